"""Integer MatMuls for ONNX Runtime: the quantized Linear layers of a Q/DQ graph run as
MatMulIntegerToFloat in the session's copy, with the graph's numbers; the files stay untouched."""

import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from exporter.errors import UsageError
from exporter.export import export_graphs
from exporter.export.manifest import read_manifest
from exporter.models import load_model
from exporter.recipe import QuantizationSpec
from exporter.runtime import ort_integer
from exporter.runtime.backends import QDQ_FUSIONS, OnnxRuntimeBackend, session_from_proto
from exporter.runtime.ort_integer import ENV, cpu_has_int8_dot_products, integer_matmul_enabled, integer_matmuls

from .test_ort_fusion import feeds_for


def sqnr_db(ref: np.ndarray, x: np.ndarray) -> float:
    noise = float(((x - ref) ** 2).sum())
    return float("inf") if noise == 0 else 10 * np.log10(float((ref ** 2).sum()) / noise)


def session(model: onnx.ModelProto, folder, weights: dict, optimized_path=None, fuse: bool = True):
    """A session of ``model`` as the backend opens it; ``fuse=False``: no QDQ fusion, so the copy
    runs as its nodes say (what the rewrite itself means, apart from what ONNX Runtime makes of it)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # not the warning that an optimized graph is machine-specific
    if optimized_path:
        options.optimized_model_filepath = str(optimized_path)
    if not fuse:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if weights:
        options.add_external_initializers(list(weights), list(weights.values()))
    return session_from_proto(model, folder, options, ["CPUExecutionProvider"], ["CommonSubexpressionElimination"])


def optimized_ops(model: onnx.ModelProto, folder, weights: dict, path) -> list[str]:
    """The op types of ONNX Runtime's optimized graph of ``model``."""
    session(model, folder, weights, path)
    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


def test_quantized_linear_layers_run_as_integer_products(tiny_int8_graphs, tiny_unet_dir, monkeypatch, tmp_path):
    monkeypatch.setenv(ENV, "1")  # the rewrite on any CPU; its fused numbers only where the runtime turns it on
    exact_kernel = cpu_has_int8_dot_products()
    manifest = read_manifest(tiny_int8_graphs)
    before = {f: hashlib.sha256((tiny_int8_graphs / f).read_bytes()).hexdigest() for f in manifest["files"]}
    backend = OnnxRuntimeBackend(tiny_int8_graphs, manifest)
    model = load_model(str(tiny_unet_dir)).model
    for block in manifest["blocks"]:
        # every Linear layer with quantized activations (a Gemm when its input is 2-D: none here)
        linear = sum(a is not None and isinstance(model.get_submodule(name), torch.nn.Linear)
                     for name, (_, a) in block["quantized_layers"].items())
        for graph in block["graphs"]:
            feeds, names = feeds_for(block), [o["name"] for o in block["outputs"]]
            rewritten = backend.run(graph, feeds, names)
            assert backend.integer_matmuls[graph] == linear, graph
            plain = ort.InferenceSession(str(tiny_int8_graphs / graph), providers=["CPUExecutionProvider"]).run(names, feeds)
            for a, b in zip(rewritten, plain):  # the same int8 products, summed in int32 instead of float
                # (without int8 dot products ONNX Runtime's kernel saturates: 22-29 dB on an AVX2-only CPU)
                assert sqnr_db(b, a) >= (60 if exact_kernel else 20), graph
            if linear:  # ONNX Runtime fuses each of them, which it does for none of the file's
                copy = onnx.load(str(tiny_int8_graphs / graph), load_external_data=False)
                weights = integer_matmuls(copy, tiny_int8_graphs)
                unfused = session(copy, tiny_int8_graphs, weights, fuse=False).run(names, feeds)
                for a, b in zip(unfused, plain):  # and the copy computes what the file does, as written
                    assert np.abs(a - b).max() <= 1e-5 * max(1.0, float(np.abs(b).max())), graph
                assert optimized_ops(copy, tiny_int8_graphs, weights, tmp_path / "a.onnx").count("MatMulIntegerToFloat") == linear
                as_written = onnx.load(str(tiny_int8_graphs / graph), load_external_data=False)
                assert "MatMulIntegerToFloat" not in optimized_ops(as_written, tiny_int8_graphs, {}, tmp_path / "b.onnx")
    assert sum(backend.integer_matmuls.values()) > 0
    assert before == {f: hashlib.sha256((tiny_int8_graphs / f).read_bytes()).hexdigest() for f in manifest["files"]}


