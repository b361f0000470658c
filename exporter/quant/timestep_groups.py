"""Timestep groups: activation scales per bin of t (the noise level), chosen to minimise error.

A group is a contiguous range of timestep *values*, never a call counter, so one calibration
serves any scheduler and step count (per-call tables, as in EfficientDM/QuEST code, break when
the schedule changes).

Choosing the bins (``choose_groups``). Input: the recorded activation range ``amax[l, i]`` of
each quantized layer ``l`` at each calibrated timestep ``t_i`` (sorted). A bin shares one scale per
layer, set by the largest range in the bin, ``m_l = max_{i in bin} amax[l, i]``. Uniform
quantization noise power is proportional to the step size squared, so relative to giving ``t_i``
its own scale the bin costs ``(m_l / amax[l, i])^2`` at that timestep. The bin cost is the sum
over its timesteps and the layers (each layer normalised by itself, so wide layers do not
dominate); the partition of the sorted timesteps into ``K`` contiguous bins with the least total
cost is found exactly by dynamic programming, O(K T^2) over T calibrated timesteps:

    best[k][j] = min_i best[k-1][i-1] + cost(i..j)

Lookup: the threshold between two neighbouring groups is the midpoint of the last t of one and
the first t of the next (a t equal to it belongs to the later group). A t outside the calibrated
coverage uses the nearest group, with one warning per ``TimestepGroups`` object.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass, field

import numpy as np

from exporter.errors import UsageError

log = logging.getLogger(__name__)


def bin_costs(amax: np.ndarray) -> np.ndarray:
    """cost[i, j] for the bin of sorted timesteps i..j (inclusive); inf where j < i."""
    a = np.maximum(np.asarray(amax, dtype=np.float64), 0.0)
    if a.ndim == 1:
        a = a[None]
    n_layers, n_t = a.shape
    # an all-zero input is exact at any scale: it costs nothing (not (m / 0)^2, which would let that
    # one timestep decide the whole partition)
    inv_sq = np.divide(1.0, a**2, out=np.zeros_like(a), where=a > 0)
    inv_sq_prefix = np.concatenate([np.zeros((n_layers, 1)), np.cumsum(inv_sq, axis=1)], axis=1)
    cost = np.full((n_t, n_t), np.inf)
    for i in range(n_t):
        running_max = np.zeros(n_layers)
        for j in range(i, n_t):
            running_max = np.maximum(running_max, a[:, j])
            cost[i, j] = float(np.sum(running_max**2 * (inv_sq_prefix[:, j + 1] - inv_sq_prefix[:, i]))) / n_layers
    return cost


def optimal_bins(amax: np.ndarray, k: int) -> list[tuple[int, int]]:
    """Index ranges [(i0, j0), (i1, j1), ...] of the optimal contiguous partition into ``k`` bins."""
    cost = bin_costs(amax)
    n_t = cost.shape[0]
    k = min(k, n_t)
    best = np.full((k + 1, n_t + 1), np.inf)  # best[b][j]: first j timesteps in b bins
    best[0][0] = 0.0
    cut = np.zeros((k + 1, n_t + 1), dtype=int)
    for b in range(1, k + 1):
        for j in range(b, n_t + 1):
            candidates = [best[b - 1][i] + cost[i, j - 1] for i in range(b - 1, j)]
            i = int(np.argmin(candidates))
            best[b][j], cut[b][j] = candidates[i], i + b - 1
    bins, j = [], n_t
    for b in range(k, 0, -1):
        i = cut[b][j]
        bins.append((i, j - 1))
        j = i
    return bins[::-1]


@dataclass
class TimestepGroups:
    """K groups of timestep values; ``ranges[g]`` is the (min, max) calibrated t of group g."""

    ranges: list[tuple[float, float]]
    _warned: bool = field(default=False, repr=False, compare=False)

    def __post_init__(self):
        if not self.ranges:
            raise UsageError("timestep groups need at least one group")
        self.thresholds = [(a[1] + b[0]) / 2 for a, b in zip(self.ranges, self.ranges[1:])]

    @property
    def coverage(self) -> tuple[float, float]:
        return self.ranges[0][0], self.ranges[-1][1]

    def __len__(self) -> int:
        return len(self.ranges)

    def group_of(self, t: float) -> int:
        t = float(t)
        lo, hi = self.coverage
        if (t < lo or t > hi) and not self._warned:
            log.warning("timestep %g is outside the calibrated range [%g, %g]; using the nearest group "
                        "(calibrate with this schedule to cover it)", t, lo, hi)
            self._warned = True
        return bisect.bisect_right(self.thresholds, t)

    def to_dict(self) -> dict:
        # the thresholds are derived from the ranges, written out for readers of a manifest who pick
        # the group themselves (a server of their own): t < thresholds[0] is group 0, and so on
        return {"ranges": [list(r) for r in self.ranges], "thresholds": list(self.thresholds)}

    @classmethod
    def from_dict(cls, data: dict) -> TimestepGroups:
        return cls([tuple(r) for r in data["ranges"]])


def choose_groups(timesteps, amax: np.ndarray, k: int) -> TimestepGroups:
    """Optimal ``k`` groups for calibrated ``timesteps`` [T] with ranges ``amax`` [L, T] (or [T])."""
    t = np.asarray(timesteps, dtype=np.float64)
    if t.size == 0:
        raise UsageError("no calibrated timesteps: the calibration covers none of the requested timesteps")
    if k < 1:
        raise UsageError(f"number of timestep groups must be >= 1, got {k}")
    order = np.argsort(t)
    a = np.asarray(amax, dtype=np.float64)
    a = a[order] if a.ndim == 1 else a[:, order]
    if not np.isfinite(a).all():
        raise UsageError("recorded activation ranges contain NaN or Inf")
    bins = optimal_bins(a, k)
    return TimestepGroups([(float(t[order][i]), float(t[order][j])) for i, j in bins])
