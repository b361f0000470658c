"""What a ``QuantLayer`` becomes in ONNX: standard QuantizeLinear / DequantizeLinear nodes.

During ``torch.onnx.export`` (TorchScript exporter) a quantized layer traces as

    x ─ QuantizeLinear(s_x) ─ DequantizeLinear(s_x) ─┐
                  W_int ─ DequantizeLinear(s_w, axis) ─ Conv / Gemm / MatMul

with the weight stored quantized (an int8 / float8 initializer; INT4 is written as int8 here and
retyped to INT4 by ``exporter.export.passes``, as are INT4 zero points, written as uint8). The autograd functions
below only exist to emit those nodes: their eager ``forward`` is never used for numbers (the
fake-quant path in ``exporter.quant.ptq`` is), so PyTorch and the graph agree by construction of
``exporter.quant.formats`` (bit-exact with ONNX Runtime, tested).
"""

from __future__ import annotations

import torch

from exporter.quant.formats import QuantFormat

# Names of buffers whose int8 storage stands for INT4 (retyped after export).
INT4_MARK = "int4"


class QuantizeDequantize(torch.autograd.Function):
    """Activation Q/DQ pair, per tensor."""

    @staticmethod
    def forward(ctx, x, scale, zero_point):
        return x

    @staticmethod
    def symbolic(g, x, scale, zero_point):
        q = g.op("QuantizeLinear", x, scale, zero_point)
        return g.op("DequantizeLinear", q, scale, zero_point)


class DequantizeWeight(torch.autograd.Function):
    """DequantizeLinear of a stored quantized weight: per channel along ``axis``, or blocked along it
    (INT4: the weight stored [in, out], blocked along axis 0, the input features)."""

    @staticmethod
    def forward(ctx, w, scale, axis: int, block_size: int):
        return w.to(scale.dtype)

    @staticmethod
    def symbolic(g, w, scale, axis: int, block_size: int):
        if block_size:
            return g.op("DequantizeLinear", w, scale, axis_i=axis, block_size_i=block_size)
        return g.op("DequantizeLinear", w, scale, axis_i=axis)


def storage_dtype(fmt: QuantFormat) -> torch.dtype:
    """The torch dtype a quantized tensor of this format is stored in before export."""
    if fmt.name == "fp8":
        return torch.float8_e4m3fn
    if fmt.name in ("int8", "int4"):
        return torch.int8
    raise ValueError(f"{fmt.name} is simulation only: no ONNX type exists for it")
