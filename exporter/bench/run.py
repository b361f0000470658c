"""``exporter bench``: every variant a user could pick, measured side by side in one run.

Per reference model (layout of ``OUT/<model>/``: ``calib/``, ``graphs/<precision>/``,
``images/<variant>/``): the artifacts are made first (calibration, exports; reused when present
and still what this bench would make), per-block parity of the quantized graphs is checked, then
every variant (see :mod:`exporter.bench.variants`) is warmed up and timed in rounds in which the
variants take turns, one row of images each (the order reversing every turn), so machine drift
hits them alike: latency, one image per call (two with classifier-free guidance), and throughput,
40 images per call, for the FP32 variants that compete head to head (PyTorch, the DeepCache
package, our FP32 graphs, with and without caching). Then each variant's peak memory is measured in
a process of its own, and its images from the last round are scored against PyTorch FP32 of the
same seeds. Cached runtime variants also get the Amdahl ideal from the uncached run's per-block
times, and every runtime variant its time in graphs apart from the loop's own time around them
(scheduler, guidance, array conversions), which the ideal does not count. Results:
``OUT/bench.json`` and ``OUT/bench.md``. Timings are never test assertions.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from exporter.bench.probe import probe_peak_rss
from exporter.bench.variants import Variant, deepcache_available, open_variant, plan_variants
from exporter.errors import UsageError
from exporter.fileio import atomic_write_bytes, atomic_write_json
from exporter.imageio import write_image_folder
from exporter.sampling.loop import SampleSettings

log = logging.getLogger(__name__)

MODELS = ("digits-unet", "digits-dit")
PROBE_STEPS = 6  # memory probes: one batch, enough steps to cross every timestep group and cache refresh


@dataclass(frozen=True)
class BenchPlan:
    formats: tuple[str, ...]  # quantized graphs to run (the first also runs with caching)
    intervals: tuple[int, ...]
    schedules: tuple[str, ...]
    rows: tuple[int, ...]
    per_row: int
    rounds: int
    trajectories: int | None = None  # calibration trajectories (None: the bundled recipe's)
    steps: int = 20
    batch_size: int = 1  # latency: one image per request (x2 with CFG), as a server answers a prompt
    throughput_batch: int = 40  # throughput: PyTorch, DeepCache and FP32 graphs also at this batch


FULL = BenchPlan(("int8", "fp8", "w4a8"), (2, 3, 5), ("uniform", "quadratic"), tuple(range(10)), 8, 3)
QUICK = BenchPlan(("int8",), (3,), ("uniform", "quadratic"), tuple(range(4)), 4, 1, trajectories=8)


def ideal_speedup(block_seconds: dict[str, float], shallow: list[str], steps: int, full_steps: int) -> float:
    """Amdahl: full steps cost every block, cached steps only the branch's blocks."""
    full = sum(block_seconds.values())
    cached = sum(block_seconds[b] for b in shallow)
    return steps * full / (full_steps * full + (steps - full_steps) * cached)


def run_bench(out: str | Path, quick: bool = False, models: tuple[str, ...] = MODELS, progress: bool = True) -> dict:
    plan = QUICK if quick else FULL
    out = Path(out)
    import torch

    result = {"quick": quick, "plan": dataclasses.asdict(plan), "deepcache_package": _deepcache_version(),
              # the runtime's sessions are given PyTorch's thread count (exporter.bench.variants)
              "threads": {"torch": torch.get_num_threads(), "onnxruntime": torch.get_num_threads(),
                          "cpus": os.cpu_count()}, "models": {}}
    earlier = out / "bench.json"
    if earlier.is_file():  # a folder of the other mode holds calibration and graphs of another plan
        try:
            mode = json.loads(earlier.read_text()).get("quick")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise UsageError(f"{earlier} is not a bench result; choose another --out") from None
        if mode != quick:
            raise UsageError(f"{out} holds a {'full' if quick else 'quick'} bench; choose another --out (defaults: "
                             "runs/bench, runs/bench-quick)")
    from exporter.models.loading import find_model_dir
    from exporter.reference import resolve

    for model in models:  # a wrong name of the second model would otherwise stop the bench after the first's
        find_model_dir(resolve(model))
    names = [model_name(m) for m in models]
    if len(set(names)) != len(names):
        raise UsageError(f"two models of one name in --models ({', '.join(models)}): their results would share a folder")
    for model, name in zip(models, names):
        result["models"][name] = bench_model(model, out / name, plan, progress) | {"model": model}
        atomic_write_json(out / "bench.json", result)  # partial results survive a later failure
    atomic_write_bytes(out / "bench.md", (format_bench(result) + "\n").encode())
    return result


