"""What this GPU and TensorRT can build and run, decided before any build or load.

Plain logic over a ``DeviceInfo`` (what ``exporter.build.tensorrt.device_info`` reports) and the
manifests, so every decision is tested on machines without a GPU.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from exporter.errors import ExporterError
from exporter.export.manifest import formats_used
from exporter.recipe import BuildSpec

FP8_MIN_CAPABILITY = (8, 9)  # Ada and Hopper onwards have FP8 tensor cores; TensorRT refuses FP8 below
INT4_MIN_TENSORRT = (10, 0)  # INT4 block-quantized weight-only GEMMs arrived with TensorRT 10.0
BF16_MIN_CAPABILITY = (8, 0)  # Ampere onwards compute in BF16
BF16_MIN_TENSORRT = (10, 6)  # bf16 graphs are opset 22 (bfloat16 Conv); TensorRT's parser reads it from 10.6
AMPERE = (8, 0)  # hardware compatibility "ampere_plus": built on and run on compute capability >= 8.0
TURING = (7, 5)  # "same_compute_capability" engines are built on Turing or newer ...
SAME_CC_MIN_TENSORRT = (10, 9)  # ... with TensorRT 10.9+, which added that level
VOLTA = (7, 0)  # TensorRT builds version-compatible engines on Volta and newer GPUs

log = logging.getLogger(__name__)


class BuildError(ExporterError):
    """Engines cannot be built or loaded here; the message says what is missing and what to do."""


@dataclass(frozen=True)
class DeviceInfo:
    tensorrt: str  # version, e.g. "10.13.0.35"
    gpu: str  # device name
    compute_capability: tuple[int, int]

    def to_dict(self) -> dict:
        return {**asdict(self), "compute_capability": list(self.compute_capability)}


def dotted(parts) -> str:
    """(8, 9) -> "8.9": compute capabilities and versions in messages."""
    return ".".join(map(str, parts))


def version_tuple(version: str, parts: int = 3) -> tuple[int, ...]:
    """The numeric parts of a TensorRT version: major.minor.patch for feature gates; ``parts=4``
    adds the build number, which engine and timing-cache compatibility also depend on."""
    return tuple(int(part) for part in version.split(".")[:parts] if part.isdigit())


def same_tensorrt_build(a: str, b: str) -> bool:
    """Whether two TensorRT versions are one build: engines (not built version-compatible) and
    timing caches hold only for the major.minor.patch.build that wrote them."""
    return version_tuple(a, 4) == version_tuple(b, 4)


def plan_build(manifest: dict, spec: BuildSpec, device: DeviceInfo) -> dict | None:
    """None when the graphs build as they are; a fallback record when FP8 must become INT8 (and the
    recipe allows it). Raises BuildError when this GPU / TensorRT cannot build them."""
    formats = formats_used(manifest)
    _check_hardware_compatibility(spec.hardware_compatibility, device)
    if spec.version_compatible and tuple(device.compute_capability) < VOLTA:
        raise BuildError(f"version-compatible engines are built on a Volta or newer GPU (compute capability >= "
                         f"{dotted(VOLTA)}); {device.gpu} has {dotted(device.compute_capability)}")
    if manifest.get("dtype") == "bf16":
        if tuple(device.compute_capability) < BF16_MIN_CAPABILITY:
            raise BuildError(f"the graphs are bf16, which needs compute capability >= "
                             f"{dotted(BF16_MIN_CAPABILITY)}; {device.gpu} has "
                             f"{dotted(device.compute_capability)}. Re-export with --dtype fp16")
        if version_tuple(device.tensorrt) < BF16_MIN_TENSORRT:
            raise BuildError(f"the graphs are bf16 (ONNX opset 22), which TensorRT's parser reads from "
                             f"{dotted(BF16_MIN_TENSORRT)} on; this machine has TensorRT {device.tensorrt}. "
                             "Upgrade TensorRT or re-export with --dtype fp16")
    if "int4" in formats and version_tuple(device.tensorrt) < INT4_MIN_TENSORRT:
        raise BuildError(f"the graphs hold INT4 blocked weights, which need TensorRT >= "
                         f"{dotted(INT4_MIN_TENSORRT)}; this machine has TensorRT {device.tensorrt}. "
                         "Upgrade TensorRT or re-export with --format int8")
    if "fp8" in formats and tuple(device.compute_capability) < FP8_MIN_CAPABILITY:
        cc = dotted(device.compute_capability)
        reason = (f"FP8 needs compute capability >= {dotted(FP8_MIN_CAPABILITY)}; "
                  f"{device.gpu} has {cc}")
        if spec.fp8_fallback != "int8":
            raise BuildError(f"{reason}. Re-export with --format int8, or allow the fallback with "
                             "'build: {fp8_fallback: int8}' in the recipe (FP8 scales and weights are converted "
                             "to INT8 and the engine manifest records it)")
        return {"from": "fp8", "to": "int8", "reason": reason}
    return None


def _check_hardware_compatibility(level: str, device: DeviceInfo) -> None:
    """What TensorRT requires of the GPU that builds engines of a hardware compatibility level."""
    cc = dotted(device.compute_capability)
    if level == "ampere_plus" and tuple(device.compute_capability) < AMPERE:
        raise BuildError(f"hardware_compatibility ampere_plus engines are built on an Ampere or newer GPU "
                         f"(compute capability >= {dotted(AMPERE)}); {device.gpu} has {cc}")
    if level == "same_compute_capability":
        if version_tuple(device.tensorrt) < SAME_CC_MIN_TENSORRT:
            raise BuildError(f"hardware_compatibility same_compute_capability needs TensorRT >= "
                             f"{dotted(SAME_CC_MIN_TENSORRT)}; this machine has TensorRT {device.tensorrt}")
        if tuple(device.compute_capability) < TURING:
            raise BuildError(f"hardware_compatibility same_compute_capability engines are built on a Turing or "
                             f"newer GPU (compute capability >= {dotted(TURING)}); {device.gpu} has {cc}")


def check_engines_compatible(manifest: dict, device: DeviceInfo) -> None:
    """Engines are tied to the TensorRT version and GPU that built them; refuse others with the way
    out, rather than fail inside deserialization. TensorRT requires the same major, minor, patch and
    build number for engines not built version-compatible; version-compatible ones run on the
    TensorRT that built them and later ones (see ``_version_problem``). The GPU part follows the
    build's hardware compatibility level: "none" (TensorRT: compatible with the type of device they
    were built on) needs the same compute capability, and another GPU model of it gets a warning,
    as TensorRT itself gives; "same_compute_capability" needs the same compute capability;
    "ampere_plus" any GPU from 8.0 on that has the engines' formats (FP8 from 8.9)."""
    built = manifest["tensorrt"]
    level = built.get("flags", {}).get("hardware_compatibility", "none")
    here, there = tuple(device.compute_capability), tuple(built["compute_capability"])
    problems = []
    problem = _version_problem(built["version"], device.tensorrt,
                               bool(built.get("flags", {}).get("version_compatible")))
    if problem:
        problems.append(problem)
    if level == "ampere_plus":
        needed = FP8_MIN_CAPABILITY if "fp8" in built.get("precision", []) else AMPERE
        if here < needed:
            problems.append(f"built for Ampere and newer GPUs{' with FP8' if needed != AMPERE else ''} (compute "
                            f"capability >= {dotted(needed)}), this GPU ({device.gpu}) is {dotted(here)}")
    elif here != there:
        problems.append(f"built for compute capability {dotted(there)} ({built['gpu']}), this GPU ({device.gpu}) "
                        f"is {dotted(here)}")
    elif level == "none" and built["gpu"] != device.gpu:
        log.warning("these engines were built on %s and run on %s: TensorRT ties engines built without hardware "
                    "compatibility to the GPU model (expect lower speed, or errors); rebuild here, or build with "
                    "'build: {hardware_compatibility: same_compute_capability}'", built["gpu"], device.gpu)
    if problems:
        raise BuildError("these engines cannot run here: " + "; ".join(problems) + ". TensorRT engines fit the "
                         "TensorRT and GPU they were built for: rebuild them here with "
                         f"'exporter build {manifest['source']['graphs']} --out DIR'")