def test_switched_off_the_graphs_run_as_written(tiny_int8_graphs, monkeypatch):
    monkeypatch.setenv(ENV, "0")
    manifest = read_manifest(tiny_int8_graphs)
    backend = OnnxRuntimeBackend(tiny_int8_graphs, manifest)
    for block in manifest["blocks"]:
        backend.session(block["graphs"][0])
    assert set(backend.integer_matmuls.values()) == {0}


def test_only_cpus_with_int8_dot_products(monkeypatch, tmp_path, caplog):
    """Without VNNI, ONNX Runtime's u8 x s8 kernel sums pairs of products in 16 bits, which can saturate."""
    monkeypatch.delenv(ENV, raising=False)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n")
    assert not integer_matmul_enabled(cpuinfo)
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n")
    assert integer_matmul_enabled(cpuinfo)
    cpuinfo.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp\n")  # ARM dot product
    assert integer_matmul_enabled(cpuinfo)
    assert not integer_matmul_enabled(tmp_path / "missing")
    monkeypatch.setenv(ENV, "1")
    monkeypatch.setattr(ort_integer, "_WARNED", set())
    assert integer_matmul_enabled(tmp_path / "missing")
    assert "can saturate" in caplog.text  # forced on where the kernel is not exact: said
    monkeypatch.setenv(ENV, "0")
    cpuinfo.write_text("flags\t\t: avx512_vnni\n")
    assert not integer_matmul_enabled(cpuinfo)
    monkeypatch.setenv(ENV, " ")  # set but empty: the CPU decides, as when unset
    assert integer_matmul_enabled(cpuinfo)
    monkeypatch.setenv(ENV, "O")  # a typo is not silently "on"
    with pytest.raises(UsageError, match=ENV):
        integer_matmul_enabled(cpuinfo)


def test_without_integer_products_onnx_runtimes_own_qdq_fusions_are_off_too(tiny_unet_dir, tiny_unet_calib,
                                                                            monkeypatch, tmp_path):
    """An INT4 layer's weight goes straight into its MatMul (TensorRT's layout), which ONNX Runtime's
    own QDQ fusion turns into MatMulIntegerToFloat with no rewrite of ours: where integer products
    are off (no int8 dot products, whose absence made a finetuned W4A8 block 23 dB, or switched off),
    the backend's sessions and parity's run without that fusion."""
    folder = tmp_path / "w4a8"
    export_graphs(str(tiny_unet_dir), folder, calib=tiny_unet_calib, progress=False,
                  quantization=QuantizationSpec(weights="int4", activations="int8", groups=1))
    manifest = read_manifest(folder)

    def optimized(disabled: list[str]) -> list[str]:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        ort.InferenceSession(str(folder / "mid.onnx"), options, providers=["CPUExecutionProvider"],
                             disabled_optimizers=disabled or None)
        return [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph.node]

    assert "MatMulIntegerToFloat" in optimized([])  # ONNX Runtime's default
    monkeypatch.setenv(ENV, "0")
    backend = OnnxRuntimeBackend(folder, manifest)
    assert backend.disabled == [QDQ_FUSIONS]
    assert "MatMulIntegerToFloat" not in optimized(backend.disabled)
    monkeypatch.setenv(ENV, "1")
    assert OnnxRuntimeBackend(folder, manifest).disabled == []


def test_weight_only_int4_layers_keep_float_activations(tiny_unet_dir, tiny_unet_calib, monkeypatch, tmp_path):
    """W4A16: ONNX Runtime's QDQ fusion makes MatMulNBits of an INT4 weight feeding a MatMul with a
    float input, and its default accuracy level quantizes that input to int8 (the tiny UNet's mid:
    59 dB against the graph as written). The backend's sessions and parity's run the graph's floats."""
    monkeypatch.setenv(ENV, "1")  # ONNX Runtime's QDQ fusions on, whatever this CPU
    folder = tmp_path / "w4a16"
    export_graphs(str(tiny_unet_dir), folder, progress=False,
                  quantization=QuantizationSpec(weights="int4", activations=None, block_size=16, groups=1))
    manifest = read_manifest(folder)
    block = next(b for b in manifest["blocks"] if b["name"] == "mid")
    feeds, names = feeds_for(block), [o["name"] for o in block["outputs"]]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    as_written = ort.InferenceSession(str(folder / "mid.onnx"), options, providers=["CPUExecutionProvider"],
                                      disabled_optimizers=[QDQ_FUSIONS]).run(names, feeds)
    fused = ort.InferenceSession(str(folder / "mid.onnx"), options, providers=["CPUExecutionProvider"])
    assert sqnr_db(as_written[0], fused.run(names, feeds)[0]) < 80  # ONNX Runtime's default: int8 activations
    ours = OnnxRuntimeBackend(folder, manifest).run("mid.onnx", feeds, names)
    np.testing.assert_allclose(ours[0], as_written[0], rtol=0, atol=1e-5)
    from exporter.parity import check_parity

    results, _ = check_parity(folder, calib=tiny_unet_calib, end_to_end_check=False, blocks_to_check=["mid"],
                              samples=2)
    assert min(s for s, _ in results[0].outputs.values()) > 80  # the file's session in floats too
    # the runtime's session runs the INT4 weights fused, parity's of the file unfused: parity compares
    # the runtime's too (before: only when one of our rewrites applied)
    assert "INT4 weights under QDQ fusions" in results[0].runtime and min(
        s for s, _ in results[0].runtime_outputs.values()) > 80
    monkeypatch.setenv(ENV, "0")  # fusions off: the runtime runs the graph as parity's session does
    backend = OnnxRuntimeBackend(folder, manifest)
    backend.open("mid.onnx")
    assert "INT4" not in backend.rewrites("mid.onnx")


