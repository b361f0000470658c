"""Float convolution weights for ONNX Runtime's CPU provider: the session's copy has each quantized
convolution's weight folded to float once, bit for bit what DequantizeLinear gives, and computes
what the file does; graphs over the memory budget and the files stay untouched."""

import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from exporter.errors import UsageError
from exporter.export.manifest import read_manifest
from exporter.runtime.backends import OnnxRuntimeBackend
from exporter.runtime.ort_conv import ENV, float_conv_weights_budget, fold_conv_weights
from exporter.runtime.ort_integer import attribute

from .test_ort_fusion import feeds_for
from .test_ort_integer import optimized_ops


def quantized_conv_weights(model: onnx.ModelProto) -> set[str]:
    """The int8 initializers that reach a Conv's weight input through a DequantizeLinear."""
    producer = {o: n for n in model.graph.node for o in n.output}
    int8 = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8}
    dqs = [producer.get(n.input[1]) for n in model.graph.node if n.op_type == "Conv"]
    return {dq.input[0] for dq in dqs if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in int8}


def test_quantized_convolutions_run_on_folded_float_weights(tiny_int8_graphs, tmp_path):
    manifest = read_manifest(tiny_int8_graphs)
    before = {f: hashlib.sha256((tiny_int8_graphs / f).read_bytes()).hexdigest() for f in manifest["files"]}
    backend = OnnxRuntimeBackend(tiny_int8_graphs, manifest)
    for block in manifest["blocks"]:
        for graph in block["graphs"]:
            as_written = onnx.load(str(tiny_int8_graphs / graph), load_external_data=False)
            feeds, names = feeds_for(block), [o["name"] for o in block["outputs"]]
            ours = backend.run(graph, feeds, names)
            assert backend.folded_conv_weights[graph] == len(quantized_conv_weights(as_written)), graph
            plain = ort.InferenceSession(str(tiny_int8_graphs / graph), providers=["CPUExecutionProvider"]).run(names, feeds)
            for a, b in zip(ours, plain):  # the same products, summed in another order
                assert np.abs(a - b).max() <= 1e-4 * max(1.0, float(np.abs(b).max())), graph
            if backend.folded_conv_weights[graph]:  # ONNX Runtime folds them: no dequantization per call
                copy = onnx.load(str(tiny_int8_graphs / graph), load_external_data=False)
                assert fold_conv_weights(copy, tiny_int8_graphs) == backend.folded_conv_weights[graph]
                assert not quantized_conv_weights(copy), graph
                kept = optimized_ops(copy, tiny_int8_graphs, {}, tmp_path / "a.onnx")
                written = optimized_ops(as_written, tiny_int8_graphs, {}, tmp_path / "b.onnx")
                assert kept.count("DequantizeLinear") <= written.count("DequantizeLinear") - backend.folded_conv_weights[graph]
                for op in ("Cast", "Unsqueeze", "Mul"):  # folded: none of the rewrite's ops is left
                    assert kept.count(op) <= written.count(op), (graph, op)
    assert sum(backend.folded_conv_weights.values()) > 0
    assert before == {f: hashlib.sha256((tiny_int8_graphs / f).read_bytes()).hexdigest() for f in manifest["files"]}


def test_the_folded_weights_are_what_dequantize_linear_computes(tiny_int8_graphs):
    graph = next(f for f in sorted(tiny_int8_graphs.glob("*.onnx"))
                 if quantized_conv_weights(onnx.load(str(f), load_external_data=False)))
    model = onnx.load(str(graph), load_external_data=False)
    initializers = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    for conv in [n for n in model.graph.node if n.op_type == "Conv"]:
        dq = producer[conv.input[1]]
        weight, scale = (numpy_helper.to_array(initializers[i], base_dir=str(tiny_int8_graphs)) for i in dq.input[:2])
        x = np.zeros([1, weight.shape[1] * attribute(conv, "group", 1), *[8] * (weight.ndim - 2)], np.float32)
        mini = helper.make_graph(
            [helper.make_node("DequantizeLinear", ["w", "s"], ["weight"], axis=attribute(dq, "axis", 1)),
             helper.make_node("Conv", ["x", "weight"], ["y"], pads=attribute(conv, "pads", None) or [0] * 4)],
            "dq", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x.shape)],
            [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in ("weight", "y")],
            [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(scale, "s")])
        mini = helper.make_model(mini, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
        expected = run_weight(mini, x, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)  # DequantizeLinear itself
        assert fold_conv_weights(mini, tiny_int8_graphs) == 1
        assert [n.op_type for n in mini.graph.node][-2:] == ["Mul", "Conv"]
        folded = run_weight(mini, x, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)  # folded into a constant
        assert np.array_equal(folded.view(np.int32), expected.view(np.int32)), conv.name


def run_weight(model: onnx.ModelProto, x: np.ndarray, level) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(
        ["weight"], {"x": x})[0]


def test_graphs_over_the_budget_and_unquantized_graphs_are_left_as_written(tiny_int8_graphs, tiny_unet_dir,
                                                                            monkeypatch, tmp_path):
    from exporter.export import export_graphs

    graph = next(f for f in sorted(tiny_int8_graphs.glob("*.onnx"))
                 if quantized_conv_weights(onnx.load(str(f), load_external_data=False)))
    model = onnx.load(str(graph), load_external_data=False)
    before = model.SerializeToString()
    assert fold_conv_weights(model, tiny_int8_graphs, budget=1024) == 0
    assert model.SerializeToString() == before
    monkeypatch.setenv(ENV, "0")
    manifest = read_manifest(tiny_int8_graphs)
    backend = OnnxRuntimeBackend(tiny_int8_graphs, manifest)
    backend.session(graph.name)
    assert backend.folded_conv_weights[graph.name] == 0 and "conv" not in backend.rewrites(graph.name)
    monkeypatch.setenv(ENV, "1.5")
    assert float_conv_weights_budget() == 3 << 19
    for bad in ("lots", "-1", "inf", "nan"):
        monkeypatch.setenv(ENV, bad)
        with pytest.raises(UsageError, match=ENV):
            float_conv_weights_budget()
    monkeypatch.delenv(ENV)
    out = tmp_path / "fp32"
    export_graphs(str(tiny_unet_dir), out, progress=False)
    manifest = read_manifest(out)
    backend = OnnxRuntimeBackend(out, manifest)
    for block in manifest["blocks"]:
        backend.session(block["graphs"][0])
    assert set(backend.folded_conv_weights.values()) == {0}


def test_weights_of_unnamed_nodes_fold_into_uniquely_named_nodes(tmp_path):
    # nodes of graphs from other tools may have no name: two folded weights were both "/folded",
    # which ONNX Runtime refuses ("two nodes with same node name")
    rng = np.random.default_rng(0)
    weight = rng.integers(-127, 128, (4, 2, 3, 3)).astype(np.int8)
    nodes, inits = [], [numpy_helper.from_array(weight, "w")]
    for i in range(2):
        inits.append(numpy_helper.from_array(rng.uniform(0.01, 0.02, 4).astype(np.float32), f"s{i}"))
        nodes += [helper.make_node("DequantizeLinear", ["w", f"s{i}"], [f"weight{i}"], axis=0),
                  helper.make_node("Conv", ["x", f"weight{i}"], [f"y{i}"], pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 5, 5])],
                              [helper.make_tensor_value_info(f"y{i}", onnx.TensorProto.FLOAT, None) for i in range(2)],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    x = rng.standard_normal((1, 2, 5, 5)).astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert fold_conv_weights(model, tmp_path) == 2
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for a, b in zip(expected, got):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
