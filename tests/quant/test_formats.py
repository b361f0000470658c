"""Fake quantization equals ONNX Runtime's QuantizeLinear/DequantizeLinear bit for bit."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from exporter.quant.formats import FORMATS, block_amax, fake_quant, quantize, scale_from_amax


def run_qdq(x: np.ndarray, scale: np.ndarray, qtype: int, axis: int | None, opset: int) -> np.ndarray:
    zero = numpy_helper.from_array(np.zeros(scale.shape, np.int8), "zp") if qtype == TensorProto.INT8 else \
        helper.make_tensor("zp", qtype, scale.shape, np.zeros(scale.size).tolist())
    attrs = {} if axis is None else {"axis": axis}
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"], **attrs),
         helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["y"], **attrs)],
        "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, x.shape)],
        [numpy_helper.from_array(scale.astype(np.float32), "scale"), zero])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # FP8: see DESIGN.md facts
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def sample(shape, seed=0):
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 3
    x.flat[:6] = [0.5, 1.5, -2.5, 2.5, 1000.0, -1000.0]  # exact ties and saturation
    x.flat[-2:] = [-1e-4, -0.0]  # below half a step: ONNX's integer 0 dequantizes to +0, never -0
    return x


def assert_bits_equal(got: np.ndarray, expected: np.ndarray) -> None:
    """Bit for bit, which also tells -0.0 from +0.0 (assert_array_equal does not)."""
    np.testing.assert_array_equal(got.view(np.uint32), expected.astype(np.float32).view(np.uint32))


def test_int8_per_tensor_matches_onnxruntime():
    x = sample((4, 64))
    scale = np.float32(0.05)  # x/scale hits exact .5 ties for 0.025 multiples
    x.flat[6:10] = [0.025, 0.075, -0.025, -0.125]
    got = fake_quant(torch.from_numpy(x), torch.tensor(scale), FORMATS["int8"]).numpy()
    assert_bits_equal(got, run_qdq(x, np.array(scale), TensorProto.INT8, None, 19))


def test_int8_per_channel_matches_onnxruntime():
    w = sample((8, 3, 3, 3), seed=1)
    amax = torch.from_numpy(w).abs().amax(dim=(1, 2, 3))
    scale = scale_from_amax(amax, FORMATS["int8"])
    got = fake_quant(torch.from_numpy(w), scale, FORMATS["int8"], axis=0).numpy()
    assert_bits_equal(got, run_qdq(w, scale.numpy(), TensorProto.INT8, 0, 19))


def test_fp8_e4m3_matches_onnxruntime():
    x = sample((4, 64), seed=2)
    scale = np.float32(0.01)
    got = fake_quant(torch.from_numpy(x), torch.tensor(scale), FORMATS["fp8"]).numpy()
    assert_bits_equal(got, run_qdq(x, np.array(scale), TensorProto.FLOAT8E4M3FN, None, 19))
    assert np.abs(got).max() == pytest.approx(448 * 0.01)  # saturated, not inf/nan


def test_int4_blocked_weights_match_onnxruntime_dequantize():
    w = torch.from_numpy(sample((6, 20), seed=3))  # 20 input channels, blocks of 8: the last block is short
    scale = scale_from_amax(block_amax(w, 8, axis=1), FORMATS["int4"])
    assert scale.shape == (6, 3)
    q = quantize(w, scale, FORMATS["int4"], axis=1, block_size=8)
    assert q.min() >= -8 and q.max() <= 7
    ints = helper.make_tensor("w", TensorProto.INT4, w.shape, q.to(torch.int64).flatten().tolist())
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["w", "scale"], ["y"], axis=1, block_size=8)], "dq", [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, w.shape)],
        [ints, numpy_helper.from_array(scale.numpy(), "scale")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]
    got = fake_quant(w, scale, FORMATS["int4"], axis=1, block_size=8).numpy()
    np.testing.assert_array_equal(got, expected)


def test_int8_error_is_what_the_step_size_predicts():
    """Rounding noise step^2/12 plus clipping noise predicts the SQNR (about 40 dB at amax = 4 sigma)."""
    torch.manual_seed(0)
    x = torch.randn(200_000)
    scale = scale_from_amax(4 * x.std(), FORMATS["int8"])
    err = fake_quant(x, scale, FORMATS["int8"]) - x
    sqnr = 10 * torch.log10(x.pow(2).mean() / err.pow(2).mean())
    amax = scale * 127
    clip_noise = ((x.abs() - amax).clamp(min=0) ** 2).mean()
    rounding_noise = scale**2 / 12 * (x.abs() <= amax).float().mean()
    predicted = 10 * torch.log10(x.pow(2).mean() / (rounding_noise + clip_noise))
    assert abs(sqnr - predicted) < 0.3 and sqnr > 38