def model_name(model: str) -> str:
    """A model's name in the bench folder and report: a reference name, or its directory's name
    (resolved: ``.`` or ``..`` would put the model's folders outside its own)."""
    from exporter.reference import NAMES

    return model if model in NAMES else Path(model).expanduser().resolve().name


def prepare(model: str, root: Path, plan: BenchPlan, progress: bool) -> tuple[dict[str, Path], Path]:
    """Calibration and exported graphs of every precision (reused when already there)."""
    from exporter.calibrate import calibrate
    from exporter.export import export_graphs
    from exporter.recipe import resolve_recipe

    calib = root / "calib"
    spec = resolve_recipe(None, plan.formats[0], model).calibration
    if plan.trajectories is not None:
        spec = dataclasses.replace(spec, trajectories=plan.trajectories)
    _say(f"{model}: calibration ({spec.trajectories} trajectories x {spec.steps} steps)")
    calibrate(model, calib, spec, progress=progress)  # resumes / returns at once when complete
    graphs = {}
    for precision in ("fp32", *plan.formats):
        graphs[precision] = root / "graphs" / precision
        quantization = None if precision == "fp32" else resolve_recipe(None, precision, model).quantization
        if (graphs[precision] / "manifest.json").is_file():
            stale = stale_export(graphs[precision], model, quantization, calib)
            if stale is None:
                continue
            _say(f"{model}: {graphs[precision]} cannot be reused ({stale}): exporting again")
            shutil.rmtree(graphs[precision])
        _say(f"{model}: exporting {precision} graphs")
        export_graphs(model, graphs[precision], calib=calib if quantization else None, quantization=quantization,
                      progress=progress)
    return graphs, calib


def stale_export(folder: Path, model: str, quantization, calib: Path) -> str | None:
    """Why the graphs a bench root already holds are not what this bench would export (None: they
    are): a folder from an older exporter, another recipe (the bundled ones change between versions),
    another calibration, or of a model elsewhere (parity and PyTorch load the manifest's model path)
    would be measured, or refused by parity, under this bench's name."""
    from exporter.calibrate import CalibrationData
    from exporter.errors import ExporterError
    from exporter.export.manifest import read_manifest, read_record
    from exporter.reference import resolve

    try:
        manifest = read_manifest(folder)
        if Path(manifest["source"]["model"]).resolve() != Path(resolve(model)).resolve():
            return f"exported from {manifest['source']['model']}"
        if quantization is None:
            return None if manifest["quantization"] is None else "quantized graphs where FP32 ones belong"
        if manifest["quantization"] is None:
            return "FP32 graphs where quantized ones belong"
        if manifest["quantization"]["spec"] != json.loads(json.dumps(dataclasses.asdict(quantization))):
            return "exported with another recipe"
        if read_record(folder, manifest).get("calibration_sha256") != CalibrationData(calib).fingerprint:
            return "exported from another calibration"
    except ExporterError as e:
        return str(e)
    return None


def block_parity(graphs: Path, calib: Path) -> list[dict]:
    """Per-graph SQNR of PyTorch fake quant vs ONNX Runtime (the report's bar chart)."""
    from exporter.parity import check_parity

    results, _ = check_parity(graphs, calib=calib, write_golden=False, end_to_end_check=False)

    def worst(r) -> float | None:  # None: identical outputs (infinite SQNR, which JSON cannot hold)
        sqnr = min(s for s, _ in r.outputs.values())
        return None if math.isinf(sqnr) else sqnr

    return [{"block": r.block, "graph": r.graph, "group": r.group, "threshold_db": r.threshold,
             "sqnr_db": worst(r), "passed": r.passed} for r in results]


