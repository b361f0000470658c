"""Parity's inputs: recorded samples spread over each timestep group, run in calls of a bounded size
and compared over all of them."""

import numpy as np
from polygraphy.comparator import RunResults
from polygraphy.comparator.struct import IterationResult

from exporter.export.manifest import read_manifest
from exporter.models import load_model
from exporter.parity.check import joined
from exporter.parity.inputs import group_inputs, open_calibration, samples_per_group, split_batches, spread
from exporter.quant.timestep_groups import TimestepGroups


def test_samples_are_spread_over_the_timesteps_and_the_extra_ones_over_the_range():
    ts = [49.0 + 50 * i for i in range(20)]
    taken = spread(dict.fromkeys(ts, 8), 32)
    assert sum(taken.values()) == 32 and set(taken) == set(ts)  # every t, before any t twice
    twice = sorted(t for t, k in taken.items() if k == 2)
    assert set(taken.values()) == {1, 2} and len(twice) == 12
    # the 12 extra ones reach both ends of the range (before: the first 8 samples at t=49 only)
    assert twice[0] < 200 and twice[-1] > 800
    assert spread({1.0: 3, 2.0: 1}, 10) == {1.0: 3, 2.0: 1}  # all there is
    assert spread({1.0: 3, 2.0: 1}, 0) == {}


def test_each_group_gets_its_samples_from_every_recorded_timestep_it_covers(tiny_int8_graphs):
    manifest = read_manifest(tiny_int8_graphs)
    loaded = load_model(manifest["source"]["model"])
    blocks = loaded.adapter.blocks(loaded.model, split=loaded.adapter.cache_split(loaded.model))
    groups = TimestepGroups.from_dict(manifest["groups"])
    data = open_calibration(manifest["source"]["calibration"], loaded)
    recorded = sorted({float(t) for shard in data for t in shard["t"].tolist()})
    assert samples_per_group(data, groups.group_of, 32) == {g: 8 * sum(groups.group_of(t) == g for t in recorded)
                                                            for g in range(len(groups))}
    for g in range(len(groups)):
        inputs = group_inputs(manifest, loaded, blocks, data, groups.group_of, g, samples=32)
        in_group = [t for t in recorded if groups.group_of(t) == g]
        assert len(in_group) >= 2 and sorted(set(inputs["t"])) == in_group
        # 4 trajectories with guidance: 8 recorded samples per t, all of them (fewer than 32)
        assert len(inputs["t"]) == 8 * len(in_group) == samples_per_group(data, groups.group_of, 32)[g]
        assert all(len(v) == len(inputs["t"]) for v in inputs["env"].values())  # every block tensor, batch first
        assert np.array_equal(inputs["env"]["timestep"], np.array(inputs["t"], dtype=np.float32))
        few = group_inputs(manifest, loaded, blocks, data, groups.group_of, g, samples=4)
        assert len(few["t"]) == 4 and len(set(few["t"])) >= 2
        assert samples_per_group(data, groups.group_of, 4)[g] == 4


def test_calls_are_as_even_as_possible_and_joined_back_in_order():
    feed = {"x": np.arange(10, dtype=np.float32)[:, None], "t": np.arange(10)}
    calls = split_batches(feed, 4)
    assert [len(c["x"]) for c in calls] == [3, 4, 3]
    assert [len(c["x"]) for c in split_batches(feed, 10)] == [10]
    run = RunResults([("a", [IterationResult({"y": c["x"] * 2}, 0.5, "a") for c in calls])])
    ((name, (whole,)),) = joined(run)
    assert name == "a" and np.array_equal(whole["y"], feed["x"] * 2) and whole.runtime == 1.5