def test_a_bad_switch_is_refused_for_every_folder(tiny_int8_graphs, monkeypatch):
    # FP8 graphs run at the basic level, where integer products never apply: the value is still read
    from exporter.runtime import backends

    monkeypatch.setattr(backends, "optimization_level", lambda manifest: ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    monkeypatch.setenv(ENV, "banana")
    with pytest.raises(UsageError, match=ENV):
        OnnxRuntimeBackend(tiny_int8_graphs, read_manifest(tiny_int8_graphs))


def linear_layers(axis: int, shared: bool) -> tuple[onnx.ModelProto, dict]:
    """x -> Q/DQ -> MatMul with Transpose(DQ(int8 W [8, 16])), as the exporter writes a Linear layer
    (per-channel scales along ``axis`` of W); ``shared``: a second layer reading the same W."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    # 7-bit weights: on a CPU without VNNI, ONNX Runtime's u8 x s8 kernel sums pairs of products in
    # 16 bits, and full-range ones saturate there (2 of 48 outputs off by 1.2 on an AVX2-only EPYC);
    # these tests are about the rewrite's layout, which is the same on every CPU
    weight = rng.integers(-63, 64, (8, 16)).astype(np.int8)
    scale = rng.uniform(0.01, 0.02, weight.shape[axis % 2]).astype(np.float32)
    inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(scale, "s"),
             numpy_helper.from_array(np.array(0.05, np.float32), "xs"),
             numpy_helper.from_array(np.array(0, np.int8), "xz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"])]
    outputs = []
    for i in range(2 if shared else 1):
        nodes += [helper.make_node("DequantizeLinear", ["w", "s"], [f"wd{i}"], axis=axis),
                  helper.make_node("Transpose", [f"wd{i}"], [f"wt{i}"], perm=[1, 0]),
                  helper.make_node("MatMul", ["xd", f"wt{i}"], [f"y{i}"])]
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 16])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=9)
    return model, {"x": rng.standard_normal((2, 3, 16)).astype(np.float32)}


@pytest.mark.parametrize(("axis", "shared", "rewritten"), [(0, True, 1), (-2, False, 1), (1, False, 0), (-1, False, 0)])
def test_integer_rewrite_of_shared_weights_and_scale_axes(axis, shared, rewritten, tmp_path):
    # a weight read by two layers is declared once (twice made a model ONNX Runtime refuses); scales
    # along the input features are left as written (ONNX Runtime's integer kernel cannot take them)
    model, feeds = linear_layers(axis, shared)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    weights = integer_matmuls(model, tmp_path)
    assert len(weights) == rewritten
    options = ort.SessionOptions()
    if weights:
        options.add_external_initializers(list(weights), list(weights.values()))
    got = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)
    for a, b in zip(expected, got):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)


def test_blocked_weight_scales_are_left_as_written(tmp_path):
    # scales [out / block, in] along the output axis would need transposing with the weight: not rewritten
    model, feeds = linear_layers(0, False)
    scale = next(t for t in model.graph.initializer if t.name == "s")
    blocked = np.random.default_rng(1).uniform(0.01, 0.02, (4, 16)).astype(np.float32)
    scale.CopyFrom(onnx.numpy_helper.from_array(blocked, "s"))
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "w")
    dq.attribute.append(onnx.helper.make_attribute("block_size", 2))
    model.opset_import[0].version = 21
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert integer_matmuls(model, tmp_path) == {}
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    np.testing.assert_array_equal(got[0], expected[0])