def bench_model(model: str, root: Path, plan: BenchPlan, progress: bool = True) -> dict:
    from exporter.eval import evaluate
    from exporter.export.manifest import deployed_bytes, read_manifest
    from exporter.reference import NAMES, resolve

    graphs, calib = prepare(model, root, plan, progress)
    parity = {}
    for precision in plan.formats:
        _say(f"{model}: per-block parity of the {precision} graphs")
        parity[precision] = block_parity(graphs[precision], calib)
    fp32_manifest = read_manifest(graphs["fp32"])
    is_unet = fp32_manifest["source"]["model_class"] == "UNet2DConditionModel"
    variants = plan_variants(is_unet, list(plan.formats), list(plan.intervals), list(plan.schedules),
                             deepcache_available())
    if is_unet and not deepcache_available():
        log.warning("the DeepCache package is not installed (pip install DeepCache): its variants are left out")
    shared: dict = {}
    runners = {v.name: open_variant(v, model, graphs, shared) for v in variants}
    settings = SampleSettings(rows=plan.rows, per_row=plan.per_row, steps=plan.steps, scheduler="ddim",
                              guidance=fp32_manifest["sampling_defaults"].get("guidance", 1.0), seed=0,
                              batch_size=plan.batch_size)
    n_images = len(plan.rows) * plan.per_row

    seconds, block_seconds, graph_seconds, images = _latency(model, variants, runners, settings, plan, progress)
    throughput = _throughput(variants, runners, settings, plan)
    for name, generated in images.items():
        write_image_folder(root / "images" / name, {k: x.numpy() for k, x in generated.items()})

    _say(f"{model}: peak memory, one process per variant")
    probe = dataclasses.replace(settings, rows=settings.rows[:1], per_row=plan.batch_size, steps=PROBE_STEPS)
    peak = {v.name: probe_peak_rss(v, model, graphs, probe) for v in variants}

    _say(f"{model}: image quality against PyTorch FP32")
    digits = model in NAMES
    reference = root / "images" / "pytorch-fp32"
    sizes = {p: deployed_bytes(g) for p, g in graphs.items()}
    # what the PyTorch variants load: the model's weight files and its conditioning file (as the
    # graphs' folders count theirs), not other components or variants beside them
    from exporter.models.loading import CONDITIONING, find_model_dir, weight_files

    directory = Path(resolve(model))
    loaded_files = [*weight_files(find_model_dir(directory)), directory / CONDITIONING]
    model_bytes = sum(f.stat().st_size for f in loaded_files if f.is_file())
    base = {"pytorch": statistics.median(seconds["pytorch-fp32"]), "ort": statistics.median(seconds["ort-fp32"])}
    rows = []
    for v in variants:
        median = statistics.median(seconds[v.name])
        quality = evaluate(root / "images" / v.name, None if v.name == "pytorch-fp32" else reference, digits=digits)
        row = {**v.to_dict(), "seconds": seconds[v.name], "images": n_images,
               "ms_per_image": {k: 1000 * f(seconds[v.name]) / n_images
                                for k, f in (("median", statistics.median), ("min", min), ("max", max))},
               "speedup_vs_pytorch": base["pytorch"] / median, "speedup_vs_ort_fp32": base["ort"] / median,
               "peak_rss_mb": peak[v.name],
               "artifact_mb": (sizes[v.precision] if v.kind == "runtime" else model_bytes) / 1e6,
               "accuracy": quality.get("accuracy"), "fd_digits": quality.get("fd_digits"),
               "psnr_vs_fp32": quality.get("psnr_mean"), "identical_vs_fp32": quality.get("n_identical")}
        if v.name in throughput:
            row["throughput_ms_per_image"] = 1000 * statistics.median(throughput[v.name]) / n_images
        if v.kind == "runtime":
            row |= loop_time(seconds[v.name], graph_seconds[v.name], n_images, plan.steps)
        if v.kind == "runtime" and v.interval > 1:
            row |= _cache_ideal(runners[v.name].runtime, v, block_seconds[v.precision], seconds, graph_seconds,
                                plan.steps)
        ours = f"ort-fp32-cache{v.interval}"
        if v.kind == "deepcache" and ours in images:  # the same algorithm? compare image by image
            row["psnr_vs_ours"] = evaluate(root / "images" / v.name, root / "images" / ours, digits=False)["psnr_mean"]
        rows.append(row)
    backend = next(iter(shared.values())).backend
    return {"images": n_images, "steps": plan.steps, "guidance": settings.guidance, "rounds": plan.rounds,
            "batch_size": plan.batch_size, "throughput_batch": min(plan.throughput_batch, n_images),
            "backend": backend.name, "variants": rows, "parity": parity,
            "integer_matmul": getattr(backend, "integer_matmul", None),
            "calibration": str(calib), "graphs": {k: str(g) for k, g in graphs.items()},
            "block_seconds": block_seconds}


