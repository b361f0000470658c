"""Post-training quantization of a diffusers model in place, from recorded calibration data.

Every Conv2d/Linear not excluded becomes a ``QuantLayer``: its weight fake-quantized once
(per output channel, or per block of input features for INT4), its input fake-quantized with the
scale of the current timestep group. Split-shortcut sites quantize the two concatenated parts
with separate scales (the weight is per output channel, so splitting it along input channels
changes nothing numerically; the exporter writes it as two convolutions summed).

Calibration runs the blocks on the recorded inputs, one timestep at a time, one shard in memory:
pass 1 records each layer's input range per t and picks the timestep groups from them
(``choose_groups``); pass 2 (percentile / MSE observers only) fills one histogram per layer,
group and split part.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import time

import numpy as np
import torch
import torch.nn.functional as F

from exporter.errors import UsageError
from exporter.quant.formats import QuantFormat, compact, dequantize, fake_quant, get_format, quantize, scale_from_amax
from exporter.quant.observers import HistogramObserver, weight_amax
from exporter.quant.timestep_groups import TimestepGroups, choose_groups
from exporter.recipe import TENSORRT_INT4_BLOCKS, PrecisionOverride, QuantizationSpec

log = logging.getLogger(__name__)

COMPUTE_LAYERS = (torch.nn.Conv2d, torch.nn.Linear)
WEIGHT_ONLY_FORMAT = "int8"  # the weights of the adapter's default weight-only layers, in every format

# TensorRT runs INT4 weights only as weight-only GEMMs (ModelOpt quantizes only MatMul/Gemm to INT4
# and has no INT4 convolution), in blocks of 64 or 128 along the input features (its "Working with
# Quantized Types" guide: "The supported block sizes are {64, 128}"). Its ONNX parser infers the
# block size from the weight and scale shapes instead of reading ``block_size``, so a partial last
# block would be dequantized with other blocks than PyTorch and ONNX Runtime use: every block whole.
INT4_RULE = ("INT4 weights need a Linear layer whose input features are a multiple of the block size "
             "(TensorRT runs INT4 only in GEMMs, in whole blocks of 64 or 128)")
INT4_FALLBACK = "int8"
INT4_FALLBACK_REASON = f"{INT4_RULE}: INT8 weights"


def int4_block(layer: torch.nn.Module, block_size: int) -> int | None:
    """The INT4 block size of ``layer``: the recipe's, or TensorRT's smaller one (64) when the input
    features are not a multiple of it; None when the layer cannot hold INT4 weights (see above)."""
    if not isinstance(layer, torch.nn.Linear):
        return None
    sizes = [block_size] + [b for b in TENSORRT_INT4_BLOCKS if b < block_size]
    return next((b for b in sizes if layer.in_features % b == 0), None)


def positive_scale(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` with every value kept positive in its own float type: FP16 rounds scales under 2^-24
    (a dead input's floored range, 1e-12 / 127) to 0, which TensorRT refuses and lint reports."""
    floor = 2.0**-24 if scale.dtype == torch.float16 else torch.finfo(scale.dtype).tiny
    return scale.clamp_min(floor)


class TimestepContext:
    """The t of the current model call, shared by all quantized layers of one model."""

    def __init__(self):
        self.t: float | None = None
        self.groups: TimestepGroups | None = None
        self.calibration: str | None = None  # CalibrationData.fingerprint of the scales; None: weight-only

    @property
    def group(self) -> int:
        return 0 if self.groups is None else self.groups.group_of(self.t)


