"""Tiny exported graphs for the build tests, and the TensorRT boundary replaced (CPU machines)."""

from __future__ import annotations

import numpy as np
import pytest

from exporter.build.gating import DeviceInfo
from exporter.export import export_graphs
from exporter.recipe import QuantizationSpec

L4 = DeviceInfo("10.13.0.35", "NVIDIA L4", (8, 9))  # FP8-capable
A10 = DeviceInfo("10.13.0.35", "NVIDIA A10", (8, 6))  # no FP8


def random_feed(block: dict, batch: int = 2, seed: int = 0) -> dict:
    """Inputs for one block of a manifest at its traced sizes: Gaussian tensors, t in [0, 500)."""
    rng = np.random.default_rng(seed)
    feed = {}
    for tensor in block["inputs"]:
        shape = [batch if d == "batch" else d if isinstance(d, int) else t
                 for d, t in zip(tensor["shape"], tensor["trace_shape"])]
        values = rng.random(shape) * 500 if tensor["name"] == "timestep" else rng.standard_normal(shape)
        feed[tensor["name"]] = values.astype(tensor["dtype"])
    return feed


@pytest.fixture(scope="session")
def tiny_fp8_graphs(tiny_unet_dir, tiny_unet_calib, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp8") / "graphs"
    spec = QuantizationSpec(weights="fp8", activations="fp8", weight_observer="max", act_observer="max", groups=1)
    export_graphs(str(tiny_unet_dir), out, calib=tiny_unet_calib, quantization=spec, progress=False)
    return out


@pytest.fixture
def fake_tensorrt(monkeypatch):
    """Replace exactly the TensorRT boundary (``exporter.build.tensorrt``'s device query and engine
    build): the fake engine is the graph's bytes, and its layer information says every quantized
    node ran in INT8 except the ones listed in ``fallen_back``."""
    from exporter.build import tensorrt

    calls = {"device": L4, "built": [], "fallen_back": set(), "cache_found": []}

    def build_engine(graph, plan, profile, spec, timing_cache, lean_runtime=None):
        import onnx

        calls["cache_found"].append(timing_cache.is_file())  # whether TensorRT would have loaded one
        model = onnx.load(str(graph), load_external_data=False)
        calls["built"].append({"graph": graph, "profile": profile, "model": model, "lean_runtime": lean_runtime,
                               "lean_runtime_present": lean_runtime is not None and lean_runtime.is_file()})
        plan.write_bytes(b"fake plan of " + graph.name.encode())
        timing_cache.write_bytes(b"timings")
        layers = []
        for node in model.graph.node:
            if node.op_type in ("Conv", "MatMul", "Gemm"):
                dtype = "Float" if node.name in calls["fallen_back"] else "Int8"
                layers.append({"Name": node.name, "LayerType": "CaskConvolution",
                               "Inputs": [{"Name": node.input[0], "Format/Datatype": f"{dtype} NC/32HW32"}]})
        return layers

    monkeypatch.setattr(tensorrt, "device_info", lambda: calls["device"])
    monkeypatch.setattr(tensorrt, "build_engine", build_engine)
    return calls
