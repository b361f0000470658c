"""Number formats and fake quantization that computes exactly what ONNX Q/DQ computes.

ONNX QuantizeLinear (symmetric, zero point 0) is ``saturate(round_half_even(x / scale))`` and
DequantizeLinear is ``q * scale``; for FLOAT8E4M3FN the cast rounds to nearest even and
saturates to +-448. ``fake_quant`` reproduces that bit for bit (tests compare against ONNX Runtime),
so a parity mismatch between PyTorch and an exported graph is a real bug, never rounding noise.

Scales are symmetric: ``scale = amax / qmax`` where ``qmax`` is 127 (INT8), 7 (INT4, whose
ONNX range is [-8, 7]; -8 is never produced from an in-range value) or 448 (FP8 E4M3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from exporter.errors import UsageError


@dataclass(frozen=True)
class QuantFormat:
    name: str
    kind: str  # "int" or "fp8"
    qmin: float
    qmax: float
    bits: int


FORMATS = {
    "int8": QuantFormat("int8", "int", -128, 127, 8),
    "int4": QuantFormat("int4", "int", -8, 7, 4),
    "fp8": QuantFormat("fp8", "fp8", -448.0, 448.0, 8),
    # Simulation only: no 6-bit type exists in ONNX or TensorRT; used to study activation techniques.
    "int6": QuantFormat("int6", "int", -32, 31, 6),
}
EXPORTABLE = ("int8", "int4", "fp8")  # the formats an ONNX initializer / QuantizeLinear can hold

_TINY = 1e-12  # all-zero tensors still get a valid (positive) scale


def get_format(name: str) -> QuantFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise UsageError(f"unknown quantization format {name!r}; known: {', '.join(FORMATS)}") from None


def scale_from_amax(amax: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    return torch.clamp(torch.as_tensor(amax, dtype=torch.float32), min=_TINY) / fmt.qmax


def _broadcast(scale: torch.Tensor, x: torch.Tensor, axis: int | None, block_size: int | None) -> torch.Tensor:
    """Expand a per-tensor, per-axis or blocked scale to ``x``'s shape, as ONNX does."""
    if scale.ndim == 0 or axis is None:
        return scale
    axis = axis % x.ndim
    if block_size:  # blocked: scale has x's shape with dim `axis` divided by block_size
        return scale.repeat_interleave(block_size, dim=axis).narrow(axis, 0, x.shape[axis])
    shape = [1] * x.ndim
    shape[axis] = -1
    return scale.reshape(shape)


def quantize(x: torch.Tensor, scale: torch.Tensor, fmt: QuantFormat, axis: int | None = None,
             block_size: int | None = None) -> torch.Tensor:
    """QuantizeLinear: integer values (as float32, or float8 values for FP8) before dequantization."""
    s = _broadcast(scale.to(torch.float32), x, axis, block_size)
    scaled = x.to(torch.float32) / s
    if fmt.kind == "fp8":
        return scaled.clamp(fmt.qmin, fmt.qmax).to(torch.float8_e4m3fn).to(torch.float32)
    # torch.round is half-to-even, like ONNX; + 0.0 turns its -0.0 into the +0 an integer 0 dequantizes to
    return torch.round(scaled).clamp(fmt.qmin, fmt.qmax) + 0.0


def dequantize(q: torch.Tensor, scale: torch.Tensor, axis: int | None = None,
               block_size: int | None = None) -> torch.Tensor:
    """DequantizeLinear of quantized values ``q`` (float32, or as ``compact`` stores them), in float32."""
    return q.to(torch.float32) * _broadcast(scale.to(torch.float32), q, axis, block_size)


def compact(q: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Quantized values in the smallest dtype that holds them exactly: int8 for the integer formats
    (INT4 and the simulated INT6 included), float8_e4m3fn for FP8. A quarter of float32's memory,
    which is gigabytes for a real-size model's weights."""
    return q.to(torch.float8_e4m3fn if fmt.kind == "fp8" else torch.int8)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, fmt: QuantFormat, axis: int | None = None,
               block_size: int | None = None) -> torch.Tensor:
    """QuantizeLinear followed by DequantizeLinear, in float32."""
    return dequantize(quantize(x, scale, fmt, axis, block_size), scale, axis, block_size)


def block_amax(w: torch.Tensor, block_size: int, axis: int = 1) -> torch.Tensor:
    """Max |w| per block of ``block_size`` along ``axis`` (INT4 weights: blocks of input channels).
    The last block may be short, as in ONNX blocked quantization."""
    axis = axis % w.ndim
    n = w.shape[axis]
    blocks = -(-n // block_size)
    pad = blocks * block_size - n
    a = w.abs().movedim(axis, -1)
    if pad:
        a = torch.nn.functional.pad(a, (0, pad))
    return a.reshape(*a.shape[:-1], blocks, block_size).amax(-1).movedim(-1, axis)
