"""``exporter report RUN``: a bench run's tables and pictures in one Markdown file.

Reads ``RUN/bench.json`` (written by ``exporter bench``) and the run's own folders, draws the
pictures into ``RUN/report/`` and writes ``RUN/report/report.md`` with relative links, so the
folder can be zipped or committed to a wiki as it is.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from exporter.bench import format_bench
from exporter.errors import ImageFolderError, UsageError
from exporter.fileio import atomic_write_bytes
from exporter.report import figures

log = logging.getLogger(__name__)


def build_report(run: str | Path) -> Path:
    run = Path(run)
    source = run / "bench.json"
    if not source.is_file():
        raise UsageError(f"{source} not found: run `exporter bench --out {run}` first")
    try:
        bench = json.loads(source.read_text())
        models = bench["models"]
    except (json.JSONDecodeError, KeyError) as e:
        raise UsageError(f"{source}: not a bench result ({e})") from None
    out = run / "report"
    out.mkdir(exist_ok=True)
    lines = ["# Benchmark report", "",
             (f"Run `{run}`{' (quick mode)' if bench.get('quick') else ''}; DeepCache package "
             f"{bench.get('deepcache_package') or 'not installed'}. Times were measured in this run, the "
             "variants taking turns (peak memory: one process per variant); calibration and graphs are the run "
             "folder's, made by its first bench and reused by later ones."), ""]
    for model, result in models.items():
        lines += _model_section(run, out, model, result)
    report = out / "report.md"
    atomic_write_bytes(report, ("\n".join(lines) + "\n").encode())
    return report


def _model_section(run: Path, out: Path, model: str, result: dict) -> list[str]:
    root = run / model
    table = format_bench({"models": {model: result}}).splitlines()
    lines = [f"## {model}", "", *table[2:], ""]

    folders = {v["name"]: root / "images" / v["name"] for v in result["variants"]}
    missing = [name for name, f in folders.items() if not f.is_dir()]
    grid = None
    if missing:
        lines += [f"Image grid left out: no images for {', '.join(missing)}.", ""]
    else:
        try:
            grid = figures.variant_grid(folders, out / f"grid_{model}.png")
        except ImageFolderError as e:  # a folder emptied or damaged since the bench: the rest still reports
            lines += [f"Image grid left out: {e}.", ""]
        else:
            if grid is None:
                lines += ["Image grid left out: the variants share no image name (row and seed).", ""]
    if grid is not None:
        lines += ["### Images (rows: variants; columns: the same seeds)", "", f"![image grid]({grid.name})", ""]

    scatter = figures.speed_quality(result["variants"], out / f"speed_quality_{model}.png",
                                    f"{model}: speed against quality")
    lines += ["### Speed against quality", "", f"![speed vs quality]({scatter.name})", ""]

    for precision, graphs in result.get("parity", {}).items():
        if not graphs:
            continue
        bars = figures.parity_bars(graphs, out / f"parity_{model}_{precision}.png",
                                   f"{model} {precision}: per-block parity, PyTorch fake quant vs ONNX Runtime")
        lines += [f"### Per-block parity, {precision}", "", f"![parity {precision}]({bars.name})", ""]

    for precision, graphs in result.get("graphs", {}).items():
        record = Path(graphs) / "quantization.json"
        if precision == "fp32" or not record.is_file():
            continue
        plot = figures.activation_ranges(json.loads(record.read_text()), out / f"act_ranges_{model}.png",
                                         f"{model} ({precision} calibration)")
        if plot is not None:
            lines += ["### Activation ranges over the denoising trajectory", "", f"![activation ranges]({plot.name})",
                      ""]
            break
    return lines
