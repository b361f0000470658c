"""``exporter pipeline``: every available stage, end to end, for one model and one format.

Today the stages are FP32 reference sampling and the quality yardstick; calibration, export,
the runtime and parity join as they land. Layout of ``ROOT``::

    ROOT/images/fp32/     <row>_<k>.png, grid.png, samples.json
    ROOT/metrics.json     yardstick results per variant
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from exporter.errors import UsageError
from exporter.eval import evaluate, format_table
from exporter.fileio import atomic_write_json
from exporter.sampling.pytorch import sample_pytorch

log = logging.getLogger(__name__)

FORMATS = ("fp32",)  # the quantized formats arrive with calibration and export


def run_pipeline(model: str, out: str | Path, fmt: str = "fp32", **sample_options) -> dict:
    if fmt not in FORMATS:
        raise UsageError(f"format {fmt!r} is not available yet; available: {', '.join(FORMATS)}")
    root = Path(out)
    start = time.perf_counter()
    images_dir = root / "images" / "fp32"
    record = sample_pytorch(model, images_dir, **sample_options)
    metrics = evaluate(images_dir)
    summary = {"model": record["model"], "format": fmt, "sampling": record, "metrics": {"fp32": metrics},
               "seconds": round(time.perf_counter() - start, 2)}
    atomic_write_json(root / "metrics.json", summary)
    print(f"fp32 ({record['model_class']}, {record['steps']} {record['scheduler']} steps, "
          f"guidance {record['guidance']}):")
    print(format_table(metrics))
    print(f"wrote {images_dir}/ and {root / 'metrics.json'}")
    return summary
