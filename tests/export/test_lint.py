"""Lint: the per-block quantized/float report and each TensorRT rule actually firing."""

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from exporter.export import export_graphs
from exporter.export.lint import lint_folder, named_violations
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
    named = named_violations(lint_folder(int8_graphs))  # what `exporter pipeline` writes to summary.json
    assert {tuple(v.split(": ")[:2]) for v in named} == {("down1.onnx", "one-sided"), ("mid.onnx", "zero-point")}, named


def test_bad_scales_and_a_declared_layer_left_in_float_are_violations(int8_graphs, run_cli):
    def zero_activation_scale(graph):
        init = next(i for i in graph.initializer if "onnx_act_scale" in i.name)
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 0, init.name))

    def negative_weight_scale(graph):  # in the graph or in its external weight file
        init = next(i for i in graph.initializer if i.name.endswith("conv1.weight_scale"))
        values = numpy_helper.to_array(init, base_dir=str(int8_graphs)).copy()
        values[0] = -values[0]
        init.CopyFrom(numpy_helper.from_array(values, init.name))  # stored in the graph from now on

    def conv2_in_float(graph):  # its Q/DQ pairs lost, a float weight in their place
        conv = next(n for n in graph.node if n.op_type == "Conv" and "conv2" in n.name)
        act_dq = next(n for n in graph.node if n.output[0] == conv.input[0])
        act_q = next(n for n in graph.node if n.output[0] == act_dq.input[0])
        w_dq = next(n for n in graph.node if n.output[0] == conv.input[1])
        weight = next(i for i in graph.initializer if i.name == w_dq.input[0])
        graph.initializer.append(numpy_helper.from_array(np.zeros(weight.dims, np.float32), "conv2_float_weight"))
        conv.input[0], conv.input[1] = act_q.input[0], "conv2_float_weight"
        for node in (act_dq, act_q, w_dq):
            graph.node.remove(node)

    edit_graph(int8_graphs, "mid.onnx", zero_activation_scale)
    edit_graph(int8_graphs, "down1.onnx", negative_weight_scale)
    edit_graph(int8_graphs, "down0.layer0.onnx", conv2_in_float)
    result = run_cli("lint", int8_graphs)
    assert result.returncode == 1, result.stdout
    assert "VIOLATION mid.onnx: scale: " in result.stdout and "has zero or negative scale(s)" in result.stdout
    assert "VIOLATION down1.onnx: scale: " in result.stdout
    assert ("VIOLATION down0.layer0.onnx: float: down_blocks.0.resnets.0.conv2 (/layers.0/resnet/conv2/Conv) is "
            "quantized in the manifest but has no Q/DQ") in result.stdout
    named = named_violations(lint_folder(int8_graphs))
    assert sorted(tuple(v.split(": ")[:2]) for v in named) == [
        ("down0.layer0.onnx", "float"), ("down1.onnx", "scale"), ("mid.onnx", "scale")], named


def int4_dq(graph):
    return next(n for n in graph.node if n.op_type == "DequantizeLinear" and any(a.name == "block_size"
                                                                                for a in n.attribute))


def set_attr(node, name, value):
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend([*kept, onnx.helper.make_attribute(name, value)])


def transpose_between(graph):
    dq = int4_dq(graph)
    matmul = next(n for n in graph.node if dq.output[0] in n.input)
    graph.node.append(onnx.helper.make_node("Transpose", [dq.output[0]], ["wt"], perm=[1, 0]))
    matmul.input[1] = "wt"


def conv_weight_blocked(graph):
    weight_dqs = {n.output[0]: n for n in graph.node if n.op_type == "DequantizeLinear"}
    conv = next(n for n in graph.node if n.op_type == "Conv" and n.input[1] in weight_dqs)
    set_attr(weight_dqs[conv.input[1]], "block_size", 64)


FF = "/layers.0/mid/attentions.0/transformer_blocks.0/ff/net.2/DequantizeLinear"


