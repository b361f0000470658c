import numpy as np
import onnx
import onnxruntime as ort

from exporter.build.fallback import convert_folder
from exporter.export import read_manifest
from exporter.export.lint import lint_graph

from .conftest import random_feed


def run(path, feed, basic=False):
    options = ort.SessionOptions()
    if basic:  # FP8 graphs run at ONNX Runtime's basic level (exporter.runtime.backends.optimization_level)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feed)


def test_fp8_graphs_become_lint_clean_int8_graphs_computing_nearly_the_same(tiny_fp8_graphs, tmp_path):
    manifest = read_manifest(tiny_fp8_graphs)
    convert_folder(tiny_fp8_graphs, manifest, tmp_path / "int8")
    checked = 0
    for block in manifest["blocks"]:
        graph = block["graphs"][0]
        model = onnx.load(str(tmp_path / "int8" / graph), load_external_data=False)
        types = {i.data_type for i in model.graph.initializer}
        assert onnx.TensorProto.FLOAT8E4M3FN not in types, graph
        report = lint_graph(tmp_path / "int8" / graph, block, manifest)
        assert not report.violations, report.violations
        if not any("fp8" in formats for formats in block["quantized_layers"].values()):
            continue  # e.g. the stem: only the weight-only INT8 time-embedding layers, nothing to convert
        assert onnx.TensorProto.INT8 in types
        assert len(report.quantized) + len(report.weight_only) == len(block["quantized_layers"])
        feed = random_feed(block)
        fp8 = run(tiny_fp8_graphs / graph, feed, basic=True)
        int8 = run(tmp_path / "int8" / graph, feed)
        for a, b in zip(fp8, int8):  # two approximations of one float block: close, not equal
            sqnr = 10 * np.log10(np.mean(a.astype(np.float64) ** 2) / np.mean((a - b) ** 2))
            assert 20 < sqnr < 80, (graph, sqnr)
        checked += 1
    assert checked >= 3


def test_fp16_graphs_keep_their_scale_type_through_the_fallback(tiny_unet_dir, tiny_unet_calib, tmp_path):
    # graphs for TensorRT are fp16 or bf16: a float32 scale beside an fp16 input is an invalid
    # QuantizeLinear (NumPy 2 promoted fp16 x float32 scalar to float32 here once)
    from exporter.export import export_graphs
    from exporter.recipe import QuantizationSpec

    spec = QuantizationSpec(weights="fp8", activations="fp8", weight_observer="max", act_observer="max", groups=1)
    export_graphs(str(tiny_unet_dir), tmp_path / "fp8", calib=tiny_unet_calib, quantization=spec, dtype="fp16",
                  progress=False)
    manifest = read_manifest(tmp_path / "fp8")
    convert_folder(tmp_path / "fp8", manifest, tmp_path / "int8")
    for block in manifest["blocks"]:
        path = tmp_path / "int8" / block["graphs"][0]
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path), load_external_data=False)
        inits = {i.name: i for i in model.graph.initializer}
        scales = [inits[n.input[1]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
        assert all(s.data_type == onnx.TensorProto.FLOAT16 for s in scales), block["name"]
    feed = random_feed(next(b for b in manifest["blocks"] if b["name"] == "mid"))
    assert all(np.isfinite(out).all() for out in run(tmp_path / "int8" / "mid.onnx", feed))
