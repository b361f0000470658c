"""The parts of ``exporter.build.tensorrt`` that are plain logic over TensorRT objects (the rest runs
in ``test_gpu.py`` where CUDA exists)."""

from types import SimpleNamespace

import pytest

from exporter.build.gating import BuildError
from exporter.build.tensorrt import deserialize, folder_runtime, scratch_size, tensorrt_runtime
from exporter.export.manifest import ManifestError, sha256_file


def test_scratch_size_takes_v2_when_present_even_if_zero():
    # TensorRT 11 removed device_memory_size; an engine needing no scratch reports v2 == 0
    assert scratch_size(SimpleNamespace(device_memory_size_v2=0)) == 0
    assert scratch_size(SimpleNamespace(device_memory_size_v2=4096, device_memory_size=1024)) == 4096
    assert scratch_size(SimpleNamespace(device_memory_size=1024)) == 1024  # TensorRT 10.0


class FakeRuntime:
    """TensorRT's IRuntime as far as tensorrt_runtime uses it: ``load_runtime`` returns ``lean``."""

    def __init__(self, logger, lean=None):
        self.logger, self.lean, self.loaded = logger, lean, []

    def load_runtime(self, path):
        self.loaded.append(path)
        return self.lean


def fake_trt(lean):
    class Logger:
        WARNING = 2

        def __init__(self, level):
            self.level = level

    return SimpleNamespace(Logger=Logger, Runtime=lambda logger: FakeRuntime(logger, lean))


def test_version_compatible_engines_are_deserialized_by_the_lean_runtime_they_ship_with(tmp_path):
    runtime, keep = tensorrt_runtime(fake_trt(None), None)  # ordinary engines: TensorRT's own runtime
    assert isinstance(runtime, FakeRuntime) and not runtime.loaded

    lean = FakeRuntime(None)
    runtime, keep = tensorrt_runtime(fake_trt(lean), tmp_path / "libnvinfer_lean.so.11")
    assert runtime is lean
    parent = next(k for k in keep if isinstance(k, FakeRuntime))  # kept alive: it loaded the lean one
    assert parent.loaded == [str(tmp_path / "libnvinfer_lean.so.11")]
    assert not getattr(runtime, "engine_host_code_allowed", False)  # plans carry no host code of their own

    with pytest.raises(BuildError, match="could not load this lean runtime library"):
        tensorrt_runtime(fake_trt(None), tmp_path / "libnvinfer_lean.so.11")


def test_an_engines_folder_loads_its_lean_runtime_once_per_library_content(tmp_path, monkeypatch):
    import sys

    lean, made = FakeRuntime(None), []

    class RecordedRuntime(FakeRuntime):  # TensorRT's own runtime; records every one made
        def __init__(self, logger):
            super().__init__(logger, lean)
            made.append(self)

    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(Logger=fake_trt(None).Logger, Runtime=RecordedRuntime))
    library = tmp_path / "libnvinfer_lean.so.11"
    library.write_bytes(b"one lean runtime")
    manifest = {"tensorrt": {"lean_runtime": library.name}, "files": {library.name: sha256_file(library)}}
    assert folder_runtime(tmp_path, manifest) is lean and folder_runtime(tmp_path, manifest) is lean
    assert sum(len(r.loaded) for r in made) == 1  # the backend and parity share one load
    library.write_bytes(b"another lean runtime")  # another library there, with its manifest
    folder_runtime(tmp_path, {**manifest, "files": {library.name: sha256_file(library)}})
    assert sum(len(r.loaded) for r in made) == 2
    with pytest.raises(ManifestError, match="libnvinfer_lean.so.11: sha256 mismatch"):  # swapped after load
        folder_runtime(tmp_path, manifest)
    assert isinstance(folder_runtime(tmp_path, {"tensorrt": {"lean_runtime": None}}), FakeRuntime)
    assert sum(len(r.loaded) for r in made) == 2  # ordinary engines: TensorRT's own runtime, nothing loaded


def test_engines_are_deserialized_with_host_code_off_and_a_refusal_names_the_plan(tmp_path):
    plan = tmp_path / "mid.g0.plan"
    plan.write_bytes(b"plan bytes")
    seen = []
    runtime = SimpleNamespace(engine_host_code_allowed=False,
                              deserialize_cuda_engine=lambda data: seen.append(data) or "engine")
    assert deserialize(runtime, plan) == "engine" and seen == [b"plan bytes"]
    assert runtime.engine_host_code_allowed is False  # polygraphy's loaders would have switched it on
    runtime.deserialize_cuda_engine = lambda data: None  # TensorRT refused it (another build, corrupted)
    with pytest.raises(BuildError, match=r"mid.g0.plan: TensorRT could not deserialize this engine; rebuild it"):
        deserialize(runtime, plan)
