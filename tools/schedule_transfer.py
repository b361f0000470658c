#!/usr/bin/env python
"""Do activation scales calibrated on one sampling schedule hold on another? Measured on INT8 graphs.

    python tools/schedule_transfer.py --out runs/schedules            # both reference models

Timestep groups are ranges of t *values*, not step counters, so one calibration is meant to serve
any scheduler and step count. This measures it through the runtime (ONNX Runtime), per reference
model and per sampling schedule S (DDIM 20 steps, the calibration's; DDIM 50; DPM-Solver++ 10;
Euler 30), against the FP32 graphs sampled with the same S (rows 0-9 x 8, guidance 1.5, seed 0):

    ddim20       INT8, the bundled recipe (4 timestep groups), calibrated on DDIM 20 steps
    ddim20-1g    the same with one group (one activation scale for all t)
    own          INT8, the bundled recipe, calibrated on S itself (same trajectories and seed)

If ``ddim20`` stays as close to FP32 as ``own`` on every S, the scales are not tied to the schedule.
Every artifact goes to OUT/<model>/ (calib-*, graphs/*, images/<S>/<variant>); a rerun reuses
finished calibrations, exports and image folders. Results: OUT/schedules.json, OUT/schedules.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = ("digits-unet", "digits-dit")
CALIBRATED = ("ddim", 20)  # the bundled recipes' calibration schedule
SCHEDULES = [("ddim", 20), ("ddim", 50), ("dpm++", 10), ("euler", 30)]
SAMPLING = {"rows": list(range(10)), "per_row": 8, "guidance": 1.5, "seed": 0}


def label(schedule: tuple[str, int]) -> str:
    return f"{schedule[0]}{schedule[1]}"


def calibrated(model: str, root: Path, schedule: tuple[str, int]) -> Path:
    from exporter.calibrate import calibrate
    from exporter.recipe import resolve_recipe

    out = root / f"calib-{label(schedule)}"
    spec = dataclasses.replace(resolve_recipe(None, "int8", model).calibration, scheduler=schedule[0],
                               steps=schedule[1])
    calibrate(model, out, spec, progress=False)  # resumes: finished shards are kept
    return out


def exported(model: str, folder: Path, calib: Path | None, groups: int | None = None) -> Path:
    from exporter.export import export_graphs
    from exporter.recipe import resolve_recipe

    if not (folder / "manifest.json").is_file():
        quantization = None
        if calib is not None:
            quantization = resolve_recipe(None, "int8", model).quantization
            if groups is not None:
                quantization = dataclasses.replace(quantization, groups=groups)
        export_graphs(model, folder, calib=calib, quantization=quantization, progress=False)
    return folder


def sampled(graphs: Path, out: Path, schedule: tuple[str, int]) -> Path:
    from exporter.imageio import write_image_folder
    from exporter.runtime import Runtime

    if not (out / "grid.png").is_file():
        images = Runtime.load(graphs).generate(scheduler=schedule[0], steps=schedule[1], progress=False, **SAMPLING)
        write_image_folder(out, {k: v.numpy() for k, v in images.items()})
    return out


def outside_coverage(graphs: Path, schedule: tuple[str, int]) -> tuple[int, int]:
    """How many of the schedule's t values lie outside the calibrated t range (nearest group used)."""
    from exporter.export.manifest import read_manifest
    from exporter.quant.timestep_groups import TimestepGroups
    from exporter.sampling.schedulers import make_scheduler

    manifest = read_manifest(graphs)
    lo, hi = TimestepGroups.from_dict(manifest["groups"]).coverage
    scheduler = make_scheduler(schedule[0], manifest["scheduler_config"])
    scheduler.set_timesteps(schedule[1])
    t = [float(v) for v in scheduler.timesteps]
    return sum(not lo <= v <= hi for v in t), len(t)


def run_model(model: str, root: Path) -> dict:
    from exporter.eval import evaluate

    fp32 = exported(model, root / "graphs" / "fp32", None)
    base_calib = calibrated(model, root, CALIBRATED)
    graphs = {"ddim20": exported(model, root / "graphs" / "int8-ddim20", base_calib),
              "ddim20-1g": exported(model, root / "graphs" / "int8-ddim20-1g", base_calib, groups=1)}
    results = {}
    for schedule in SCHEDULES:
        start = time.perf_counter()
        name = label(schedule)
        variants = dict(graphs)
        if schedule != CALIBRATED:
            variants["own"] = exported(model, root / "graphs" / f"int8-{name}", calibrated(model, root, schedule))
        images = root / "images" / name
        reference = sampled(fp32, images / "fp32", schedule)
        row = {"fp32": evaluate(reference), "outside_coverage": outside_coverage(graphs["ddim20"], schedule)}
        for variant, folder in variants.items():
            row[variant] = evaluate(sampled(folder, images / variant, schedule), reference)
        results[name] = row
        print(f"{model} {name}: " + ", ".join(f"{v} {row[v]['psnr_mean']:.2f} dB" for v in variants)
              + f" ({time.perf_counter() - start:.0f} s)", flush=True)
    return results


def cell(r: dict | None) -> str:
    if r is None:
        return "(same as DDIM 20)"
    return f"{r['psnr_mean']:.2f} dB · {100 * r['accuracy']:.1f} % · {r['fd_digits']:.2f}"


def markdown(results: dict) -> str:
    lines = []
    for model, rows in results.items():
        lines += [f"**{model}**; cells: PSNR vs the FP32 graphs on the same schedule · accuracy · FD-digits", "",
                  ("| schedule | FP32 graphs | INT8, DDIM-20 scales, 4 groups | INT8, DDIM-20 scales, 1 group "
                   "| INT8 calibrated on this schedule | t outside DDIM-20 coverage |"),
                  "|---|---|---|---|---|---|"]
        for name, row in rows.items():
            out, total = row["outside_coverage"]
            lines.append(f"| {name} | {100 * row['fp32']['accuracy']:.1f} % · {row['fp32']['fd_digits']:.2f} "
                         f"| {cell(row['ddim20'])} | {cell(row['ddim20-1g'])} | {cell(row.get('own'))} "
                         f"| {out} of {total} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/schedules"))
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    results = {model: run_model(model, args.out / model) for model in args.models.split(",")}
    (args.out / "schedules.json").write_text(json.dumps(results, indent=1))
    (args.out / "schedules.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