class QuantLayer(torch.nn.Module):
    """A Conv2d/Linear with fake-quantized weight and (unless weight-only) input.

    Buffers hold what the exporter writes: ``weight_scale`` (per output channel, or
    [out, in/block] for INT4 blocks) and ``act_scale`` [groups, parts] (parts = 2 at a split site).
    ``weight_q`` (the dequantized weight, in float) is kept for fast fake-quant forwards unless
    ``materialize=False``: then each forward dequantizes, and a real-size model holds its weights
    once, in int8 / float8, instead of twice more in float32.
    """

    def __init__(self, name: str, layer: torch.nn.Module, wfmt: QuantFormat, afmt: QuantFormat | None,
                 spec: QuantizationSpec, context: TimestepContext, split: int | None, materialize: bool = True):
        super().__init__()
        self.name, self.layer, self.context, self.split = name, layer, context, split
        self.wfmt, self.afmt = wfmt, afmt
        w = layer.weight.detach()
        if wfmt.name == "int4":  # whole blocks of input features of a Linear layer (plan_layers checked it)
            self.block_size, axis = int4_block(layer, spec.block_size), 1
            if self.block_size is None:
                raise UsageError(f"layer {name}: {INT4_RULE}")
            scale = scale_from_amax(weight_amax(w, wfmt, spec.weight_observer, block_size=self.block_size), wfmt)
        else:
            self.block_size, axis = None, 0
            scale = scale_from_amax(weight_amax(w, wfmt, spec.weight_observer, axis=0), wfmt)
        # the quantized values (integers, or FP8 values), stored exactly in int8 / float8; a plain
        # attribute, so exporting the model in FP16 (model.to(dtype)) cannot touch them
        self.weight_values = compact(quantize(w, scale, wfmt, axis=axis, block_size=self.block_size), wfmt)
        self.weight_shape = layer.weight.shape
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_q", self.dequantized_weight() if materialize else None)
        self.register_buffer("act_scale", torch.zeros(0))
        self.mode = "float"  # "observe_t" | "observe_hist" | "quant"
        self.per_t: dict[float, list[float]] = {}  # t -> input |max| per part
        self.hist: dict[int, list[HistogramObserver]] = {}  # group -> observer per part

    def dequantized_weight(self) -> torch.Tensor:
        axis = 1 if self.block_size else 0
        return dequantize(self.weight_values, self.weight_scale, axis=axis,
                          block_size=self.block_size).reshape(self.weight_shape)

    def drop_float_weight(self) -> None:
        """Free the original float weight (an SD 1.5 UNet's 3.4 GB, an SDXL UNet's 10 GB). Only for
        models that stay in "quant" mode: calibration modes and finetuning need the original."""
        self.layer.weight = torch.nn.Parameter(torch.empty(0, dtype=self.weight_scale.dtype), requires_grad=False)

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
        elif self.mode == "quant" and torch.onnx.is_in_onnx_export():
            return self._onnx_forward(x)
        elif self.mode == "quant" and self.afmt is not None:
            if self.act_scale.numel() == 0:
                raise UsageError(f"layer {self.name}: activation quantizer is uncalibrated (run quantize_model)")
            scales = self.act_scale[self.context.group]
            x = torch.cat([fake_quant(p, s, self.afmt) for p, s in zip(self.parts(x), scales)], dim=1)
        if self.mode != "quant":
            return self._compute(x, self.layer.weight, self.layer.bias)
        return self._compute(x, self.weight_q if self.weight_q is not None else self.dequantized_weight(),
                             self.layer.bias)

    def _compute(self, x, weight, bias):
        if isinstance(self.layer, torch.nn.Conv2d):
            return self.layer._conv_forward(x, weight, bias)
        return F.linear(x, weight, bias)

    # --- ONNX export: the same computation as standard Q/DQ nodes (see exporter.quant.onnx_ops) ---

    def prepare_export(self, group: int) -> None:
        """Buffers the graph of timestep group ``group`` stores: the quantized weight (two halves
        at a split site), its scales, and this group's activation scales and zero point."""
        from exporter.quant.onnx_ops import INT4_MARK, storage_dtype

        mark = f"_{INT4_MARK}" if self.wfmt.name == "int4" else ""
        q = self.weight_values.to(storage_dtype(self.wfmt))
        with torch.no_grad():
            self.weight_scale.copy_(positive_scale(self.weight_scale))  # a no-op unless FP16 rounded one to 0
        if self.block_size:  # the layout TensorRT's INT4 GEMMs take (and ModelOpt writes): W [in, out] and
            q = q.t()  # its scales [in / block, out], blocked along axis 0, DequantizeLinear straight into MatMul
            self.register_buffer("onnx_weight_scale", self.weight_scale.t().contiguous())
        self._weight_names = []
        halves = self.split and not self.block_size  # per-channel scales hold for both halves
        for i, part in enumerate([q[:, : self.split], q[:, self.split :]] if halves else [q]):
            self._weight_names.append(f"onnx_weight{i}{mark}")
            self.register_buffer(self._weight_names[-1], part.contiguous())
        if self.afmt is not None:
            for i, scale in enumerate(self.act_scale[group]):  # in the graph's float type, like the weight scale
                self.register_buffer(f"onnx_act_scale{i}", positive_scale(scale.clone().to(self.weight_scale.dtype)))
            int4 = self.afmt.name == "int4"
            self._zero_point_name = f"onnx_zero_point_{INT4_MARK}" if int4 else "onnx_zero_point"
            # An INT4 zero point is uint8 until retyped: torch's exporter merges equal buffers of one
            # dtype, and an int8 0 would merge with INT8 layers' zero points under one name and type.
            dtype = torch.uint8 if int4 else storage_dtype(self.afmt)
            self.register_buffer(self._zero_point_name, torch.zeros((), dtype=dtype))

    def _onnx_forward(self, x):
        from exporter.quant.onnx_ops import DequantizeWeight, QuantizeDequantize

        parts = self.parts(x)
        if self.afmt is not None:
            zero_point = getattr(self, self._zero_point_name)
            parts = [QuantizeDequantize.apply(p, getattr(self, f"onnx_act_scale{i}"), zero_point)
                     for i, p in enumerate(parts)]
        if self.block_size:  # x @ W + b, no Transpose between the weight and the MatMul
            w = DequantizeWeight.apply(getattr(self, self._weight_names[0]), self.onnx_weight_scale, 0, self.block_size)
            y = torch.matmul(parts[0], w)
            return y if self.layer.bias is None else y + self.layer.bias
        weights = [DequantizeWeight.apply(getattr(self, n), self.weight_scale, 0, 0) for n in self._weight_names]
        if len(parts) == 1:
            return self._compute(parts[0], weights[0], self.layer.bias)
        # Split shortcut: two quantized convolutions summed, each input half with its own scale
        # (a Concat of two differently scaled Q/DQ tensors would leave the convolution in float).
        return self._compute(parts[0], weights[0], self.layer.bias) + self._compute(parts[1], weights[1], None)


