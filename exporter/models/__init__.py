"""Loading diffusers-format models and the architecture adapters that know how to call them."""

from exporter.models.adapters import ArchitectureAdapter, adapter_for, supported_classes
from exporter.models.conditioning import Conditioning, load_conditioning, resolve_guidance
from exporter.models.loading import LoadedModel, load_model

__all__ = [
    "ArchitectureAdapter",
    "Conditioning",
    "LoadedModel",
    "adapter_for",
    "load_conditioning",
    "load_model",
    "resolve_guidance",
    "supported_classes",
]
