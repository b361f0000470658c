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
