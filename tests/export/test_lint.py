"""Lint: the per-block quantized/float report and each TensorRT rule actually firing."""

import json

import onnx
import pytest
from onnx import numpy_helper

from exporter.export import export_graphs
from exporter.export.lint import lint_folder
from exporter.export.manifest import sha256_file
from exporter.recipe import QuantizationSpec


@pytest.fixture
def int8_graphs(tiny_unet_dir, tiny_unet_calib, tmp_path):
    folder = tmp_path / "g"
    export_graphs(str(tiny_unet_dir), folder, calib=tiny_unet_calib,
                  quantization=QuantizationSpec(groups=1, split_shortcut=True), progress=False)
    return folder


def test_every_quantized_layer_is_counted_and_every_float_one_has_its_reason(int8_graphs, run_cli):
    manifest = json.loads((int8_graphs / "manifest.json").read_text())
    reports = {r.block: r for r in lint_folder(int8_graphs)}
    for block in manifest["blocks"]:
        report = reports[block["name"]]
        assert not report.violations
        assert sorted(report.quantized + report.weight_only) == sorted(block["quantized_layers"])
        assert all(block["quantized_layers"][layer][1] is None for layer in report.weight_only)
    reasons = {layer: reason for r in reports.values() for layer, reason in r.float_layers.items()}
    weight_only = {layer for r in reports.values() for layer in r.weight_only}
    assert reasons["conv_in"].startswith("first layer") and "time_embedding.linear_1" not in reasons
    assert {"time_embedding.linear_1", "down_blocks.0.resnets.0.time_emb_proj"} <= weight_only  # adapter default
    assert reports["down0.layer0"].attention_matmuls == 4  # QK^T and attention x V, self and cross
    result = run_cli("lint", int8_graphs)
    assert result.returncode == 0 and "no rule violations" in result.stdout
    assert "weight-only layers (quantized weights, float input and compute), and why:" in result.stdout
    assert "  time_embedding.linear_1: time embedding: input depends on t only" in result.stdout


def edit_graph(folder, name, edit):
    path = folder / name
    model = onnx.load(str(path), load_external_data=False)
    edit(model.graph)
    onnx.save(model, str(path))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = sha256_file(path)  # a deliberate edit, re-signed: lint must still catch it
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_nonzero_zero_point_and_one_sided_quantization_are_violations(int8_graphs, run_cli):
    def nonzero_zero_point(graph):
        init = next(i for i in graph.initializer if "onnx_zero_point" in i.name)
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + 3, init.name))

    def drop_activation_qdq(graph):
        conv = next(n for n in graph.node if n.op_type == "Conv" and "conv1" in n.name)
        dq = next(n for n in graph.node if n.output[0] == conv.input[0])
        q = next(n for n in graph.node if n.output[0] == dq.input[0])
        conv.input[0] = q.input[0]
        graph.node.remove(dq)
        graph.node.remove(q)

    edit_graph(int8_graphs, "mid.onnx", nonzero_zero_point)
    edit_graph(int8_graphs, "down1.onnx", drop_activation_qdq)
    result = run_cli("lint", int8_graphs)
    assert result.returncode == 1
    assert "VIOLATION mid.onnx: zero-point" in result.stdout
    assert "VIOLATION down1.onnx: one-sided: down_blocks.1.resnets.0.conv1" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("model", ["digits-unet", "digits-dit"])
def test_every_bundled_recipe_exports_graphs_tensorrt_accepts(model, tmp_path):
    """What `exporter build` receives for the reference models follows TensorRT's Q/DQ rules: every
    bundled format but W4A4 (whose INT4 activations lint reports), and the FP16 variant TensorRT
    builds from. (A short calibration: the structure of the graphs does not depend on how long one
    calibrates.)"""
    from exporter.calibrate import calibrate
    from exporter.recipe import FORMATS, CalibrationSpec, bundled_recipe_path, load_recipe

    calib = tmp_path / "calib"
    calibrate(model, calib, CalibrationSpec(trajectories=2, steps=3, batch_trajectories=2), progress=False)
    variants = [(fmt, "fp32") for fmt in FORMATS[1:]] + [("int8", "fp16")]
    for fmt, dtype in variants:
        spec = load_recipe(bundled_recipe_path(fmt, model)).quantization
        folder = tmp_path / f"{fmt}-{dtype}"
        manifest = export_graphs(model, folder, calib=calib, quantization=spec, dtype=dtype, progress=False)
        reports = lint_folder(folder)
        violations = [v for r in reports for v in r.violations]
        if fmt == "w4a4":  # 4-bit activations: ONNX Runtime only, and lint says so for every graph
            assert len(violations) == sum(1 for r in reports if r.quantized), violations
            assert all(v.startswith("int4-activation: ") for v in violations), violations
        else:
            assert not violations, (fmt, dtype)
        quantized = {layer for b in manifest["blocks"] for layer in b["quantized_layers"]}
        counted = {layer for r in reports for layer in (*r.quantized, *r.weight_only)}
        assert counted == quantized, (fmt, dtype)  # every quantized layer recognised as such in its graph