@pytest.mark.parametrize("edit, violation", [
    (None, None),
    (transpose_between, f"int4-layout: {FF} reaches"),
    (lambda g: set_attr(int4_dq(g), "block_size", 32), f"int4-block: {FF} has blocks of 32; TensorRT supports 64 and 128"),
    (lambda g: set_attr(int4_dq(g), "block_size", 128), f"int4-block: {FF}'s 64 input features are not whole blocks of 128"),
    (conv_weight_blocked, ("int4-layer: /layers.0/mid/resnets.0/conv1/DequantizeLinear feeds a Conv; TensorRT runs "
     "INT4 weights only in GEMMs")),
])
def test_int4_weights_only_where_tensorrt_runs_them(tiny_unet_dir, tmp_path, run_cli, edit, violation):
    folder = tmp_path / "w4a16"  # INT4 on the one Linear layer with 64 input features, INT8 elsewhere
    export_graphs(str(tiny_unet_dir), folder, quantization=QuantizationSpec(weights="int4", activations=None,
                                                                            block_size=64), progress=False)
    graph = onnx.load(str(folder / "mid.onnx"), load_external_data=False).graph
    dq = int4_dq(graph)
    assert dq.name == FF and next(n for n in graph.node if dq.output[0] in n.input).op_type == "MatMul"  # directly
    init = next(i for i in graph.initializer if i.name == dq.input[0])
    assert init.data_type == onnx.TensorProto.INT4 and list(init.dims) == [64, 16]  # [in, out]
    assert {a.name: a.i for a in dq.attribute} == {"axis": 0, "block_size": 64}
    if edit is not None:
        edit_graph(folder, "mid.onnx", edit)
    result = run_cli("lint", folder)
    if violation is None:
        assert result.returncode == 0 and "no rule violations" in result.stdout, result.stdout
    else:
        assert result.returncode == 1 and f"VIOLATION mid.onnx: {violation}" in result.stdout, result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("model", ["digits-unet", "digits-dit"])
def test_every_bundled_recipe_exports_graphs_tensorrt_accepts(model, tmp_path):
    """What `exporter build` receives for the reference models follows TensorRT's Q/DQ rules: every
    bundled format but W4A4 (whose INT4 activations lint reports), and the FP16 variant TensorRT
    builds from. (A short calibration: the structure of the graphs does not depend on how long one
    calibrates.)"""
    from exporter.calibrate import calibrate
    from exporter.recipe import FORMATS, UNQUANTIZED_FORMATS, CalibrationSpec, bundled_recipe_path, load_recipe

    calib = tmp_path / "calib"
    calibrate(model, calib, CalibrationSpec(trajectories=2, steps=3, batch_trajectories=2), progress=False)
    variants = [(fmt, "fp32") for fmt in FORMATS if fmt not in UNQUANTIZED_FORMATS] + [("int8", "fp16")]
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


def lint_small(tmp_path, nodes, inits, quantized, inputs=None):
    """lint_graph on a one-layer graph: x [1, 4] (or ``inputs``) -> ... -> y, layer scope "lin"."""
    from onnx import TensorProto, helper

    from exporter.export.lint import lint_graph

    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10), str(path))
    return lint_graph(path, {"name": "b", "quantized_layers": quantized, "modules": {}}, {"quantization": {}})


