"""Load a local diffusers-format model: a pipeline directory or a bare model directory.

* pipeline directory: ``unet/`` or ``transformer/`` (config.json + safetensors), ``scheduler/``, and
  optionally ``conditioning.safetensors`` and ``sampling.json`` (default guidance/steps/scheduler).
* bare model directory: ``config.json`` + ``diffusion_pytorch_model.safetensors``; the scheduler
  falls back to diffusers' DDPM defaults (with a warning).

Only safetensors weights are read: a ``.bin`` checkpoint would go through pickle, which can run code.
Every failure becomes a ``ModelError`` naming the file and what to do.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from exporter.errors import ModelError
from exporter.models.adapters import ArchitectureAdapter, adapter_for, model_class_of, supported_classes
from exporter.models.non_finite import all_finite
from exporter.reference import NAMES

log = logging.getLogger(__name__)

WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = WEIGHTS + ".index.json"
CONDITIONING = "conditioning.safetensors"
SAMPLING_DEFAULTS = "sampling.json"


@dataclass
class LoadedModel:
    directory: Path  # what the user named
    model_dir: Path  # the folder holding config.json and the weights
    model: torch.nn.Module
    adapter: ArchitectureAdapter
    scheduler_config: dict
    default_conditioning: Path | None = None
    sampling_defaults: dict = field(default_factory=dict)


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{path}: corrupted {what} ({e})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: {what} must be a JSON object")
    return data


def find_model_dir(directory: Path) -> Path:
    if not directory.exists():
        hint = "" if len(directory.parts) > 1 else f" (nor a reference name: {', '.join(NAMES)})"
        raise ModelError(f"model directory not found: {directory}{hint}")
    if not directory.is_dir():
        raise ModelError(f"{directory} is not a directory (expected a diffusers model or pipeline directory)")
    for sub in ("unet", "transformer"):
        if (directory / sub / "config.json").is_file():
            return directory / sub
    if (directory / "config.json").is_file():
        return directory
    raise ModelError(
        f"{directory}: no config.json, unet/config.json or transformer/config.json; "
        "expected a diffusers model directory (save_pretrained output) or pipeline directory"
    )


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files a model folder's weights are loaded from: the plain file, or the shards
    its index names (not other variants or components beside them)."""
    index = model_dir / WEIGHTS_INDEX
    if not index.is_file():
        return [model_dir / WEIGHTS]
    weight_map = read_json(index, "weights index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or \
            not all(isinstance(v, str) and v == Path(v).name for v in weight_map.values()):
        raise ModelError(f"{index}: not a weights index (a 'weight_map' of tensor name -> shard file name "
                         "in this folder)")
    return [model_dir / s for s in sorted(set(weight_map.values()))]


def check_weights(model_dir: Path) -> None:
    """Fail early, naming the file, on missing, pickled or corrupted weights."""
    from safetensors import SafetensorError, safe_open

    for f in weight_files(model_dir):
        if not f.is_file():
            pickled = list(model_dir.glob("*.bin")) + list(model_dir.glob("*.pt")) + list(model_dir.glob("*.ckpt"))
            # a download of one variant only (--include "*.fp16.*") names its files after the variant
            variants = sorted(p.name for p in model_dir.glob(f"{WEIGHTS.removesuffix('.safetensors')}*.*.safetensors"))
            hint = (
                f"; found {pickled[0].name}, but pickled checkpoints are not loaded (they can run code): "
                "convert it to safetensors first" if pickled else
                f"; found {variants[0]}, a weights variant: copy or link it (and its index, if sharded) under the "
                "plain name, which is what is loaded" if variants else ""
            )
            raise ModelError(f"weights not found: {f}{hint}")
        try:
            with safe_open(str(f), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelError(f"{f}: corrupted safetensors weights ({e})") from None


def load_model(directory: str | Path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    import diffusers

    directory = Path(directory)
    model_dir = find_model_dir(directory)
    config = read_json(model_dir / "config.json", "model config")
    if not config.get("_class_name"):
        raise ModelError(f"{model_dir / 'config.json'}: no '_class_name'; supported: {', '.join(supported_classes())}")
    class_name = model_class_of(config)
    adapter = adapter_for(class_name, config)
    check_weights(model_dir)
    try:
        model = getattr(diffusers, class_name).from_pretrained(
            model_dir, use_safetensors=True, local_files_only=True, torch_dtype=dtype
        )
    except Exception as e:  # noqa: BLE001  diffusers raises many kinds; the user needs the file and the reason
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{model_dir}: could not load {class_name} ({reason})") from None
    model.eval().requires_grad_(False)
    # diffusers leaves a weight the file lacks on the meta device (with a warning), where it fails
    # only when first used
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise ModelError(f"{model_dir}: the weights file lacks {len(missing)} tensor(s) of {class_name}, "
                         f"first {missing[0]}; the file does not belong to this config")
    # NaN/Inf weights (a diverged training run, a bad conversion) would only show as black images or
    # garbage INT8 scales much later; one pass over the weights (0.23 s for SD 1.5 here) names them now
    broken = next((n for n, p in model.named_parameters() if not all_finite(p)), None)
    if broken is not None:
        raise ModelError(f"{model_dir}: the weight {broken} holds NaN/Inf (a diverged training run or a broken "
                         "conversion); nothing can be calibrated, exported or sampled from it")
    sched_file = directory / "scheduler" / "scheduler_config.json"
    if model_dir != directory and sched_file.is_file():  # only a pipeline directory has a scheduler
        scheduler_config = read_json(sched_file, "scheduler config")
    else:
        log.warning("%s has no scheduler/scheduler_config.json; using diffusers' DDPM defaults", directory)
        scheduler_config = dict(diffusers.DDPMScheduler().config)
    cond_file = directory / CONDITIONING
    defaults_file = directory / SAMPLING_DEFAULTS
    return LoadedModel(
        directory=directory,
        model_dir=model_dir,
        model=model,
        adapter=adapter,
        scheduler_config=scheduler_config,
        default_conditioning=cond_file if cond_file.is_file() else None,
        sampling_defaults=read_sampling_defaults(defaults_file) if defaults_file.is_file() else {},
    )


def read_sampling_defaults(path: Path) -> dict:
    """A model folder's ``sampling.json``, checked like the options it stands in for: a NaN guidance
    (Python's json reads it) would silently turn guidance off, a string would fail mid-sampling."""
    from exporter.sampling.schedulers import SCHEDULERS

    data = read_json(path, "sampling defaults")
    unknown = sorted(set(data) - {"guidance", "steps", "scheduler"})
    if unknown:
        raise ModelError(f"{path}: unknown key(s) {unknown}; known: guidance, steps, scheduler")
    guidance, steps, scheduler = data.get("guidance"), data.get("steps"), data.get("scheduler")
    if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, (int, float))
                                 or not math.isfinite(guidance)):
        raise ModelError(f"{path}: guidance must be a finite number, got {guidance!r}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ModelError(f"{path}: steps must be a positive whole number, got {steps!r}")
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise ModelError(f"{path}: scheduler {scheduler!r} is not one of {', '.join(SCHEDULERS)}")
    return data
