"""The DeepCache benchmark's arithmetic (timings themselves are never asserted)."""

from exporter.bench import ideal_speedup


def test_ideal_speedup_is_amdahl_over_full_and_cached_steps():
    blocks = {"stem": 1.0, "down": 3.0, "mid": 4.0, "up": 1.0, "head": 1.0}
    # 20 steps, 7 full (10 s each) and 13 cached running stem + up + head (3 s each)
    assert abs(ideal_speedup(blocks, ["stem", "up", "head"], 20, 7) - 200 / (70 + 39)) < 1e-12
    assert ideal_speedup(blocks, list(blocks), 20, 7) == 1.0


def test_plan_has_every_kind_of_variant_once():
    from exporter.bench.variants import plan_variants

    names = [v.name for v in plan_variants(True, ["int8", "fp8"], [2, 5], ["uniform", "quadratic"], True)]
    assert names == ["pytorch-fp32", "deepcache-2", "deepcache-5", "ort-fp32", "ort-int8", "ort-fp8",
                     "ort-fp32-cache2", "ort-fp32-cache2-quadratic", "ort-fp32-cache5", "ort-fp32-cache5-quadratic",
                     "ort-int8-cache2", "ort-int8-cache2-quadratic", "ort-int8-cache5", "ort-int8-cache5-quadratic"]
    dit = [v.name for v in plan_variants(False, ["int8"], [3], ["uniform"], True)]
    assert dit == ["pytorch-fp32", "ort-fp32", "ort-int8", "ort-fp32-cache3", "ort-int8-cache3"]  # no DeepCache
