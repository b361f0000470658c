"""The inputs parity feeds each graph: recorded model inputs of one t per timestep group, run
through the PyTorch blocks so every block sees what it sees in a denoising trajectory."""

from __future__ import annotations

from pathlib import Path

import torch

from exporter.errors import UsageError

SAMPLES = 8  # inputs per graph (a batch of 8)


def model_inputs(manifest, loaded, blocks, calib: Path | None, group_of, samples: int = SAMPLES,
                  latent: tuple[int, int] | None = None) -> dict[int, dict]:
    """Per timestep group: every block tensor (numpy) for up to ``samples`` recorded samples at
    one t of the group, from the first shard that has one (shards are read one at a time, until
    every group has its inputs: with steps drawn per trajectory a shard may miss a group); with
    ``latent``, the recorded latents resized to it (bilinear) before the blocks run on them."""
    from exporter.calibrate import CalibrationData

    if calib is None:
        raise UsageError("parity needs calibration data for real inputs: pass --calib (FP32 graphs) "
                         "or export from a calibration folder")
    data = CalibrationData(calib)
    data.check_recorded_from(loaded.adapter)
    context = getattr(loaded.model, "_exporter_context", None)
    per_group: dict[int, dict] = {}
    count = len(manifest["groups"]["ranges"]) if manifest["groups"] else 1
    for shard in data:
        if len(per_group) == count:
            break
        for t in sorted({float(t) for t in shard["t"].tolist()}):
            g = group_of(t)
            if g not in per_group:
                per_group[g] = _group_inputs(manifest, blocks, shard, t, samples, latent, context)
    return per_group


def _group_inputs(manifest, blocks, shard, t: float, samples: int, latent, context) -> dict:
    """Every block tensor for up to ``samples`` recorded samples at ``t``."""
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
    return {"t": t, "env": {n: v.numpy() for n, v in env.items()}}
