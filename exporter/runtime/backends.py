"""Backends run one graph (or engine) on named numpy tensors: ONNX Runtime for graphs folders,
TensorRT (``exporter.build.tensorrt.TensorRTBackend``) for engines folders, behind the same
``run(file, feeds, outputs)``."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


class OnnxRuntimeBackend:
    """One ONNX Runtime session per graph file, opened on first use. CUDA when the provider is
    present, else CPU."""

    name = "onnxruntime"

    def __init__(self, folder: Path, manifest: dict, threads: int | None = None):
        import onnxruntime as ort

        self.folder = folder
        self.options = ort.SessionOptions()
        if threads:
            self.options.intra_op_num_threads = threads
        self.options.graph_optimization_level = optimization_level(manifest)
        # onnxruntime-gpu lists CUDA even without a GPU, then warns on every session: ask for it only
        # where a CUDA device exists.
        cuda = "CUDAExecutionProvider" in ort.get_available_providers() and _cuda_device_present()
        self.providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        self._sessions: dict[str, object] = {}

    def session(self, graph: str):
        if graph not in self._sessions:
            import onnxruntime as ort

            self._sessions[graph] = ort.InferenceSession(str(self.folder / graph), self.options,
                                                         providers=self.providers)
            log.debug("opened %s (%s)", graph, self._sessions[graph].get_providers()[0])
        return self._sessions[graph]

    def run(self, graph: str, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        return self.session(graph).run(outputs, feeds)


def optimization_level(manifest: dict):
    """ONNX Runtime's full optimisation, except for FP8 graphs: its extended level fuses FP8 Q/DQ
    into MatMulIntegerToFloat, which rejects float8 (an ORT bug); the basic level runs them as written."""
    import onnxruntime as ort

    from exporter.export.manifest import formats_used

    if "fp8" in formats_used(manifest):
        return ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def _cuda_device_present() -> bool:
    import torch

    return torch.cuda.is_available()


def tensorrt_backend(folder: Path, manifest: dict, threads: int | None = None):
    """The TensorRT backend (``exporter.build.tensorrt``), imported only when asked for."""
    from exporter.build.tensorrt import TensorRTBackend

    return TensorRTBackend(folder, manifest, threads=threads)


BACKENDS = {"onnxruntime": OnnxRuntimeBackend, "tensorrt": tensorrt_backend}


def default_backend(manifest: dict) -> str:
    """Engines folders run on TensorRT, graphs folders on ONNX Runtime."""
    return "tensorrt" if manifest.get("kind") == "tensorrt" else "onnxruntime"
