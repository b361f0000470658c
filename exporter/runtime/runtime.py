"""The runtime: a denoising loop over exported graphs, with DeepCache-style feature caching.

At every step each block runs the graph of the timestep group of the current t. With caching,
"full" steps run every block and keep the cached feature (the input of an up block or layer);
the steps in between run only the blocks that feature's branch needs (``manifest["cache"]``:
the up path from that feature on, plus the shallow down blocks producing its skips) and reuse
the kept feature. The shallowest branch (the default) skips the most.

    from exporter.runtime import Runtime
    images = Runtime.load("graphs/x").generate(rows=[0, 1], per_row=4, steps=20, cache_interval=3, seed=0)
    wider = Runtime.load("graphs/x").generate(rows=[0], latent=(48, 80))  # UNet graphs: any size they divide
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from exporter.errors import ConditioningError, NonFiniteError, UsageError
from exporter.export.manifest import check_latent, check_unchanged, read_manifest
from exporter.models import adapter_for, load_conditioning, resolve_guidance
from exporter.quant.timestep_groups import TimestepGroups
from exporter.runtime.backends import BACKENDS, default_backend
from exporter.sampling.loop import SampleSettings, generate

log = logging.getLogger(__name__)


def refresh_steps(steps: int, interval: int, schedule: str = "uniform") -> list[int]:
    """Steps that run the full model. ``uniform``: every ``interval``-th step (DeepCache's default).
    ``quadratic``: the same number of full steps, denser at the start of sampling, where features
    change fastest between steps (spacing grows quadratically)."""
    if interval < 1:
        raise UsageError(f"cache interval must be >= 1, got {interval}")
    full = -(-steps // interval)
    if schedule == "uniform":
        return list(range(0, steps, interval))
    if schedule == "quadratic":
        chosen = [round((i / max(full - 1, 1)) ** 2 * (steps - 1)) for i in range(full)]
        # Early positions round to the same step (20 steps, interval 2: 0 and 0.23); keep them
        # distinct so the schedule costs exactly as many full steps as the uniform one.
        for i in range(1, full):
            chosen[i] = max(chosen[i], chosen[i - 1] + 1)
        return [min(c, steps - full + i) for i, c in enumerate(chosen)]
    raise UsageError(f"unknown cache schedule {schedule!r}; choose uniform or quadratic")


def engine_batch_size(manifest: dict, settings: SampleSettings, guided: bool) -> int:
    """Images per call that keep every model call inside the engines' batch range (``batch``: the
    profile's min, opt, max per call, doubled at build time by the recipe's ``cfg``) whatever
    ``cfg`` said: the loop doubles a call whenever guidance runs (``guided``)."""
    low, _, high = manifest["tensorrt"]["batch"]  # written by every build (exporter.build.profiles.batch_sizes)
    factor = 2 if guided else 1
    per_call = min(settings.batch_size, high // factor)
    images = len(settings.rows) * settings.per_row
    smallest = factor * min(per_call, images % per_call or per_call) if per_call else factor
    if per_call == 0 or smallest < low:
        what = "with classifier-free guidance (2 per image)" if guided else "without guidance (1 per image)"
        raise UsageError(f"the engines take {low} to {high} samples per model call and this run {what} would "
                         f"call them with {smallest}; rebuild with build.images and build.cfg (recipe) "
                         "covering it, or change --guidance or --batch-size")
    return per_call


@dataclass
class CachePlan:
    feature: str | None  # None: no caching
    full_steps: set[int]
    shallow_blocks: list[str]


class Runtime:
    def __init__(self, folder: Path, manifest: dict, backend: str | None = None, threads: int | None = None):
        self.folder, self.manifest = folder, manifest
        backend = backend or default_backend(manifest)
        if manifest.get("kind") == "tensorrt" and backend != "tensorrt":
            raise UsageError(f"{folder} holds TensorRT engines; run its graphs folder "
                             f"({manifest['source']['graphs']}) for ONNX Runtime")
        if backend == "tensorrt" and manifest.get("kind") != "tensorrt":
            raise UsageError(f"{folder} holds ONNX graphs; build engines first: exporter build {folder} --out DIR")
        if backend not in BACKENDS:
            raise UsageError(f"unknown backend {backend!r}; available: {', '.join(BACKENDS)}")
        self.backend = BACKENDS[backend](folder, manifest, threads=threads)
        self.adapter = adapter_for(manifest["source"]["model_class"], manifest["source"]["config"])
        self.groups = TimestepGroups.from_dict(manifest["groups"]) if manifest["groups"] else None
        self.blocks = manifest["blocks"]
        self.dtypes = {t["name"]: t["dtype"] for b in self.blocks for t in b["inputs"]}
        self.seconds: dict[str, float] = {}  # time spent per block, for benchmarks
        self.settings: SampleSettings | None = None  # the last generate's, the manifest's defaults filled in
        self.plan: CachePlan | None = None  # the last generate's caching: the branch taken, the full steps
        self._conditioning: tuple | None = None  # (file key, Conditioning) of the last generate

    @classmethod
    def load(cls, folder: str | Path, backend: str | None = None, threads: int | None = None) -> Runtime:
        """A graphs folder (ONNX Runtime) or an engines folder (TensorRT), from its manifest."""
        folder = Path(folder)
        return cls(folder, read_manifest(folder), backend, threads)

    @property
    def cache_features(self) -> dict[str, list[str]]:
        return self.manifest["cache"]["features"]

    def cache_plan(self, steps: int, interval: int, branch: str | None, schedule: str) -> CachePlan:
        if interval < 1:
            raise UsageError(f"cache interval must be >= 1 (1: no caching), got {interval}")
        features = self.cache_features
        # a wrong branch or schedule is refused even when interval 1 would not use it: no run records
        # an option that was never valid
        if branch is not None and branch not in features:
            raise UsageError(f"unknown cache branch {branch!r}; choose one of {', '.join(features) or 'none'}")
        full_steps = set(refresh_steps(steps, interval, schedule))
        if interval == 1:
            return CachePlan(None, full_steps, [b["name"] for b in self.blocks])
        if not features:
            raise UsageError(f"{self.manifest['source']['model_class']} graphs declare no cacheable feature")
        if branch is None:  # the shallowest branch: the fewest blocks on cached steps
            branch = min(features, key=lambda f: len(features[f]))
        return CachePlan(branch, full_steps, features[branch])

    @staticmethod
    def _file(block: dict, group: int) -> str:
        """The graph (or, in an engines folder, the .plan) a block runs for timestep group ``group``."""
        files = block.get("engines") or block["graphs"]
        return files[group if len(files) > 1 else 0]

    def _feeds(self, block: dict, env: dict) -> dict[str, np.ndarray]:
        return {t["name"]: env[t["name"]] for t in block["inputs"]}

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond, step: int, plan: CachePlan, cache: dict):
        """One model call as graphs: every block on full steps, the branch's blocks otherwise."""
        tt = float(t[0])
        group = self.groups.group_of(tt) if self.groups else 0
        inputs = self.adapter.named_inputs(x, t.to(torch.float32), cond)
        env = {n: v.numpy().astype(self.dtypes.get(n, "float32"), copy=False)
               for n, v in inputs.items() if v is not None}
        if step == 0:
            self._check_fixed_sizes(env)
        full = step in plan.full_steps or plan.feature not in cache
        run = [b["name"] for b in self.blocks] if full else plan.shallow_blocks
        if not full:
            env[plan.feature] = cache[plan.feature]
        for block in self.blocks:
            if block["name"] not in run:
                continue
            graph = self._file(block, group)
            names = [o["name"] for o in block["outputs"]]
            start = time.perf_counter()
            env.update(zip(names, self.backend.run(graph, self._feeds(block, env), names)))
            self.seconds[block["name"]] = self.seconds.get(block["name"], 0.0) + time.perf_counter() - start
        if not np.isfinite(env["noise_pred"]).all():  # one cheap check per step; the search only on failure
            raise NonFiniteError(self._first_non_finite(run, env, step, tt, group))
        if full and plan.feature is not None:
            cache[plan.feature] = env[plan.feature]
        # fp16 / bf16 graphs: back to fp32
        return self.adapter.postprocess(torch.from_numpy(env["noise_pred"].astype(np.float32, copy=False)))

    def _check_fixed_sizes(self, env: dict[str, np.ndarray]) -> None:
        """The model inputs against the fixed (non-symbolic) sizes the graphs declare, e.g. the text
        length of ``encoder_hidden_states``: a mismatch is the conditioning's, named here rather than
        in a backend's shape error."""
        for block in self.blocks:
            for spec in block["inputs"]:
                value = env.get(spec["name"])
                if value is None or spec["name"] == "sample":  # sample: the latent size, checked with --latent
                    continue
                fixed = [(i, d) for i, d in enumerate(spec["shape"]) if isinstance(d, int)]
                if value.ndim != len(spec["shape"]) or any(value.shape[i] != d for i, d in fixed):
                    shown = ", ".join(str(d) for d in spec["shape"])
                    raise ConditioningError(
                        f"the graphs take {spec['name']} as [{shown}] but the conditioning gives "
                        f"{list(value.shape)}: use conditioning made for this model (its manifest's "
                        f"conditioning.safetensors shows the shapes)")

    def _first_non_finite(self, run: list[str], env: dict, step: int, t: float, group: int) -> str:
        """Where this step went non-finite: the first block (in run order) with NaN/Inf in an output
        while its inputs were finite. ``env`` still holds every tensor of the step."""
        where = f"step {step} (t={t:g}, timestep group {group})"
        for block in (b for b in self.blocks if b["name"] in run):
            inputs = [i["name"] for i in block["inputs"]]
            broken = [n for n in inputs if not np.isfinite(env[n]).all()]
            if broken:
                return (f"{where}: the input {broken[0]} of block {block['name']} was already NaN/Inf "
                        "(the latents from the previous step, or a cached feature)")
            for name in (o["name"] for o in block["outputs"]):
                values = env[name]
                if np.isfinite(values).all():
                    continue
                peak = max(float(np.abs(env[n].astype(np.float32)).max()) for n in inputs)
                hint = " (FP16 overflows past 65504)" if self.manifest.get("dtype") == "fp16" else ""
                parity = (f"exporter parity {self.manifest['source']['graphs']} --engines {self.folder}"
                          if self.manifest.get("kind") == "tensorrt" else f"exporter parity {self.folder}")
                return (f"{where}: block {block['name']} ({self._file(block, group)}) turned finite "
                        f"inputs (largest |value| {peak:.4g}) into {int((~np.isfinite(values)).sum())} NaN/Inf "
                        f"of {values.size} values in {name}{hint}; compare it with PyTorch: {parity}")
        return f"{where}: the noise prediction is NaN/Inf"

    def _load_conditioning(self, path: Path | None):
        """The conditioning file, read and checked once while it stays the same file (a server or the
        bench calls generate per request; reading it every time would be timed with the graphs)."""
        key = None
        if path is not None and self.manifest["conditioning"] and path == self.folder / self.manifest["conditioning"]:
            check_unchanged(self.folder, self.manifest, self.manifest["conditioning"])  # the folder's own, verified
        if path is not None and path.is_file():
            stat = path.stat()
            key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
        if key is None or self._conditioning is None or self._conditioning[0] != key:
            self._conditioning = (key, load_conditioning(path, self.adapter))
        return self._conditioning[1]

    def generate(self, cond: str | Path | None = None, rows: list[int] | None = None, per_row: int = 8,
                 steps: int | None = None, scheduler: str | None = None, guidance: float | None = None,
                 seed: int = 0, cache_interval: int = 1, cache_branch: str | None = None,
                 cache_schedule: str = "uniform", batch_size: int = 40, latent: tuple[int, int] | None = None,
                 progress: bool = True) -> dict:
        """Images {(row, k): tensor [C, H, W]}, seeded exactly as ``exporter sample`` seeds them.
        ``latent``: (height, width) of the sample the graphs denoise, default the model's own; UNet
        graphs take any size their downsamplings divide (engines: any inside their profile)."""
        defaults = {"steps": 20, "scheduler": "ddim", "guidance": 1.0, **self.manifest["sampling_defaults"]}
        cond_path = Path(cond) if cond else (self.folder / self.manifest["conditioning"]
                                             if self.manifest["conditioning"] else None)
        conditioning = self._load_conditioning(cond_path)
        settings = SampleSettings(
            rows=tuple(rows if rows is not None else range(conditioning.num_rows or 1)), per_row=per_row,
            steps=steps if steps is not None else defaults["steps"], scheduler=scheduler or defaults["scheduler"],
            guidance=resolve_guidance(guidance, defaults["guidance"], conditioning, self.adapter), seed=seed,
            batch_size=batch_size)
        if self.manifest.get("kind") == "tensorrt":  # stay inside the engines' optimization profile
            guided = settings.guidance > 1.0 and conditioning.cond is not None  # as the loop decides
            settings = dataclasses.replace(settings, batch_size=engine_batch_size(self.manifest, settings, guided))
        plan = self.cache_plan(settings.steps, cache_interval, cache_branch, cache_schedule)
        self.settings, self.plan = settings, plan
        channels, *native = self.adapter.sample_shape
        check_latent(self.manifest, tuple(latent or native))  # engines: the own size may lie outside the profile
        sample_shape = (channels, *(latent or native))
        cache: dict = {}

        def denoise(x, t, c, step):
            if step == 0:
                cache.clear()  # a new batch: nothing cached yet
            return self.denoise(x, t, c, step, plan, cache)

        log.info("running %s with %s at latent %dx%d%s", self.folder, settings, *sample_shape[1:],
                 f", caching {plan.feature} (full steps {sorted(plan.full_steps)})" if plan.feature else "")
        return generate(denoise, sample_shape, self.manifest["scheduler_config"], conditioning,
                        settings, progress)
