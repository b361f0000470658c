"""What ``exporter bench`` compares, and how each variant generates images.

A variant is one way to get the same images (same seeds, sampler, guidance): the plain diffusers
loop in PyTorch, the same loop with the ``DeepCache`` package's ``DeepCacheSDHelper`` (UNets), or
our runtime on exported graphs of some precision, with or without feature caching. Every variant
goes through :func:`open_variant`, which returns a ``generate(settings) -> images`` callable, so the
timing loop, the memory probe (a separate process) and the quality evaluation treat them alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

from exporter.errors import UsageError
from exporter.sampling.loop import SampleSettings, generate

Images = dict  # {(row, k): tensor [C, H, W]}


@dataclass(frozen=True)
class Variant:
    name: str  # e.g. pytorch-fp32, deepcache-3, ort-int8, ort-int8-cache3-quadratic
    kind: str  # pytorch | deepcache | runtime
    precision: str = "fp32"  # fp32 | int8 | fp8 | w4a8 (runtime: which graphs)
    interval: int = 1  # cache interval (1: no caching)
    schedule: str = "uniform"  # refresh schedule of the cache: uniform | quadratic

    def to_dict(self) -> dict:
        return asdict(self)


def plan_variants(is_unet: bool, formats: list[str], intervals: list[int], schedules: list[str],
                  deepcache: bool) -> list[Variant]:
    """(a) PyTorch FP32; (b) the DeepCache package at each interval (UNets); (c) our runtime on FP32
    graphs; (d) on each quantized format; (e) with caching, every interval and schedule, on FP32
    and on the first quantized format."""
    variants = [Variant("pytorch-fp32", "pytorch")]
    if is_unet and deepcache:
        variants += [Variant(f"deepcache-{n}", "deepcache", interval=n) for n in intervals]
    variants += [Variant(f"ort-{p}", "runtime", p) for p in ["fp32", *formats]]
    for precision in ["fp32", *formats[:1]]:
        variants += [Variant(f"ort-{precision}-cache{n}" + ("" if s == "uniform" else f"-{s}"), "runtime",
                             precision, n, s) for n in intervals for s in schedules]
    return variants


def deepcache_available() -> bool:
    try:
        import DeepCache  # noqa: F401
    except ImportError:
        return False
    return True


def open_variant(variant: Variant, model: str, graphs: dict[str, Path], shared: dict | None = None
                 ) -> Callable[[SampleSettings], Images]:
    """The variant's ``generate(settings)``. ``shared`` memoises loaded runtimes across variants
    of the same graphs (caching variants reuse the uncached variant's sessions)."""
    shared = {} if shared is None else shared
    if variant.kind == "runtime":
        from exporter.runtime import Runtime

        if variant.precision not in graphs:
            raise UsageError(f"no {variant.precision} graphs for {variant.name}")
        key = ("runtime", variant.precision)
        if key not in shared:
            import torch

            # ONNX Runtime's sessions get as many threads as PyTorch has, whatever its own default
            # would be (physical cores; PyTorch's OMP_NUM_THREADS, when set): one race, one thread count
            shared[key] = Runtime.load(graphs[variant.precision], threads=torch.get_num_threads())
        runtime = shared[key]

        def run_graphs(s: SampleSettings) -> Images:
            return runtime.generate(rows=list(s.rows), per_row=s.per_row, steps=s.steps, scheduler=s.scheduler,
                                    guidance=s.guidance, seed=s.seed, batch_size=s.batch_size,
                                    cache_interval=variant.interval, cache_schedule=variant.schedule, progress=False)
        run_graphs.runtime = runtime  # the bench reads its per-block seconds
        return run_graphs
    if variant.kind == "pytorch":
        return _pytorch(model)
    if variant.kind == "deepcache":
        return _deepcache(model, variant.interval)
    raise UsageError(f"unknown variant kind {variant.kind!r}")


def _load(model: str):
    from exporter.models import load_conditioning, load_model
    from exporter.reference import resolve

    loaded = load_model(resolve(model))
    return loaded, load_conditioning(loaded.default_conditioning, loaded.adapter)


def _pytorch(model: str) -> Callable[[SampleSettings], Images]:
    """The plain diffusers loop: the model's own forward at every step."""
    loaded, conditioning = _load(model)

    def denoise(x, t, c, step):
        return loaded.adapter.denoise(loaded.model, x, t, c)

    def run(s: SampleSettings) -> Images:
        return generate(denoise, loaded.adapter.sample_shape, loaded.scheduler_config, conditioning, s, False)
    return run


def _deepcache(model: str, interval: int) -> Callable[[SampleSettings], Images]:
    """The same loop with ``DeepCache.DeepCacheSDHelper`` wrapping the UNet, as its README shows:
    ``helper = DeepCacheSDHelper(pipe=pipe); helper.set_params(cache_interval=N, cache_branch_id=0);
    helper.enable()``. The helper only needs ``pipe.unet`` and ``pipe.scheduler`` (it looks the
    current t up in ``scheduler.timesteps``), and the UNet called with a scalar t, as diffusers'
    pipelines call it. Branch 0 is its shallowest: cached steps run conv_in, the last up-block
    layer and conv_out, the same blocks as our runtime's shallowest branch."""
    from DeepCache import DeepCacheSDHelper

    from exporter.sampling.schedulers import make_scheduler

    loaded, conditioning = _load(model)
    if loaded.adapter.class_name != "UNet2DConditionModel":
        raise UsageError(f"the DeepCache package wraps Stable Diffusion UNets, not {loaded.adapter.class_name}")
    pipe = SimpleNamespace(unet=loaded.model, scheduler=None)
    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=0)

    def denoise(x, t, c, step):  # the adapter calls unet(sample, t, encoder_hidden_states=...) like diffusers
        return loaded.adapter.denoise(pipe.unet, x, t[0], c)

    def run(s: SampleSettings) -> Images:
        pipe.scheduler = make_scheduler(s.scheduler, loaded.scheduler_config)
        pipe.scheduler.set_timesteps(s.steps)  # the same timesteps the loop's own scheduler gets
        helper.enable()
        try:
            return generate(denoise, loaded.adapter.sample_shape, loaded.scheduler_config, conditioning, s, False)
        finally:
            helper.disable()
    return run
