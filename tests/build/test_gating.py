import pytest

from exporter.build.gating import BuildError, DeviceInfo, check_engines_compatible, foreign_timing_cache, plan_build
from exporter.recipe import BuildSpec


def manifest_with(*formats):
    return {"blocks": [{"quantized_layers": {f"layer{i}": [f, f if f != "int4" else None]
                                             for i, f in enumerate(formats)}}]}


def test_fp8_needs_compute_capability_8_9_or_an_allowed_fallback():
    ada, ampere = DeviceInfo("10.8.0", "NVIDIA L4", (8, 9)), DeviceInfo("10.8.0", "NVIDIA A100", (8, 0))
    assert plan_build(manifest_with("fp8"), BuildSpec(), ada) is None
    assert plan_build(manifest_with("int8"), BuildSpec(), ampere) is None
    with pytest.raises(BuildError, match=r"compute capability >= 8.9; NVIDIA A100 has 8.0.*fp8_fallback: int8"):
        plan_build(manifest_with("fp8"), BuildSpec(), ampere)
    record = plan_build(manifest_with("fp8"), BuildSpec(fp8_fallback="int8"), ampere)
    assert record["from"] == "fp8" and record["to"] == "int8" and "A100" in record["reason"]


def test_int4_needs_tensorrt_10():
    with pytest.raises(BuildError, match=r"TensorRT >= 10.0; this machine has TensorRT 9.3.0"):
        plan_build(manifest_with("int4"), BuildSpec(), DeviceInfo("9.3.0", "NVIDIA L4", (8, 9)))
    assert plan_build(manifest_with("int4"), BuildSpec(), DeviceInfo("10.0.1.6", "NVIDIA L4", (8, 9))) is None


def test_engines_from_another_tensorrt_or_gpu_are_refused_with_the_rebuild_command():
    manifest = {"tensorrt": {"version": "10.8.0.43", "gpu": "NVIDIA L4", "compute_capability": [8, 9]},
                "source": {"graphs": "/runs/graphs/x"}}
    check_engines_compatible(manifest, DeviceInfo("10.8.0.43", "NVIDIA L4", (8, 9)))
    with pytest.raises(BuildError, match=r"TensorRT 10.8.0.43, this machine has 10.9.0.34.*exporter build /runs/graphs/x"):
        check_engines_compatible(manifest, DeviceInfo("10.9.0.34", "NVIDIA L4", (8, 9)))
    with pytest.raises(BuildError, match=r"compute capability 8.9 \(NVIDIA L4\), this GPU \(NVIDIA H100\) is 9.0"):
        check_engines_compatible(manifest, DeviceInfo("10.8.0.43", "NVIDIA H100", (9, 0)))
    # TensorRT refuses an engine from another build of the same release too (no version-compatible flag)
    with pytest.raises(BuildError, match=r"TensorRT 10.8.0.43, this machine has 10.8.0.44"):
        check_engines_compatible(manifest, DeviceInfo("10.8.0.44", "NVIDIA L4", (8, 9)))


def test_a_timing_cache_fits_only_the_tensorrt_build_and_gpu_that_wrote_it():
    here = DeviceInfo("11.4.0.106", "NVIDIA L4", (8, 9))
    assert foreign_timing_cache(here.to_dict(), here) is None
    older = DeviceInfo("10.13.0.35", "NVIDIA L4", (8, 9)).to_dict()
    assert foreign_timing_cache(older, here) == "written by TensorRT 10.13.0.35, this machine has 11.4.0.106"
    other_gpu = DeviceInfo("11.4.0.106", "NVIDIA L40S", (8, 9)).to_dict()
    assert foreign_timing_cache(other_gpu, here) == "written on NVIDIA L40S, this GPU is NVIDIA L4"
    assert "does not say" in foreign_timing_cache({"tensorrt": "11.4.0.106"}, here)


def test_bf16_graphs_need_ampere_and_tensorrt_10_6():
    bf16 = {**manifest_with("int8"), "dtype": "bf16"}
    with pytest.raises(BuildError, match=r"bf16, which needs compute capability >= 8.0; Tesla T4 has 7.5.*--dtype fp16"):
        plan_build(bf16, BuildSpec(), DeviceInfo("10.8.0", "Tesla T4", (7, 5)))
    with pytest.raises(BuildError, match=r"opset 22.*from 10.6 on; this machine has TensorRT 10.5.0.*--dtype fp16"):
        plan_build(bf16, BuildSpec(), DeviceInfo("10.5.0", "NVIDIA A100", (8, 0)))
    assert plan_build(bf16, BuildSpec(), DeviceInfo("10.6.0.26", "NVIDIA A100", (8, 0))) is None
    assert plan_build(manifest_with("int8"), BuildSpec(), DeviceInfo("10.5.0", "Tesla T4", (7, 5))) is None
