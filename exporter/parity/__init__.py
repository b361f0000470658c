"""Parity: PyTorch ⇄ ONNX Runtime (⇄ TensorRT), per block with polygraphy, and end to end."""

from exporter.parity.check import GraphParity, check_parity
from exporter.parity.report import format_parity

__all__ = ["GraphParity", "check_parity", "format_parity"]
