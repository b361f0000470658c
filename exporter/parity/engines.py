"""The TensorRT side of parity (GPU machines): the engines built from a graphs folder, as
polygraphy runners joining each graph's comparison, and their batch range checked first."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from exporter.errors import UsageError
from exporter.export.manifest import check_latent, read_manifest
from exporter.parity.inputs import call_bounds


def engine_runners(engines: Path | None, folder: Path, manifest: dict, latent: tuple[int, int] | None
                    ) -> tuple[dict, list[int] | None]:
    """{graph file: (plan file, polygraphy TrtRunner)} for an engines folder built from ``folder``
    (whose profile must take ``latent``), and the engines' batch range (min, opt, max per call)."""
    if engines is None:
        return {}, None
    from polygraphy.backend.trt import TrtRunner

    from exporter.build.gating import check_engines_compatible
    from exporter.build.tensorrt import deserialize, device_info, folder_runtime

    engine_manifest = read_manifest(engines)
    if engine_manifest.get("kind") != "tensorrt":
        raise UsageError(f"{engines} is not an engines folder (exporter build writes one)")
    check_latent(engine_manifest, tuple(latent or engine_manifest["sample_shape"][1:]))  # own size: maybe outside
    check_engines_compatible(engine_manifest, device_info())
    runtime = folder_runtime(engines, engine_manifest)  # version-compatible engines: their lean runtime
    runners = {}
    for block in engine_manifest["blocks"]:
        for plan, source in block["source_graphs"].items():
            if manifest["files"].get(source["graph"]) != source["sha256"]:
                raise UsageError(f"{engines / plan} was built from another {source['graph']} than the one in "
                                 f"{folder}; rebuild the engines or pass their graphs folder")
            runners[source["graph"]] = (plan, TrtRunner(partial(deserialize, runtime, engines / plan)))
    return runners, engine_manifest["tensorrt"]["batch"]


def check_engine_batch(counts: dict[int, int], batch: int, engine_batch: list[int], calib) -> None:
    """Each group's inputs go through the engines ``batch`` at a time (``inputs.call_bounds``): a
    call below the profile's minimum (a group with fewer recorded samples) is refused before
    anything runs, instead of polygraphy's shape error from inside TensorRT."""
    low = engine_batch[0]
    for group, n in counts.items():  # samples per group (inputs.samples_per_group)
        smallest = min(end - start for start, end in call_bounds(n, batch))
        if smallest < low:
            raise UsageError(f"timestep group {group}: {n} recorded sample(s) in {calib} go through the engines in "
                             f"calls of {smallest} or more (--batch {batch}, split evenly), and the engines take "
                             f"{low} to {engine_batch[2]} per call: pass another --samples or --batch, rebuild with a "
                             "smaller build.images (or build.cfg false), or calibrate more trajectories")
