"""``exporter finetune``: data-free distillation of a PTQ'd model from its own FP32 model.

The FP32 model (the teacher) samples DDIM trajectories from random noise and random conditioning
rows (no dataset). At every denoising step, the quantized model (the student: PTQ from the
calibration folder, then ``TrainableQuantLayer`` wrappers) predicts noise on the teacher's
input (both CFG halves), its MSE to the teacher's prediction is one optimizer step (EfficientDM).
Only the adapters (or, for the QAT baseline, the weights) and the activation steps train; the
learning rate of each layer's adapter is scaled by its weight step size (EfficientDM's
scale-aware rates).

The output folder holds ``finetune.safetensors`` (trainable tensors and Adam state, written
atomically every ``checkpoint_every`` trajectory batches: rerunning the same command resumes)
and ``finetune.json`` (what was finetuned from what, the loss curve, the wall time).
``apply_finetune`` merges a finished run into a freshly PTQ'd model, which then samples, exports
and checks parity exactly like a PTQ model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import torch

from exporter.errors import ExporterError, UsageError
from exporter.fileio import atomic_write_json
from exporter.finetune.trainable import TrainableQuantLayer
from exporter.models.non_finite import all_finite
from exporter.quant.ptq import QuantLayer, _replace
from exporter.recipe import FinetuneSpec, QuantizationSpec, quantization_from_dict

log = logging.getLogger(__name__)

CHECKPOINT = "finetune.safetensors"
RECORD = "finetune.json"


class FinetuneError(ExporterError):
    """A finetune folder that does not fit the model, calibration or quantization it is used with."""


def wrap(model: torch.nn.Module, spec: FinetuneSpec) -> dict[str, TrainableQuantLayer]:
    generator = torch.Generator().manual_seed(spec.seed)  # the same adapters on every (re)run
    layers = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLayer):
            layers[name] = TrainableQuantLayer(module, spec.rank, spec.method, generator)
            _replace(model, name, layers[name])
    return layers


def unwrap(model: torch.nn.Module, layers: dict[str, TrainableQuantLayer]) -> None:
    for name, layer in layers.items():
        layer.merge()
        _replace(model, name, layer.q)


def _optimizer(layers: dict[str, TrainableQuantLayer], spec: FinetuneSpec) -> torch.optim.Optimizer:
    mean_step = sum(layer.weight_step for layer in layers.values()) / len(layers)
    groups = []
    for layer in layers.values():
        weights = [layer.weight] if spec.method == "qat" else [layer.lora_A, layer.lora_B]
        groups.append({"params": weights, "lr": spec.lr * layer.weight_step / mean_step})
        if layer.log_steps() and spec.scale_lr > 0:
            groups.append({"params": layer.log_steps(), "lr": spec.scale_lr})
    return torch.optim.Adam(groups)


def _state_tensors(layers, optimizer) -> dict[str, torch.Tensor]:
    tensors = {f"{name}.{p}": t.detach().contiguous() for name, layer in layers.items()
               for p, t in layer.named_parameters(recurse=False)}
    for i, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"optimizer.{i}.{key}"] = torch.as_tensor(value).contiguous()
    return tensors


def _load_state(layers, optimizer, tensors: dict[str, torch.Tensor], where: Path) -> None:
    with torch.no_grad():
        for name, layer in layers.items():
            for p, t in layer.named_parameters(recurse=False):
                key = f"{name}.{p}"
                if key not in tensors or tensors[key].shape != t.shape:
                    raise FinetuneError(f"{where}: no matching {key}; it was written for another model or recipe, "
                                        "or by an exporter before 2026-12-05 (one log-step per layer, not per "
                                        "timestep group): finetune again")
                t.copy_(tensors[key])
    broken = _unusable_state(layers)  # NaN/Inf parameters (runs before finetune stopped at NaN) or unusable steps
    if broken:
        raise FinetuneError(f"{where}: {broken} (the finetuning diverged); finetune again with lower learning "
                            "rates (lr, scale_lr in the recipe's finetune: section)")
    if optimizer is not None:
        state = optimizer.state_dict()
        params = [p for group in optimizer.param_groups for p in group["params"]]
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, field = key.split(".", 2)
                if not index.isdigit() or int(index) >= len(params) or not all_finite(value) or (
                        field != "step" and value.shape != params[int(index)].shape):
                    raise FinetuneError(f"{where}: {key} does not fit the optimizer ({tuple(value.shape)}, or not "
                                        "finite); the checkpoint is damaged: finetune again into a new --out")
                state["state"].setdefault(int(index), {})[field] = value
        optimizer.load_state_dict(state)


def _non_finite(loss: torch.Tensor, layers: dict[str, TrainableQuantLayer]) -> str | None:
    """What went NaN/Inf in this optimizer step (the loss, or a gradient), or None."""
    if not all_finite(loss):
        return f"the loss is {loss.item()}"
    for name, layer in layers.items():
        for p, t in layer.named_parameters(recurse=False):
            if t.grad is not None and not all_finite(t.grad):
                return f"the gradient of {name}.{p} holds NaN/Inf"
    return None


def _unusable_state(layers: dict[str, TrainableQuantLayer]) -> str | None:
    """What an optimizer step left unusable (a parameter NaN/Inf, or an activation step that is
    Inf or 0 once the learned log-step multiplies the PTQ scale), or None."""
    for name, layer in layers.items():
        for p, t in layer.named_parameters(recurse=False):
            if not all_finite(t):
                return f"{name}.{p} holds NaN/Inf"
        if layer.q.afmt is not None:
            log_step = layer.log_step()
            steps = layer.q.act_scale.float() * torch.exp(log_step)
            if not all_finite(steps) or not bool((steps > 0).all()):
                return f"{name}.log_step makes activation steps Inf or 0 (|log step| up to {log_step.abs().max():.3g})"
    return None


def _diverged_message(broken: str, batch: int, batches: int, step: int, t: float, spec: FinetuneSpec, out: Path,
                      record: dict) -> str:
    done = record["done_batches"]
    kept = (f"{out / CHECKPOINT} still holds the state after batch {done} (loss {record['losses'][-1]:.3g}); "
            "nothing of the diverged batch was written" if done else "nothing was written")
    return (f"finetuning diverged in trajectory batch {batch + 1} of {batches}, denoising step {step} (t={t:g}): "
            f"{broken}; {kept}. Usually the learning rates (lr {spec.lr:g}, scale_lr {spec.scale_lr:g}) are too "
            "high for the model: lower them in the recipe's finetune: section and finetune again into a new --out")


def finetune(model: str, calib: str | Path, quantization: QuantizationSpec, spec: FinetuneSpec, out: str | Path,
             progress: bool = True) -> dict:
    """Finetune (or resume finetuning) into ``out``; returns the record written to ``finetune.json``."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from exporter.models import load_conditioning, load_model
    from exporter.quant.ptq import quantize_model
    from exporter.reference import resolve
    from exporter.sampling.loop import denoise_batch, initial_noise

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; finetuning writes a folder")
    # a finetune folder holds its record and checkpoint (and the temporary file of a killed write):
    # anything else (a graphs or calibration folder) is not ours to write into
    ours = (RECORD, CHECKPOINT, CHECKPOINT + ".partial")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in ours
                     and not (p.name.startswith(".") and p.name.endswith(".tmp"))) if out.is_dir() else []
    if foreign:
        raise UsageError(f"{out} exists and is not a finetune folder (it holds {foreign[0]}); choose another --out")
    teacher, student = load_model(resolve(model)), load_model(resolve(model))
    summary = quantize_model(student, quantization, calib)
    out.mkdir(parents=True, exist_ok=True)  # only now: a model or calibration refused above leaves no empty folder
    context = student.model._exporter_context
    identity = {"model": str(student.directory), "calibration": str(Path(calib).resolve()),
                "calibration_sha256": context.calibration, "quantization": dataclasses.asdict(quantization),
                "finetune": dataclasses.asdict(spec), "groups": summary["groups"]}
    identity = json.loads(json.dumps(identity))  # as finetune.json holds it (lists, not tuples)
    layers = wrap(student.model, spec)
    optimizer = _optimizer(layers, spec)
    record = {**identity, "done_batches": 0, "losses": [], "seconds": 0.0}
    if (out / RECORD).is_file():
        previous = _read_record(out / RECORD)
        if _resumable(previous) != _resumable(identity):
            raise UsageError(f"{out} holds a finetune of another model, calibration or recipe; choose another --out")
    if (out / RECORD).is_file() and (out / CHECKPOINT).is_file():  # resume
        tensors, saved = _load_checkpoint(out / CHECKPOINT)
        _load_state(layers, optimizer, tensors, out / CHECKPOINT)
        # the record saved inside the checkpoint: finetune.json is written after it, and a run killed
        # in between would otherwise train the last batch twice
        record = saved if saved is not None else previous
        atomic_write_json(out / RECORD, record)  # finished by that checkpoint: the record says so too
        log.info("resuming %s after %d trajectory batches", out, record["done_batches"])

    adapter = student.adapter
    conditioning = load_conditioning(student.default_conditioning, adapter)
    rows = list(range(conditioning.num_rows or 1))
    batches = -(-spec.trajectories // spec.batch)
    params = sum(p.numel() for group in optimizer.param_groups for p in group["params"])  # what trains
    log.info("finetuning %d layers (%s, %d trainable parameters) on %d trajectories x %d steps", len(layers),
             spec.method, params, spec.trajectories, spec.steps)
    teacher.model.requires_grad_(False)
    student.model.requires_grad_(False)
    for layer in layers.values():
        for p in layer.parameters(recurse=False):
            p.requires_grad_(True)

    def train_step(model_in, t, cond_in, step):
        with torch.inference_mode(False), torch.enable_grad():
            x, tt = model_in.clone(), t.clone()
            c = cond_in.clone() if isinstance(cond_in, torch.Tensor) else cond_in
            with torch.no_grad():
                target = adapter.denoise(teacher.model, x, tt, c)
            context.t = float(tt[0])
            loss = torch.nn.functional.mse_loss(adapter.denoise(student.model, x, tt, c), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            broken = _non_finite(loss, layers)
            if broken:  # stop before the step: Adam would carry NaN into every later checkpoint
                raise FinetuneError(_diverged_message(broken, b, batches, step, float(tt[0]), spec, out, record))
            optimizer.step()
            broken = _unusable_state(layers)
            if broken:  # the step itself diverged: nothing of it is written
                raise FinetuneError(_diverged_message(broken, b, batches, step, float(tt[0]), spec, out, record))
            losses.append(loss.item())
        return target  # the trajectory follows the FP32 model

    start = time.perf_counter() - record["seconds"]
    bar = tqdm(total=batches * spec.steps, initial=record["done_batches"] * spec.steps, desc="finetuning",
               unit="step", disable=not progress or None)
    for b in range(record["done_batches"], batches):
        count = min(spec.batch, spec.trajectories - b * spec.batch)
        keys = [(rows[(b * spec.batch + i) % len(rows)], b * spec.batch + i) for i in range(count)]
        noise = torch.stack([initial_noise(adapter.sample_shape, spec.seed, r, k) for r, k in keys])
        cond, uncond = conditioning.batch([r for r, _ in keys])
        losses: list[float] = []
        denoise_batch(train_step, "ddim", teacher.scheduler_config, noise, cond, uncond, spec.steps, spec.guidance,
                      on_step=lambda: bar.update(1))
        record["losses"].append(sum(losses) / len(losses))
        record["done_batches"] = b + 1
        record["seconds"] = round(time.perf_counter() - start, 1)
        bar.set_postfix(loss=f"{record['losses'][-1]:.2e}")
        if record["done_batches"] % spec.checkpoint_every == 0 or record["done_batches"] == batches:
            partial = out / (CHECKPOINT + ".partial")  # a kill leaves this, never a half checkpoint
            save_file(_state_tensors(layers, optimizer), str(partial), metadata={"record": json.dumps(record)})
            os.replace(partial, out / CHECKPOINT)
            atomic_write_json(out / RECORD, record)
    bar.close()
    log.info("finetuned %s in %.1fs (loss %.3g -> %.3g)", model, record["seconds"], record["losses"][0],
             record["losses"][-1])
    return record


def apply_finetune(loaded, folder: str | Path, quantization: QuantizationSpec) -> dict:
    """Merge a finetune run into ``loaded`` (already PTQ'd with ``quantization``, which must be the
    run's, from the run's calibration); returns the run's record."""
    folder = Path(folder)
    record = _record(folder)
    if Path(record["model"]).resolve() != Path(loaded.directory).resolve():
        raise FinetuneError(f"{folder} was finetuned from {record['model']}, not {loaded.directory}")
    batches = -(-record["finetune"]["trajectories"] // record["finetune"]["batch"])
    if record["done_batches"] < batches:
        raise FinetuneError(f"{folder}: finetuning stopped after {record['done_batches']} of {batches} batches; "
                            "rerun exporter finetune with the same options to finish it")
    context = getattr(loaded.model, "_exporter_context", None)
    groups = context.groups.ranges if context is not None and context.groups else None
    if json.loads(json.dumps(groups)) != (record["groups"] or {}).get("ranges"):
        raise FinetuneError(f"{folder} was finetuned with other timestep groups than this quantized model's; "
                            "use the calibration and recipe it was finetuned from")
    recorded = record.get("calibration_sha256")  # absent in runs from before 2026-12-05
    if recorded is not None and context is not None and context.calibration != recorded:
        # the same folder path, recalibrated since (another seed, say): PTQ's scales have moved
        raise FinetuneError(f"{folder} was finetuned on other calibration data than this model's "
                            f"({record['calibration']} has changed since); finetune again")
    if json.loads(json.dumps(dataclasses.asdict(quantization))) != record["quantization"]:
        # the learned steps multiply the PTQ scales of that quantization: on another one they mean nothing
        raise FinetuneError(f"{folder} was finetuned with another quantization than this one "
                            f"({record['quantization']}); use the recipe it was finetuned with")
    try:
        spec = FinetuneSpec(**record["finetune"])
    except TypeError as e:
        raise FinetuneError(f"{folder / RECORD}: its finetune section does not fit this version ({e})") from None
    layers = wrap(loaded.model, spec)
    _load_state(layers, None, _load_checkpoint(folder / CHECKPOINT)[0], folder / CHECKPOINT)
    unwrap(loaded.model, layers)
    return record


def _resumable(identity: dict) -> dict:
    """What a resume must match: all of a run's identity except how often it checkpoints."""
    finetune = {k: v for k, v in (identity.get("finetune") or {}).items() if k != "checkpoint_every"}
    return {**{k: identity.get(k) for k in IDENTITY_KEYS}, "finetune": finetune}


IDENTITY_KEYS = ("model", "calibration", "calibration_sha256", "quantization", "finetune", "groups")


def finetuned_source(folder: str | Path) -> tuple[str, Path, QuantizationSpec]:
    """(model, calibration folder, quantization spec) a finetune run was made from."""
    folder = Path(folder)
    record = _record(folder)
    return record["model"], Path(record["calibration"]), quantization_from_dict(record["quantization"],
                                                                                 f"{folder / RECORD}.quantization")


def _record(folder: Path) -> dict:
    """A finetune folder's ``finetune.json``, after checking the folder is one."""
    if not (folder / RECORD).is_file() or not (folder / CHECKPOINT).is_file():
        raise FinetuneError(f"{folder}: not a finetune folder (no {RECORD} / {CHECKPOINT}); run exporter finetune")
    return _read_record(folder / RECORD)


RECORD_KEYS = ("model", "calibration", "quantization", "finetune", "groups", "done_batches", "losses", "seconds")


def _read_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise FinetuneError(f"{path} is damaged (not JSON: {e}); finetune again into a new --out") from None
    missing = [k for k in RECORD_KEYS if not isinstance(record, dict) or k not in record]
    if missing:
        raise FinetuneError(f"{path} lacks {', '.join(missing)}; it is damaged or not a finetune record")
    return record


def _load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The checkpoint's tensors and the record saved with them (None: written before records were)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
            meta = f.metadata() or {}
        return tensors, json.loads(meta["record"]) if "record" in meta else None
    except (SafetensorError, OSError, ValueError) as e:  # a truncated or edited file
        raise FinetuneError(f"{path} is damaged ({str(e).splitlines()[0]}); finetune again into a new --out") from None
