"""``exporter pipeline``: every stage, end to end, for one model and one recipe.

calibrate -> [finetune, when the recipe has a finetune: section] -> quantize + export (and the
FP32 baseline export) -> lint -> parity -> run -> eval. Layout of ``ROOT``::

    ROOT/calib/                    calibration data (not for fp32 or weight-only formats)
    ROOT/finetune/                 the finetune run (finetune.safetensors, finetune.json)
    ROOT/graphs/fp32/, ROOT/graphs/<format>/     exported graphs + manifest.json (+ parity/)
    ROOT/images/pytorch-fp32/      the reference: FP32 PyTorch, same seeds
    ROOT/images/<variant>/         runtime images per variant (fp32, <format>, <format>-cacheN; N = the
                                   recipe's sampling.cache_interval, 3, or --cache-interval)
    ROOT/summary.json              every stage's result; the table is printed at the end
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from exporter.errors import UsageError
from exporter.eval import evaluate, psnr_text
from exporter.fileio import atomic_write_json
from exporter.imageio import write_image_folder

log = logging.getLogger(__name__)


def _stage(name: str):
    print(f"== {name}", flush=True)
    return time.perf_counter()


def run_pipeline(model: str, out: str | Path, fmt: str | None = "int8", recipe_path: str | Path | None = None,
                 rows: list[int] | None = None, per_row: int | None = None, steps: int | None = None,
                 scheduler: str | None = None, guidance: float | None = None, seed: int | None = None,
                 cache_interval: int | None = None, progress: bool = True, **_) -> dict:
    """Every stage for ``model``; the sampling options left None come from the recipe's ``sampling:``."""
    from exporter.calibrate import calibrate
    from exporter.export import export_graphs
    from exporter.export.lint import layer_counts, lint_folder, named_violations
    from exporter.export.manifest import deployed_bytes
    from exporter.parity import check_parity, format_parity
    from exporter.parity.report import worst_runtime_sqnr, worst_sqnr
    from exporter.recipe import recipe_from_dict, resolve_recipe
    from exporter.runtime import Runtime
    from exporter.sampling.pytorch import sample_pytorch

    root = Path(out)
    # an earlier run's graphs, images or summary (a run stopped while calibrating resumes it): new
    # images written among old ones would be scored as one run
    earlier = [p for p in (root / "graphs", root / "images") if p.is_dir() and any(p.iterdir())]
    if earlier or (root / "summary.json").exists():
        raise UsageError(f"{root} holds an earlier pipeline run ({(earlier or [root / 'summary.json'])[0].name}); "
                         "choose another --out or delete it")
    recipe = resolve_recipe(recipe_path, None if recipe_path else fmt, model)
    model = model or recipe.model
    if model is None:
        raise UsageError("no model: pass --model or set 'model' in the recipe")
    quantization, dtype = recipe.quantization, recipe.export.dtype
    if quantization is not None:  # before calibrating for minutes
        quantization.require_exportable()
    if dtype == "bf16":
        raise UsageError("the pipeline runs the graphs on ONNX Runtime's CPU provider, which has no bf16 kernels: "
                         "use export.dtype fp32 or fp16 (bf16 graphs: exporter export, then build on a GPU machine)")
    # the variant's graphs folder and name; a recipe without quantization in FP32 is the baseline alone
    baseline_only = quantization is None and dtype == "fp32"
    name = "fp32" if baseline_only else fmt if recipe_path is None else Path(recipe_path).stem
    if not baseline_only and name in ("fp32", "pytorch-fp32"):  # a recipe file so named: not the baselines' folders
        name += "-recipe"
    summary: dict = {"model": model, "format": name, "recipe": recipe_path and str(recipe_path), "stages": {}}
    # the recipe's sampling: section, each field overridden by an option given here (the CLI's flags)
    chosen = {"rows": rows, "per_row": per_row, "steps": steps, "scheduler": scheduler, "guidance": guidance,
              "seed": seed, "cache_interval": cache_interval}
    sampling = dataclasses.asdict(recipe.sampling) | {k: v for k, v in chosen.items() if v is not None}
    recipe_from_dict({"sampling": sampling}, where="pipeline options")  # an override the recipe would refuse
    cache_interval = sampling.pop("cache_interval")
    _preflight(model, sampling)
    started = time.perf_counter()

    calib = None
    if quantization is not None and quantization.activations is not None:
        t = _stage("calibrate")
        calib = root / "calib"
        calibrate(model, calib, recipe.calibration, progress=progress)
        summary["stages"]["calibrate"] = round(time.perf_counter() - t, 1)

    finetuned = None
    if recipe.finetune is not None:
        from exporter.finetune import finetune

        if calib is None:
            raise UsageError("finetuning needs calibration data: give the recipe quantized activations")
        t = _stage("finetune")
        finetuned = root / "finetune"
        record = finetune(model, calib, quantization, recipe.finetune, finetuned, progress=progress)
        summary["finetune"] = {"seconds": record["seconds"], "losses": record["losses"]}
        summary["stages"]["finetune"] = round(time.perf_counter() - t, 1)

    t = _stage("export")
    graphs = {"fp32": root / "graphs" / "fp32"}
    export_graphs(model, graphs["fp32"], progress=progress)
    if not baseline_only:
        graphs[name] = root / "graphs" / name
        export_graphs(model, graphs[name], calib=calib, quantization=quantization, dtype=dtype, progress=progress,
                      finetuned=finetuned)
    summary["stages"]["export"] = round(time.perf_counter() - t, 1)
    summary["graph_bytes"] = {k: deployed_bytes(g) for k, g in graphs.items()}

    t = _stage("lint")
    reports = lint_folder(graphs[name])
    summary["lint_violations"] = named_violations(reports)
    summary["lint_layers"] = layer_counts(reports)
    print(_lint_line(summary))
    summary["stages"]["lint"] = round(time.perf_counter() - t, 1)

    t = _stage("parity")
    parity = {}
    if calib is None:  # parity feeds recorded inputs: `exporter parity GRAPHS --calib DIR` for these formats
        print("no calibration data (fp32, fp16 or weight-only recipe): parity skipped")
    for key, folder in graphs.items() if calib is not None else ():
        results, e2e = check_parity(folder, calib=calib, progress=progress)
        print(format_parity(results).splitlines()[-1])
        parity[key] = {"graphs_passed": sum(r.passed for r in results), "graphs": len(results),
                       "worst_sqnr_db": worst_sqnr(results),
                       "runtime_rewritten": sum(bool(r.runtime_outputs) for r in results),
                       "worst_runtime_sqnr_db": worst_runtime_sqnr(results),
                       "end_to_end": e2e}
    summary["parity"] = parity
    summary["stages"]["parity"] = round(time.perf_counter() - t, 1)

    t = _stage("run")
    images = root / "images"
    reference = sample_pytorch(model, images / "pytorch-fp32", progress=progress, **sampling)
    summary["sampling"] = sampling | {k: reference[k] for k in ("steps", "scheduler", "guidance")} | {
        "cache_interval": cache_interval}  # as run: the model's defaults filled in
    runs = {"fp32": (graphs["fp32"], 1)}
    if not baseline_only:
        runs[name] = (graphs[name], 1)
        if cache_interval > 1:  # the variant with DeepCache-style caching, at the shallowest branch
            runs[f"{name}-cache{cache_interval}"] = (graphs[name], cache_interval)
    seconds = {}
    for variant, (folder, interval) in runs.items():
        start = time.perf_counter()
        generated = Runtime.load(folder).generate(
            rows=sampling["rows"], per_row=sampling["per_row"], steps=reference["steps"],
            scheduler=reference["scheduler"], guidance=reference["guidance"], seed=sampling["seed"],
            cache_interval=interval, progress=progress)
        seconds[variant] = round(time.perf_counter() - start, 2)
        write_image_folder(images / variant, {k: v.numpy() for k, v in generated.items()})
    summary["stages"]["run"] = round(time.perf_counter() - t, 1)

    t = _stage("eval")
    from exporter.reference import NAMES

    digits = model in NAMES  # accuracy and FD-digits mean something for the digits models only
    metrics = {"pytorch-fp32": evaluate(images / "pytorch-fp32", digits=digits)}
    for variant in runs:
        metrics[variant] = evaluate(images / variant, images / "pytorch-fp32", digits=digits)
    summary["metrics"] = metrics
    summary["runtime_seconds"] = seconds
    summary["stages"]["eval"] = round(time.perf_counter() - t, 1)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    atomic_write_json(root / "summary.json", summary)
    print(format_summary(summary))
    print(f"wrote {root}/ (summary.json, graphs/, images/)")
    return summary


