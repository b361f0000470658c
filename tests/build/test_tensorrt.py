"""The parts of ``exporter.build.tensorrt`` that are plain logic over TensorRT objects (the rest runs
in ``test_gpu.py`` where CUDA exists)."""

from types import SimpleNamespace

import pytest

from exporter.build.gating import BuildError
from exporter.build.tensorrt import scratch_size, tensorrt_runtime


def test_scratch_size_takes_v2_when_present_even_if_zero():
    # TensorRT 11 removed device_memory_size; an engine needing no scratch reports v2 == 0
    assert scratch_size(SimpleNamespace(device_memory_size_v2=0)) == 0
    assert scratch_size(SimpleNamespace(device_memory_size_v2=4096, device_memory_size=1024)) == 4096
    assert scratch_size(SimpleNamespace(device_memory_size=1024)) == 1024  # TensorRT 10.0


class FakeRuntime:
    def __init__(self, logger, loads=None):
        self.logger, self.loads, self.loaded = logger, loads, []

    def load_runtime(self, path):
        self.loaded.append(path)
        return self.loads


def fake_trt(loads):
    class Logger:
        WARNING = 2

        def __init__(self, level):
            self.level = level

    return SimpleNamespace(Logger=Logger, Runtime=lambda logger: FakeRuntime(logger, loads))


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
