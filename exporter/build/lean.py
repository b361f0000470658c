"""Finding TensorRT's lean runtime library, which version-compatible engines run on.

A version-compatible plan either embeds TensorRT's lean runtime (``libnvinfer_lean``, 110 MB in
TensorRT 11.4) or leaves it out; a later TensorRT then loads the lean runtime of the release that
built the plan (``IRuntime.load_runtime``) and lets it run the plan. We build one engine per block
and timestep group (46 for the reference UNet's INT8 graphs), so ``exporter build`` leaves it out
of every plan and copies the library into the engines folder once, with its sha256 in the manifest.

Plain file search (no TensorRT import), so it is tested on machines without a GPU.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path

from exporter.build.gating import BuildError, same_tensorrt_build, version_tuple

# pip's TensorRT wheels put libraries in these packages; the lean one comes with `tensorrt-lean-cu12`
# (or -cu13), the full `tensorrt-cu12-libs` does not carry it
PIP_PACKAGES = ("tensorrt_lean_libs", "tensorrt_libs")
SYSTEM_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/local/tensorrt/lib")


def library_name(tensorrt_version: str) -> str:
    """``libnvinfer_lean.so.<major>``, the file name TensorRT's Linux packages use."""
    return f"libnvinfer_lean.so.{version_tuple(tensorrt_version, 1)[0]}"


def search_dirs() -> list[Path]:
    """Where TensorRT's pip packages, ``LD_LIBRARY_PATH`` and the Debian/RPM packages put libraries,
    in that order."""
    dirs = []
    for package in PIP_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            dirs += [Path(p) for p in spec.submodule_search_locations]
    dirs += [Path(p) for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    return dirs + [Path(p) for p in SYSTEM_DIRS]


def find_lean_runtime(tensorrt_version: str, dirs: list[Path] | None = None) -> Path:
    """The lean runtime library of the installed TensorRT; BuildError with the install command when
    there is none, or when pip's copy belongs to another TensorRT release (a lean runtime runs only
    plans of its own release)."""
    name = library_name(tensorrt_version)
    for folder in search_dirs() if dirs is None else dirs:
        candidate = folder / name
        if candidate.is_file():
            pip_version = _pip_version(folder)
            if pip_version and not same_tensorrt_build(pip_version, tensorrt_version):
                raise BuildError(f"{candidate} is TensorRT {pip_version}'s lean runtime and this TensorRT is "
                                 f"{tensorrt_version}: version-compatible engines need the lean runtime of the "
                                 f"TensorRT that builds them (pip install tensorrt-lean-cu12=={tensorrt_version}, "
                                 "or -cu13 to match your tensorrt package)")
            return candidate
    raise BuildError(f"version-compatible engines need TensorRT's lean runtime ({name}), found nowhere "
                     f"(searched TensorRT's pip packages, LD_LIBRARY_PATH and {', '.join(SYSTEM_DIRS)}): "
                     f"pip install tensorrt-lean-cu12=={tensorrt_version} (or -cu13 to match your tensorrt "
                     "package), or drop 'version_compatible' from the recipe's build section")


def _pip_version(folder: Path) -> str | None:
    """The release of the pip distribution that installed ``folder``, when pip did."""
    for name in importlib.metadata.packages_distributions().get(folder.name, []):
        try:
            distribution = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if Path(distribution.locate_file(folder.name)).resolve() == folder.resolve():
            return distribution.version
    return None
