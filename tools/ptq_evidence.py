#!/usr/bin/env python
"""The quantization evidence table: which diffusion-specific PTQ technique buys what, per format.

    python tools/ptq_evidence.py --out runs/evidence              # both reference models, ~40 min

For each reference model: calibrate with the bundled recipe's calibration (64 trajectories x 20
DDIM steps), sample FP32 images (20 DDIM steps, guidance 1.5, seed 0, rows 0-9 x 8), then for
every format quantize in PyTorch (fake quant with ONNX semantics), sample the same images and
measure accuracy, FD-digits and PSNR against FP32. Variants, each adding to the previous one:

    naive      min-max ranges, one global activation scale, no split shortcut
    groups     + activation scales per timestep group (4 groups, bins chosen by DP)
    split      + split shortcut (separate scales for the halves of up-block skip concats; UNet only)
    best-*     + MSE weight ranges and the activation observer named (mse or percentile 99.99)

W8A6 and W4A6 are simulation only (no 6-bit type exists in ONNX or TensorRT). Every job writes
OUT/<model>/<format>/<variant>/ (images, samples.json, quantization.json, metrics.json); a rerun
skips finished jobs. Results: OUT/evidence.json, OUT/evidence.md, OUT/<model>/act_ranges.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exporter.cli_types import names_from, positive_int
from exporter.recipe import QuantizationSpec

MODELS = ("digits-unet", "digits-dit")
FORMATS = {  # name -> (weights, activations)
    "int8": ("int8", "int8"),
    "fp8": ("fp8", "fp8"),
    "w4a16": ("int4", None),
    "w4a8": ("int4", "int8"),
    "w4a4": ("int4", "int4"),
    "w8a6": ("int8", "int6"),
    "w4a6": ("int4", "int6"),
}
LABELS = {"int8": "W8A8 INT8", "fp8": "W8A8 FP8", "w4a16": "W4A16", "w4a8": "W4A8", "w4a4": "W4A4",
          "w8a6": "W8A6 (sim.)", "w4a6": "W4A6 (sim.)"}
GROUPS = 4
SAMPLING = {"rows": list(range(10)), "per_row": 8, "steps": 20, "scheduler": "ddim", "guidance": 1.5, "seed": 0}


def variants(fmt: str, has_split_sites: bool) -> dict[str, QuantizationSpec]:
    weights, activations = FORMATS[fmt]
    naive = QuantizationSpec.naive(weights, activations)
    if activations is None:  # weight-only: timestep groups, split and activation observers do not apply
        return {"naive": naive, "best-mse": dataclasses.replace(naive, weight_observer="mse")}
    out = {"naive": naive, "groups": dataclasses.replace(naive, groups=GROUPS)}
    last = out["groups"]
    if has_split_sites:
        out["split"] = last = dataclasses.replace(last, split_shortcut=True)
    for observer in ("mse", "percentile"):
        out[f"best-{observer}"] = dataclasses.replace(last, weight_observer="mse", act_observer=observer)
    return out


def run_job(job: tuple) -> tuple:
    """One quantized sampling run in a worker process (one thread: the workers share the cores)."""
    import torch

    from exporter.eval import evaluate
    from exporter.sampling.pytorch import sample_pytorch

    torch.set_num_threads(1)
    model, fmt, variant, spec_dict, calib, fp32, out = job
    spec = QuantizationSpec(**spec_dict)
    start = time.perf_counter()
    sample_pytorch(model, out, calib=calib, quantization=spec, progress=False, **SAMPLING)
    metrics = evaluate(out, fp32)
    (Path(out) / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return model, fmt, variant, time.perf_counter() - start


def prepare(model: str, root: Path) -> tuple[Path, Path, bool]:
    """Calibration data and FP32 images for one model (reused when already complete)."""
    from exporter.calibrate import calibrate
    from exporter.eval import evaluate
    from exporter.models import load_model
    from exporter.recipe import CalibrationSpec
    from exporter.reference import path
    from exporter.sampling.pytorch import sample_pytorch

    calib, fp32 = root / model / "calib", root / model / "fp32"
    spec_file = calib / "spec.json"
    if not (spec_file.is_file() and json.loads(spec_file.read_text()).get("complete")):
        calibrate(model, calib, CalibrationSpec())
    if not (fp32 / "metrics.json").is_file():
        sample_pytorch(model, fp32, **SAMPLING)
        (fp32 / "metrics.json").write_text(json.dumps(evaluate(fp32), indent=1))
    loaded = load_model(path(model))
    return calib, fp32, bool(loaded.adapter.split_shortcut_sites(loaded.model))


def collect(root: Path, models, formats) -> dict:
    results = {}
    for model in models:
        fp32 = json.loads((root / model / "fp32" / "metrics.json").read_text())
        results[model] = {"fp32": {"accuracy": fp32["accuracy"], "fd_digits": fp32["fd_digits"]}}
        for fmt in formats:
            for run in sorted((root / model / fmt).glob("*/metrics.json")):
                m = json.loads(run.read_text())
                q = json.loads((run.parent / "quantization.json").read_text())
                results[model].setdefault(fmt, {})[run.parent.name] = {
                    "accuracy": m["accuracy"], "fd_digits": m["fd_digits"], "psnr": m["psnr_mean"],
                    "ssim": m["ssim_mean"], "groups": q["groups"]["ranges"] if q["groups"] else None}
    return results


def cell(r: dict | None) -> str:
    if r is None:
        return "n/a"
    return f"{r['psnr']:.2f} dB · {100 * r['accuracy']:.1f} % · {r['fd_digits']:.2f}"


def markdown(results: dict) -> str:
    lines = []
    for model, per_format in results.items():
        fp32 = per_format["fp32"]
        lines += [(f"**{model}** (FP32: accuracy {100 * fp32['accuracy']:.1f} %, FD-digits {fp32['fd_digits']:.2f}); "
                   "cells: PSNR vs FP32 · accuracy · FD-digits"), "",
                  "| format | naive | + t-groups | + split shortcut | + best observer |",
                  "|---|---|---|---|---|"]
        for fmt, runs in per_format.items():
            if fmt == "fp32":
                continue
            best = [k for k in runs if k.startswith("best-")]
            top = max(best, key=lambda k: runs[k]["psnr"]) if best else None
            best_cell = f"{cell(runs[top])} ({top[5:]})" if top else "n/a"
            lines.append(f"| {LABELS[fmt]} | {cell(runs.get('naive'))} | {cell(runs.get('groups'))} "
                         f"| {cell(runs.get('split'))} | {best_cell} |")
        lines.append("")
    return "\n".join(lines)


def plot_ranges(root: Path, model: str) -> Path | None:
    """Per-t input range of the layers whose range varies most over t, with the chosen groups."""
    from exporter.report.figures import activation_ranges

    source = root / model / "int8" / "groups" / "quantization.json"
    if not source.is_file():
        return None
    return activation_ranges(json.loads(source.read_text()), root / model / "act_ranges.png", model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "evidence")
    parser.add_argument("--models", type=names_from(MODELS), default=list(MODELS))
    parser.add_argument("--formats", type=names_from(FORMATS), default=list(FORMATS))
    parser.add_argument("--workers", type=positive_int, default=2, help="parallel jobs (one thread each)")
    args = parser.parse_args()
    models, formats = args.models, args.formats
    jobs = []
    for model in models:
        calib, fp32, has_sites = prepare(model, args.out)
        for fmt in formats:
            for variant, spec in variants(fmt, has_sites).items():
                out = args.out / model / fmt / variant
                if not (out / "metrics.json").is_file():
                    jobs.append((model, fmt, variant, dataclasses.asdict(spec), str(calib), str(fp32), str(out)))
    print(f"{len(jobs)} job(s) to run with {args.workers} worker(s)", flush=True)
    # One OpenMP thread per worker, set before they start: set_num_threads alone left the two
    # workers oversubscribing the cores (measured: 57 s per job instead of 28 s).
    os.environ["OMP_NUM_THREADS"] = "1"
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        for i, (model, fmt, variant, seconds) in enumerate(pool.imap_unordered(run_job, jobs), 1):
            print(f"[{i}/{len(jobs)}] {model} {fmt} {variant}: {seconds:.0f} s "
                  f"(elapsed {time.perf_counter() - start:.0f} s)", flush=True)
    results = collect(args.out, models, formats)
    (args.out / "evidence.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (args.out / "evidence.md").write_text(table)
    print(table)
    for model in models:
        plot = plot_ranges(args.out, model)
        if plot:
            print(f"wrote {plot}")


if __name__ == "__main__":
    main()
