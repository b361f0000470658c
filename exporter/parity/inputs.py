"""The inputs parity feeds each graph: recorded model inputs spread over the timesteps of the
graph's group, run through the PyTorch blocks so every block sees what it sees in a denoising
trajectory."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import numpy as np
import torch

from exporter.errors import UsageError

# Recorded inputs per graph. A quantized block's SQNR against PyTorch averages a very uneven
# error over samples: where a float-level difference flips one rounding decision early in the
# block, later quantizers flip in turn and that sample alone may read 32-38 dB, while the others
# match to float precision (digits-unet's FP8 up1, three calibrations of 640 samples each: 17 to
# 19 % below 40 dB, 42.1 to 42.8 dB over all). The 8 samples at one t checked until 2026-12-05
# decided such a graph by how many of them cascaded (10 of 80 such batches fell below 40 dB); of
# 32 drawn from the 640, 1.7 to 5.3 % of draws do, of 64, 0.1 to 0.9 %.
SAMPLES = 64
BATCH = 8  # samples per call of each runner: what bounds memory (a real-size sample: ~1 GB of attention scores)


def open_calibration(calib: Path | None, loaded):
    """The calibration folder parity takes its inputs from, checked against the model."""
    from exporter.calibrate import CalibrationData

    if calib is None:
        raise UsageError("parity needs calibration data for real inputs: pass --calib (FP32 graphs) "
                         "or export from a calibration folder")
    data = CalibrationData(calib)
    data.check_recorded_from(loaded.adapter)
    return data


def samples_per_group(data, group_of, samples: int = SAMPLES) -> dict[int, int]:
    """How many samples ``group_inputs`` gives each timestep group the calibration covers: up to
    ``samples``, from the calibration's spec (no shard is read)."""
    recorded: dict[int, int] = {}
    for t, count in data.state["coverage"].items():
        g = group_of(float(t))
        recorded[g] = recorded.get(g, 0) + count
    return {g: min(samples, n) for g, n in sorted(recorded.items())}


def group_inputs(manifest, loaded, blocks, data, group_of, group: int, samples: int = SAMPLES,
                 latent: tuple[int, int] | None = None) -> dict:
    """``{"t": the timesteps, one per sample, "env": every block tensor (NumPy, batch first)}`` for
    up to ``samples`` recorded samples of timestep group ``group``, spread evenly over its recorded
    timesteps; each timestep's samples run through the PyTorch blocks at that t. Only shards that
    hold one of its timesteps are read, one at a time, until it has its samples (with steps drawn
    per trajectory, a shard may miss a group). One group at a time: at real size a sample's block
    tensors take 57 MiB (SD 1.5 layout, 64x64): 64 samples of 4 groups at once would hold 14 GiB.
    With ``latent``, the recorded latents are resized to it (bilinear) first."""
    context = getattr(loaded.model, "_exporter_context", None)
    parts: list[dict] = []
    have = 0
    for path in data.paths:
        if have >= samples:
            break
        # the shard's samples per t of this group, from the spec: a shard holding none is not read
        per_t = {float(t): n for t, n in data.state["shards"][path.name]["timesteps"].items()
                 if group_of(float(t)) == group}
        if not per_t:
            continue
        shard = data.load(path)
        for t, k in spread(per_t, samples - have).items():
            parts.append(_timestep_inputs(manifest, blocks, shard, t, k, latent, context))
            have += k
    return {"t": [t for p in parts for t in p["t"]],
            "env": {n: np.concatenate([p["env"][n] for p in parts]) for n in parts[0]["env"]}}


def spread(available: dict[float, int], wanted: int) -> dict[float, int]:
    """How many samples to take at each timestep: ``wanted`` in all (or every one available), one
    per timestep per round, the extra ones of the last round spread over the range rather than
    bunched at its low end."""
    ts = sorted(available)
    order = sorted(range(len(ts)), key=lambda i: (i * 0.6180339887) % 1)  # golden-ratio order: evenly spread
    taken = dict.fromkeys(ts, 0)
    while wanted > 0 and any(taken[t] < available[t] for t in ts):
        for i in order:
            t = ts[i]
            if wanted > 0 and taken[t] < available[t]:
                taken[t] += 1
                wanted -= 1
    return {t: k for t, k in taken.items() if k}


def call_bounds(total: int, batch: int) -> list[tuple[int, int]]:
    """[start, end) of each call when ``total`` samples go at most ``batch`` at a time, the calls
    as even as possible."""
    calls = -(-total // batch)
    return list(pairwise(round(i * total / calls) for i in range(calls + 1)))


def split_batches(feed: dict, batch: int) -> list[dict]:
    """``feed`` (every input batch first) as its calls (``call_bounds``)."""
    total = len(next(iter(feed.values())))
    return [{n: v[a:b] for n, v in feed.items()} for a, b in call_bounds(total, batch)]


def _timestep_inputs(manifest, blocks, shard, t: float, samples: int, latent, context) -> dict:
    """Every block tensor for the first ``samples`` recorded samples at ``t``."""
    from exporter.models.blocks import run_blocks

    index = (shard["t"] == t).nonzero().flatten()[:samples]
    env = {n: shard[n][index] for n in manifest["model_inputs"]}
    env["timestep"] = env["timestep"].to(torch.float32)
    if latent is not None and tuple(latent) != tuple(env["sample"].shape[2:]):
        env["sample"] = torch.nn.functional.interpolate(env["sample"].float(), size=tuple(latent), mode="bilinear",
                                                        align_corners=False).to(env["sample"].dtype)
    if context is not None:
        context.t = t
    with torch.no_grad():
        run_blocks(blocks, env, ("noise_pred",), keep=env)
    return {"t": [t] * len(index), "env": {n: v.numpy() for n, v in env.items()}}
