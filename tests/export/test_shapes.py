"""Static reshape targets: ONNX's 0 / -1 where the symbolic dims allow, computed targets elsewhere."""

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from exporter.export.shapes import constant_target, static_reshapes


def test_constant_target_copies_equal_dims_and_infers_at_most_one():
    assert constant_target(["batch", "h*w", 48], ["batch", "h*w", 8, 6]) == [0, 0, 8, 6]  # heads split
    assert constant_target(["batch", 8, "h*w", 6], ["batch", "h*w", 48]) == [0, -1, 48]  # moved dim: inferred
    assert constant_target(["batch", "h", "w", 48], ["batch", "h*w", 48]) == [0, -1, 48]
    assert constant_target(["batch", "h*w", 48], ["batch", "h", "w", 48]) is None  # h and w both unknown
    assert constant_target(["batch", 4, 48], ["batch", 4, 8, 6]) == [0, 4, 8, 6]
    assert constant_target(["batch", 0, 3], ["batch", 0]) is None  # an empty dim: -1 is ambiguous
    assert constant_target(None, ["batch", 3]) is None


def attention_like_graph() -> onnx.ModelProto:
    """x [batch, tokens, 12] -> reshape to [batch, tokens, 3, 4] with the target computed from
    Shape(x) the way torch.onnx writes it, then y [batch, tokens, 3, 4] * sqrt(1/sqrt(4)) computed
    from the shape too."""
    def const(name, values, dtype=np.int64):
        return numpy_helper.from_array(np.array(values, dtype=dtype), name)

    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["b"], axis=0),
        helper.make_node("Unsqueeze", ["b", "axes0"], ["b1"]),
        helper.make_node("Concat", ["b1", "minus1", "three", "four"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"], name="split"),
        helper.make_node("Shape", ["y"], ["yshape"]),
        helper.make_node("Gather", ["yshape", "last"], ["d"], axis=0),
        helper.make_node("Cast", ["d"], ["df"], to=TensorProto.FLOAT),
        helper.make_node("Sqrt", ["df"], ["sd"]),
        helper.make_node("Div", ["one", "sd"], ["inv"]),
        helper.make_node("Sqrt", ["inv"], ["scale"]),
        helper.make_node("Mul", ["y", "scale"], ["out"]),
    ]
    inits = [const("zero", 0), const("axes0", [0]), const("minus1", [-1]), const("three", [3]), const("four", [4]),
             const("last", -1), const("one", 1.0, np.float32)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "tokens", 12])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "tokens", 3, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def test_a_computed_target_becomes_constant_and_the_graph_computes_the_same():
    from exporter.export.passes import simplify

    model = attention_like_graph()
    simplified = simplify(model)
    ops = [n.op_type for n in simplified.graph.node]
    assert ops == ["Reshape", "Mul"]  # the shape chains are gone, the scale is one constant
    target = numpy_helper.to_array(next(i for i in simplified.graph.initializer
                                        if i.name == simplified.graph.node[0].input[1]))
    assert target.tolist() == [0, 0, 3, 4]
    x = np.random.default_rng(0).standard_normal((5, 7, 12)).astype(np.float32)
    (expected,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    (got,) = ort.InferenceSession(simplified.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)


def test_an_unknown_op_upstream_leaves_the_target_computed_and_writes_no_file(tmp_path, monkeypatch):
    """Inference cannot see through an op it does not know; the Reshape keeps its computed target,
    and nothing is written into the working directory (ONNX Runtime's infer_shapes would leave
    sym_shape_infer_temp.onnx there)."""
    monkeypatch.chdir(tmp_path)
    model = attention_like_graph()
    for node in model.graph.node:  # x -> Opaque -> x2 feeds everything that read x
        node.input[:] = ["x2" if i == "x" else i for i in node.input]
    model.graph.node.insert(0, helper.make_node("Opaque", ["x"], ["x2"], domain="example.custom"))
    model.opset_import.append(helper.make_opsetid("example.custom", 1))
    assert static_reshapes(model) == 0
    reshape = next(n for n in model.graph.node if n.op_type == "Reshape")
    assert reshape.input[1] == "target"
    assert list(tmp_path.iterdir()) == []


def test_a_batch_that_a_broadcast_pinned_to_a_number_keeps_its_computed_target():
    """ONNX Runtime's inference with auto_merge takes x [batch, 4] + C [2, 4] to mean batch = 2;
    batch 1 broadcasts as well, so a target written from that shape ([2, 2, 2]) would refuse it."""
    nodes = [
        helper.make_node("Add", ["x", "c"], ["y"]),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["b"], axis=0),
        helper.make_node("Unsqueeze", ["b", "axes0"], ["b1"]),
        helper.make_node("Concat", ["b1", "two_two"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["z"], name="split"),
    ]
    inits = [numpy_helper.from_array(np.ones((2, 4), np.float32), "c"),
             numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array([0], np.int64), "axes0"),
             numpy_helper.from_array(np.array([2, 2], np.int64), "two_two")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    assert static_reshapes(model) == 0
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert session.run(["z"], {"x": np.ones((1, 4), np.float32)})[0].shape == (1, 2, 2)