def _preflight(model: str, sampling: dict) -> None:
    """What the run stage would refuse, refused before calibrating, finetuning and exporting for
    minutes: rows the conditioning file lacks, a step count the scheduler cannot take, a bad
    EXPORTER_ORT_* setting (docs/benchmarks.md)."""
    from exporter.models import load_conditioning, load_model
    from exporter.reference import resolve
    from exporter.runtime.ort_conv import float_conv_weights_budget
    from exporter.runtime.ort_integer import integer_matmul_enabled
    from exporter.sampling.pytorch import BUILTIN_DEFAULTS
    from exporter.sampling.schedulers import make_scheduler, set_steps

    integer_matmul_enabled()
    float_conv_weights_budget()
    loaded = load_model(resolve(model))
    if sampling["rows"] is not None:
        load_conditioning(loaded.default_conditioning, loaded.adapter).check_rows(sampling["rows"])
    defaults = {**BUILTIN_DEFAULTS, **loaded.sampling_defaults}
    scheduler = make_scheduler(sampling["scheduler"] or defaults["scheduler"], loaded.scheduler_config)
    set_steps(scheduler, sampling["steps"] if sampling["steps"] is not None else defaults["steps"])


def format_summary(summary: dict) -> str:
    stages = ", ".join(f"{k} {v} s" for k, v in summary["stages"].items())
    lines = [f"{summary['model']}, {summary['format']}: {summary['seconds']} s ({stages})",
             "| variant | accuracy | FD-digits | PSNR vs PyTorch FP32 | runtime s |", "|---|---|---|---|---|"]
    for variant, m in summary["metrics"].items():
        secs = summary["runtime_seconds"].get(variant, "—")
        accuracy = f"{100 * m['accuracy']:.1f} %" if "accuracy" in m else "—"
        fd = f"{m['fd_digits']:.2f}" if "fd_digits" in m else "—"
        lines.append(f"| {variant} | {accuracy} | {fd} | {psnr_text(m)} | {secs} |")
    for key, p in summary["parity"].items():
        e2e = p["end_to_end"]
        runtime = (f" (as the runtime runs them: {p['runtime_rewritten']} rewritten, worst "
                   f"{p['worst_runtime_sqnr_db']:.1f} dB)") if p.get("runtime_rewritten") else ""
        lines.append(f"parity {key}: {p['graphs_passed']}/{p['graphs']} graphs above threshold, worst "
                     f"{p['worst_sqnr_db']:.1f} dB{runtime}" + (f"; end to end PSNR {e2e['psnr_db']:.1f} dB" if e2e else ""))
    sizes = summary["graph_bytes"]
    lines.append("deployed sizes (manifest files): " + ", ".join(
        f"{k} {v / 1e6:.2f} MB ({100 * v / sizes['fp32']:.0f} %)" for k, v in sizes.items()))
    lines.append(_lint_line(summary))
    return "\n".join(lines)


def _lint_line(summary: dict) -> str:
    """Fallback at a glance: how many compute layers run quantized, and any rule violation."""
    from exporter.export.lint import format_layer_counts

    violations = len(summary["lint_violations"])
    return (f"lint: {format_layer_counts(summary['lint_layers'])}; "
            + (f"{violations} rule violation(s), see exporter lint" if violations else "no rule violations"))