def _release_weight_file(model: torch.nn.Module) -> None:
    """diffusers maps the safetensors file into memory and the float tensors still in use (biases,
    norms, excluded layers) point into it, which keeps every page of the file resident, the
    dropped weights' pages included (3.4 GB at SD 1.5 size). Copying those tensors out lets the
    mapping go."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()


def _replace(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _check_patterns(names: list[str], patterns: list[str], what: str) -> None:
    """A recipe pattern that matches no layer is a typo, never silently ignored."""
    for pattern in patterns:
        if not any(fnmatch.fnmatch(n, pattern) for n in names):
            raise UsageError(f"{what} pattern {pattern!r} matches no Conv2d/Linear layer of the model "
                             f"(layers look like {names[0]!r}, {names[-1]!r})")


def plan_layers(model: torch.nn.Module, adapter, spec: QuantizationSpec) -> tuple[dict, list, list]:
    """Which layers get quantized in which formats; which stay in float and which take their
    formats from a precision override (the adapter's weight-only defaults or the recipe's), each
    with the reason."""
    names = [n for n, m in model.named_modules() if isinstance(m, COMPUTE_LAYERS)]
    if spec.exclude is None:
        exclusions = list(adapter.default_exclusions)
    else:
        exclusions = [(e.pattern, e.reason) for e in spec.exclude]
        _check_patterns(names, [p for p, _ in exclusions], "exclude")
    if spec.precision is None:
        overrides = [PrecisionOverride(p, WEIGHT_ONLY_FORMAT, None, r) for p, r in adapter.default_weight_only]
    else:
        overrides = spec.precision
        _check_patterns(names, [o.pattern for o in overrides], "precision")
    plan, excluded, overridden = {}, [], []
    for name in names:
        reason = next((r for p, r in exclusions if fnmatch.fnmatch(name, p)), None)
        if reason is not None:
            excluded.append({"layer": name, "reason": reason})
            continue
        override = next((o for o in overrides if fnmatch.fnmatch(name, o.pattern)), None)
        chosen = override or spec
        weights = chosen.weights
        reason = (override.reason or "recipe precision override") if override else None
        if weights == "int4" and int4_block(model.get_submodule(name), spec.block_size) is None:
            weights, reason = INT4_FALLBACK, INT4_FALLBACK_REASON
        if reason is not None:
            overridden.append({"layer": name, "weights": weights, "activations": chosen.activations, "reason": reason})
        plan[name] = (get_format(weights), get_format(chosen.activations) if chosen.activations else None)
    return plan, excluded, overridden


def quantize_model(loaded, spec: QuantizationSpec, calib_dir=None, keep_float_weights: bool = True,
                   record: dict | None = None) -> dict:
    """Quantize ``loaded.model`` in place from a calibration folder (not needed for weight-only
    formats); returns a summary. ``keep_float_weights=False`` frees each layer's original weight
    once calibrated (see ``QuantLayer.drop_float_weight``): export and parity never need it
    unless a finetune run is merged afterwards, and at real size it is gigabytes.

    ``record``: the summary of an earlier call (an export's ``quantization.json``): its timestep
    groups and activation scales are taken as they are instead of measured again. Parity rebuilds
    the model the graphs were exported from this way: exactly their scales, whatever calibration it
    takes its inputs from, and without the calibration passes.

    Afterwards ``loaded.model._exporter_context.t`` must be set to the current t before each call
    (the sampler's denoise function does it) so each layer uses its timestep group's scales.
    """
    start = time.perf_counter()
    adapter, model = loaded.adapter, loaded.model
    plan, excluded, overridden = plan_layers(model, adapter, spec)
    sites = adapter.split_shortcut_sites(model) if spec.split_shortcut else {}
    context = TimestepContext()
    layers: dict[str, QuantLayer] = {}
    for name, (wfmt, afmt) in plan.items():
        layers[name] = QuantLayer(name, model.get_submodule(name), wfmt, afmt, spec, context,
                                  sites.get(name) if afmt else None, materialize=keep_float_weights)
        _replace(model, name, layers[name])
    model._exporter_context = context
    act_layers = {n: layer for n, layer in layers.items() if layer.afmt is not None}
    per_t_amax = None  # weight-only formats need no calibration data
    if act_layers and record is not None:
        _restore_scales(act_layers, context, record)
        per_t_amax = record.get("per_t_amax")
    elif act_layers:
        per_t_amax = _calibrate(act_layers, context, adapter, model, spec, calib_dir)
    for layer in layers.values():
        layer.mode = "quant"
        if not keep_float_weights:
            layer.drop_float_weight()
    if not keep_float_weights:
        _release_weight_file(model)
    seconds = round(time.perf_counter() - start, 1)
    summary = {
        "spec": dataclasses.asdict(spec),
        "quantized_layers": len(layers),
        "formats": {n: [layer.wfmt.name, layer.afmt.name if layer.afmt else None] for n, layer in layers.items()},
        "excluded": excluded,
        "precision_overrides": overridden,
        "split_shortcut_layers": sorted(n for n, layer in layers.items() if layer.split),
        "groups": context.groups.to_dict() if context.groups else None,
        "per_t_amax": per_t_amax,
        # what the graphs hold, unless a finetune run's learned steps are merged on top (parity
        # rebuilds the model from these: ``record`` above, then merges the run again), and the
        # calibration they were measured on (a finetune run checks it)
        "calibration_sha256": context.calibration,
        "act_scales": {n: layer.act_scale.tolist() for n, layer in act_layers.items()},
        "seconds": seconds,
    }
    log.info("quantized %d layers (%d kept in float), %d timestep group(s), %d split-shortcut site(s) in %.1fs%s",
             len(layers), len(excluded), len(context.groups) if context.groups else 0,
             len(summary["split_shortcut_layers"]), seconds,
             " (activation scales of the record)" if act_layers and record is not None else "")
    return summary


def _calibrate(act_layers: dict, context: TimestepContext, adapter, model, spec: QuantizationSpec,
               calib_dir) -> dict:
    """Measure the activation ranges on the calibration data, pick the timestep groups and set every
    layer's ``act_scale``; returns the per-t ranges (for the summary's plots)."""
    from exporter.calibrate import CalibrationData
    from exporter.models.blocks import partition

    if calib_dir is None:
        raise UsageError("activation quantization needs calibration data: run exporter calibrate first")
    blocks = partition(adapter.units(model), ("noise_pred",))
    data = CalibrationData(calib_dir)
    data.check_recorded_from(adapter)
    context.calibration = data.fingerprint

    def calibration_pass(mode: str, desc: str) -> None:
        from tqdm.auto import tqdm

        for layer in act_layers.values():
            layer.mode = mode
        with torch.inference_mode(), tqdm(total=len(data), desc=desc, unit="shard", disable=None) as bar:
            for shard in data:
                for t in torch.unique(shard["t"]).tolist():
                    context.t = float(t)
                    index = (shard["t"] == t).nonzero().flatten()
                    for block in blocks:
                        block(*(shard[n][index] for n in block.inputs))
                bar.update(1)

    calibration_pass("observe_t", "activation ranges per t")
    ts = [float(t) for t in data.timesteps]
    for name, layer in act_layers.items():
        missing = [t for t in ts if t not in layer.per_t]
        if missing:
            raise UsageError(f"quantizer of layer {name} left uncalibrated at t={missing[:5]}: "
                             "no calibration data reached it there")
    amax = np.array([[max(layer.per_t[t]) for t in ts] for layer in act_layers.values()])
    context.groups = choose_groups(ts, amax, spec.groups)
    if spec.act_observer == "max":
        for layer in act_layers.values():
            per_group = np.zeros((len(context.groups), len(layer.per_t[ts[0]])))
            for t, ranges in layer.per_t.items():
                g = context.groups.group_of(t)
                per_group[g] = np.maximum(per_group[g], ranges)
            layer.act_scale = scale_from_amax(torch.tensor(per_group), layer.afmt)
    else:
        calibration_pass("observe_hist", f"{spec.act_observer} observer")
        for layer in act_layers.values():
            layer.act_scale = scale_from_amax(torch.tensor([
                [obs.amax(spec.act_observer, layer.afmt, spec.percentile) for obs in layer.hist[g]]
                for g in range(len(context.groups))
            ]), layer.afmt)
            layer.hist.clear()
    return {"timesteps": ts, "layers": dict(zip(act_layers, amax.tolist()))}


def _restore_scales(act_layers: dict, context: TimestepContext, record: dict) -> None:
    """Set the timestep groups and every layer's ``act_scale`` from a summary of ``quantize_model``."""
    scales = record.get("act_scales")
    if not isinstance(scales, dict):
        raise UsageError("the quantization record holds no activation scales (records written before "
                         "2026-12-05 do not); re-export")
    if set(scales) != set(act_layers):
        other = sorted(set(scales) ^ set(act_layers))
        raise UsageError(f"this recipe quantizes {len(other)} layer(s) differently from the quantization record "
                         f"(first: {other[0]}, whose input only {'the record' if other[0] in scales else 'the recipe'}"
                         " quantizes); re-export")
    if not isinstance(record.get("groups"), dict):
        raise UsageError("the quantization record holds activation scales but no timestep groups; re-export")
    context.groups = TimestepGroups.from_dict(record["groups"])
    context.calibration = record.get("calibration_sha256")
    for name, layer in act_layers.items():
        scale = torch.tensor(scales[name], dtype=torch.float32)
        expected = (len(context.groups), 2 if layer.split else 1)
        if tuple(scale.shape) != expected or not bool((scale > 0).all()):
            raise UsageError(f"the quantization record's activation scale of {name} is not {expected[0]} x "
                             f"{expected[1]} positive numbers; re-export")
        layer.act_scale = scale
