"""Quantization core: formats and fake quantization with ONNX Q/DQ semantics, observers, timestep groups."""

from exporter.quant.formats import FORMATS, QuantFormat, fake_quant, quantize, scale_from_amax
from exporter.quant.timestep_groups import TimestepGroups, choose_groups

__all__ = ["FORMATS", "QuantFormat", "TimestepGroups", "choose_groups", "fake_quant", "quantize", "scale_from_amax"]
