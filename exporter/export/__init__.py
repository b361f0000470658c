"""ONNX export: Q/DQ graphs per block and timestep group, shared external weights, manifest."""

from exporter.export.graphs import export_graphs
from exporter.export.manifest import ManifestError, read_manifest

__all__ = ["ManifestError", "export_graphs", "read_manifest"]
