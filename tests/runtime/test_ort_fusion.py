"""Attention fusion for ONNX Runtime: same outputs, the exported files untouched."""

import hashlib
from unittest import mock

import numpy as np
import onnx
import pytest

from exporter.export import export_graphs
from exporter.export.manifest import read_manifest
from exporter.runtime.backends import OnnxRuntimeBackend
from exporter.runtime.ort_fusion import fuse_attention


@pytest.fixture(scope="module", params=["unet", "dit", "unet-computed-shapes"])
def graphs(request, tiny_unet_dir, tiny_dit_dir, tmp_path_factory):
    """Exported graphs; ``unet-computed-shapes`` as exports before the static-reshape pass wrote
    them (reshape targets and the attention scale computed from Shape), which must still fuse."""
    model = tiny_dit_dir if request.param == "dit" else tiny_unet_dir
    out = tmp_path_factory.mktemp("fusion") / request.param
    if request.param.endswith("computed-shapes"):
        with mock.patch("exporter.export.passes.static_reshapes", return_value=0):
            export_graphs(str(model), out, progress=False)
        assert any(n.op_type == "Sqrt" for f in out.glob("*.onnx")
                   for n in onnx.load(str(f), load_external_data=False).graph.node)
    else:
        export_graphs(str(model), out, progress=False)
    return out


def feeds_for(block: dict, batch: int = 3) -> dict:
    rng = np.random.default_rng(0)
    feeds = {}
    for i in block["inputs"]:
        shape = [batch, *i["trace_shape"][1:]]
        feeds[i["name"]] = (rng.standard_normal(shape).astype(i["dtype"]) if i["dtype"].startswith("float")
                            else rng.integers(0, 3, shape).astype(i["dtype"]))
    return feeds


def test_fused_sessions_match_the_graphs_as_written(graphs):
    import onnxruntime as ort

    manifest = read_manifest(graphs)
    backend = OnnxRuntimeBackend(graphs, manifest)
    before = {f: hashlib.sha256((graphs / f).read_bytes()).hexdigest() for f in manifest["files"]}
    fused_total = 0
    for block in manifest["blocks"]:
        graph = block["graphs"][0]
        feeds, names = feeds_for(block), [o["name"] for o in block["outputs"]]
        fused = backend.run(graph, feeds, names)
        plain = ort.InferenceSession(str(graphs / graph), providers=["CPUExecutionProvider"]).run(names, feeds)
        for a, b in zip(fused, plain):
            assert np.abs(a - b).max() <= 1e-5 * max(1.0, float(np.abs(b).max())), graph
        fused_total += backend.fused_attention[graph]
    attentions = sum(n.op_type == "Softmax" for block in manifest["blocks"]
                     for n in onnx.load(str(graphs / block["graphs"][0]), load_external_data=False).graph.node)
    assert attentions > 0 and fused_total == attentions  # every attention of both architectures
    assert before == {f: hashlib.sha256((graphs / f).read_bytes()).hexdigest() for f in manifest["files"]}


def test_attention_with_something_between_matmul_and_softmax_is_left_alone(graphs):
    """A mask (or a Q/DQ pair) between the score MatMul and the Softmax is not the pattern."""
    manifest = read_manifest(graphs)
    for block in manifest["blocks"]:
        model = onnx.load(str(graphs / block["graphs"][0]), load_external_data=False)
        softmaxes = [n for n in model.graph.node if n.op_type == "Softmax"]
        if not softmaxes:
            continue
        for sm in softmaxes:  # put an Identity in front of every Softmax
            sm_input = sm.input[0]
            sm.input[0] = sm_input + "_masked"
            model.graph.node.append(onnx.helper.make_node("Identity", [sm_input], [sm_input + "_masked"]))
        assert fuse_attention(model) == 0
        return
    pytest.fail("no graph with attention")


@pytest.mark.parametrize("graphs", ["unet-computed-shapes"], indirect=True)  # the others fold the scale
def test_a_computed_scale_is_the_default_only_when_it_comes_from_the_querys_last_dimension(graphs):
    # 1/sqrt(D) computed from another tensor's shape is not SDPA's default scale: the fused kernel
    # (which applies 1/sqrt(D) itself) would compute something else
    manifest = read_manifest(graphs)
    for block in manifest["blocks"]:
        model = onnx.load(str(graphs / block["graphs"][0]), load_external_data=False)
        queries = {n.output[0] for n in model.graph.node if n.op_type == "Transpose"}
        shapes = [n for n in model.graph.node if n.op_type == "Shape" and n.input[0] in queries]
        if not shapes or not any(n.op_type == "Softmax" for n in model.graph.node):
            continue
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        assert fuse_attention(copy) > 0
        for shape in shapes:
            shape.input[0] = model.graph.input[0].name  # the block's input: another tensor's last dimension
        assert fuse_attention(model) == 0
        return
    pytest.fail("no attention with a computed scale")


def attention(out_target, opset=17, softmax_axis=-1):
    """diffusers' attention as the exporter writes it: heads split, both sides scaled by D^-1/4,
    Softmax, heads merged by a Reshape to ``out_target``."""
    from onnx import TensorProto, helper, numpy_helper

    heads, dim = 4, 8
    inits = []

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    split, scale = const("split", np.array([0, 0, heads, dim])), const("scale", np.array(dim ** -0.25, np.float32))
    axis = {"axis": softmax_axis} if softmax_axis is not None else {}
    nodes = [helper.make_node("Reshape", [x, split], [f"{x}4"]) for x in "qkv"] + [
        helper.make_node("Transpose", ["q4"], ["qt"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["v4"], ["vt"], perm=[0, 2, 1, 3]),
        helper.make_node("Mul", ["qt", scale], ["qs"]), helper.make_node("Mul", ["kt", scale], ["ks"]),
        helper.make_node("MatMul", ["qs", "ks"], ["scores"]), helper.make_node("Softmax", ["scores"], ["p"], **axis),
        helper.make_node("MatMul", ["p", "vt"], ["o4"]), helper.make_node("Transpose", ["o4"], ["ot"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ot", const("merge", np.array(out_target))], ["out"])]
    inputs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [2, 6, heads * dim]) for x in "qkv"]
    graph = helper.make_graph(nodes, "a", inputs, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              inits)
    return onnx.helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


@pytest.mark.parametrize(("target", "opset", "axis", "fused"), [([0, 0, 32], 17, -1, 1), ([-1, 32], 17, -1, 0),
                                                                 ([0, 0, 32], 12, None, 0), ([0, 0, 32], 12, -1, 1)])
def test_only_attention_the_fused_kernel_computes_is_fused(target, opset, axis, fused):
    # MultiHeadAttention gives [B, S, heads * D] and a softmax over the keys: a merge to another
    # shape, or Softmax's default axis before opset 13 (1, over heads), stays as written
    import onnxruntime as ort

    model = attention(target, opset, axis)
    feeds = {x: np.random.default_rng(i).standard_normal((2, 6, 32)).astype(np.float32) for i, x in enumerate("qkv")}
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert fuse_attention(model) == fused
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-5