def test_qdq_that_tensorrt_cannot_take_at_build_time_is_a_violation(tmp_path):
    """Each of these passed lint before: a run-time scale, a non-zero zero point in a Constant node,
    a DequantizeLinear of a tensor no QuantizeLinear made, INT4 activations by output_dtype, and
    weight-only Q/DQ on a layer the manifest does not declare weight-only."""
    from onnx import TensorProto, helper

    s, zp = numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "zp")
    w, ws = numpy_helper.from_array(np.ones((4, 3), np.int8), "W"), numpy_helper.from_array(np.full(3, .1, np.float32), "ws")
    weight = [helper.make_node("DequantizeLinear", ["W", "ws"], ["Wd"], name="/lin/wdq", axis=1),
              helper.make_node("MatMul", ["xd", "Wd"], ["y"], name="/lin/MatMul")]

    def activation(scale="s", zero="zp", **attrs):
        return [helper.make_node("QuantizeLinear", ["x", scale, zero] if zero else ["x", scale], ["xq"], name="/lin/q",
                                 **attrs),
                helper.make_node("DequantizeLinear", ["xq", scale, zero] if zero else ["xq", scale], ["xd"],
                                 name="/lin/dq")]

    int8 = {"lin": ["int8", "int8"]}
    report = lint_small(tmp_path, activation("sx") + weight, [zp, w, ws], int8,
                        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
                                helper.make_tensor_value_info("sx", TensorProto.FLOAT, [])])
    assert report.violations == [("scale: /lin/q has run-time (not constant) scale(s); TensorRT needs every scale a "
                                 "build-time constant, finite and > 0")]
    five = helper.make_node("Constant", [], ["five"], value=numpy_helper.from_array(np.array(5, np.int8)))
    report = lint_small(tmp_path, [five, *activation(zero="five"), *weight], [s, w, ws], int8)
    assert report.violations == ["zero-point: /lin/q has a non-zero zero point",
                                 "zero-point: /lin/dq has a non-zero zero point"]
    cast = [helper.make_node("Cast", ["x"], ["xi"], to=TensorProto.INT8, name="/lin/cast"),
            helper.make_node("DequantizeLinear", ["xi", "s", "zp"], ["xd"], name="/lin/dq")]
    report = lint_small(tmp_path, cast + weight, [s, zp, w, ws], int8)
    assert report.violations == [("dangling: /lin/dq dequantizes xi, which is neither a constant nor a "
                                 "QuantizeLinear's output")]
    report = lint_small(tmp_path, activation(zero=None, output_dtype=TensorProto.INT4) + weight, [s, w, ws],
                        {"lin": ["int8", "int4"]})
    assert [v.split(":")[0] for v in report.violations] == ["int4-activation"]
    weight_only = [helper.make_node("DequantizeLinear", ["W", "ws"], ["Wd"], name="/lin/wdq", axis=1),
                   helper.make_node("MatMul", ["x", "Wd"], ["y"], name="/lin/MatMul")]
    assert lint_small(tmp_path, weight_only, [w, ws], {"lin": ["int8", None]}).weight_only == ["lin"]
    report = lint_small(tmp_path, weight_only, [w, ws], {})
    assert report.violations == ["one-sided: lin (/lin/MatMul) has Q/DQ on its weight only; TensorRT runs it in float"]


