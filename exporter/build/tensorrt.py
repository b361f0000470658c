"""The one module that touches TensorRT and CUDA: device query, engine build (through polygraphy's
loaders), the engine inspector, and the runtime backend that runs engines.

``tensorrt`` is imported inside functions only, so ``import exporter`` and every CPU path work
without it. Written against TensorRT 10 and 11 (strongly typed networks, ``execute_async_v3``,
user-managed device memory; nothing TensorRT 11 removed is called on it); the GPU tests in
``tests/build`` exercise it where CUDA exists.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from exporter.bfloat16 import to_numpy, to_torch
from exporter.build.gating import BuildError, DeviceInfo, check_engines_compatible
from exporter.export.manifest import check_unchanged
from exporter.recipe import BuildSpec

log = logging.getLogger(__name__)


def device_info() -> DeviceInfo:
    """TensorRT's version and the GPU's name and compute capability; BuildError naming whatever is
    missing (no partial work is done before this check)."""
    import torch

    missing = []
    try:
        import tensorrt as trt
    except ImportError:
        trt = None
        missing.append("TensorRT (pip install -e '.[trt]', on a machine with an NVIDIA driver)")
    if not torch.cuda.is_available():
        missing.append("a CUDA GPU (torch.cuda.is_available() is False; a CUDA build of PyTorch is needed too)")
    if missing:
        raise BuildError("TensorRT engines are built and run on an NVIDIA GPU; this machine lacks "
                         + " and ".join(missing) + ". ONNX Runtime runs the graphs here: exporter run GRAPHS")
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return DeviceInfo(trt.__version__, props.name, (props.major, props.minor))


def build_engine(graph: Path, plan: Path, profile: dict[str, list[tuple[int, ...]]], spec: BuildSpec,
                 timing_cache: Path, lean_runtime: Path | None = None) -> list[dict]:
    """Build one engine from one graph and save it; returns the engine's layer information.

    Strongly typed: the graph's Q/DQ and float types decide each layer's precision (no precision
    flags). ``timing_cache`` is read if present and written back, so all engines of a run (and
    later runs) share tactic timings. With ``spec.version_compatible`` the plan leaves TensorRT's
    lean runtime out, and ``lean_runtime`` (that library) loads it back, as later TensorRT
    releases will: a lean runtime that cannot is an error here, not on the deployment machine."""
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, Profile, engine_bytes_from_network, network_from_onnx_path

    shapes = Profile()
    for name, (smallest, optimal, largest) in profile.items():
        shapes.add(name, min=smallest, opt=optimal, max=largest)
    # hardware-compatible engines need the parser's native InstanceNormalization (no plugin), which is
    # its default from TensorRT 10.0 on and which polygraphy leaves set unless told otherwise
    level = None if spec.hardware_compatibility == "none" else \
        getattr(trt.HardwareCompatibilityLevel, spec.hardware_compatibility.upper())  # AMPERE_PLUS, ...
    config = CreateConfig(profiles=[shapes], builder_optimization_level=spec.optimization_level,
                          hardware_compatibility_level=level,
                          load_timing_cache=str(timing_cache) if timing_cache.is_file() else None,
                          refittable=spec.refittable or None, weight_streaming=spec.weight_streaming or None,
                          version_compatible=spec.version_compatible or None,
                          exclude_lean_runtime=spec.version_compatible or None,
                          profiling_verbosity=trt.ProfilingVerbosity.DETAILED)  # the inspector needs it
    network = network_from_onnx_path(str(graph), strongly_typed=True)
    # a serialized plan (the only way TensorRT builds version-compatible ones), loaded back the way
    # the runtime loads it, for the inspector
    plan.write_bytes(bytes(engine_bytes_from_network(network, config=config, save_timing_cache=str(timing_cache))))
    runtime, _keep_alive = tensorrt_runtime(trt, lean_runtime)
    remedy = (f"it was just built, so the lean runtime {lean_runtime} must be this TensorRT's ({trt.__version__})"
              if lean_runtime else "it was just built (see TensorRT's log above)")
    return layer_information(deserialize(runtime, plan, remedy))


def tensorrt_runtime(trt, lean_runtime: Path | None):
    """The ``IRuntime`` that deserializes engines, and the objects it needs kept alive: TensorRT's
    own runtime, or for version-compatible engines the lean runtime library of the TensorRT that
    built them, loaded through it. Our plans never carry host code (their lean runtime is left
    out), so ``engine_host_code_allowed`` stays False: a plan that does is refused."""
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    if lean_runtime is None:
        return runtime, (logger,)
    loaded = runtime.load_runtime(str(lean_runtime))
    if loaded is None:
        raise BuildError(f"{lean_runtime}: TensorRT could not load this lean runtime library (see its log above)")
    return loaded, (logger, runtime)  # the loading runtime must outlive the one it loaded


def deserialize(runtime, plan: Path, remedy: str = "rebuild it"):
    """One engine, through ``folder_runtime``'s runtime (or the build's). polygraphy's engine
    loaders are not used for this: they switch on ``engine_host_code_allowed``, which stays off."""
    engine = runtime.deserialize_cuda_engine(plan.read_bytes())
    if engine is None:
        raise BuildError(f"{plan}: TensorRT could not deserialize this engine; {remedy}")
    return engine


_LEAN_RUNTIMES: dict[tuple, tuple] = {}  # (library path, sha256) -> tensorrt_runtime(...), for the process's life


def folder_runtime(folder: Path, manifest: dict):
    """The ``IRuntime`` for the plans of an engines folder (the TensorRT backend's and parity's):
    TensorRT's own, or for version-compatible engines the folder's lean runtime, loaded once per
    process (per library file and content) and kept alive with the runtime that loaded it."""
    import tensorrt as trt

    lean = manifest["tensorrt"].get("lean_runtime")
    if not lean:
        return tensorrt_runtime(trt, None)[0]
    check_unchanged(folder, manifest, lean)
    key = (str((Path(folder) / lean).resolve()), manifest["files"][lean])
    if key not in _LEAN_RUNTIMES:
        _LEAN_RUNTIMES[key] = tensorrt_runtime(trt, Path(key[0]))
    return _LEAN_RUNTIMES[key][0]


def layer_information(engine) -> list[dict]:
    """Every layer's JSON from TensorRT's engine inspector. The inspector shows formats and types
    (what the precision report reads) only with an execution context whose input shapes are all set
    ("Otherwise, values dependent on input shapes will be displayed as -1 and format information
    will not be shown", IEngineInspector::setExecutionContext): the profile's opt shapes, as
    trtexec and polygraphy inspect. No device memory is allocated for it."""
    import tensorrt as trt

    context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            context.set_input_shape(name, engine.get_tensor_profile_shape(name, 0)[1])
    inspector = engine.create_engine_inspector()
    inspector.execution_context = context
    return [json.loads(inspector.get_layer_information(i, trt.LayerInformationFormat.JSON))
            for i in range(engine.num_layers)]


def scratch_size(engine) -> int:
    """Bytes of device memory an engine's context needs. ``device_memory_size_v2`` (TensorRT 10.1+)
    replaced ``device_memory_size``, which TensorRT 11 removed; v2 may be 0 (small engines), so the
    choice is by presence, never by value."""
    if hasattr(engine, "device_memory_size_v2"):
        return engine.device_memory_size_v2
    return engine.device_memory_size


def _torch_dtype(trt_dtype):
    import tensorrt as trt
    import torch

    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
             trt.int32: torch.int32, trt.int64: torch.int64, trt.int8: torch.int8, trt.bool: torch.bool}
    return table[trt_dtype]


class TensorRTBackend:
    """Runs ``.plan`` engines, one at a time, on one CUDA stream.

    Every execution context is created with user-managed device memory and pointed at one shared
    scratch buffer, sized for the largest engine opened so far: the blocks of a denoising step run
    one after another, so their activations never need to coexist. Input shapes are set per call
    and checked against the engine's profile. With ``cuda_graphs``, each engine's run is captured
    once per input shapes and replayed while its shapes stay the same (fixed shapes only pay the
    launch cost once; a change of shapes captures again)."""

    name = "tensorrt"

    def __init__(self, folder: Path, manifest: dict, threads: int | None = None, cuda_graphs: bool = False):
        check_engines_compatible(manifest, device_info())  # refuse foreign engines before touching them
        import tensorrt as trt
        import torch

        self.trt, self.torch = trt, torch
        self.folder, self.manifest = Path(folder), manifest
        self.runtime = folder_runtime(self.folder, manifest)
        self.stream = torch.cuda.Stream()
        self.engines: dict[str, object] = {}
        self.contexts: dict[str, object] = {}
        self.scratch = None
        self.cuda_graphs = cuda_graphs
        self.captured: dict[tuple, tuple] = {}  # (plan, shapes) -> (graph, static inputs, static outputs)

    def _open(self, plan: str):
        if plan not in self.contexts:
            check_unchanged(self.folder, self.manifest, plan)  # opened now, maybe long after the folder was verified
            engine = deserialize(self.runtime, self.folder / plan)
            context = engine.create_execution_context(self.trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            self.engines[plan], self.contexts[plan] = engine, context
            size = scratch_size(engine)
            if self.scratch is None or self.scratch.numel() < size:
                self.scratch = self.torch.empty(max(size, 1), dtype=self.torch.uint8, device="cuda")
                self.captured.clear()  # captured graphs point at the old buffer
                for other in self.contexts.values():  # every context moves to the larger buffer
                    self._point_at_scratch(other)
            else:
                self._point_at_scratch(context)
        return self.engines[plan], self.contexts[plan]

    def _point_at_scratch(self, context) -> None:
        if hasattr(context, "set_device_memory"):  # TensorRT 10.1+
            context.set_device_memory(self.scratch.data_ptr(), self.scratch.numel())
        else:
            context.device_memory = self.scratch.data_ptr()

    def _bind(self, plan: str, engine, context, inputs: dict) -> dict:
        """Set shapes and addresses; returns freshly allocated outputs {name: tensor}."""
        for name, tensor in inputs.items():
            if not context.set_input_shape(name, tuple(tensor.shape)):
                raise BuildError(f"{plan}: input {name} of shape {tuple(tensor.shape)} lies outside the engine's "
                                 f"profile (min, opt, max = {engine.get_tensor_profile_shape(name, 0)}); rebuild with "
                                 "a wider build.images / build.latent in the recipe")
            context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) == self.trt.TensorIOMode.OUTPUT:
                outputs[name] = self.torch.empty(tuple(context.get_tensor_shape(name)),
                                                 dtype=_torch_dtype(engine.get_tensor_dtype(name)), device="cuda")
                context.set_tensor_address(name, outputs[name].data_ptr())
        return outputs

    def run(self, plan: str, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        torch = self.torch
        engine, context = self._open(plan)
        key = (plan, tuple((n, v.shape) for n, v in sorted(feeds.items())))
        with torch.cuda.stream(self.stream):
            if key in self.captured:
                graph, static_in, static_out = self.captured[key]
                for name, array in feeds.items():
                    static_in[name].copy_(to_torch(array), non_blocking=True)
                graph.replay()
                results = static_out
            else:
                # a graph replays the context state of its capture: once this context takes other
                # shapes, the graphs captured at its earlier ones are stale (captured again when needed)
                for stale in [k for k in self.captured if k[0] == plan]:
                    del self.captured[stale]
                inputs = {n: to_torch(a).to("cuda", non_blocking=True) for n, a in feeds.items()}
                results = self._bind(plan, engine, context, inputs)
                if not context.execute_async_v3(self.stream.cuda_stream):
                    raise BuildError(f"{plan}: TensorRT execution failed (see the TensorRT log above)")
                if self.cuda_graphs:  # after one ordinary run, as TensorRT requires before capture
                    self.stream.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, stream=self.stream):
                        context.execute_async_v3(self.stream.cuda_stream)
                    self.captured[key] = (graph, inputs, results)
        self.stream.synchronize()
        return [to_numpy(results[name]) for name in outputs]  # bf16 engines: ml_dtypes' bfloat16
