"""``exporter calibrate``: record every block's inputs, with their t, along FP32 trajectories.

The full-precision model denoises ``trajectories`` images (conditioning rows cycled, CFG batched
as at inference, so the null-conditioning half is recorded too, as Q-Diffusion does). At the
recorded steps the model runs as blocks and every tensor a block reads is kept, once per tensor
name. Steps are recorded for every step, or ``steps_per_trajectory`` of them: evenly spaced
("uniform", Q-Diffusion) or drawn around 0.4 T ("normal", PTQ4DM).

Trajectories run in batches; each batch becomes one safetensors shard, written atomically, and
``spec.json`` (spec, blocks, every t covered, sha256 per shard) is rewritten after each shard. So
memory holds one batch however many trajectories are asked for, and a rerun with the same spec
and output folder resumes: shards whose sha256 checks out are kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from exporter import __version__
from exporter.errors import ExporterError, UsageError
from exporter.fileio import atomic_write_bytes, atomic_write_json, occupied
from exporter.models import load_conditioning, load_model
from exporter.models.loading import read_json
from exporter.recipe import CalibrationSpec
from exporter.reference import resolve
from exporter.sampling.loop import denoise_batch, initial_noise
from exporter.sampling.schedulers import make_scheduler, set_steps

log = logging.getLogger(__name__)

SPEC_FILE = "spec.json"
SCHEMA = 1


class CalibrationError(ExporterError):
    """Calibration data that is missing, corrupted, inconsistent or unusable."""


def recorded_steps(spec: CalibrationSpec, timesteps: list[int], trajectory: int,
                   num_train_timesteps: int = 1000) -> list[int]:
    """Indices into the scheduler's timesteps recorded for one trajectory."""
    n = len(timesteps)
    k = spec.steps_per_trajectory or n
    if spec.timestep_sampling == "uniform":
        return sorted(set(np.linspace(0, n - 1, k).round().astype(int).tolist()))
    # PTQ4DM: t ~ N(0.4 T, (0.4 T)^2), clamped, mapped to the nearest step; distinct steps.
    rng = np.random.default_rng(spec.seed * 7919 + trajectory)
    total = float(num_train_timesteps)
    chosen: list[int] = []
    t_values = np.asarray(timesteps, dtype=np.float64)
    for _ in range(100 * k):
        if len(chosen) == k:
            break
        t = float(np.clip(rng.normal(0.4 * total, 0.4 * total), 0, total - 1))
        index = int(np.argmin(np.abs(t_values - t)))
        if index not in chosen:
            chosen.append(index)
    return sorted(chosen)


