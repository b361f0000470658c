"""On a GPU machine with TensorRT: real builds of the tiny graphs, run and compared with ONNX Runtime.
Skipped elsewhere (tests/conftest.py gives the reason)."""

import numpy as np
import pytest
import torch

from exporter.build.engines import build_engines
from exporter.build.gating import BuildError
from exporter.recipe import BuildSpec
from exporter.runtime import Runtime

from .conftest import random_feed

pytestmark = pytest.mark.gpu


def sqnr_db(ref, x):
    return float(10 * np.log10(np.mean(ref.astype(np.float64) ** 2) / max(np.mean((ref - x) ** 2), 1e-30)))


def test_tiny_int8_engines_match_onnx_runtime_per_block_and_end_to_end(tiny_int8_graphs, tmp_path):
    manifest = build_engines(tiny_int8_graphs, tmp_path / "e", BuildSpec(images=[1, 2, 4]), progress=False)
    engines, graphs = Runtime.load(tmp_path / "e"), Runtime.load(tiny_int8_graphs)
    assert engines.backend.name == "tensorrt"
    for block in manifest["blocks"]:
        feed = random_feed(block)
        outputs = [o["name"] for o in block["outputs"]]
        for plan, graph in zip(block["engines"], block["graphs"]):
            for trt_out, ort_out in zip(engines.backend.run(plan, feed, outputs),
                                        graphs.backend.run(graph, feed, outputs)):
                assert sqnr_db(ort_out, trt_out) > 30, (plan, sqnr_db(ort_out, trt_out))
    a = engines.generate(rows=[0, 1], per_row=2, steps=6, progress=False)
    b = graphs.generate(rows=[0, 1], per_row=2, steps=6, progress=False)
    for key in a:
        assert sqnr_db(b[key].numpy(), a[key].numpy()) > 25, key


def test_an_input_outside_the_profile_is_a_clear_error(tiny_int8_graphs, tmp_path):
    manifest = build_engines(tiny_int8_graphs, tmp_path / "e", BuildSpec(images=[1, 1, 2]), progress=False)
    runtime = Runtime.load(tmp_path / "e")
    block = manifest["blocks"][0]
    with pytest.raises(BuildError, match="outside the engine's profile"):
        runtime.backend.run(block["engines"][0], random_feed(block, batch=16), [o["name"] for o in block["outputs"]])


def test_cuda_graph_replay_gives_the_same_outputs(tiny_int8_graphs, tmp_path):
    from exporter.build.tensorrt import TensorRTBackend
    from exporter.export import read_manifest

    build_engines(tiny_int8_graphs, tmp_path / "e", BuildSpec(images=[1, 2, 4]), progress=False)
    manifest = read_manifest(tmp_path / "e")
    plain = TensorRTBackend(tmp_path / "e", manifest)
    graphs = TensorRTBackend(tmp_path / "e", manifest, cuda_graphs=True)
    block = manifest["blocks"][1]
    outputs = [o["name"] for o in block["outputs"]]
    for seed in range(3):  # capture on the first call, replay on the next ones with new inputs
        feed = random_feed(block, seed=seed)
        for x, y in zip(plain.run(block["engines"][0], feed, outputs), graphs.run(block["engines"][0], feed, outputs)):
            np.testing.assert_array_equal(x, y)


def test_ampere_plus_engines_carry_their_hardware_compatibility_level(tiny_int8_graphs, tmp_path):
    import tensorrt as trt

    if torch.cuda.get_device_capability() < (8, 0):
        with pytest.raises(BuildError, match="Ampere or newer GPU"):
            build_engines(tiny_int8_graphs, tmp_path / "e", BuildSpec(hardware_compatibility="ampere_plus"),
                          progress=False)
        return
    manifest = build_engines(tiny_int8_graphs, tmp_path / "e", BuildSpec(images=[1, 2, 4],
                             hardware_compatibility="ampere_plus"), progress=False)
    assert manifest["tensorrt"]["flags"]["hardware_compatibility"] == "ampere_plus"
    runtime = Runtime.load(tmp_path / "e")
    plan = manifest["blocks"][0]["engines"][0]
    engine, _ = runtime.backend._open(plan)
    assert engine.hardware_compatibility_level == trt.HardwareCompatibilityLevel.AMPERE_PLUS