def test_attention_qdq_counts_as_attention_and_weight_axes_follow_the_layout(tmp_path):
    from onnx import TensorProto, helper

    s, zp = numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8), "zp")
    both = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["aq"], name="/attn/q1"),
            helper.make_node("DequantizeLinear", ["aq", "s", "zp"], ["ad"], name="/attn/dq1"),
            helper.make_node("Transpose", ["x"], ["xt"], name="/attn/T"),
            helper.make_node("QuantizeLinear", ["xt", "s", "zp"], ["bq"], name="/attn/q2"),
            helper.make_node("DequantizeLinear", ["bq", "s", "zp"], ["bd"], name="/attn/dq2"),
            helper.make_node("MatMul", ["ad", "bd"], ["y"], name="/attn/MatMul")]
    report = lint_small(tmp_path, both, [s, zp], {})
    assert (report.attention_matmuls, report.quantized, report.violations) == (1, [], [])  # not a "layer"

    act = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="/lin/q"),
           helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"], name="/lin/dq")]
    w, ws = numpy_helper.from_array(np.ones((3, 4), np.int8), "W"), numpy_helper.from_array(np.full(3, .1, np.float32), "ws")
    shape = numpy_helper.from_array(np.array([4, 3], np.int64), "shape")
    transposed = [helper.make_node("DequantizeLinear", ["W", "ws"], ["Wd"], name="/lin/wdq", axis=0),  # [out, in]
                  helper.make_node("Transpose", ["Wd"], ["Wt"], name="/lin/T", perm=[1, 0]),
                  helper.make_node("Reshape", ["Wt", "shape"], ["Wr"], name="/lin/R"),
                  helper.make_node("MatMul", ["xd", "Wr"], ["y"], name="/lin/MatMul")]
    report = lint_small(tmp_path, act + transposed, [s, zp, w, ws, shape], {"lin": ["int8", "int8"]})
    assert (report.quantized, report.violations) == (["lin"], [])  # the Transpose two nodes up counts

    wc = numpy_helper.from_array(np.ones((4, 2, 3, 3), np.int8), "Wc")  # ConvTranspose: [in, out, kh, kw]
    for axis, scale in ((0, np.full(4, .1, np.float32)), (1, np.full(2, .1, np.float32))):
        conv_t = [helper.make_node("DequantizeLinear", ["Wc", "wcs"], ["Wd"], name="/up/wdq", axis=axis),
                  helper.make_node("ConvTranspose", ["xd", "Wd"], ["y"], name="/up/ConvTranspose")]
        report = lint_small(tmp_path, act + conv_t, [s, zp, wc, numpy_helper.from_array(scale, "wcs")],
                            {"up": ["int8", "int8"]},
                            inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5])])
        assert report.quantized == ["up"]
        assert report.violations == ([] if axis == 1 else
                                     ["weight-axis: /up/wdq scales axis 0, not the output-channel axis 1"])


def test_constants_count_as_constants_in_every_form_onnx_writes_them(tmp_path):
    """A scale written as a Constant's ``value_float`` (before: reported as a run-time scale) and a
    weight from a Constant behind a Transpose (a layer in float, not an attention MatMul)."""
    from onnx import TensorProto, helper

    zp = numpy_helper.from_array(np.array(0, np.int8), "zp")
    w, ws = numpy_helper.from_array(np.ones((4, 3), np.int8), "W"), numpy_helper.from_array(np.full(3, .1, np.float32), "ws")
    nodes = [helper.make_node("Constant", [], ["s"], value_float=0.1),
             helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="/lin/q"),
             helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"], name="/lin/dq"),
             helper.make_node("DequantizeLinear", ["W", "ws"], ["Wd"], name="/lin/wdq", axis=1),
             helper.make_node("MatMul", ["xd", "Wd"], ["y"], name="/lin/MatMul")]
    report = lint_small(tmp_path, nodes, [zp, w, ws], {"lin": ["int8", "int8"]})
    assert (report.quantized, report.violations) == (["lin"], [])
    negative = [helper.make_node("Constant", [], ["s"], value_float=-0.1), *nodes[1:]]
    assert lint_small(tmp_path, negative, [zp, w, ws], {"lin": ["int8", "int8"]}).violations == [
        "scale: /lin/q has zero or negative scale(s); TensorRT needs every scale a build-time constant, finite and > 0"]
    float_weight = [helper.make_node("Constant", [], ["Wc"], value_floats=[1.0] * 12),
                    helper.make_node("Reshape", ["Wc", "shape"], ["Wr"], name="/lin/R"),
                    helper.make_node("Transpose", ["Wr"], ["Wt"], name="/lin/T", perm=[1, 0]),
                    helper.make_node("MatMul", ["x", "Wt"], ["y"], name="/lin/MatMul")]
    shape = numpy_helper.from_array(np.array([3, 4], np.int64), "shape")
    report = lint_small(tmp_path, float_weight, [shape], {},
                        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])])
    assert (report.attention_matmuls, list(report.float_layers), report.violations) == (0, ["lin"], [])
