"""Post-training quantization of a diffusers model in place, from recorded calibration data.

Every Conv2d/Linear not excluded becomes a ``QuantLayer``: its weight fake-quantized once
(per output channel, or per block of input channels for INT4), its input fake-quantized with the
scale of the current timestep group. Split-shortcut sites quantize the two concatenated parts
with separate scales (the weight is per output channel, so splitting it along input channels
changes nothing numerically; the exporter writes it as two convolutions summed).

Calibration runs the blocks on the recorded inputs, one timestep at a time:
pass 1 records each layer's input range per t and picks the timestep groups from them
(``choose_groups``); pass 2 fills one histogram per layer and group for the chosen observer.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from exporter.errors import UsageError
from exporter.quant.formats import fake_quant, get_format, scale_from_amax
from exporter.quant.observers import HistogramObserver, weight_amax
from exporter.quant.timestep_groups import TimestepGroups, choose_groups

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PTQConfig:
    weights: str = "int8"  # int8 | int4 | fp8
    activations: str | None = "int8"  # int8 | fp8 | int6 (simulation) | int4 | None (weight-only)
    weight_observer: str = "max"  # max | mse
    act_observer: str = "max"  # max | percentile | mse
    groups: int = 1  # timestep groups (1: one global scale)
    split_shortcut: bool = False
    block_size: int = 128  # INT4 weight blocks of input channels (capped at the channel count)


class TimestepContext:
    """The t of the current model call, shared by all quantized layers of one model."""

    def __init__(self):
        self.t: float | None = None
        self.groups: TimestepGroups | None = None

    @property
    def group(self) -> int:
        return 0 if self.groups is None else self.groups.group_of(self.t)


class QuantLayer(torch.nn.Module):
    def __init__(self, name: str, layer: torch.nn.Module, config: PTQConfig, context: TimestepContext,
                 split: int | None):
        super().__init__()
        self.name, self.layer, self.context, self.split = name, layer, context, split
        self.wfmt = get_format(config.weights)
        self.afmt = get_format(config.activations) if config.activations else None
        w = layer.weight.detach()
        if self.wfmt.name == "int4":
            block = min(config.block_size, w.shape[1])
            amax = weight_amax(w.flatten(1), self.wfmt, config.weight_observer, block_size=block)
            wq = fake_quant(w.flatten(1), scale_from_amax(amax, self.wfmt), self.wfmt, axis=1, block_size=block)
            wq = wq.reshape(w.shape)
        else:
            amax = weight_amax(w, self.wfmt, config.weight_observer, axis=0)
            wq = fake_quant(w, scale_from_amax(amax, self.wfmt), self.wfmt, axis=0)
        self.register_buffer("weight_q", wq)
        self.mode = "float"  # "observe_t" | "observe_hist" | "quant"
        self.per_t: dict[float, list[float]] = {}
        self.hist: dict[int, list[HistogramObserver]] = {}
        self.register_buffer("act_scale", torch.zeros(0))

    def parts(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [x[:, : self.split], x[:, self.split :]] if self.split else [x]

    def forward(self, x):
        if self.mode == "observe_t":
            ranges = [float(p.detach().abs().max()) for p in self.parts(x)]
            old = self.per_t.get(self.context.t)
            self.per_t[self.context.t] = ranges if old is None else [max(a, b) for a, b in zip(old, ranges)]
        elif self.mode == "observe_hist":
            observers = self.hist.setdefault(self.context.group, [HistogramObserver() for _ in self.parts(x)])
            for obs, part in zip(observers, self.parts(x)):
                obs.observe(part)
        elif self.mode == "quant" and self.afmt is not None:
            scales = self.act_scale[self.context.group]
            x = torch.cat([fake_quant(p, s, self.afmt) for p, s in zip(self.parts(x), scales)], dim=1)
        weight = self.weight_q if self.mode == "quant" else self.layer.weight
        if isinstance(self.layer, torch.nn.Conv2d):
            return self.layer._conv_forward(x, weight, self.layer.bias)
        return F.linear(x, weight, self.layer.bias)


def _replace(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantize_model(loaded, config: PTQConfig, calib_dir, exclusions=None) -> dict:
    """Quantize ``loaded.model`` in place from the calibration folder; returns a summary."""
    from exporter.calibrate import load_shards
    from exporter.models.blocks import partition

    start = time.perf_counter()
    adapter, model = loaded.adapter, loaded.model
    exclusions = adapter.default_exclusions if exclusions is None else exclusions
    sites = adapter.split_shortcut_sites(model) if config.split_shortcut else {}
    context = TimestepContext()
    layers: dict[str, QuantLayer] = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            continue
        if any(fnmatch.fnmatch(name, pattern) for pattern, _ in exclusions):
            continue
        layers[name] = QuantLayer(name, module, config, context, sites.get(name))
        _replace(model, name, layers[name])
    model._exporter_context = context  # the sampler sets t on it before each call

    state, shards = load_shards(calib_dir)
    blocks = partition(adapter.units(model), ("noise_pred",))

    def calibration_pass(mode: str) -> None:
        for layer in layers.values():
            layer.mode = mode
        with torch.inference_mode():
            for shard in shards:
                for t in torch.unique(shard["t"]).tolist():
                    context.t = float(t)
                    index = (shard["t"] == t).nonzero().flatten()
                    for block in blocks:
                        block(*(shard[n][index] for n in block.inputs))

    if config.activations:
        calibration_pass("observe_t")
        unseen = [n for n, layer in layers.items() if not layer.per_t]
        if unseen:
            raise UsageError(f"quantizer(s) left uncalibrated (no calibration data reached them): {unseen[:5]}")
        ts = sorted(next(iter(layers.values())).per_t)
        amax = np.array([[max(layer.per_t[t]) for t in ts] for layer in layers.values()])
        context.groups = choose_groups(ts, amax, config.groups)
        afmt = get_format(config.activations)
        if config.act_observer == "max":
            for layer in layers.values():
                per_group = [[0.0] * len(next(iter(layer.per_t.values()))) for _ in range(len(context.groups))]
                for t, ranges in layer.per_t.items():
                    g = context.groups.group_of(t)
                    per_group[g] = [max(a, b) for a, b in zip(per_group[g], ranges)]
                layer.act_scale = scale_from_amax(torch.tensor(per_group), afmt)
        else:
            calibration_pass("observe_hist")
            for layer in layers.values():
                layer.act_scale = scale_from_amax(torch.tensor([
                    [obs.amax(config.act_observer, afmt) for obs in layer.hist[g]] for g in range(len(context.groups))
                ]), afmt)
                layer.hist.clear()
    for layer in layers.values():
        layer.mode = "quant"
    summary = {
        "config": config.__dict__,
        "quantized_layers": len(layers),
        "excluded": [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
                     and not isinstance(m, QuantLayer) and not n.endswith(".layer")],
        "split_shortcut_layers": len([1 for layer in layers.values() if layer.split]),
        "groups": context.groups.to_dict() if context.groups else None,
        "seconds": round(time.perf_counter() - start, 1),
    }
    log.info("quantized %d layers (%s weights, %s activations, %d group(s)) in %.1fs", len(layers),
             config.weights, config.activations, config.groups, summary["seconds"])
    return summary
