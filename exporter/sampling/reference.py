"""``exporter sample``: FP32 reference images from the PyTorch model, the yardstick's baseline."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from exporter import __version__
from exporter.fileio import atomic_write_json
from exporter.imageio import write_image_folder
from exporter.models import load_conditioning, load_model
from exporter.reference import resolve
from exporter.sampling.loop import SampleSettings, generate

log = logging.getLogger(__name__)

BUILTIN_DEFAULTS = {"steps": 20, "scheduler": "ddim", "guidance": 1.0, "per_row": 8}


def sample_reference(
    model: str,
    out: str | Path,
    cond: str | Path | None = None,
    rows: list[int] | None = None,
    per_row: int | None = None,
    steps: int | None = None,
    scheduler: str | None = None,
    guidance: float | None = None,
    seed: int = 0,
    batch_size: int = 40,
    progress: bool = True,
) -> dict:
    """Sample images with the FP32 PyTorch model into ``out``; returns the run record (also saved
    as ``out/samples.json``). Unset options come from the model directory's ``sampling.json``, then
    from built-in defaults; all rows of the conditioning file are used when ``rows`` is None."""
    start = time.perf_counter()
    loaded = load_model(resolve(model))
    cond_path = Path(cond) if cond is not None else loaded.default_conditioning
    conditioning = load_conditioning(cond_path, loaded.adapter)
    defaults = {**BUILTIN_DEFAULTS, **loaded.sampling_defaults}
    settings = SampleSettings(
        rows=tuple(rows if rows is not None else range(conditioning.num_rows or 1)),
        per_row=per_row or defaults["per_row"],
        steps=steps or defaults["steps"],
        scheduler=scheduler or defaults["scheduler"],
        guidance=guidance if guidance is not None else defaults["guidance"],
        seed=seed,
        batch_size=batch_size,
    )
    log.info("sampling %s (%s) with %s", loaded.directory, loaded.adapter.class_name, settings)

    def denoise(x, t, c):
        return loaded.adapter.denoise(loaded.model, x, t, c)

    images = generate(denoise, loaded.adapter.sample_shape, loaded.scheduler_config, conditioning, settings, progress)
    out = Path(out)
    write_image_folder(out, {key: img.numpy() for key, img in images.items()})
    record = {
        "model": str(loaded.directory),
        "model_class": loaded.adapter.class_name,
        "conditioning": str(cond_path) if cond_path else None,
        "precision": "fp32",
        "backend": "pytorch",
        "rows": list(settings.rows),
        "per_row": settings.per_row,
        "steps": settings.steps,
        "scheduler": settings.scheduler,
        "guidance": settings.guidance,
        "seed": settings.seed,
        "seconds": round(time.perf_counter() - start, 2),
        "exporter_version": __version__,
        "torch_version": torch.__version__,
    }
    atomic_write_json(out / "samples.json", record)
    log.info("wrote %d images and grid.png to %s", len(images), out)
    return record
