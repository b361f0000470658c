import itertools
import logging

import numpy as np
import pytest

from exporter import UsageError
from exporter.quant.timestep_groups import TimestepGroups, bin_costs, choose_groups, optimal_bins


def brute_force(amax, k):
    cost = bin_costs(amax)
    n = cost.shape[0]
    best = None
    for cuts in itertools.combinations(range(1, n), k - 1):
        edges = (0, *cuts, n)
        total = sum(cost[a, b - 1] for a, b in itertools.pairwise(edges))
        if best is None or total < best[0]:
            best = (total, [(a, b - 1) for a, b in itertools.pairwise(edges)])
    return best


@pytest.mark.parametrize("seed", range(5))
def test_dynamic_programming_finds_the_brute_force_optimum(seed):
    amax = np.random.default_rng(seed).uniform(0.1, 5, (3, 9))
    for k in (1, 2, 3, 4):
        total, _bins = brute_force(amax, k)
        got = optimal_bins(amax, k)
        cost = bin_costs(amax)
        assert sum(cost[i, j] for i, j in got) == pytest.approx(total)
        # k contiguous, non-empty bins covering every t (a cheaper "partition" could skip some)
        assert len(got) == k and got[0][0] == 0 and got[-1][1] == amax.shape[1] - 1
        assert all(i <= j for i, j in got) and all(a[1] + 1 == b[0] for a, b in itertools.pairwise(got))


def test_groups_separate_a_range_jump_and_cover_every_t():
    t = np.arange(0, 1000, 50)  # 20 steps
    amax = np.where(t < 400, 1.0, 8.0)  # small activations near t=0, large at high noise
    groups = choose_groups(t, amax, 2)
    assert groups.ranges == [(0.0, 350.0), (400.0, 950.0)]
    assert groups.group_of(349) == 0 and groups.group_of(380) == 1 and groups.group_of(950) == 1
    assert choose_groups(t, amax, 1).ranges == [(0.0, 950.0)]


def test_a_layer_whose_input_is_zero_at_one_t_does_not_decide_the_groups():
    # layer 0 is exactly zero at t=0 (exact at any scale: no cost); layer 1 jumps tenfold at t=500
    amax = np.array([[0.0, 1, 1, 1], [1, 1, 10, 10]])
    assert choose_groups([0, 250, 500, 750], amax, 2).ranges == [(0.0, 250.0), (500.0, 750.0)]
    assert np.isfinite(bin_costs(amax)[np.triu_indices(4)]).all()


def test_outside_coverage_uses_nearest_group_and_warns_once(caplog):
    groups = TimestepGroups([(1.0, 300.0), (301.0, 951.0)])
    with caplog.at_level(logging.WARNING):
        assert groups.group_of(999) == 1 and groups.group_of(0) == 0
    assert caplog.text.count("outside the calibrated range") == 1
    assert TimestepGroups.from_dict(groups.to_dict()).ranges == groups.ranges


def test_bad_inputs_are_clear_errors():
    with pytest.raises(UsageError, match="covers none of the requested timesteps"):
        choose_groups([], np.zeros(0), 2)
    with pytest.raises(UsageError, match="NaN or Inf"):
        choose_groups([1, 2], np.array([1.0, np.nan]), 1)
