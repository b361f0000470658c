"""``exporter build``: one TensorRT engine per exported graph, plus ``manifest.json``.

Order matters for users: the machine is checked first (TensorRT importable, a CUDA GPU, FP8 /
INT4 support), so a missing piece stops the command at once and no ``engines/`` folder appears.
Engines are written into ``OUT.partial`` and renamed at the end. All TensorRT calls go through
``exporter.build.tensorrt``.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import time
from pathlib import Path

from exporter.build.gating import foreign_timing_cache, plan_build
from exporter.build.lean import find_lean_runtime
from exporter.build.precision import check_precision, format_precision
from exporter.build.profiles import batch_sizes, block_profiles, latent_sizes
from exporter.errors import UsageError
from exporter.export.manifest import CONDITIONING, MANIFEST, formats_used, read_manifest, sha256_file
from exporter.fileio import atomic_write_json, require_staged_folder
from exporter.recipe import BuildSpec

log = logging.getLogger(__name__)

PRECISION_REPORT = "precision.json"
TIMING_CACHE = "timing.cache"


def build_engines(graphs: str | Path, out: str | Path, spec: BuildSpec | None = None,
                  progress: bool = True) -> dict:
    """Build every graph of ``graphs`` into ``out``; returns the engine manifest."""
    from tqdm.auto import tqdm

    from exporter.build import tensorrt
    from exporter.export.lint import lint_graph

    spec = spec or BuildSpec()
    graphs, out = Path(graphs), Path(out)
    manifest = read_manifest(graphs)
    if manifest.get("kind") != "onnx":
        raise UsageError(f"{graphs} is not an exported graphs folder (manifest kind {manifest.get('kind')!r})")
    require_staged_folder(out)
    device = tensorrt.device_info()  # fails fast, before anything is written
    fallback = plan_build(manifest, spec, device)
    lean = find_lean_runtime(device.tensorrt) if spec.version_compatible else None
    profiles = block_profiles(manifest, spec)

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    # one timing cache for every engine: the recipe's file, else one inside the engines folder
    cache = Path(spec.timing_cache) if spec.timing_cache else partial / TIMING_CACHE
    _set_aside_foreign_timing_cache(cache, device)
    start = time.perf_counter()
    try:
        if lean is not None:  # one copy for every engine, and the one each build is checked with
            log.info("version-compatible engines: copying TensorRT's lean runtime %s into %s", lean, out)
            shutil.copyfile(lean, partial / lean.name)
            lean = partial / lean.name
        with tempfile.TemporaryDirectory(prefix="fp8-as-int8-") as converted:
            source = graphs
            if fallback is not None:
                from exporter.build.fallback import convert_folder

                log.warning("%s: building FP8 graphs as INT8", fallback["reason"])
                source = Path(converted)
                convert_folder(graphs, manifest, source)
            engines, precision, seconds = {}, [], {}
            n_graphs = sum(len(b["graphs"]) for b in manifest["blocks"])
            with tqdm(total=n_graphs, desc="building", unit="engine", disable=not progress or None) as bar:
                for block in manifest["blocks"]:
                    quantized = block["quantized_layers"]
                    for graph in block["graphs"]:
                        plan = graph.removesuffix(".onnx") + ".plan"
                        began = time.perf_counter()
                        layers = tensorrt.build_engine(source / graph, partial / plan, profiles[block["name"]],
                                                       spec, cache, lean)
                        seconds[plan] = round(time.perf_counter() - began, 1)
                        log.info("built %s in %.1fs", plan, seconds[plan])
                        nodes = lint_graph(source / graph, block, manifest).quantized_nodes
                        fmt = "int8" if fallback else None
                        precision += check_precision(graph, {n: (layer, fmt or quantized[layer][1])
                                                             for n, layer in nodes.items()}, layers)
                        engines.setdefault(block["name"], []).append(plan)
                        bar.update(1)
        engine_manifest = _engine_manifest(graphs, manifest, partial, engines, profiles, spec, device, fallback,
                                           seconds, Path(spec.timing_cache) if spec.timing_cache else out / TIMING_CACHE,
                                           lean)
        atomic_write_json(_cache_record(cache), device.to_dict())
        atomic_write_json(partial / PRECISION_REPORT, [r.__dict__ for r in precision])
        atomic_write_json(partial / MANIFEST, engine_manifest)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists():
        out.rmdir()
    partial.rename(out)
    log.info("built %d engines into %s in %.1fs", n_graphs, out, time.perf_counter() - start)
    print(format_precision(precision))
    return engine_manifest


def _engine_manifest(graphs: Path, manifest: dict, folder: Path, engines: dict, profiles: dict, spec: BuildSpec,
                     device, fallback, seconds: dict, timing_cache: Path, lean: Path | None) -> dict:
    """The graphs' manifest (blocks, I/O, groups, cache topology: all the runtime needs), plus the
    engines, where and how they were built, the graph each came from, and for version-compatible
    engines the lean runtime file that runs them."""
    if manifest.get("conditioning"):
        shutil.copyfile(graphs / manifest["conditioning"], folder / CONDITIONING)
    blocks = []
    for block in manifest["blocks"]:
        plans = engines[block["name"]]
        blocks.append({**block, "engines": plans,
                       "profile": {name: [list(s) for s in shapes] for name, shapes in profiles[block["name"]].items()},
                       "source_graphs": {plan: {"graph": graph, "sha256": manifest["files"][graph]}
                                         for plan, graph in zip(plans, block["graphs"])}})
    quantized_formats = formats_used(manifest)
    return {
        **manifest,
        "kind": "tensorrt",
        "source": {**manifest["source"], "graphs": str(graphs.resolve())},
        "blocks": blocks,
        "tensorrt": {**device.to_dict(), "version": device.tensorrt,
                     "precision": sorted({"int8"} | quantized_formats - {"fp8"}) if fallback else sorted(quantized_formats),
                     "float_type": manifest.get("dtype", "fp32"), "fallback": fallback,
                     "images": spec.images, "cfg": spec.cfg, "batch": batch_sizes(spec),
                     "latent": [list(hw) for hw in latent_sizes(manifest, spec)],
                     "flags": {"strongly_typed": True, "optimization_level": spec.optimization_level,
                               "hardware_compatibility": spec.hardware_compatibility,
                               "refittable": spec.refittable, "weight_streaming": spec.weight_streaming,
                               "version_compatible": spec.version_compatible},
                     "lean_runtime": lean.name if lean else None,
                     "timing_cache": str(timing_cache), "build_seconds": seconds},
        # not the timing cache, its record, the report, nor the lock file polygraphy leaves beside a cache
        "files": {p.name: sha256_file(p) for p in sorted(folder.iterdir())
                  if p.name not in (MANIFEST, TIMING_CACHE, _cache_record(Path(TIMING_CACHE)).name, PRECISION_REPORT)
                  and p.suffix != ".lock"},
    }


def _cache_record(cache: Path) -> Path:
    """The file beside a timing cache naming the TensorRT build and GPU that wrote it."""
    return cache.with_name(cache.name + ".json")


def _set_aside_foreign_timing_cache(cache: Path, device) -> None:
    """A shared timing cache (``--timing-cache F``) this tool wrote with another TensorRT or on
    another GPU is renamed, not loaded. TensorRT documents its timings as specific to the device and
    the TensorRT version, and polygraphy attaches a loaded cache with mismatch checking on; rather
    than leave a foreign cache to that check, the build starts a new cache at the same path and the
    old one stays beside it for the machine it belongs to. A cache without our record (written by
    trtexec, say) is passed on as it is; TensorRT checks its header."""
    record_file = _cache_record(cache)
    if not (cache.is_file() and record_file.is_file()):
        return
    try:
        record = json.loads(record_file.read_text())
    except (OSError, ValueError):
        record = None
    record = record if isinstance(record, dict) else {}
    reason = foreign_timing_cache(record, device)
    if reason is None:
        return
    origin = re.sub(r"[^\w.-]+", "_", f"tensorrt-{record.get('tensorrt', 'unknown')}-{record.get('gpu', 'unknown')}")
    aside = cache.with_name(f"{cache.name}.{origin}")
    cache.replace(aside)
    record_file.replace(_cache_record(aside))
    log.warning("timing cache %s was %s: moved to %s; this build starts a new cache", cache, reason, aside.name)