def _latency(model: str, variants: list[Variant], runners: dict, settings: SampleSettings, plan: BenchPlan,
             progress: bool) -> tuple[dict, dict, dict, dict]:
    """Warm-up, then ``plan.rounds`` rounds: seconds per variant per round, the uncached runtime
    variants' per-block seconds (averaged over rounds), the runtime variants' seconds in graphs per
    round, and the last round's images.

    Within a round the variants take turns slice by slice (a slice is one row's images), the order
    reversing every slice: on these shared 2-core machines the speed drifts over minutes, and a
    variant timed on all its images in one stretch (half a minute) can meet another machine than the
    variant it is compared with, which put single runs' cached-vs-uncached ratios anywhere from 80 %
    to 132 % of the Amdahl ideal (docs/benchmarks.md, "Repeated runs"). Turns of a few seconds spread every
    variant over the whole round."""
    _say(f"{model}: warm-up of {len(variants)} variants")
    for v in variants:  # opens every session and touches every timestep group's graph
        runners[v.name](dataclasses.replace(settings, rows=settings.rows[:1], per_row=1))
    slices = call_turns(settings)
    seconds: dict[str, list[float]] = {v.name: [] for v in variants}
    block_seconds: dict[str, dict[str, float]] = {}
    graph_seconds: dict[str, list[float]] = {v.name: [] for v in variants if v.kind == "runtime"}
    images: dict[str, dict] = {}
    for r in range(plan.rounds):
        spent = dict.fromkeys(seconds, 0.0)
        in_graphs = dict.fromkeys(graph_seconds, 0.0)
        for j, part in enumerate(slices):
            for v in variants if (r * len(slices) + j) % 2 == 0 else variants[::-1]:
                runtime = getattr(runners[v.name], "runtime", None)
                if runtime is not None:
                    runtime.seconds.clear()
                start = time.perf_counter()
                generated = runners[v.name](part)
                spent[v.name] += time.perf_counter() - start
                images.setdefault(v.name, {}).update(generated)  # later rounds overwrite: the last round's
                if v.name in in_graphs:
                    in_graphs[v.name] += sum(runtime.seconds.values())
                if runtime is not None and v.interval == 1:
                    acc = block_seconds.setdefault(v.precision, {})
                    for block, s in runtime.seconds.items():
                        acc[block] = acc.get(block, 0.0) + s / plan.rounds
            _say(f"{model}: round {r + 1}/{plan.rounds}, slice {j + 1}/{len(slices)} of every variant", progress)
        for name, s in spent.items():
            seconds[name].append(s)
        for name, s in in_graphs.items():
            graph_seconds[name].append(s)
        _say(f"{model}: round {r + 1}/{plan.rounds}: " + ", ".join(f"{n} {s:.1f} s" for n, s in spent.items()),
             progress)
    return seconds, block_seconds, graph_seconds, images


def loop_time(seconds: list[float], graph_seconds: list[float], images: int, steps: int) -> dict:
    """A runtime variant's time in graphs per image, and the loop's own time per step (the rest:
    scheduler step, guidance, array conversions), medians over rounds. On a cached step the graphs
    are a few milliseconds at one image per call, so the loop's share, which caching does not
    shrink, is what keeps the measured speedup under the Amdahl ideal of the graphs alone."""
    return {"graphs_ms_per_image": 1000 * statistics.median(graph_seconds) / images,
            "loop_ms_per_step": 1000 * statistics.median(s - g for s, g in zip(seconds, graph_seconds))
            / (images * steps)}