def model_config(config: dict) -> dict:
    """The architecture part of a model's config.json (not diffusers' bookkeeping keys, ``_...``)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer, by name, as loaded."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256(path: Path) -> str:
    return _sha256_bytes(path.read_bytes())


def calibrate(model: str, out: str | Path, spec: CalibrationSpec, cond: str | Path | None = None,
              progress: bool = True) -> dict:
    from safetensors.torch import save
    from tqdm.auto import tqdm

    start = time.perf_counter()
    out = Path(out)
    loaded = load_model(resolve(model))
    adapter = loaded.adapter
    conditioning = load_conditioning(Path(cond) if cond else loaded.default_conditioning, adapter)
    rows = spec.rows if spec.rows is not None else list(range(conditioning.num_rows or 1))
    conditioning.check_rows(rows)
    shape = adapter.sample_shape_at(loaded.model, spec.latent)  # a latent the model cannot take: refused here
    set_steps(make_scheduler(spec.scheduler, loaded.scheduler_config), spec.steps)  # a step count it cannot take too
    blocks = adapter.blocks(loaded.model, split=spec.split)
    read = {n for b in blocks for n in b.inputs}
    produced_in_order = [n for b in blocks for n in (*b.inputs, *b.outputs)]  # model inputs come first
    # recorded tensors in the order the model computes them: the first NaN named is the earliest one
    names = [n for n in dict.fromkeys(produced_in_order) if n in read]

    state = {
        "schema": SCHEMA,
        "model": str(loaded.directory),
        "model_class": adapter.class_name,
        # what the model was, not only where: a calibration of another config is refused where it is
        # used, and other weights under the same path do not resume
        "model_config": model_config(adapter.config),
        "weights_sha256": weights_sha256(loaded.model),
        "conditioning": str(conditioning.source) if conditioning.source else None,
        # what the rows were, not only where: another file under the same name must not resume
        "conditioning_sha256": _sha256(conditioning.source) if conditioning.source else None,
        "spec": dataclasses.asdict(spec),
        "blocks": [{"name": b.name, "inputs": list(b.inputs), "outputs": list(b.outputs)} for b in blocks],
        "tensors": names,
        "shards": {},
        "exporter_version": __version__,
    }
    state["shards"] = _resumable_shards(out, state)
    _write_state(out, state, complete=False)  # from the start: a run killed in its first shard resumes too
    n_batches = -(-spec.trajectories // spec.batch_trajectories)
    use_cfg = spec.guidance > 1.0 and conditioning.cond is not None
    bar = tqdm(total=n_batches * spec.steps, desc="calibrating", unit="step", disable=not progress or None)
    for batch_index in range(n_batches):
        shard_name = f"shard-{batch_index:05d}.safetensors"
        if shard_name in state["shards"]:
            bar.update(spec.steps)
            continue
        first = batch_index * spec.batch_trajectories
        ids = list(range(first, min(first + spec.batch_trajectories, spec.trajectories)))
        tensors = _record_batch(loaded, conditioning, blocks, names, spec, shape, rows, ids, use_cfg, bar)
        meta = {"trajectories": f"{ids[0]}-{ids[-1]}"}
        data = save(tensors, metadata=meta)
        atomic_write_bytes(out / shard_name, data)
        ts = tensors["t"].tolist()
        state["shards"][shard_name] = {"sha256": _sha256_bytes(data), "samples": len(ts),
                                       "trajectories": [ids[0], ids[-1]], "timesteps": dict(Counter(ts))}
        _write_state(out, state, complete=False)
    bar.close()
    _write_state(out, state, complete=True)
    log.info("calibration of %d trajectories: %d samples over %d timesteps in %.1fs", spec.trajectories,
             sum(s["samples"] for s in state["shards"].values()), len(state["coverage"]), time.perf_counter() - start)
    return state


def _record_batch(loaded, conditioning, blocks, names, spec, shape, rows, ids, use_cfg,
                  bar) -> dict[str, torch.Tensor]:
    from exporter.models.blocks import run_blocks
    from exporter.models.non_finite import all_finite, first_non_finite_module

    adapter = loaded.adapter
    scheduler = make_scheduler(spec.scheduler, loaded.scheduler_config)
    set_steps(scheduler, spec.steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    train_steps = scheduler.config.num_train_timesteps
    chosen = {i: set(recorded_steps(spec, timesteps, i, train_steps)) for i in ids}
    traj_rows = [rows[i % len(rows)] for i in ids]
    noise = torch.stack([initial_noise(shape, spec.seed, r, i) for r, i in zip(traj_rows, ids)])
    cond, uncond = conditioning.batch(traj_rows)
    records: dict[str, list[torch.Tensor]] = {n: [] for n in names + ["t", "trajectory", "null_condition"]}

    def denoise_and_record(model_in, t_batch, cond_in, step):
        env = adapter.named_inputs(model_in, t_batch, cond_in)
        eps = run_blocks(blocks, env, ("noise_pred",), keep=env)[0]
        # every step, recorded or not: the first step to go NaN/Inf had finite inputs, so the module is found
        broken = next((n for n in [*names, "noise_pred"]
                       if env[n].is_floating_point() and not all_finite(env[n])), None)
        if broken is not None:
            found = first_non_finite_module(
                loaded.model, lambda: adapter.denoise(loaded.model, model_in, t_batch, cond_in))
            raise CalibrationError(f"NaN/Inf in tensor {broken!r} at t={int(t_batch[0])}: the FP model diverged "
                                   f"({found})")
        take = [j for j, i in enumerate(ids) if step in chosen[i]]
        if take:
            # with CFG the batch is [null; conditional]: record both halves of each chosen trajectory
            index = torch.tensor(take + [j + len(ids) for j in take] if use_cfg else take)
            for n in names:
                records[n].append(env[n][index].contiguous())
            records["t"].append(t_batch[index].to(torch.int64))
            records["trajectory"].append(torch.tensor([ids[j] for j in take] * (2 if use_cfg else 1)))
            records["null_condition"].append(
                torch.tensor([True] * len(take) + [False] * len(take) if use_cfg else [False] * len(take)))
        return adapter.postprocess(eps)

    denoise_batch(denoise_and_record, spec.scheduler, loaded.scheduler_config, noise, cond, uncond, spec.steps,
                  spec.guidance if use_cfg else 1.0, on_step=lambda: bar.update(1))
    return {n: torch.cat(v) for n, v in records.items() if v}


def _resumable_shards(out: Path, state: dict) -> dict:
    """Shards of an earlier, interrupted run with the same spec whose sha256 still checks out."""
    spec_file = out / SPEC_FILE
    debris = sorted(out.glob(".*.tmp")) if out.is_dir() else []  # half-written files of a killed run
    if not spec_file.is_file():
        if occupied(out) and set(out.iterdir()) != set(debris):  # e.g. a graphs folder: not ours to fill
            raise CalibrationError(f"{out} exists and is not a calibration folder; choose another --out or delete it")
        for path in debris:
            path.unlink()
        return {}
    for path in debris:
        path.unlink()
    old = read_json(spec_file, "calibration spec")
    if isinstance(old, dict) and not old.get("shards"):
        # an earlier run that stopped before its first shard (a refused option, a divergence, a kill):
        # nothing recorded to keep or mix with, whatever its spec was
        log.info("%s holds no recorded shard of an earlier run; starting over", out)
        return {}
    # spec fields added since that run was written take their defaults (e.g. latent: the model's own size)
    old["spec"] = {**dataclasses.asdict(CalibrationSpec()), **old.get("spec", {})}
    keys = ("schema", "model_class", "spec", "tensors")
    # folders written before conditioning_sha256 existed: the conditioning file's path at least
    same_conditioning = (old["conditioning_sha256"] == state["conditioning_sha256"] if "conditioning_sha256" in old
                         else _same_path(old.get("conditioning"), state["conditioning"]))
    # the model by content where the folder records it (config and weights, checked below), so the
    # same weights elsewhere resume (the bundled reference model of another checkout or install)
    by_content = "model_config" in old and "weights_sha256" in old
    if any(old.get(k) != state[k] for k in keys) or not (by_content or _same_path(old.get("model"), state["model"])):
        raise CalibrationError(f"{out} holds calibration data of another model or spec; "
                               "choose another --out or delete it")
    for key, what in (("model_config", "another config"), ("weights_sha256", "other weights")):
        if key in old and old[key] != state[key]:  # folders from before these keys: the path decided
            raise CalibrationError(f"{out} holds calibration data recorded from {what} than {state['model']} has "
                                   "now; choose another --out or delete it")
    if not same_conditioning:
        raise CalibrationError(f"{out} holds calibration data recorded with another conditioning file "
                               f"({old.get('conditioning')}); choose another --out or delete it")
    kept = {name: info for name, info in old.get("shards", {}).items()
            if (out / name).is_file() and _sha256(out / name) == info.get("sha256")}
    if kept:
        log.info("resuming: %d of the shards in %s are complete and verified", len(kept), out)
    return kept


def _same_path(a: str | None, b: str | None) -> bool:
    return (a is None) == (b is None) and (a is None or Path(a).resolve() == Path(b).resolve())


def _write_state(out: Path, state: dict, complete: bool) -> None:
    coverage: Counter = Counter()
    for info in state["shards"].values():
        coverage.update({int(t): n for t, n in info["timesteps"].items()})
    state["coverage"] = {str(t): coverage[t] for t in sorted(coverage)}
    state["complete"] = complete
    atomic_write_json(out / SPEC_FILE, state)


class CalibrationData:
    """A complete calibration folder: ``state`` (its spec.json) and the shards, loaded one at a time
    on iteration so memory holds one shard however much was recorded. Every shard is checked
    against its sha256 when the folder is opened."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        spec_file = directory / SPEC_FILE
        if not spec_file.is_file():
            raise CalibrationError(f"no {SPEC_FILE} in {directory}: not a calibration folder (run exporter calibrate)")
        state = read_json(spec_file, "calibration spec")
        if not state.get("complete"):
            raise CalibrationError(f"{directory}: calibration is incomplete; rerun exporter calibrate to resume it")
        if not state.get("coverage"):
            raise CalibrationError(f"{directory}: the calibration covers no timesteps")
        self.directory, self.state = directory, state
        self.paths = [directory / name for name in sorted(state["shards"])]
        for path in self.paths:
            if not path.is_file() or _sha256(path) != state["shards"][path.name]["sha256"]:
                raise CalibrationError(f"{path}: missing or modified since calibration (sha256 mismatch)")

    def check_recorded_from(self, adapter) -> None:
        """Refuse data recorded from another architecture than ``adapter``'s model: its tensors would
        not fit the blocks (a shape error or a missing tensor deep in a run)."""
        if self.state.get("model_class") != adapter.class_name:
            raise UsageError(f"{self.directory} was recorded from a {self.state.get('model_class')}, "
                             f"not this {adapter.class_name}")
        recorded = self.state.get("model_config")  # absent in folders from before 2026-12-05
        ours = json.loads(json.dumps(model_config(adapter.config)))  # as spec.json holds it (lists, not tuples)
        if recorded is not None and recorded != ours:
            differ = sorted(k for k in {*recorded, *ours} if recorded.get(k) != ours.get(k))
            shown = ", ".join(f"{k} {recorded.get(k)!r} there, {ours.get(k)!r} here" for k in differ[:3])
            raise UsageError(f"{self.directory} was recorded from a {adapter.class_name} of another config "
                             f"({shown}{', ...' if len(differ) > 3 else ''}); calibrate this model")

    @property
    def timesteps(self) -> list[int]:
        return sorted(int(t) for t in self.state["coverage"])

    @property
    def fingerprint(self) -> str:
        """sha256 of the shards' names and sha256s (checked at open): what a finetune run, whose
        learned steps multiply the scales PTQ took from this data, is tied to. A recalibration into
        the same folder (another seed, model or recipe) changes it."""
        shards = {name: info["sha256"] for name, info in sorted(self.state["shards"].items())}
        return _sha256_bytes(json.dumps(shards, sort_keys=True).encode())

    def __len__(self) -> int:
        return len(self.paths)

    def __iter__(self):
        for path in self.paths:
            yield self.load(path)

    @staticmethod
    def load(path: Path) -> dict:
        """One shard's tensors (one of ``paths``; checked at open)."""
        from safetensors.torch import load_file

        return load_file(str(path))
