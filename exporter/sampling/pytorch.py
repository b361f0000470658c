"""``exporter sample``: images from the PyTorch model, FP32 (the yardstick's baseline) or
fake-quantized from a calibration folder (what the exported Q/DQ graphs must reproduce)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from exporter import __version__
from exporter.errors import NonFiniteError
from exporter.fileio import atomic_write_json
from exporter.imageio import write_image_folder
from exporter.models import load_conditioning, load_model, resolve_guidance
from exporter.models.non_finite import all_finite, first_non_finite_module
from exporter.quant.ptq import quantize_model
from exporter.recipe import QuantizationSpec
from exporter.reference import resolve
from exporter.sampling.loop import SampleSettings, generate

log = logging.getLogger(__name__)

BUILTIN_DEFAULTS = {"steps": 20, "scheduler": "ddim", "guidance": 1.0, "per_row": 8}


def sample_pytorch(
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
    calib: str | Path | None = None,
    quantization: QuantizationSpec | None = None,
    finetuned: str | Path | None = None,
    latent: tuple[int, int] | None = None,
) -> dict:
    """Sample images with the PyTorch model into ``out``; returns the run record (also saved as
    ``out/samples.json``). Unset options come from the model directory's ``sampling.json``, then
    from built-in defaults; all rows of the conditioning file are used when ``rows`` is None.
    With ``quantization`` the model is fake-quantized first (PTQ from the calibration folder ``calib``;
    weight-only formats need none), and with ``finetuned`` an ``exporter finetune`` run merged in.
    ``latent``: (height, width) of the sample to denoise, default the model's own."""
    start = time.perf_counter()
    loaded = load_model(resolve(model))
    sample_shape = loaded.adapter.sample_shape_at(loaded.model, latent)  # refused here, before any work
    quant_summary = None
    if quantization is not None:
        quant_summary = quantize_model(loaded, quantization, calib)
    if finetuned is not None:
        from exporter.finetune import apply_finetune

        apply_finetune(loaded, finetuned, quantization)
    cond_path = Path(cond) if cond is not None else loaded.default_conditioning
    conditioning = load_conditioning(cond_path, loaded.adapter)
    defaults = {**BUILTIN_DEFAULTS, **loaded.sampling_defaults}
    settings = SampleSettings(
        rows=tuple(rows if rows is not None else range(conditioning.num_rows or 1)),
        per_row=per_row if per_row is not None else defaults["per_row"],
        steps=steps if steps is not None else defaults["steps"],
        scheduler=scheduler or defaults["scheduler"],
        guidance=resolve_guidance(guidance, defaults["guidance"], conditioning, loaded.adapter),
        seed=seed,
        batch_size=batch_size,
    )
    log.info("sampling %s (%s) with %s", loaded.directory, loaded.adapter.class_name, settings)

    context = getattr(loaded.model, "_exporter_context", None)

    def denoise(x, t, c, step):
        if context is not None:  # quantized layers pick the scales of t's group
            context.t = float(t[0])
        eps = loaded.adapter.denoise(loaded.model, x, t, c)
        if not all_finite(eps):  # stop at the first such step instead of writing black images
            where = f"step {step} (t={float(t[0]):g}" + (f", timestep group {context.group})" if context else ")")
            if not all_finite(x):
                raise NonFiniteError(f"{where}: the latents from the previous step were already NaN/Inf")
            found = first_non_finite_module(loaded.model, lambda: loaded.adapter.denoise(loaded.model, x, t, c))
            raise NonFiniteError(f"{where}: {found}")
        return eps

    images = generate(denoise, sample_shape, loaded.scheduler_config, conditioning, settings, progress)
    out = Path(out)
    write_image_folder(out, {key: img.numpy() for key, img in images.items()})
    record = {
        "model": str(loaded.directory),
        "model_class": loaded.adapter.class_name,
        "conditioning": str(cond_path) if cond_path else None,
        "precision": _precision(quantization),
        "calibration": str(calib) if calib is not None else None,
        "finetuned": str(finetuned) if finetuned is not None else None,
        "backend": "pytorch",
        "rows": list(settings.rows),
        "per_row": settings.per_row,
        "steps": settings.steps,
        "scheduler": settings.scheduler,
        "guidance": settings.guidance,
        "seed": settings.seed,
        "batch_size": settings.batch_size,  # float sums may differ by a grey level at another batch size
        "latent": list(sample_shape[1:]),
        "seconds": round(time.perf_counter() - start, 2),
        "exporter_version": __version__,
        "torch_version": torch.__version__,
    }
    atomic_write_json(out / "samples.json", record)
    if quant_summary is not None:
        atomic_write_json(out / "quantization.json", quant_summary)
    log.info("wrote %d images and grid.png to %s", len(images), out)
    return record


def _precision(spec: QuantizationSpec | None) -> str:
    """``fp32``, or e.g. ``w4a8`` / ``w8a8-fp8`` / ``w4a16`` for the model-wide formats."""
    if spec is None:
        return "fp32"
    bits = {"int8": "8", "fp8": "8", "int4": "4", "int6": "6"}
    name = f"w{bits[spec.weights]}a{bits[spec.activations] if spec.activations else '16'}"
    return name + ("-fp8" if "fp8" in (spec.weights, spec.activations) else "")