def call_turns(settings: SampleSettings) -> list[SampleSettings]:
    """The turns variants take in :func:`_latency` and :func:`_throughput`: one row each when a row
    is whole calls (its images a multiple of the batch), one call's rows each when a call is whole
    rows, else all rows at once (so the calls are the same batches as without turns). Images do not
    depend on the split: each one's noise is seeded by (seed, row, k)."""
    if settings.per_row % settings.batch_size == 0:
        size = 1
    elif settings.batch_size % settings.per_row == 0:
        size = settings.batch_size // settings.per_row
    else:
        return [settings]
    return [dataclasses.replace(settings, rows=settings.rows[i:i + size]) for i in range(0, len(settings.rows), size)]


def _throughput(variants: list[Variant], runners: dict, settings: SampleSettings, plan: BenchPlan
                ) -> dict[str, list[float]]:
    """Seconds per round at ``plan.throughput_batch`` images per call, for PyTorch, the DeepCache
    package and our FP32 graphs at the middle cache interval (and uncached). Like the latency rounds,
    the variants take turns call by call (the order reversing every turn), so the machine's drift
    over a round meets every variant alike."""
    interval = plan.intervals[len(plan.intervals) // 2]
    chosen = [v for v in variants if v.precision == "fp32" and v.schedule == "uniform"
              and (v.kind == "pytorch" or v.interval in (1, interval))]
    batched = dataclasses.replace(settings, batch_size=plan.throughput_batch)
    turns = call_turns(batched)
    # untimed: the latency rounds ran one image per call, and the first call at this batch allocates
    # its buffers (one full batch, 3 steps: a full step and cached ones, so every graph sees its shapes)
    rows = -(-plan.throughput_batch // settings.per_row)
    for v in chosen:
        runners[v.name](dataclasses.replace(batched, rows=settings.rows[:rows], steps=min(3, settings.steps)))
    seconds: dict[str, list[float]] = {v.name: [] for v in chosen}
    for r in range(plan.rounds):
        spent = dict.fromkeys(seconds, 0.0)
        for j, part in enumerate(turns):
            for v in chosen if (r * len(turns) + j) % 2 == 0 else chosen[::-1]:
                start = time.perf_counter()
                runners[v.name](part)
                spent[v.name] += time.perf_counter() - start
        for name, s in spent.items():
            seconds[name].append(s)
        _say(f"throughput round {r + 1}/{plan.rounds}: " + ", ".join(f"{n} {s:.2f} s" for n, s in spent.items()))
    return seconds


def _cache_ideal(runtime, v: Variant, block_seconds: dict, seconds: dict, graph_seconds: dict, steps: int) -> dict:
    """A cached variant against its uncached twin (medians over rounds), in all and in graphs only,
    each as a share of the Amdahl ideal."""
    from exporter.runtime import refresh_steps

    cache = runtime.cache_plan(steps, v.interval, None, v.schedule)
    ideal = ideal_speedup(block_seconds, cache.shallow_blocks, steps, len(refresh_steps(steps, v.interval, v.schedule)))
    uncached = f"ort-{v.precision}"
    measured = statistics.median(seconds[uncached]) / statistics.median(seconds[v.name])
    graphs = statistics.median(graph_seconds[uncached]) / statistics.median(graph_seconds[v.name])
    return {"cached_feature": cache.feature, "speedup_vs_uncached": measured, "ideal_speedup": ideal,
            "fraction_of_ideal": measured / ideal, "graphs_speedup_vs_uncached": graphs,
            "graphs_fraction_of_ideal": graphs / ideal}


def _deepcache_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("DeepCache")
    except PackageNotFoundError:
        return None


def _say(message: str, show: bool = True) -> None:
    log.info(message)
    if show:
        print(f"== {message}", flush=True)


def _integer_note(enabled: bool | None) -> str:
    if enabled is None:
        return ""
    return (" (quantized Linear layers as integer MatMuls)" if enabled else
            " (quantized Linear layers in float: this CPU has no int8 dot products, or EXPORTER_ORT_INTEGER_MATMUL=0)")


def format_bench(result: dict) -> str:
    from exporter.eval import psnr_text

    lines = []
    for model, r in result["models"].items():
        lines += [f"### {model}", "",
                  (f"{r['images']} images, {r['steps']} DDIM steps, guidance {r['guidance']}; latency: "
                  f"{r['batch_size']} image per call (x2 with CFG), median of {r['rounds']} round(s) in which the "
                  f"variants take turns row by row (min-max); throughput: {r['throughput_batch']} images per "
                  f"call; peak RSS of a process generating one latency call's images; backend {r['backend']}"
                  f"{_integer_note(r.get('integer_matmul'))}. "
                  "Quantized graphs: the bundled recipes' PTQ (a recipe's finetune: section, which exporter "
                  "pipeline runs, is not run here). "
                  "Cache, graphs only: the time in graphs against the uncached run's (% of the same ideal); "
                  "loop ms / step: the time outside graphs (scheduler, guidance, conversions)."), "",
                  ("| variant | latency ms / image | vs PyTorch | vs ORT FP32 | cache: vs uncached (ideal) "
                  "| cache, graphs only | loop ms / step | throughput ms / image | peak RSS | artifact | accuracy "
                  "| FD-digits | PSNR vs FP32 |"),
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for v in r["variants"]:
            ms = v["ms_per_image"]
            psnr = "—" if v["name"] == "pytorch-fp32" else psnr_text(
                {"n_compared": v["images"], "psnr_mean": v["psnr_vs_fp32"], "n_identical": v.get("identical_vs_fp32")})
            cache = (f"{v['speedup_vs_uncached']:.2f}x ({v['ideal_speedup']:.2f}x, "
                     f"{100 * v['fraction_of_ideal']:.0f} %)" if "ideal_speedup" in v else "")
            graphs = (f"{v['graphs_speedup_vs_uncached']:.2f}x ({100 * v['graphs_fraction_of_ideal']:.0f} %)"
                      if "graphs_speedup_vs_uncached" in v else "")
            loop = f"{v['loop_ms_per_step']:.2f}" if "loop_ms_per_step" in v else ""
            accuracy = "—" if v["accuracy"] is None else f"{100 * v['accuracy']:.1f} %"
            fd = "—" if v["fd_digits"] is None else f"{v['fd_digits']:.2f}"
            batched = f"{v['throughput_ms_per_image']:.1f}" if "throughput_ms_per_image" in v else ""
            lines.append(f"| {v['name']} | {ms['median']:.1f} ({ms['min']:.1f}–{ms['max']:.1f}) "
                         f"| {v['speedup_vs_pytorch']:.2f}x | {v['speedup_vs_ort_fp32']:.2f}x | {cache} | {graphs} "
                         f"| {loop} | {batched} "
                         f"| {v['peak_rss_mb']:.0f} MB | {v['artifact_mb']:.2f} MB | {accuracy} | {fd} | {psnr} |")
        if r["images"] < 40:
            lines += ["", (f"(FD-digits from {r['images']} images is dominated by sampling noise; the full bench "
                      "uses 80.)")]
        same = [v for v in r["variants"] if "psnr_vs_ours" in v]
        if same:
            lines += ["", "DeepCache package vs our runtime at the same interval (FP32 graphs, shallowest branch), "
                      "image by image: " + ", ".join(
                          f"interval {v['interval']}: " + ("identical" if v["psnr_vs_ours"] is None
                                                           else f"{v['psnr_vs_ours']:.1f} dB")
                          for v in same)]
        for precision, graphs in r.get("parity", {}).items():
            if not graphs:
                continue
            finite = [g for g in graphs if g["sqnr_db"] is not None]
            worst = (f"worst {min(g['sqnr_db'] for g in finite):.1f} dB "
                     f"({min(finite, key=lambda g: g['sqnr_db'])['graph']})" if finite else "all identical")
            lines.append(f"Per-block parity {precision} (PyTorch fake quant vs ONNX Runtime): "
                         f"{sum(g['passed'] for g in graphs)}/{len(graphs)} graphs above threshold, {worst}")
        lines.append("")
    return "\n".join(lines)
