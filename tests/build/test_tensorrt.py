"""The parts of ``exporter.build.tensorrt`` that are plain logic over TensorRT objects (the rest runs
in ``test_gpu.py`` where CUDA exists)."""

from types import SimpleNamespace

from exporter.build.tensorrt import scratch_size


def test_scratch_size_takes_v2_when_present_even_if_zero():
    # TensorRT 11 removed device_memory_size; an engine needing no scratch reports v2 == 0
    assert scratch_size(SimpleNamespace(device_memory_size_v2=0)) == 0
    assert scratch_size(SimpleNamespace(device_memory_size_v2=4096, device_memory_size=1024)) == 4096
    assert scratch_size(SimpleNamespace(device_memory_size=1024)) == 1024  # TensorRT 10.0
