"""``exporter bench``: DeepCache speed-up of the runtime, measured side by side, against its ideal.

On the bundled ``digits-unet`` (FP32 graphs, exported into ``OUT/graphs`` if absent), the same
images are generated without caching and at cache intervals 3 and 5 (shallowest branch, uniform
refresh), in interleaved rounds so machine noise hits every variant alike; the median per variant
is reported. The ideal speed-up follows from the per-block times of the uncached runs (Amdahl: a
cached step costs only the branch's blocks); the measured/ideal ratio shows what the runtime's own
overhead leaves on the table. Accuracy and PSNR against the uncached images show what caching costs.
Timings are never test assertions: this is a report.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

from exporter.fileio import atomic_write_json
from exporter.imageio import write_image_folder

log = logging.getLogger(__name__)

INTERVALS = (1, 3, 5)


def ideal_speedup(block_seconds: dict[str, float], shallow: list[str], steps: int, full_steps: int) -> float:
    full = sum(block_seconds.values())
    cached = sum(block_seconds[b] for b in shallow)
    return steps * full / (full_steps * full + (steps - full_steps) * cached)


def run_bench(out: str | Path, quick: bool = False, model: str = "digits-unet", progress: bool = True) -> dict:
    from exporter.eval import evaluate
    from exporter.export import export_graphs
    from exporter.runtime import Runtime, refresh_steps

    out = Path(out)
    graphs = out / "graphs"
    if not (graphs / "manifest.json").is_file():
        export_graphs(model, graphs, progress=progress)
    runtime = Runtime.load(graphs)
    rows, per_row, rounds = (list(range(10)), 8, 3) if not quick else (list(range(4)), 4, 1)
    steps = 20
    kwargs = dict(rows=rows, per_row=per_row, steps=steps, scheduler="ddim", seed=0, progress=False)
    runtime.generate(**{**kwargs, "rows": rows[:1], "per_row": 1, "steps": 2})  # open every session
    seconds: dict[int, list[float]] = {n: [] for n in INTERVALS}
    block_seconds: dict[str, float] = {}
    images = {}
    for r in range(rounds):
        for n in INTERVALS:
            runtime.seconds.clear()
            start = time.perf_counter()
            images[n] = runtime.generate(cache_interval=n, **kwargs)
            seconds[n].append(time.perf_counter() - start)
            if n == 1:
                for block, s in runtime.seconds.items():
                    block_seconds[block] = block_seconds.get(block, 0.0) + s / rounds
            log.info("round %d, interval %d: %.2fs", r + 1, n, seconds[n][-1])
    for n in INTERVALS:
        write_image_folder(out / f"interval{n}", {k: v.numpy() for k, v in images[n].items()})
    base = statistics.median(seconds[1])
    result = {"model": model, "steps": steps, "images": len(rows) * per_row, "rounds": rounds,
              "backend": runtime.backend.name, "variants": {}}
    for n in INTERVALS:
        plan = runtime.cache_plan(steps, n, None, "uniform")
        metrics = evaluate(out / f"interval{n}", out / "interval1")
        ideal = ideal_speedup(block_seconds, plan.shallow_blocks, steps, len(refresh_steps(steps, n)))
        measured = base / statistics.median(seconds[n])
        result["variants"][str(n)] = {
            "seconds_median": statistics.median(seconds[n]), "seconds": seconds[n], "speedup": measured,
            "ideal_speedup": ideal, "fraction_of_ideal": measured / ideal, "cached_feature": plan.feature,
            "blocks_on_cached_steps": plan.shallow_blocks if plan.feature else None,
            "accuracy": metrics["accuracy"], "psnr_vs_uncached": metrics["psnr_mean"]}
    result["block_seconds"] = block_seconds
    atomic_write_json(out / "bench.json", result)
    return result


def format_bench(result: dict) -> str:
    lines = [f"{result['model']}, {result['steps']} DDIM steps, {result['images']} images, backend "
             f"{result['backend']}, median of {result['rounds']} interleaved round(s):",
             "| cache interval | seconds | speed-up | ideal (Amdahl) | of ideal | accuracy | PSNR vs uncached |",
             "|---|---|---|---|---|---|---|"]
    for n, v in result["variants"].items():
        psnr = "identical" if v["psnr_vs_uncached"] is None else f"{v['psnr_vs_uncached']:.2f} dB"
        lines.append(f"| {'off' if n == '1' else n} | {v['seconds_median']:.2f} | {v['speedup']:.2f}x | "
                     f"{v['ideal_speedup']:.2f}x | {100 * v['fraction_of_ideal']:.0f} % | "
                     f"{100 * v['accuracy']:.1f} % | {psnr} |")
    return "\n".join(lines)
