import logging

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


T4, A10 = DeviceInfo("10.13.0.35", "Tesla T4", (7, 5)), DeviceInfo("10.13.0.35", "NVIDIA A10", (8, 6))
A100, L4 = DeviceInfo("10.13.0.35", "NVIDIA A100", (8, 0)), DeviceInfo("10.13.0.35", "NVIDIA L4", (8, 9))
L40S, H100 = DeviceInfo("10.13.0.35", "NVIDIA L40S", (8, 9)), DeviceInfo("10.13.0.35", "NVIDIA H100", (9, 0))


def engines_from(device: DeviceInfo, level: str, precision=("int8",)) -> dict:
    return {"tensorrt": {"version": device.tensorrt, "gpu": device.gpu,
                         "compute_capability": list(device.compute_capability), "precision": list(precision),
                         "flags": {"hardware_compatibility": level}}, "source": {"graphs": "/g"}}


def test_hardware_compatibility_levels_need_the_gpu_and_tensorrt_that_can_build_them():
    int8 = manifest_with("int8")
    assert plan_build(int8, BuildSpec(hardware_compatibility="ampere_plus"), A100) is None
    with pytest.raises(BuildError, match=r"ampere_plus engines are built on an Ampere or newer GPU.*Tesla T4 has 7.5"):
        plan_build(int8, BuildSpec(hardware_compatibility="ampere_plus"), T4)
    assert plan_build(int8, BuildSpec(hardware_compatibility="same_compute_capability"), T4) is None
    with pytest.raises(BuildError, match=r"needs TensorRT >= 10.9; this machine has TensorRT 10.8.0"):
        plan_build(int8, BuildSpec(hardware_compatibility="same_compute_capability"),
                   DeviceInfo("10.8.0", "NVIDIA L4", (8, 9)))
    with pytest.raises(BuildError, match=r"Turing or newer GPU.*Tesla V100 has 7.0"):
        plan_build(int8, BuildSpec(hardware_compatibility="same_compute_capability"),
                   DeviceInfo("10.13.0.35", "Tesla V100", (7, 0)))


def test_where_engines_may_run_follows_their_hardware_compatibility_level(caplog):
    with caplog.at_level(logging.WARNING, logger="exporter.build.gating"):
        check_engines_compatible(engines_from(L4, "none"), L40S)  # same compute capability, another model
    assert "built on NVIDIA L4 and run on NVIDIA L40S" in caplog.text and "same_compute_capability" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="exporter.build.gating"):
        check_engines_compatible(engines_from(L4, "same_compute_capability"), L40S)
        check_engines_compatible(engines_from(L4, "none"), L4)
    assert caplog.text == ""
    with pytest.raises(BuildError, match=r"compute capability 8.9 \(NVIDIA L4\), this GPU \(NVIDIA A10\) is 8.6"):
        check_engines_compatible(engines_from(L4, "same_compute_capability"), A10)

    for gpu in (A10, L4, H100):  # Ampere-plus INT8 engines built on an A100 run from 8.0 on
        check_engines_compatible(engines_from(A100, "ampere_plus"), gpu)
    with pytest.raises(BuildError, match=r"Ampere and newer GPUs \(compute capability >= 8.0\), this GPU "
                                         r"\(Tesla T4\) is 7.5"):
        check_engines_compatible(engines_from(A100, "ampere_plus"), T4)
    check_engines_compatible(engines_from(H100, "ampere_plus", ["fp8", "int8"]), L4)
    with pytest.raises(BuildError, match=r"with FP8 \(compute capability >= 8.9\), this GPU \(NVIDIA A10\) is 8.6"):
        check_engines_compatible(engines_from(H100, "ampere_plus", ["fp8", "int8"]), A10)


def test_version_compatible_engines_run_on_their_tensorrt_and_later_ones_never_earlier(caplog):
    def built_with(version: str, version_compatible: bool = True) -> dict:
        return {"tensorrt": {"version": version, "gpu": "NVIDIA L4", "compute_capability": [8, 9],
                             "flags": {"version_compatible": version_compatible}}, "source": {"graphs": "/g"}}

    with caplog.at_level(logging.WARNING, logger="exporter.build.gating"):
        for later in ("10.13.0.35", "10.13.0.36", "10.13.3.9", "10.16.1.11"):
            check_engines_compatible(built_with("10.13.0.35"), DeviceInfo(later, "NVIDIA L4", (8, 9)))
    assert caplog.text == ""
    with pytest.raises(BuildError, match=r"built version-compatible with TensorRT 10.13.0.35, which runs on that "
                                         r"release and later ones; this machine has the earlier 10.13.0.34"):
        check_engines_compatible(built_with("10.13.0.35"), DeviceInfo("10.13.0.34", "NVIDIA L4", (8, 9)))
    with pytest.raises(BuildError, match=r"the earlier 10.16.1.11"):
        check_engines_compatible(built_with("11.4.0.106"), DeviceInfo("10.16.1.11", "NVIDIA L4", (8, 9)))
    with caplog.at_level(logging.WARNING, logger="exporter.build.gating"):  # across a major release: a warning
        check_engines_compatible(built_with("10.16.1.11"), DeviceInfo("11.4.0.106", "NVIDIA L4", (8, 9)))
    assert "built with TensorRT 10.16.1.11 and run on 11.4.0.106" in caplog.text
    with pytest.raises(BuildError, match=r"compute capability 8.9 \(NVIDIA L4\), this GPU \(NVIDIA A10\) is 8.6"):
        check_engines_compatible(built_with("10.13.0.35"), DeviceInfo("10.16.1.11", "NVIDIA A10", (8, 6)))
    with pytest.raises(BuildError, match=r"this machine has 10.13.0.36 \(engines built with 'build: "
                                         r"\{version_compatible: true\}' also run on later TensorRT releases\)"):
        check_engines_compatible(built_with("10.13.0.35", False), DeviceInfo("10.13.0.36", "NVIDIA L4", (8, 9)))


def test_version_compatible_engines_are_built_on_volta_or_newer():
    spec = BuildSpec(version_compatible=True)
    assert plan_build(manifest_with("int8"), spec, DeviceInfo("10.13.0.35", "Tesla V100", (7, 0))) is None
    with pytest.raises(BuildError, match=r"Volta or newer GPU \(compute capability >= 7.0\); Tesla P100 has 6.0"):
        plan_build(manifest_with("int8"), spec, DeviceInfo("10.3.0.26", "Tesla P100", (6, 0)))
