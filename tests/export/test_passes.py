"""Graph passes on external initializers: read from the trace's scratch folder, wherever the process runs."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exporter.export.passes import INT4_OPSET, WeightFile, finalize
from exporter.quant.onnx_ops import INT4_MARK


def int4_graph(values: np.ndarray) -> onnx.ModelProto:
    """A weight-only INT4 MatMul as the trace leaves it: the INT4 weight as an int8 stand-in."""
    weight = numpy_helper.from_array(values.astype(np.int8), f"w{INT4_MARK}")
    scale = numpy_helper.from_array(np.full((1, values.shape[1]), 0.5, np.float32), "scale")
    nodes = [helper.make_node("DequantizeLinear", [weight.name, scale.name], ["w"], axis=0, block_size=values.shape[0]),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, values.shape[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, values.shape[1]])],
                              [weight, scale])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", INT4_OPSET)], ir_version=10)


def test_external_int4_weights_are_read_from_the_scratch_folder_not_the_working_directory(tmp_path, monkeypatch):
    values = np.arange(256).reshape(16, 16) % 16 - 8  # 128 bytes as INT4: big enough to stay external
    scratch, elsewhere = tmp_path / "scratch", tmp_path / "elsewhere"
    scratch.mkdir()
    elsewhere.mkdir()
    model = int4_graph(values)
    WeightFile(scratch / "traced.weights").externalize(model, scratch)  # as the trace does
    monkeypatch.chdir(elsewhere)  # no traced.weights here: a second, relative read would fail
    final = finalize(model, WeightFile(tmp_path / "block.weights"), base_dir=scratch)
    weight = next(i for i in final.graph.initializer if INT4_MARK in i.name)
    assert weight.data_type == TensorProto.INT4 and weight.data_location == TensorProto.EXTERNAL
    assert final.ir_version == 10 and final.opset_import[0].version == INT4_OPSET
    np.testing.assert_array_equal(numpy_helper.to_array(weight, str(tmp_path)).astype(np.int8), values)