def test_fp8_builds_only_where_the_gpu_has_fp8(tiny_fp8_graphs, tmp_path):
    if torch.cuda.get_device_capability() >= (8, 9):
        manifest = build_engines(tiny_fp8_graphs, tmp_path / "e", progress=False)
        assert manifest["tensorrt"]["precision"] == ["fp8"] and manifest["tensorrt"]["fallback"] is None
    else:
        with pytest.raises(BuildError, match="FP8 needs compute capability"):
            build_engines(tiny_fp8_graphs, tmp_path / "e", progress=False)
        manifest = build_engines(tiny_fp8_graphs, tmp_path / "e", BuildSpec(fp8_fallback="int8"), progress=False)
        assert manifest["tensorrt"]["fallback"]["to"] == "int8"


def test_parity_runs_tensorrt_next_to_onnx_runtime(tiny_int8_graphs, tiny_unet_calib, tmp_path):
    from exporter.parity import check_parity

    build_engines(tiny_int8_graphs, tmp_path / "e", BuildSpec(images=[1, 4, 8]), progress=False)
    results, _ = check_parity(tiny_int8_graphs, calib=tiny_unet_calib, write_golden=False, end_to_end_check=False,
                              engines=tmp_path / "e")
    assert all(r.engine_outputs for r in results)
    assert min(s for r in results for s, _ in r.engine_outputs.values()) > 30


def test_bf16_engines_match_pytorch_and_run_through_the_runtime(tiny_unet_dir, tiny_unet_calib, tmp_path):
    import tensorrt

    from exporter.build.gating import BF16_MIN_CAPABILITY, BF16_MIN_TENSORRT, version_tuple
    from exporter.export import export_graphs
    from exporter.parity import check_parity
    from exporter.recipe import QuantizationSpec

    graphs = tmp_path / "g"
    export_graphs(str(tiny_unet_dir), graphs, calib=tiny_unet_calib, quantization=QuantizationSpec(groups=2),
                  dtype="bf16", progress=False)
    if (torch.cuda.get_device_capability() < BF16_MIN_CAPABILITY
            or version_tuple(tensorrt.__version__) < BF16_MIN_TENSORRT):
        with pytest.raises(BuildError, match="bf16"):
            build_engines(graphs, tmp_path / "e", progress=False)
        return
    build_engines(graphs, tmp_path / "e", BuildSpec(images=[1, 4, 8]), progress=False)
    results, _ = check_parity(graphs, calib=tiny_unet_calib, write_golden=False, end_to_end_check=False,
                              engines=tmp_path / "e")
    assert all(r.passed for r in results), [(r.graph, r.engine_outputs) for r in results]
    images = Runtime.load(tmp_path / "e").generate(rows=[0], per_row=2, steps=4, progress=False)
    assert all(torch.isfinite(image).all() for image in images.values())


def test_version_compatible_engines_run_through_the_lean_runtime_they_ship_with(tiny_int8_graphs, tiny_unet_calib,
                                                                                tmp_path):
    import tensorrt

    from exporter.build.lean import find_lean_runtime
    from exporter.parity import check_parity

    try:
        find_lean_runtime(tensorrt.__version__)
    except BuildError as e:  # pip's tensorrt does not bring it: tensorrt-lean-cu12 / -cu13 does
        pytest.skip(f"no lean runtime for this TensorRT: {e}")
    manifest = build_engines(tiny_int8_graphs, tmp_path / "e", BuildSpec(images=[1, 4, 8], version_compatible=True),
                             progress=False)
    assert manifest["tensorrt"]["lean_runtime"] in manifest["files"]
    engines, graphs = Runtime.load(tmp_path / "e"), Runtime.load(tiny_int8_graphs)
    for block in manifest["blocks"]:
        feed, outputs = random_feed(block), [o["name"] for o in block["outputs"]]
        for plan, graph in zip(block["engines"], block["graphs"]):
            for trt_out, ort_out in zip(engines.backend.run(plan, feed, outputs),
                                        graphs.backend.run(graph, feed, outputs)):
                assert sqnr_db(ort_out, trt_out) > 30, (plan, sqnr_db(ort_out, trt_out))
    results, _ = check_parity(tiny_int8_graphs, calib=tiny_unet_calib, write_golden=False, end_to_end_check=False,
                              engines=tmp_path / "e")  # polygraphy's TrtRunner, through the same lean runtime
    assert all(r.engine_outputs for r in results)
    assert min(s for r in results for s, _ in r.engine_outputs.values()) > 30
