"""Where a PyTorch model call went NaN/Inf: the module that turned finite inputs into NaN/Inf.

The runtime names the first graph that did it; this is the same report for the PyTorch model
(``exporter sample``, FP32 or fake-quantized, and ``exporter calibrate``), one level finer: a
module, not a block. The model call is repeated with forward hooks only after it came out
non-finite, so the normal path pays one ``all_finite`` per step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _tensors(value) -> list[torch.Tensor]:
    """The floating-point tensors in a module's arguments or output (tuples, lists, dicts, diffusers outputs)."""
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in ``t``: its min and max are finite (NaN propagates through both; one fast pass,
    20x faster than isfinite().all() on CPU). The check every guard here uses."""
    if t.numel() == 0:
        return True
    low, high = torch.aminmax(t.detach())
    return bool(torch.isfinite(low) and torch.isfinite(high))


def first_non_finite_module(model: torch.nn.Module, call: Callable[[], object]) -> str:
    """Run ``call`` (one forward of ``model``) with hooks; describe the first module to finish whose
    inputs were finite and whose output was not. Modules finish after their children, so this is
    the innermost module where the NaN/Inf appeared (a parent is named when its own arithmetic did it)."""
    found: list[str] = []

    def hook(name: str):
        def check(module, args, kwargs, output):
            if found:
                return
            inputs = _tensors(args) + _tensors(kwargs)
            outputs = _tensors(output)
            if all(map(all_finite, outputs)) or not all(map(all_finite, inputs)):
                return
            peak = max((float(t.detach().abs().max()) for t in inputs if t.numel()), default=0.0)
            bad = sum(int((~torch.isfinite(t)).sum()) for t in outputs)
            size = sum(t.numel() for t in outputs)
            state = [n for n, p in [*module.named_parameters(), *module.named_buffers()]
                     if p is not None and p.is_floating_point() and not all_finite(p)]
            cause = ""
            if state:
                verb = "holds" if len(state) == 1 else "hold"
                cause = f"; its {', '.join(state)} {verb} NaN/Inf (a broken checkpoint or finetune)"
            found.append(f"module {name} ({type(module).__name__}) turned finite inputs (largest |value| "
                         f"{peak:.4g}) into {bad} NaN/Inf of {size} values{cause}")
        return check

    handles = [m.register_forward_hook(hook(n), with_kwargs=True) for n, m in model.named_modules() if n]
    try:
        with torch.inference_mode():
            call()
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else ("no module turned finite inputs into NaN/Inf (non-finite model inputs, or "
                                    "the model's own arithmetic between modules)")
