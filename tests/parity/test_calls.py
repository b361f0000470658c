"""Samples per call without --batch: the default, or what a graph's largest tensors leave room for."""

import logging
import shutil

import numpy as np
import onnx
from onnx import TensorProto, helper

from exporter.parity import calls, check_parity
from exporter.parity.inputs import BATCH


def _attention_scores_graph(path, heads=4, tokens=64, dim=8):
    """Softmax(x @ x^T) on [batch, heads, tokens, dim]: its largest tensors are the [heads, tokens,
    tokens] scores per sample, as in a real block's self-attention."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", heads, "n", dim])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", heads, "n", "n"])
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["x", "xt"], ["scores"]),
             helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
             helper.make_node("Identity", ["probs"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "attention", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 20)])
    onnx.save(model, str(path))
    return {"x": np.zeros((16, heads, tokens, dim), np.float32)}  # 16 samples: the size is per sample


def test_the_largest_tensor_is_measured_at_one_sample(tmp_path):
    feed = _attention_scores_graph(tmp_path / "a.onnx")
    assert calls.largest_tensor_bytes(tmp_path / "a.onnx", feed) == 4 * 64 * 64 * 4  # scores, float32


def test_the_default_stands_until_the_largest_tensors_would_not_fit(tmp_path, monkeypatch, caplog):
    graph = tmp_path / "a.onnx"
    feed = _attention_scores_graph(graph)
    per_sample = calls.TENSORS_PER_SAMPLE * 4 * 64 * 64 * 4
    room_for = {"plenty": 100 * per_sample / calls.MEMORY_SHARE, "three": 3 * per_sample / calls.MEMORY_SHARE,
                "none": per_sample / 10, "unknown": None}
    got = {}
    for name, available in room_for.items():
        monkeypatch.setattr(calls, "available_bytes", lambda available=available: available)
        with caplog.at_level(logging.INFO, logger="exporter.parity.calls"):
            got[name] = calls.samples_per_call(graph, calls.largest_tensor_bytes(graph, feed), 8)
    assert got == {"plenty": 8, "three": 3, "none": 1, "unknown": 8}
    assert "a.onnx: 3 sample(s) per call instead of 8: its largest tensor takes" in caplog.text


def test_exported_graphs_are_estimated_and_a_starved_check_gives_the_same_table(tiny_int8_graphs, tmp_path,
                                                                                monkeypatch):
    folder = tmp_path / "g"
    shutil.copytree(tiny_int8_graphs, folder)
    stem = {"sample": np.zeros((5, 4, 16, 16), np.float32), "timestep": np.zeros((5,), np.float32)}
    assert calls.largest_tensor_bytes(folder / "stem.onnx", stem) > 0  # inference passes our Q/DQ graphs
    assert calls.available_bytes() > 0  # /proc/meminfo on these machines

    default, _ = check_parity(folder, blocks_to_check=["down1", "mid"], end_to_end_check=False)
    sizes = []
    real = calls.samples_per_call
    monkeypatch.setattr(calls, "available_bytes", lambda: 1)  # no room: one sample per call
    monkeypatch.setattr("exporter.parity.check.samples_per_call",
                        lambda *a: sizes.append(real(*a)) or sizes[-1])
    starved, _ = check_parity(folder, blocks_to_check=["down1", "mid"], end_to_end_check=False)
    assert sizes and set(sizes) == {1} and BATCH > 1
    assert [r.graph for r in starved] == [r.graph for r in default]
    for a, b in zip(default, starved):  # the same samples, compared over all of them either way
        assert a.passed and b.passed
        for name, (sqnr, _) in a.outputs.items():  # float-level differences (batch-size kernels) at most
            assert min(sqnr, b.outputs[name][0]) > 100 or abs(b.outputs[name][0] - sqnr) < 0.5, (a.graph, name)
