"""Peak memory of one variant, in a process of its own: ``python -m exporter.bench.probe SPEC``.

One process holds many variants during the timing rounds, so its peak resident memory says
nothing about any one of them. The bench runs this module once per variant instead: it opens the
variant, generates one batch, and prints its own peak RSS as JSON on stdout. The peak is the
kernel's high-water mark of this process's memory (``VmHWM``), not ``ru_maxrss``: Linux carries
``ru_maxrss`` over from the forking parent, so every probe would report the bench's own size.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

from exporter.bench.variants import Variant, open_variant
from exporter.sampling.loop import SampleSettings


def probe_peak_rss(variant: Variant, model: str, graphs: dict[str, Path], settings: SampleSettings) -> float:
    """Peak RSS in MB of a fresh process generating ``settings`` with ``variant``."""
    spec = {"variant": variant.to_dict(), "model": model, "graphs": {k: str(v) for k, v in graphs.items()},
            "settings": {**settings.__dict__, "rows": list(settings.rows)}}
    done = subprocess.run([sys.executable, "-m", "exporter.bench.probe", json.dumps(spec)],
                          check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe of {variant.name} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def main() -> None:
    spec = json.loads(sys.argv[1])
    settings = SampleSettings(**{**spec["settings"], "rows": tuple(spec["settings"]["rows"])})
    run = open_variant(Variant(**spec["variant"]), spec["model"], {k: Path(v) for k, v in spec["graphs"].items()})
    run(settings)
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}))


def peak_rss_mb() -> float:
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # other systems: best effort


if __name__ == "__main__":
    main()
