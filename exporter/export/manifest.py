"""``manifest.json``: everything a runtime needs to run a folder of graphs, and nothing else.

Schema 1: source model (class and config, from which the runtime rebuilds the architecture
adapter), sample shape, scheduler config and sampling defaults, the conditioning file (copied in),
blocks in execution order with named inputs/outputs (shape with symbolic dims, dtype), their
graph per timestep group and weight file, quantized vs float layers per block, the timestep
groups with their t ranges, the cache topology (which blocks a cached step runs per cacheable
feature), the sha256 of every file, and tool versions.

``read_manifest`` refuses a folder whose manifest, graphs or weights are missing, truncated,
edited or swapped (sha256), or that names a path outside the folder. The runtime opens its graphs
on first use, possibly long after; ``check_unchanged`` refuses a file changed in between.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import shutil
from pathlib import Path

from exporter import __version__
from exporter.errors import ExporterError, UsageError
from exporter.fileio import atomic_write_json
from exporter.models.blocks import blocks_to_run_with_cache
from exporter.quant.timestep_groups import TimestepGroups

MANIFEST = "manifest.json"
RECORD = "quantization.json"  # the PTQ record (scales, ranges, exclusions): for parity, people and plots; not shipped
SCHEMA = 1
CONDITIONING = "conditioning.safetensors"


class ManifestError(ExporterError):
    """A graphs/engines folder that is incomplete, corrupted or inconsistent."""


# Files read_manifest verified: resolved path -> (stat at the time, sha256). ``check_unchanged``
# hashes a file again only when its stat changed since.
_verified: dict[str, tuple[tuple, str]] = {}


def _stat_key(path: Path) -> tuple:
    stat = path.stat()  # ctime too: an in-place edit can restore the mtime (os.utime), not the ctime
    return stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _tensor_info(name: str, tensor, axes: dict[int, str]) -> dict:
    shape = [axes.get(i, int(d)) for i, d in enumerate(tensor.shape)]
    # the sizes for a batch of 2 at the model's own latent size (what a UNet block is traced at is
    # smaller, and gives the same graph): how each dynamic dimension scales with the batch and the
    # latent size (TensorRT optimization profiles are computed from them)
    return {"name": name, "shape": shape, "trace_shape": [int(d) for d in tensor.shape],
            "dtype": str(tensor.dtype).removeprefix("torch.")}


def scaled_size(tensor: dict, dim: str, traced: int, latent: tuple[int, int], native: tuple[int, int]) -> int:
    """The size of ``tensor``'s dynamic spatial dimension ``dim`` (``<name>_height`` or ``_width``,
    ``traced`` at the model's own latent ``native``) when the latent is ``latent``; a latent that
    does not divide into it (a UNet level's feature map of a fractional size) is refused."""
    axis = 0 if dim.endswith("_height") else 1
    scaled = traced * latent[axis]
    if scaled % native[axis]:
        raise UsageError(f"latent {'height' if axis == 0 else 'width'} {latent[axis]} does not divide into "
                         f"{tensor['name']}'s {dim} (traced {traced} at {native[axis]}); use a multiple "
                         f"of {native[axis] // math.gcd(traced, native[axis])}")
    return scaled // native[axis]


def check_latent(manifest: dict, latent: tuple[int, int]) -> None:
    """Refuse a latent (height, width) the folder's graphs or engines cannot run, saying why."""
    native = tuple(manifest["sample_shape"][1:])
    if tuple(latent) != native:
        _check_other_latent(manifest, tuple(latent), native)
    if manifest.get("kind") == "tensorrt":  # the model's own size too: build.latent may leave it out
        low, _, high = manifest["tensorrt"]["latent"]
        if not all(low[a] <= latent[a] <= high[a] for a in (0, 1)):
            raise UsageError(f"latent {latent[0]}x{latent[1]} lies outside the engines' optimization profile "
                             f"({low[0]}x{low[1]} to {high[0]}x{high[1]}); rebuild with a wider build.latent "
                             "in the recipe")


def _check_other_latent(manifest: dict, latent: tuple[int, int], native: tuple[int, int]) -> None:
    if min(latent) < 1:
        raise UsageError(f"latent {latent[0]}x{latent[1]}: height and width must be positive")
    if not resizable(manifest):
        raise UsageError(f"{manifest['source']['model_class']} graphs are exported for latent "
                         f"{native[0]}x{native[1]} only (their token count and position embedding are fixed)")
    multiple = manifest["latent_multiple"]
    if latent[0] % multiple or latent[1] % multiple:  # said once, not tensor by tensor
        raise UsageError(f"latent {latent[0]}x{latent[1]}: these {manifest['source']['model_class']} graphs take "
                         f"heights and widths that are multiples of {multiple} (one halving per downsampling)")
    for block in manifest["blocks"]:
        for tensor in block["inputs"]:
            if "trace_shape" not in tensor:  # manifests written before sizes were recorded
                raise UsageError(f"the manifest has no traced shape for {tensor['name']}: re-export the graphs with "
                                 "this version of the exporter to run other latent sizes")
            for dim, traced in zip(tensor["shape"], tensor["trace_shape"]):
                if isinstance(dim, str) and dim.endswith(("_height", "_width")):
                    scaled_size(tensor, dim, traced, latent, native)


def resizable(manifest: dict) -> bool:
    """Whether the graphs' spatial axes are truly dynamic (UNets); a transformer's token count and
    position embedding are fixed at export. Manifests written before the key existed: own size only."""
    return manifest.get("latent_multiple") is not None


def layer_formats(manifest: dict) -> dict[str, list]:
    """{layer: [weight format, activation format or None]} over every block of the manifest."""
    return {layer: pair for block in manifest["blocks"] for layer, pair in block["quantized_layers"].items()}


def formats_used(manifest: dict) -> set[str]:
    """Every weight and activation format of the manifest's quantized layers (int8, fp8, int4)."""
    return {f for pair in layer_formats(manifest).values() for f in pair if f}


def node_scope(node) -> str:
    """The module path inside a block graph that emitted an ONNX node (the keys of a block's
    ``modules``): ``/layers.0/resnet/conv1/Conv`` -> ``layers.0.resnet.conv1``."""
    return ".".join(node.name.strip("/").split("/")[:-1])


def _compute_modules(block, model_names: dict[int, str]) -> dict[str, str]:
    """{module path inside the block graph (ONNX node scope): module name in the model} for every
    Conv2d/Linear, so graph nodes can be traced back to recipe layers (lint, parity)."""
    import torch

    from exporter.quant.ptq import QuantLayer

    wrapped = {id(m.layer) for m in block.modules() if isinstance(m, QuantLayer)}
    return {path: model_names[id(module)] for path, module in block.named_modules()
            if isinstance(module, QuantLayer)
            or (isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and id(module) not in wrapped)}


def write_manifest(folder: Path, loaded, blocks, exported, env, summary, conditioning, calib=None,
                   dtype: str = "fp32", finetuned=None) -> dict:
    import diffusers
    import onnx
    import onnx_graphsurgeon
    import onnxruntime
    import torch

    from exporter.export.graphs import dynamic_axes

    adapter = loaded.adapter
    if conditioning.source is not None:
        shutil.copyfile(conditioning.source, folder / CONDITIONING)
    if summary is not None:  # without its run time: the same model, calibration and recipe give the same folder
        atomic_write_json(folder / RECORD, {k: v for k, v in summary.items() if k != "seconds"})
    produced = {n for b in blocks for n in b.outputs}
    model_inputs = list(dict.fromkeys(n for b in blocks for n in b.inputs if n not in produced))
    features = adapter.cacheable_features(blocks)
    model_names = {id(m): n for n, m in loaded.model.named_modules()}
    block_entries = []
    for item in exported:
        block = item["block"]
        axes = dynamic_axes((*block.inputs, *block.outputs), env, adapter.latent_multiple(loaded.model) is not None)
        layers = item["layers"]
        block_entries.append({
            "name": block.name,
            "inputs": [_tensor_info(n, env[n], axes[n]) for n in block.inputs],
            "outputs": [_tensor_info(n, env[n], axes[n]) for n in block.outputs],
            "graphs": item["files"],
            "weights": item["weights"],
            "quantized_layers": {layer.name: [layer.wfmt.name, layer.afmt.name if layer.afmt else None]
                                 for layer in layers},
            "modules": _compute_modules(block, model_names),
        })
    manifest = {
        "schema": SCHEMA,
        "kind": "onnx",
        "source": {"model": str(loaded.directory), "model_class": adapter.class_name, "config": adapter.config,
                   "calibration": str(Path(calib).resolve()) if calib is not None else None,
                   "finetuned": str(Path(finetuned).resolve()) if finetuned is not None else None},
        "quantization": summary and {**{k: summary[k] for k in ("spec", "excluded", "precision_overrides",
                                                                   "split_shortcut_layers", "groups")},
                                     "record_sha256": sha256_file(folder / RECORD)},
        "dtype": dtype,
        "sample_shape": list(adapter.sample_shape),
        # what other latent sizes must be multiples of (the adapter's); None: the model's own size only
        "latent_multiple": adapter.latent_multiple(loaded.model),
        "scheduler_config": loaded.scheduler_config,
        "sampling_defaults": loaded.sampling_defaults,
        "conditioning": CONDITIONING if conditioning.source is not None else None,
        "model_inputs": model_inputs,
        "blocks": block_entries,
        "groups": summary["groups"] if summary else None,
        "cache": {"features": {f: blocks_to_run_with_cache(blocks, f, model_inputs) for f in features}},
        "files": {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.name not in (MANIFEST, RECORD)},
        "versions": {"exporter": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                     # the export's passes: ORT's constant folding and shape inference, graphsurgeon's folding
                     "onnxruntime": onnxruntime.__version__, "onnx-graphsurgeon": onnx_graphsurgeon.__version__,
                     "diffusers": diffusers.__version__},
    }
    atomic_write_json(folder / MANIFEST, manifest)
    return manifest


def _inside(folder: Path, name: str) -> Path:
    path = (folder / name).resolve()
    if Path(name).is_absolute() or folder.resolve() not in path.parents:
        raise ManifestError(f"{folder / MANIFEST} names {name!r}, a path outside its folder; refusing it")
    return path


# what the runtime, lint and parity read from every manifest of this schema
REQUIRED_KEYS = ("source", "quantization", "sample_shape", "scheduler_config", "sampling_defaults", "conditioning",
                 "blocks", "groups", "cache", "files")


def read_manifest(folder: str | Path) -> dict:
    """The verified manifest of a graphs or engines folder (every file present and matching its sha256)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ManifestError(f"no {MANIFEST} in {folder}: not an exported graphs folder (run exporter export)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from None
    schema = manifest.get("schema") if isinstance(manifest, dict) else None
    if schema != SCHEMA:
        raise ManifestError(f"{path}: unknown manifest schema {schema!r} (this exporter reads schema {SCHEMA})")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ManifestError(f"{path}: no {', '.join(missing)}: the manifest was edited or cut short; re-export")
    _check_structure(manifest, path)
    files = manifest["files"]
    if manifest.get("kind") == "tensorrt":  # an engines folder (exporter build): plans, not graphs
        referenced = {n for b in manifest["blocks"] for n in b["engines"]}
        if manifest.get("tensorrt", {}).get("lean_runtime"):  # version-compatible engines run on it
            referenced.add(manifest["tensorrt"]["lean_runtime"])
    else:
        referenced = {n for b in manifest["blocks"] for n in (*b["graphs"], b["weights"])}
    if manifest.get("conditioning"):
        referenced.add(manifest["conditioning"])
    for name in sorted(referenced - set(files)):
        raise ManifestError(f"{path} references {name} without a sha256 for it")
    for name, digest in files.items():
        file = _inside(folder, name)
        if not file.is_file():
            raise ManifestError(f"{file}: missing (listed in {MANIFEST})")
        key = _stat_key(file)  # before hashing: a change while it is hashed shows as a changed stat later
        if sha256_file(file) != digest:
            raise ManifestError(f"{file}: sha256 mismatch: the file was modified, truncated or swapped since export")
        _verified[str(file)] = (key, digest)
    return manifest


def read_record(folder: str | Path, manifest: dict) -> dict:
    """The PTQ record of a quantized graphs folder (``quantize_model``'s summary: the activation scales
    the graphs hold), checked against the sha256 in its manifest."""
    folder = Path(folder)
    path = folder / RECORD
    digest = (manifest["quantization"] or {}).get("record_sha256")
    if digest is None:
        raise ManifestError(f"{folder / MANIFEST} holds no sha256 of {RECORD} (exported before 2026-12-05); "
                            "export again")
    if not path.is_file():
        raise ManifestError(f"{path}: missing (the quantized graphs' scales are recorded in it); export again")
    if sha256_file(path) != digest:
        raise ManifestError(f"{path}: sha256 mismatch: the record was modified, truncated or swapped since export")
    return json.loads(path.read_text())


def check_unchanged(folder: str | Path, manifest: dict, name: str) -> None:
    """Refuse ``name`` (a file of a folder ``read_manifest`` verified) if it changed since: a backend
    opens a graph or engine on first use, which may be long after the folder was loaded. Hashed
    again only when its size, modification time or inode differ from when it was verified."""
    folder = Path(folder)
    digest = manifest["files"].get(name)
    if digest is None:
        raise ManifestError(f"{folder / MANIFEST} lists no sha256 for {name}")
    file = _inside(folder, name)
    if not file.is_file():
        raise ManifestError(f"{file}: missing (removed after {folder} was loaded)")
    key = _stat_key(file)
    if _verified.get(str(file)) == (key, digest):
        return
    if sha256_file(file) != digest:
        raise ManifestError(f"{file}: sha256 mismatch: the file was modified, truncated or swapped after {folder} "
                            "was loaded; load the folder again once it is complete")
    _verified[str(file)] = (key, digest)


def _check_structure(manifest: dict, path: Path) -> None:
    """The shapes of what the runtime, lint and parity index into (the manifest carries no sha256 of
    its own: an edited one gets here), so that a damaged manifest is refused in one line."""
    def bad(what: str) -> ManifestError:
        return ManifestError(f"{path}: {what}: the manifest was edited or damaged; re-export")

    files = manifest["files"]
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise bad("'files' must map file names to sha256 digests")
    groups = manifest["groups"]
    if groups is not None and not (isinstance(groups, dict) and isinstance(groups.get("ranges"), list)
                                   and groups["ranges"]):
        raise bad("'groups' must be null or hold a list of t ranges")
    if groups is not None:
        _check_groups(groups, bad)
    if any("\0" in name for name in files):  # the OS refuses such a path with a ValueError
        raise bad("a file name holds a NUL character")
    source = manifest["source"]
    if not isinstance(source, dict) or not isinstance(source.get("model_class"), str) \
            or not isinstance(source.get("config"), dict):
        raise bad("'source' must name the model class and hold its config")
    shape = manifest["sample_shape"]
    if not (isinstance(shape, list) and len(shape) == 3
            and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        raise bad("'sample_shape' must be [channels, height, width]")
    if not isinstance(manifest["sampling_defaults"], dict) or not isinstance(manifest["scheduler_config"], dict):
        raise bad("'sampling_defaults' and 'scheduler_config' must be objects")
    count = len(groups["ranges"]) if groups else 1
    files_key = "engines" if manifest.get("kind") == "tensorrt" else "graphs"
    blocks = manifest["blocks"]
    if not isinstance(blocks, list) or not blocks:
        raise bad("'blocks' must be a non-empty list")
    for i, block in enumerate(blocks):
        if not isinstance(block, dict) or not isinstance(block.get("name"), str):
            raise bad(f"block {i} has no name")
        for key in ("inputs", "outputs"):
            if not isinstance(block.get(key), list) or not all(_is_tensor(t) for t in block[key]):
                raise bad(f"block {block['name']}: '{key}' must be a list of tensors with a name, a dtype and a "
                          "shape")
        names = block.get(files_key)
        if not isinstance(names, list) or len(names) not in (1, count) or not all(isinstance(n, str) for n in names):
            raise bad(f"block {block['name']}: '{files_key}' must list " + (
                "1 file" if count == 1 else f"1 or {count} files (one per timestep group)"))
        if files_key == "graphs" and not isinstance(block.get("weights"), str):
            raise bad(f"block {block['name']}: no 'weights' file")
    cache, names = manifest["cache"], {b["name"] for b in blocks}
    features = cache.get("features") if isinstance(cache, dict) else None
    if not isinstance(features, dict) or not all(
            isinstance(run, list) and all(isinstance(b, str) and b in names for b in run) for run in features.values()):
        raise bad("'cache' must map each cached feature to the blocks that run with it, all of them blocks here")


def _is_tensor(t) -> bool:
    return (isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("dtype"), str)
            and isinstance(t.get("shape"), list) and all(isinstance(d, (int, str)) for d in t["shape"]))


def _check_groups(groups: dict, bad) -> None:
    """Ranges [lo, hi] of t in increasing order; the thresholds between them, where written, are
    their midpoints (what the runtime switches at: an edited threshold would not be followed)."""
    ranges = groups["ranges"]
    numbers = all(isinstance(r, list) and len(r) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                              and math.isfinite(v) for v in r) for r in ranges)
    if not numbers or any(lo > hi for lo, hi in ranges) or any(a[1] > b[0] for a, b in itertools.pairwise(ranges)):
        raise bad("'groups' ranges must be [low, high] pairs of t in increasing order, not overlapping")
    if "thresholds" in groups and groups["thresholds"] != TimestepGroups([tuple(r) for r in ranges]).thresholds:
        raise bad("'groups' thresholds must be the midpoints between neighbouring ranges")


def deployed_bytes(folder: str | Path) -> int:
    """What a deployment ships: every file the manifest lists, and the manifest (not the PTQ record)."""
    folder = Path(folder)
    return sum((folder / f).stat().st_size for f in [*read_manifest(folder)["files"], MANIFEST])
