"""The DeepCache benchmark's arithmetic (timings themselves are never asserted)."""

from exporter.bench import ideal_speedup


def test_ideal_speedup_is_amdahl_over_full_and_cached_steps():
    blocks = {"stem": 1.0, "down": 3.0, "mid": 4.0, "up": 1.0, "head": 1.0}
    # 20 steps, 7 full (10 s each) and 13 cached running stem + up + head (3 s each)
    assert abs(ideal_speedup(blocks, ["stem", "up", "head"], 20, 7) - 200 / (70 + 39)) < 1e-12
    assert ideal_speedup(blocks, list(blocks), 20, 7) == 1.0
