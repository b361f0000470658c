"""Diffusion models from PyTorch to quantized TensorRT engines, with evidence that they stay right.

Stages live in subpackages (see ../shared/DESIGN.md in the development tree): ``models`` (loading and
architecture adapters), ``sampling`` (the FP32 PyTorch reference loop), ``eval`` (the quality
yardstick), ``reference`` (the bundled trained models). Heavy libraries are imported lazily, so
``import exporter`` is cheap and works without a GPU.
"""

from exporter.errors import ConditioningError, ExporterError, ImageFolderError, ModelError, UsageError

__version__ = "0.1.0"

__all__ = ["ConditioningError", "ExporterError", "ImageFolderError", "ModelError", "UsageError", "__version__"]
