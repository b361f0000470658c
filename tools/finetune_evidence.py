#!/usr/bin/env python
"""The finetuning evidence table: PTQ alone vs PTQ + EfficientDM-style finetuning, and naive QAT.

    python tools/finetune_evidence.py --out runs/finetune-evidence      # both reference models

For each reference model and format (W4A8, W4A4): PTQ with the bundled recipe, then finetuning
with the recipe's ``finetune:`` section (QALoRA + temporal LSQ, data-free distillation), and the
naive QAT baseline (every weight trains, same trajectories and steps) on W4A4. Each is sampled
(20 DDIM steps, guidance 1.5, seed 0, rows 0-9 x 8) and measured against FP32 images of the same
seeds: accuracy, FD-digits, PSNR. Finetuning wall times are measured in worker processes of one
thread each, two at a time on this 2-core machine. Calibration data and FP32 images are reused
from ``tools/ptq_evidence.py``'s folder when present. Results: OUT/finetune.json, OUT/finetune.md.
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

MODELS = ("digits-unet", "digits-dit")
FORMATS = ("w4a8", "w4a4")
QAT_FORMATS = ("w4a4",)
SAMPLING = {"rows": list(range(10)), "per_row": 8, "steps": 20, "scheduler": "ddim", "guidance": 1.5, "seed": 0}


def run_job(job: tuple) -> tuple:
    """One variant in a worker process (one thread: the workers share the cores)."""
    import torch

    from exporter.eval import evaluate
    from exporter.finetune import finetune
    from exporter.recipe import bundled_recipe_path, load_recipe
    from exporter.sampling.pytorch import sample_pytorch

    torch.set_num_threads(1)
    model, fmt, variant, calib, fp32, out = job
    out = Path(out)
    recipe = load_recipe(bundled_recipe_path(fmt, model))
    result = {"model": model, "format": fmt, "variant": variant}
    finetuned = None
    if variant != "ptq":
        spec = dataclasses.replace(recipe.finetune, method="qat" if variant == "qat" else "qalora")
        record = finetune(model, calib, recipe.quantization, spec, out / "run", progress=False)
        result.update(finetune_seconds=record["seconds"], losses=record["losses"], spec=dataclasses.asdict(spec))
        finetuned = out / "run"
    sample_pytorch(model, out / "images", calib=calib, quantization=recipe.quantization, finetuned=finetuned,
                   progress=False, **SAMPLING)
    metrics = evaluate(out / "images", fp32)
    result.update(accuracy=metrics["accuracy"], fd_digits=metrics["fd_digits"], psnr=metrics["psnr_mean"])
    (out / "result.json").write_text(json.dumps(result, indent=1))
    return result


def prepare(model: str, root: Path, ptq_root: Path) -> tuple[Path, Path]:
    """Calibration data (the bundled recipes' calibration spec) and FP32 images, reused if done."""
    from exporter.calibrate import calibrate
    from exporter.eval import evaluate
    from exporter.recipe import bundled_recipe_path, load_recipe
    from exporter.sampling.pytorch import sample_pytorch

    for base in (ptq_root / model, root / model):
        calib, fp32 = base / "calib", base / "fp32"
        spec = calib / "spec.json"
        if spec.is_file() and json.loads(spec.read_text()).get("complete") and (fp32 / "metrics.json").is_file():
            return calib, fp32
    calibrate(model, calib, load_recipe(bundled_recipe_path("w4a8", model)).calibration)
    sample_pytorch(model, fp32, **SAMPLING)
    (fp32 / "metrics.json").write_text(json.dumps(evaluate(fp32), indent=1))
    return calib, fp32


def markdown(results: list[dict], fp32: dict) -> str:
    def cell(r):
        if r is None:
            return "—"
        text = f"{r['psnr']:.2f} dB · {100 * r['accuracy']:.1f} % · {r['fd_digits']:.2f}"
        return text + (f" ({r['finetune_seconds'] / 60:.1f} min)" if "finetune_seconds" in r else "")

    lines = ["| model | format | PTQ | PTQ + finetune (QALoRA + temporal LSQ) | naive QAT, same steps |",
             "|---|---|---|---|---|"]
    by_key = {(r["model"], r["format"], r["variant"]): r for r in results}
    for model in MODELS:
        for fmt in FORMATS:
            if (model, fmt, "ptq") in by_key:
                lines.append(f"| `{model}` (FP32 {100 * fp32[model]['accuracy']:.1f} % · "
                             f"{fp32[model]['fd_digits']:.2f}) | {fmt.upper()} | {cell(by_key.get((model, fmt, 'ptq')))} "
                             f"| {cell(by_key.get((model, fmt, 'qalora')))} | {cell(by_key.get((model, fmt, 'qat')))} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "finetune-evidence")
    parser.add_argument("--ptq-evidence", type=Path, default=ROOT / "runs" / "evidence",
                        help="tools/ptq_evidence.py's folder, whose calibration and FP32 images are reused")
    parser.add_argument("--models", type=names_from(MODELS), default=list(MODELS))
    parser.add_argument("--workers", type=positive_int, default=2, help="parallel jobs (one thread each)")
    args = parser.parse_args()
    jobs, fp32 = [], {}
    for model in args.models:
        calib, fp32_dir = prepare(model, args.out, args.ptq_evidence)
        fp32[model] = json.loads((fp32_dir / "metrics.json").read_text())
        for fmt in FORMATS:
            for variant in ("qalora", "qat", "ptq") if fmt in QAT_FORMATS else ("qalora", "ptq"):
                out = args.out / model / fmt / variant
                if not (out / "result.json").is_file():
                    jobs.append((model, fmt, variant, str(calib), str(fp32_dir), str(out)))
    print(f"{len(jobs)} job(s) to run with {args.workers} worker(s)", flush=True)
    os.environ["OMP_NUM_THREADS"] = "1"  # before the workers start (see tools/ptq_evidence.py)
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        for i, r in enumerate(pool.imap_unordered(run_job, jobs), 1):
            print(f"[{i}/{len(jobs)}] {r['model']} {r['format']} {r['variant']}: {r['psnr']:.2f} dB "
                  f"(elapsed {time.perf_counter() - start:.0f} s)", flush=True)
    # this run's models only: --out may hold another model's results of an earlier run
    results = [r for r in (json.loads(p.read_text()) for p in sorted(args.out.glob("*/*/*/result.json")))
               if r["model"] in args.models]
    (args.out / "finetune.json").write_text(json.dumps(results, indent=1))
    table = markdown(results, fp32)
    (args.out / "finetune.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
