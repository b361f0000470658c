"""Observers: from observed values to the range (amax) a symmetric scale is built from.

* Activations stream through a ``HistogramObserver`` (|x| histogram whose range doubles as larger
  values arrive, so memory is fixed however much calibration data flows). From one histogram:
  ``max``, ``percentile`` (e.g. 99.99) and ``mse``: the amax minimising the expected squared
  error, clipping ((|x| - amax)^2 above it) plus rounding (step^2 / 12 below it, where the step is
  uniform for integers and grows with the exponent for FP8).
* Weights are small and known exactly, so ``weight_amax`` searches the MSE-optimal amax on the
  tensor itself, per output channel or per block of input channels (INT4), with the real fake
  quantization; ``max`` is the grid's last point, so MSE never does worse than max.
"""

from __future__ import annotations

import numpy as np
import torch

from exporter.errors import UsageError
from exporter.quant.formats import QuantFormat, block_amax, fake_quant, scale_from_amax

METHODS = ("max", "percentile", "mse")


class HistogramObserver:
    def __init__(self, bins: int = 2048):
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.float64)
        self.upper = 0.0  # histogram covers [0, upper]
        self.max = 0.0
        self.count = 0

    def observe(self, x: torch.Tensor) -> None:
        a = x.detach().abs().float().flatten()
        if not torch.isfinite(a).all():
            raise UsageError("observed NaN or Inf activations")
        if a.numel() == 0:
            return
        top = float(a.max())
        self.max = max(self.max, top)
        if self.upper == 0.0:
            self.upper = top if top > 0 else 1e-8
        while top > self.upper:  # double the range; merging neighbour bins keeps counts exact
            self.counts = self.counts.reshape(-1, 2).sum(1)
            self.counts = np.concatenate([self.counts, np.zeros(self.bins // 2)])
            self.upper *= 2
        hist = torch.histc(a, bins=self.bins, min=0.0, max=self.upper)
        self.counts += hist.double().numpy()
        self.count += a.numel()

    def _centers(self) -> np.ndarray:
        width = self.upper / self.bins
        return (np.arange(self.bins) + 0.5) * width

    def amax(self, method: str = "max", fmt: QuantFormat | None = None, percentile: float = 99.99) -> float:
        if self.count == 0:
            raise UsageError("observer saw no data: the quantizer was never calibrated")
        if method == "max":
            return self.max
        if method == "percentile":
            cdf = np.cumsum(self.counts) / self.counts.sum()
            index = int(np.searchsorted(cdf, percentile / 100.0))
            return float(min((index + 1) * self.upper / self.bins, self.max))
        if method == "mse":
            if fmt is None:
                raise UsageError("the mse observer needs the target format")
            candidates = np.linspace(0.05, 1.0, 96) * self.max
            errors = [expected_error(self._centers(), self.counts, c, fmt) for c in candidates]
            return float(candidates[int(np.argmin(errors))])
        raise UsageError(f"unknown observer {method!r}; choose one of {', '.join(METHODS)}")


def expected_error(values: np.ndarray, counts: np.ndarray, amax: float, fmt: QuantFormat) -> float:
    scale = amax / fmt.qmax
    clipped = values > amax
    if fmt.kind == "fp8":  # E4M3: 3 mantissa bits; subnormal step 2^-9 below 2^-6
        exponent = np.floor(np.log2(np.maximum(values / scale, 2.0**-6)))
        step = 2.0 ** (exponent - 3) * scale
    else:
        step = np.full_like(values, scale)
    err = np.where(clipped, (values - amax) ** 2, step**2 / 12)
    return float((err * counts).sum())


def weight_amax(w: torch.Tensor, fmt: QuantFormat, method: str = "mse", axis: int = 0,
                block_size: int | None = None, grid: int = 40) -> torch.Tensor:
    """Per-output-channel (``axis``) amax, or per block of ``block_size`` input channels (axis 1)."""
    w = w.detach().float()
    if block_size:
        amax = block_amax(w, block_size, axis=1)
        q_axis = 1
    else:
        dims = [d for d in range(w.ndim) if d != axis % w.ndim]
        amax = w.abs().amax(dim=dims) if dims else w.abs()
        q_axis = axis
    if method == "max":
        return amax
    if method != "mse":
        raise UsageError(f"weights support the max and mse observers, not {method!r}")
    best_amax, best_err = amax.clone(), None
    for ratio in np.linspace(0.3, 1.0, grid):
        cand = amax * float(ratio)
        err = (fake_quant(w, scale_from_amax(cand, fmt), fmt, axis=q_axis, block_size=block_size) - w) ** 2
        err = _reduce_like(err, amax, q_axis, block_size)
        if best_err is None:
            best_amax, best_err = cand, err
        else:
            better = err < best_err
            best_amax = torch.where(better, cand, best_amax)
            best_err = torch.where(better, err, best_err)
    return best_amax


def _reduce_like(err: torch.Tensor, amax: torch.Tensor, axis: int, block_size: int | None) -> torch.Tensor:
    """Sum squared errors over everything one scale covers, giving ``amax``'s shape."""
    if block_size:
        n = err.shape[1]
        pad = amax.shape[1] * block_size - n
        e = torch.nn.functional.pad(err.movedim(1, -1), (0, pad))
        return e.reshape(*e.shape[:-1], amax.shape[1], block_size).sum(-1).movedim(-1, 1)
    dims = [d for d in range(err.ndim) if d != axis % err.ndim]
    return err.sum(dim=dims) if dims else err
