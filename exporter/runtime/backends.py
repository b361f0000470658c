"""Backends run one graph (or engine) on named numpy tensors: ONNX Runtime for graphs folders,
TensorRT (``exporter.build.tensorrt.TensorRTBackend``) for engines folders, behind the same
``run(file, feeds, outputs)``."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from exporter.export.manifest import check_unchanged
from exporter.runtime.ort_conv import float_conv_weights_budget, fold_conv_weights
from exporter.runtime.ort_integer import integer_matmul_enabled, integer_matmuls

log = logging.getLogger(__name__)


class OnnxRuntimeBackend:
    """One ONNX Runtime session per graph file, opened on first use. CUDA when the provider is
    present, else CPU."""

    name = "onnxruntime"

    def __init__(self, folder: Path, manifest: dict, threads: int | None = None):
        import onnxruntime as ort

        self.folder, self.threads, self.level = folder, threads, optimization_level(manifest)
        self.manifest = manifest
        self.weights_of = {g: b["weights"] for b in manifest["blocks"] for g in b["graphs"]}
        # onnxruntime-gpu lists CUDA even without a GPU, then warns on every session: ask for it only
        # where a CUDA device exists.
        cuda = "CUDAExecutionProvider" in ort.get_available_providers() and _cuda_device_present()
        self.providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        if manifest.get("dtype") == "bf16" and not cuda:
            from exporter.errors import UsageError

            raise UsageError(f"{folder} holds bf16 graphs, which ONNX Runtime's CPU provider cannot run (it has no "
                             "bfloat16 Conv or InstanceNormalization kernels): build TensorRT engines from them "
                             "(exporter build) on a GPU machine, or export --dtype fp32 for ONNX Runtime on CPU")
        self._sessions: dict[str, object] = {}
        self.fused_attention: dict[str, int] = {}  # graph -> attentions run as ORT's fused kernel
        # Integer GEMMs for quantized Linear layers (exporter.runtime.ort_integer): the CPU provider's
        # QDQ fusions run at the extended level and up: not for FP8 graphs, which get the basic level.
        enabled = integer_matmul_enabled()  # read (and a bad value refused) whatever the graphs and device
        self.integer_matmul = not cuda and self.level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL and enabled
        self.integer_matmuls: dict[str, int] = {}  # graph -> Linear layers run as MatMulIntegerToFloat
        # without them, ORT's own QDQ fusions are off as well (``cpu_disabled_optimizers``)
        self.disabled = [] if cuda or self.integer_matmul else cpu_disabled_optimizers(self.level, integer=False)
        self._transposed: dict = {}  # in-memory weights the sessions read, one per weight for all groups
        self._in_memory: list[dict] = []  # every session's in-memory weights, kept alive with the sessions
        # Quantized convolutions on float weights folded once (exporter.runtime.ort_conv): the CPU
        # provider would dequantize them at every call and skip its blocked-layout convolution.
        # Only up to a budget of bytes per session: small graphs gain speed, large ones mostly memory.
        budget = float_conv_weights_budget()
        self.float_conv_budget = 0 if cuda else budget
        self.folded_conv_weights: dict[str, int] = {}  # graph -> conv weights folded to float
        self.int4_fused: dict[str, int] = {}  # graph -> INT4 weights ORT's QDQ fusions may fuse

    def session(self, graph: str):
        if graph not in self._sessions:
            self._sessions[graph] = self.open(graph)
        return self._sessions[graph]

    def open(self, graph: str, rewritten_only: bool = False):
        """A new session for ``graph``, configured and rewritten as the runtime runs it (``session``
        keeps one per graph; parity opens its own to compare it with PyTorch). ``rewritten_only``:
        None instead of a session when nothing is rewritten (the file's own session would do)."""
        import onnx
        import onnxruntime as ort

        from exporter.runtime.ort_fusion import fuse_attention

        path = self.folder / graph
        for name in (graph, self.weights_of[graph]):  # opened now, maybe long after the folder was verified
            check_unchanged(self.folder, self.manifest, name)
        model = onnx.load(str(path), load_external_data=False)  # weights stay in their files
        self.fused_attention[graph] = fuse_attention(model)
        weights = integer_matmuls(model, self.folder, self._transposed) if self.integer_matmul else {}
        self.integer_matmuls[graph] = len(weights)
        self.folded_conv_weights[graph] = fold_conv_weights(model, self.folder, self.float_conv_budget)
        # with ORT's QDQ fusions on, INT4 weights run fused (MatMulNBits, MatMulIntegerToFloat), where
        # parity's polygraphy session of the file runs them without: a difference parity must see
        fusions = self.level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL and QDQ_FUSIONS not in self.disabled
        self.int4_fused[graph] = blocked_weights(model) if fusions else 0
        if rewritten_only and not self.rewrites(graph):
            return None
        options = ort.SessionOptions()
        options.graph_optimization_level = self.level
        exact_int4_matmuls(options)
        _quiet_thread_pool(options, self.threads)
        _shared_cpu_arena(options)
        disabled = list(self.disabled)
        if weights:
            # ONNX Runtime reads these in place and keeps no reference to them: every one stays referenced
            # here as long as the backend (and its sessions) live (a weight stored inside its graph is
            # not in the shared cache of external ones)
            self._in_memory.append(weights)
            options.add_external_initializers(list(weights), list(weights.values()))
            # Common-subexpression elimination would merge the identical activation Q/DQ pairs of
            # layers sharing an input (to_q, to_k, to_v): a DequantizeLinear with several
            # consumers is fused into none of them.
            disabled.append("CommonSubexpressionElimination")
        if self.rewrites(graph):  # a rewritten copy
            session = session_from_proto(model, self.folder, options, self.providers, disabled)
        else:
            session = ort.InferenceSession(str(path), options, providers=self.providers,
                                           disabled_optimizers=disabled or None)
        log.debug("opened %s (%s, %s)", graph, session.get_providers()[0], self.rewrites(graph) or "as written")
        return session

    def rewrites(self, graph: str) -> str:
        """What the opened session of ``graph`` runs differently from the file ("" when nothing)."""
        done = [f"{n} {what}" for n, what in ((self.fused_attention.get(graph, 0), "fused attention"),
                                              (self.integer_matmuls.get(graph, 0), "integer MatMul"),
                                              (self.folded_conv_weights.get(graph, 0), "float conv weights"),
                                              (self.int4_fused.get(graph, 0), "INT4 weights under QDQ fusions"))
                if n]
        return ", ".join(done)

    def run(self, graph: str, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        return self.session(graph).run(outputs, feeds)


def session_from_proto(model, folder: Path, options, providers: list[str], disabled_optimizers: list[str] = ()):
    """An ONNX Runtime session for an edited in-memory copy of a graph (loaded without its weights),
    reading the weights from the graph's external files in ``folder``: the copy serializes small,
    whatever the size of the weights (protobuf refuses more than 2 GB)."""
    import onnxruntime as ort

    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    return ort.InferenceSession(model.SerializeToString(), options, providers=providers,
                                disabled_optimizers=list(disabled_optimizers) or None)


def _quiet_thread_pool(options, threads: int | None) -> None:
    """No spinning. A UNet runs 13+ sessions (blocks x timestep groups), each with its own intra-op
    pool; by default every pool keeps its workers spinning after a run, competing with the next
    session's threads for the cores (measured on 2 cores, 80 digits-unet images: 26.6 s with
    spinning, 17.8 s without; one process-wide pool gave 16.8 s, but ONNX Runtime then refuses
    every session made with per-session threads in the process, polygraphy's and users' included)."""
    if threads:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")


_CPU_ARENA_REGISTERED = False


def _shared_cpu_arena(options) -> None:
    """All of the runtime's sessions take their CPU memory from one arena. By default each session
    keeps its own arena, grown to its largest run and never returned: with a block's graph per
    timestep group that is one arena per graph, and ONNX Runtime dequantizes the weights of Q/DQ
    graphs into them. The blocks run one after another, so they can share one (as the TensorRT
    backend's contexts share one scratch buffer). ``exporter run`` on the SD 1.5-layout UNet's INT8
    graphs (2 groups, one image, 2 steps): peak RSS 7.9 GiB and 56 s with an arena per session,
    2.5 GiB and 31 s with one shared arena, the same image (no arena at all used less memory still,
    but ran 1.3x slower on digits-unet at 40 images per call). Only sessions opening with this
    option use it: polygraphy's and users' sessions in the same process keep their own."""
    import onnxruntime as ort

    global _CPU_ARENA_REGISTERED
    if not _CPU_ARENA_REGISTERED:
        cpu = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(cpu, None)  # process-wide, default arena settings
        _CPU_ARENA_REGISTERED = True
    options.add_session_config_entry("session.use_env_allocators", "1")


def exact_int4_matmuls(options) -> None:
    """ONNX Runtime's QDQ fusions turn a blocked INT4 DequantizeLinear feeding a MatMul with a float
    input (a W4A16 layer) into MatMulNBits, whose default accuracy level (4) quantizes the float
    activations to int8 on the fly: the graph would run as W4A8 (a tiny UNet's W4A16 ``mid``: 59 dB
    against the graph as written). Level 1 computes in float32, as the graph says."""
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")


def holds_int4_weights(path: Path) -> bool:
    """Whether a graph has blocked (INT4) DequantizeLinear weights, which ONNX Runtime's QDQ fusions
    may turn into MatMulNBits (``exact_int4_matmuls``)."""
    import onnx

    return blocked_weights(onnx.load(str(path), load_external_data=False)) > 0


def blocked_weights(model) -> int:
    """How many blocked (INT4) DequantizeLinear weights a graph has."""
    return sum(n.op_type == "DequantizeLinear" and any(a.name == "block_size" and a.i for a in n.attribute)
               for n in model.graph.node)


# ONNX Runtime's QDQ fusions (one graph transformer). Besides the layers our rewrite prepares, they
# fuse every DequantizeLinear'd weight that feeds a MatMul directly (INT4 layers, written the way
# TensorRT's GEMMs take them) with its quantized input into MatMulIntegerToFloat.
QDQ_FUSIONS = "QDQSelectorActionTransformer"


def cpu_disabled_optimizers(level, integer: bool | None = None) -> list[str]:
    """The ONNX Runtime optimizers a CPU session of our graphs runs without: its QDQ fusions wherever
    integer products are off (``integer``, default ``integer_matmul_enabled()``: no int8 dot products
    on this CPU, or ``EXPORTER_ORT_INTEGER_MATMUL=0``). There its u8 x s8 kernel saturates: a finetuned
    W4A8 tiny UNet's ``mid`` block, as written, gave 23.2 dB against PyTorch on an AVX2-only CPU with
    them and 137.3 dB without. At the basic level (FP8 graphs) they do not run anyway."""
    import onnxruntime as ort

    if level != ort.GraphOptimizationLevel.ORT_ENABLE_ALL:
        return []
    return [] if (integer_matmul_enabled() if integer is None else integer) else [QDQ_FUSIONS]


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
