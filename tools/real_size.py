#!/usr/bin/env python
"""Export a real-size Stable Diffusion-layout UNet to INT8 Q/DQ graphs, and measure every stage.

    python tools/real_size.py --layout sd15 --work /tmp/real-sd15
    python tools/real_size.py --layout sdxl --work /tmp/real-sdxl

Stages, each a separate ``exporter`` (or tool) process so its wall time and peak resident memory
are its own: make the random-weight layout (tools/make_sd_layout.py), calibrate on a handful of
random-conditioning trajectories, export per block to INT8 Q/DQ graphs, lint, per-block
parity on one block, and the runtime over all graphs (one image, 2 steps); with ``--fp32``, also
the unquantized FP32 export and its lint (the baseline path; SDXL's largest blocks are past
protobuf's 2 GB). Writes WORK/real_size.json and prints a Markdown table. A stage that fails stops
the run; the table says which one and shows the end of its log.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exporter.cli_types import positive_int

# W8A8 with the settings a real run would take, scaled down in calibration effort only: 2 timestep
# groups, split shortcut, min-max ranges (the MSE observers' histograms cost minutes at this size).
RECIPE = """\
calibration:
  trajectories: {trajectories}
  steps: {steps}
  scheduler: ddim
  guidance: 7.5
  timestep_sampling: uniform
  batch_trajectories: 1
quantization:
  weights: int8
  activations: int8
  weight_observer: max
  act_observer: max
  groups: 2
  split_shortcut: true
  exclude: null
"""


def run_stage(name: str, argv: list[str], log: Path) -> dict:
    """Run one stage; wall seconds and peak RSS (GiB) of its process."""
    print(f"== {name}: {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    result = {"stage": name, "seconds": round(seconds, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),
              "exit_code": code, "command": " ".join(argv), "log": str(log)}
    print(f"   {seconds:.0f} s, peak RSS {result['peak_rss_gib']} GiB, exit {code}", flush=True)
    return result


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and "parity" not in f.parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layout", choices=["sd15", "sdxl"], default="sd15")
    parser.add_argument("--work", type=Path, required=True, help="working folder (model, calib, graphs, logs)")
    parser.add_argument("--trajectories", type=positive_int, default=2)
    parser.add_argument("--steps", type=positive_int, default=4)
    parser.add_argument("--parity-block", help="the block checked for parity (default: the last up layer)")
    parser.add_argument("--fp32", action="store_true", help="also export the unquantized FP32 graphs and lint them")
    args = parser.parse_args()
    block = args.parity_block or {"sd15": "up3.layer2", "sdxl": "up2.layer2"}[args.layout]
    work = args.work
    # an earlier run's outputs would be reported (sizes) or resumed (calibration) as this run's
    earlier = [name for name in ("calib", "graphs", "graphs-fp32", "images") if (work / name).exists()]
    if earlier:
        parser.error(f"{work} holds an earlier run's {', '.join(earlier)}; delete them (model/ is reused) "
                     "or choose another --work")
    work.mkdir(parents=True, exist_ok=True)
    (work / "recipe.yaml").write_text(RECIPE.format(trajectories=args.trajectories, steps=args.steps))
    exporter = [sys.executable, "-m", "exporter", "-q"]
    model, calib, graphs, fp32 = work / "model", work / "calib", work / "graphs", work / "graphs-fp32"
    stages = []
    if not (model / "unet" / "config.json").is_file():
        stages.append(("layout", [sys.executable, str(ROOT / "tools" / "make_sd_layout.py"), str(model),
                                  "--layout", args.layout]))
    stages += [
        ("calibrate", exporter + ["calibrate", "--model", str(model), "--recipe", str(work / "recipe.yaml"),
                                  "--out", str(calib)]),
        ("export", exporter + ["export", "--model", str(model), "--recipe", str(work / "recipe.yaml"),
                               "--calib", str(calib), "--out", str(graphs)]),
        ("lint", exporter + ["lint", str(graphs)]),
        ("parity", exporter + ["parity", str(graphs), "--blocks", block, "--blocks-only",
                              "--samples", "2"]),
        # the runtime over every graph: one image, 2 steps (one per timestep group), guidance as calibrated
        ("run", exporter + ["run", str(graphs), "--rows", "0", "--per-row", "1", "--steps", "2",
                            "--guidance", "7.5", "--out", str(work / "images")]),
    ]
    if args.fp32:
        stages += [("export fp32", exporter + ["export", "--model", str(model), "--format", "fp32", "--out", str(fp32)]),
                   ("lint fp32", exporter + ["lint", str(fp32)])]
    results = []
    for name, argv in stages:
        results.append(run_stage(name, argv, work / f"{name}.log"))
        if results[-1]["exit_code"] != 0:
            print((work / f"{name}.log").read_text()[-3000:])
            break
    report = {"layout": args.layout, "stages": results, "trajectories": args.trajectories, "steps": args.steps}
    if (graphs / "manifest.json").is_file():
        manifest = json.loads((graphs / "manifest.json").read_text())
        report["graphs"] = sum(len(b["graphs"]) for b in manifest["blocks"])
        report["graph_folder_mb"] = round(folder_bytes(graphs) / 1e6, 1)
        report["weights_fp32_mb"] = round(sum(f.stat().st_size for f in (model / "unet").glob("*.safetensors")) / 1e6, 1)
    if (fp32 / "manifest.json").is_file():
        blocks = json.loads((fp32 / "manifest.json").read_text())["blocks"]
        largest = max(blocks, key=lambda b: (fp32 / b["weights"]).stat().st_size)
        report["fp32_graph_folder_mb"] = round(folder_bytes(fp32) / 1e6, 1)
        report["fp32_largest_block"] = {"block": largest["name"],
                                        "mb": round((fp32 / largest["weights"]).stat().st_size / 1e6, 1),
                                        "graph_bytes": sum((fp32 / g).stat().st_size for g in largest["graphs"])}
    (work / "real_size.json").write_text(json.dumps(report, indent=2))
    print(f"\n{args.layout}-layout UNet, INT8 W8A8 ({args.trajectories} trajectories x {args.steps} steps):")
    print("| stage | wall | peak RSS | exit |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['stage']} | {r['seconds']:.0f} s | {r['peak_rss_gib']:.1f} GiB | {r['exit_code']} |")
    if "graphs" in report:
        print(f"{report['graphs']} graphs, {report['graph_folder_mb']} MB (FP32 weights {report['weights_fp32_mb']} MB)")
    if "fp32_largest_block" in report:
        big = report["fp32_largest_block"]
        print(f"FP32 graphs {report['fp32_graph_folder_mb']} MB; largest block {big['block']}: {big['mb']} MB of "
              f"weights, its graph {big['graph_bytes']} bytes")
    return int(any(r["exit_code"] != 0 for r in results))  # a stage killed by a signal has a negative code


if __name__ == "__main__":
    sys.exit(main())
