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
