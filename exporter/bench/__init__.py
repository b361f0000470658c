"""``exporter bench``: PyTorch, the DeepCache package and our runtime (FP32, quantized, cached),
measured side by side in one run (see :mod:`exporter.bench.run`)."""

from exporter.bench.run import FULL, QUICK, BenchPlan, bench_model, format_bench, ideal_speedup, run_bench

__all__ = ["FULL", "QUICK", "BenchPlan", "bench_model", "format_bench", "ideal_speedup", "run_bench"]
