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


def test_graph_inputs_and_outputs_keep_their_names_and_initializers_through_simplify():
    """A constant graph output equal to another small constant is not merged away, and a short name
    never reuses a graph input's ("t0")."""
    import onnxruntime as ort

    from exporter.export.passes import simplify

    bias = numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "/bias")
    same = numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "/other")
    nodes = [helper.make_node("Identity", ["/bias"], ["const_out"]),
             helper.make_node("Relu", ["t0"], ["/relu"]), helper.make_node("Add", ["/relu", "/other"], ["/add"]),
             helper.make_node("Neg", ["/add"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("const_out", TensorProto.FLOAT, [2]),
                               helper.make_tensor_value_info("out", TensorProto.FLOAT, [2])], [bias, same])
    model = simplify(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9))
    onnx.checker.check_model(model, full_check=True)  # before: "const_out is not an output of any node"
    assert [i.name for i in model.graph.input] == ["t0"] and "t0" not in [o for n in model.graph.node for o in n.output]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    const_out, out = session.run(["const_out", "out"], {"t0": np.array([-1.0, 3.0], np.float32)})
    assert const_out.tolist() == [1.0, 2.0] and out.tolist() == [-1.0, -5.0]