def _version_problem(built: str, here: str, version_compatible: bool) -> str | None:
    """Why engines built with TensorRT ``built`` cannot run on TensorRT ``here``, or None.
    Version-compatible engines run on their TensorRT and later ones, never on an earlier one.
    TensorRT's engine-compatibility page says that holds across a major release too (10 -> 11), its
    support matrix promises only later releases of the same major: across majors they load, with
    a warning."""
    if not version_compatible:
        return None if same_tensorrt_build(built, here) else (
            f"built with TensorRT {built}, this machine has {here} (engines built with "
            "'build: {version_compatible: true}' also run on later TensorRT releases)")
    if version_tuple(here, 4) < version_tuple(built, 4):
        return (f"built version-compatible with TensorRT {built}, which runs on that release and later ones; "
                f"this machine has the earlier {here}")
    if version_tuple(here, 1) != version_tuple(built, 1):
        log.warning("these version-compatible engines were built with TensorRT %s and run on %s: TensorRT's support "
                    "matrix promises later releases of the same major version only (its compatibility guide names "
                    "10 -> 11 too); check them with 'exporter parity GRAPHS --engines DIR'", built, here)
    return None


def foreign_timing_cache(record: dict, device: DeviceInfo) -> str | None:
    """Why a timing cache written on the machine ``record`` describes (a DeviceInfo dict) does not
    fit this one, or None. TensorRT's tactic timings hold for one TensorRT build on one GPU model."""
    try:
        version, gpu = str(record["tensorrt"]), str(record["gpu"])
        capability = tuple(record["compute_capability"])
    except (KeyError, TypeError):
        return "its record does not say which TensorRT and GPU wrote it"
    if not same_tensorrt_build(version, device.tensorrt):
        return f"written by TensorRT {version}, this machine has {device.tensorrt}"
    if (gpu, capability) != (device.gpu, tuple(device.compute_capability)):
        return f"written on {gpu}, this GPU is {device.gpu}"
    return None
