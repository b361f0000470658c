"""Export: graph structure, numbers against PyTorch in ONNX Runtime, shared weights, a verified manifest."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from exporter.export import ManifestError, export_graphs, read_manifest
from exporter.export.manifest import node_scope
from exporter.models import load_model
from exporter.models.blocks import run_blocks
from exporter.parity.runners import ReferenceRunner
from exporter.quant.ptq import quantize_model
from exporter.recipe import PrecisionOverride, QuantizationSpec


def block_outputs_in_ort(folder, manifest, env, group=0):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    results = {}
    for block in manifest["blocks"]:
        graph = block["graphs"][group if len(block["graphs"]) > 1 else 0]
        session = ort.InferenceSession(str(folder / graph), options, providers=["CPUExecutionProvider"])
        outputs = session.run(None, {i["name"]: env[i["name"]].numpy() for i in block["inputs"]})
        results.update({o["name"]: out for o, out in zip(block["outputs"], outputs)})
    return results


def reference_tensors(loaded, t=700.0, batch=3, scale=1):
    """Every block tensor of the (possibly quantized) PyTorch model at ``t``, batch 3 (traced with 2),
    latents ``scale`` times the model's own height and width (UNet graphs are traced at a smaller one)."""
    torch.manual_seed(1)
    adapter = loaded.adapter
    cond = torch.randn(batch, 2, 8)
    channels, height, width = adapter.sample_shape
    env = adapter.named_inputs(torch.randn(batch, channels, height * scale, width * scale), torch.full((batch,), t),
                               cond)
    context = getattr(loaded.model, "_exporter_context", None)
    if context is not None:
        context.t = t
    blocks = adapter.blocks(loaded.model, split=adapter.cache_split(loaded.model))
    with torch.no_grad():
        run_blocks(blocks, env, ("noise_pred",), keep=env)
    return env


def sqnr_db(ref, x):
    return float(10 * np.log10((ref**2).mean() / max(((ref - x) ** 2).mean(), 1e-30)))


def test_fp32_graphs_reproduce_the_blocks_at_another_batch_size_and_resolution(tiny_unet_dir, tmp_path):
    manifest = export_graphs(str(tiny_unet_dir), tmp_path / "g", progress=False)
    names = [b["name"] for b in manifest["blocks"]]
    assert names[:3] == ["stem", "down0.layer0", "down0.downsample"] and names[-2:] == ["up1.layer1", "head"]
    assert manifest["groups"] is None and manifest["model_inputs"] == ["sample", "timestep", "encoder_hidden_states"]
    assert manifest["cache"]["features"]  # DeepCache branches with the blocks each runs
    protos = [onnx.load(str(tmp_path / "g" / g), load_external_data=False) for b in manifest["blocks"] for g in b["graphs"]]
    assert {(p.ir_version, p.opset_import[0].version) for p in protos} == {(9, 20)}  # opset 20 needs IR 9, and no more is declared
    ops = [n.op_type for p in protos for n in p.graph.node]
    assert "Softmax" in ops and "Sqrt" not in ops  # the attention scale was folded into a constant
    for scale in (1, 2):  # the reshape targets made constant at export must not pin the resolution
        env = reference_tensors(load_model(tiny_unet_dir), scale=scale)
        for name, out in block_outputs_in_ort(tmp_path / "g", manifest, env).items():
            np.testing.assert_allclose(out, env[name].numpy(), rtol=0, atol=1e-5, err_msg=(name, scale))


def test_int8_graphs_have_qdq_on_every_quantized_layer_and_match_fake_quant(tiny_unet_dir, tiny_unet_calib, tmp_path):
    spec = QuantizationSpec(groups=2, split_shortcut=True)
    manifest = export_graphs(str(tiny_unet_dir), tmp_path / "g", calib=tiny_unet_calib, quantization=spec,
                             progress=False)
    folder = tmp_path / "g"
    assert len(manifest["groups"]["ranges"]) == 2
    for block in manifest["blocks"]:
        layers = block["quantized_layers"]
        act_layers = [n for n, formats in layers.items() if formats[1]]  # not the weight-only time layers
        assert len(block["graphs"]) == (2 if act_layers else 1)  # a block without activation scales: one graph
        for graph_file in block["graphs"]:
            graph = onnx.load(str(folder / graph_file), load_external_data=False).graph
            ops = [n.op_type for n in graph.node]
            int8 = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.INT8}
            weight_dq = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int8]
            split = [n for n in layers if n in manifest["quantization"]["split_shortcut_layers"]]
            # one int8 weight per quantized layer (two at a split site), one Q/DQ pair per input half
            assert len(weight_dq) == len(layers) + len(split), (block["name"], graph_file)
            assert ops.count("QuantizeLinear") == len(act_layers) + len(split)
    # the groups' graphs of a block share one weight file: same bytes referenced, written once
    up = next(b for b in manifest["blocks"] if len(b["graphs"]) == 2 and b["quantized_layers"])
    locations = [{(e.key, e.value) for i in onnx.load(str(folder / g), load_external_data=False).graph.initializer
                  for e in i.external_data} for g in up["graphs"]]
    assert locations[0] == locations[1] and locations[0]

    loaded = load_model(tiny_unet_dir)
    quantize_model(loaded, spec, tiny_unet_calib)
    for t in (100.0, 900.0):
        env = reference_tensors(loaded, t=t)
        group = loaded.model._exporter_context.group
        for name, out in block_outputs_in_ort(folder, manifest, env, group).items():
            assert sqnr_db(env[name].numpy(), out) > 40, (name, t)


def test_w4a16_weights_are_int4_blocked_and_exact(tiny_unet_dir, tmp_path):
    spec = QuantizationSpec(weights="int4", activations=None, block_size=16)
    manifest = export_graphs(str(tiny_unet_dir), tmp_path / "g", quantization=spec, progress=False)
    graph = onnx.load(str(tmp_path / "g" / "down0.layer0.onnx"), load_external_data=False)
    assert graph.opset_import[0].version == 21
    assert graph.ir_version == 10  # opset 21's, whatever IR version the tools write
    int4 = [i for i in graph.graph.initializer if i.data_type == onnx.TensorProto.INT4]
    blocks = [a.i for n in graph.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute
              if a.name == "block_size"]
    # blocks of 16 on the Linear layers with whole blocks of 16 inputs (an ONNX Runtime experiment:
    # TensorRT takes 64 or 128, and lint says so), INT8 weights on the rest
    assert int4 and len(blocks) == len(int4) and set(blocks) == {16}
    loaded = load_model(tiny_unet_dir)
    quantize_model(loaded, spec)
    env = reference_tensors(loaded)
    for name, out in block_outputs_in_ort(tmp_path / "g", manifest, env).items():
        np.testing.assert_allclose(out, env[name].numpy(), rtol=0, atol=1e-5, err_msg=name)


def test_int4_and_int8_activations_in_one_graph_keep_their_own_zero_point_types(tiny_unet_dir, tiny_unet_calib,
                                                                                 tmp_path):
    # W4A4 with the attention projections at A8: torch's exporter merges equal buffers of one dtype,
    # which once gave every QuantizeLinear of such a block one zero point, so one of the two formats
    # saturated to the other's range
    spec = QuantizationSpec(weights="int4", activations="int4", block_size=16, groups=1, precision=[
        PrecisionOverride(pattern="*.to_q", weights="int8", activations="int8")])
    manifest = export_graphs(str(tiny_unet_dir), tmp_path / "g", calib=tiny_unet_calib, quantization=spec,
                             progress=False)
    mixed = 0
    for block in manifest["blocks"]:
        graph = onnx.load(str(tmp_path / "g" / block["graphs"][0]), load_external_data=False).graph
        types = {i.name: i.data_type for i in graph.initializer}
        found = {}
        for node in graph.node:
            if node.op_type == "QuantizeLinear":
                found[block["modules"][node_scope(node)]] = types[node.input[2]]
        expected = {n: {"int8": onnx.TensorProto.INT8, "int4": onnx.TensorProto.INT4}[formats[1]]
                    for n, formats in block["quantized_layers"].items() if formats[1]}
        assert found == {n: expected[n] for n in found} and set(found) == set(expected), block["name"]
        mixed += len(set(found.values())) == 2
    assert mixed  # some block holds both formats
    loaded = load_model(tiny_unet_dir)
    quantize_model(loaded, spec, tiny_unet_calib)
    env = reference_tensors(loaded)
    for name, out in block_outputs_in_ort(tmp_path / "g", manifest, env).items():
        assert sqnr_db(env[name].numpy(), out) > 40, name


def test_fp8_graphs_keep_float8_types_through_the_graph_passes(tiny_unet_dir, tiny_unet_calib, tmp_path):
    # regression: graphsurgeon folds an Identity of an FP8 zero point into a UINT8 constant, which
    # turns FP8 activations into uint8 ones without any checker noticing
    spec = QuantizationSpec(weights="fp8", activations="fp8", weight_observer="max", act_observer="max", groups=1)
    manifest = export_graphs(str(tiny_unet_dir), tmp_path / "g", calib=tiny_unet_calib, quantization=spec,
                             progress=False)
    fp8, int8 = onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.INT8
    for block in manifest["blocks"]:
        graph = onnx.load(str(tmp_path / "g" / block["graphs"][0]), load_external_data=False).graph
        types = {i.name: i.data_type for i in graph.initializer}
        for node in graph.node:
            if node.op_type == "QuantizeLinear":
                assert types[node.input[2]] == fp8, (block["name"], node.name)
            if node.op_type == "DequantizeLinear" and node.input[0] in types:
                # FP8 weights, or INT8 ones of the weight-only time-embedding layers (adapter default)
                layer = block["modules"][node_scope(node)]
                expected = int8 if block["quantized_layers"][layer] == ["int8", None] else fp8
                assert types[node.input[0]] == expected, (block["name"], node.name)
    loaded = load_model(tiny_unet_dir)
    quantize_model(loaded, spec, tiny_unet_calib)
    env = reference_tensors(loaded)
    for name, out in block_outputs_in_ort(tmp_path / "g", manifest, env).items():
        assert sqnr_db(env[name].numpy(), out) > 40, name


def test_a_changed_missing_or_escaping_file_is_refused(tiny_unet_dir, tmp_path, run_cli):
    folder = tmp_path / "g"
    export_graphs(str(tiny_unet_dir), folder, progress=False)
    read_manifest(folder)
    weights = folder / "mid.weights"
    data = weights.read_bytes()
    weights.write_bytes(data[:-8])
    with pytest.raises(ManifestError, match="mid.weights: sha256 mismatch"):
        read_manifest(folder)
    weights.write_bytes(data)
    (folder / "head.onnx").rename(tmp_path / "head.onnx")
    with pytest.raises(ManifestError, match="head.onnx: missing"):
        read_manifest(folder)
    (tmp_path / "head.onnx").rename(folder / "head.onnx")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["../outside.onnx"] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="outside its folder"):
        read_manifest(folder)
    result = run_cli("export", "--model", tiny_unet_dir, "--format", "fp32", "--out", folder)
    assert result.returncode == 2 and "exists and is not an empty folder" in result.stderr


def test_fp16_variant_differs_only_in_the_float_type(tiny_unet_dir, tiny_unet_calib, tmp_path):
    spec = QuantizationSpec(groups=1, split_shortcut=True)
    manifest = export_graphs(str(tiny_unet_dir), tmp_path / "g", calib=tiny_unet_calib, quantization=spec,
                             dtype="fp16", progress=False)
    assert manifest["dtype"] == "fp16"
    graph = onnx.load(str(tmp_path / "g" / "mid.onnx"), load_external_data=False).graph
    assert {i.type.tensor_type.elem_type for i in graph.input} == {onnx.TensorProto.FLOAT16}
    types = {i.data_type for i in graph.initializer}
    assert onnx.TensorProto.INT8 in types and onnx.TensorProto.FLOAT16 in types  # int8 weights, fp16 scales
    # float32 remains only in folded shape arithmetic (the attention's 1/sqrt(head_dim)), never a tensor
    assert all(np.prod(i.dims) <= 1 for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT)
    loaded = load_model(tiny_unet_dir)
    quantize_model(loaded, spec, tiny_unet_calib)
    env = reference_tensors(loaded)
    half = {n: v.half() if v.is_floating_point() and n != "timestep" else v for n, v in env.items()}
    for name, out in block_outputs_in_ort(tmp_path / "g", manifest, half).items():
        assert sqnr_db(env[name].numpy(), out.astype(np.float32)) > 30, name  # vs the float32 fake-quant model


def test_unet_blocks_traced_at_the_smallest_latent_give_the_graphs_of_the_full_size(tiny_unet_dir, tiny_unet_calib,
                                                                                     tmp_path, monkeypatch):
    # Tracing at the smallest latent is what makes a large model's FP16 export feasible on a CPU (its
    # half-precision convolutions are slow); the graphs must not depend on it, only the time does.
    from exporter.models.adapters import UNetFamily

    loaded = load_model(tiny_unet_dir)
    assert loaded.adapter.sample_shape == (1, 8, 8)
    assert loaded.adapter.trace_sample_shape(loaded.model) == (1, 4, 4)  # one downsampling: deepest level 2 x 2
    spec = QuantizationSpec(groups=2, split_shortcut=True)
    export_graphs(str(tiny_unet_dir), tmp_path / "small", calib=tiny_unet_calib, quantization=spec, dtype="fp16",
                  progress=False)
    monkeypatch.setattr(UNetFamily, "trace_sample_shape", lambda self, model: self.sample_shape)
    export_graphs(str(tiny_unet_dir), tmp_path / "full", calib=tiny_unet_calib, quantization=spec, dtype="fp16",
                  progress=False)
    files = sorted(p.name for p in (tmp_path / "full").iterdir())
    assert sorted(p.name for p in (tmp_path / "small").iterdir()) == files
    assert "seconds" not in json.loads((tmp_path / "full" / "quantization.json").read_text())  # its time would differ
    for name in files:  # graphs, weight files, the record and the manifest (whose shapes are the model's own size)
        assert (tmp_path / "small" / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name


def block_outputs_in_reference(folder, manifest, env):
    """Every block output of a bf16 graphs folder, run by ONNX's reference implementation."""
    results = {}
    for block in manifest["blocks"]:
        runner = ReferenceRunner(folder / block["graphs"][0])
        with runner:
            outputs = runner.infer({i["name"]: env[i["name"]] for i in block["inputs"]})
        results.update(outputs)
    return results


@pytest.mark.parametrize("model", ["unet", "dit"])
def test_bf16_variant_is_opset_22_and_matches_the_float32_model(model, tiny_unet_dir, tiny_dit_dir, tiny_unet_calib,
                                                               tmp_path, run_cli):
    directory = tiny_unet_dir if model == "unet" else tiny_dit_dir
    spec = QuantizationSpec(groups=1, split_shortcut=True) if model == "unet" else None
    manifest = export_graphs(str(directory), tmp_path / "g", calib=tiny_unet_calib if spec else None, quantization=spec,
                             dtype="bf16", progress=False)
    assert manifest["dtype"] == "bf16"
    for block in manifest["blocks"]:
        model_proto = onnx.load(str(tmp_path / "g" / block["graphs"][0]), load_external_data=False)
        graph = model_proto.graph
        assert [o.version for o in model_proto.opset_import if o.domain in ("", "ai.onnx")] == [22]
        assert model_proto.ir_version == 10
        timestep = {onnx.TensorProto.FLOAT} if any(i["name"] == "timestep" for i in block["inputs"]) else set()
        floats = {i.type.tensor_type.elem_type for i in graph.input} - {onnx.TensorProto.INT64}  # class labels
        assert floats == {onnx.TensorProto.BFLOAT16} | timestep
        # every constant computation folded, the bf16 ones ONNX Runtime cannot run included (attention scale)
        constants = {i.name for i in graph.initializer}
        assert not [n.name for n in graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
                    and n.input and all(name in constants for name in n.input)]
        assert "Einsum" not in {n.op_type for n in graph.node}  # the DiT's unpatchify is a Transpose
        # float32 tensors only where the spec or the float32 timestep asks for them
        float32 = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT and np.prod(i.dims) > 1}
        assert all(n.op_type == "Resize" or "time_proj" in n.name for n in graph.node if float32 & set(n.input))
    if spec:
        types = {i.data_type for i in onnx.load(str(tmp_path / "g" / "mid.onnx"), load_external_data=False).graph.initializer}
        assert onnx.TensorProto.INT8 in types and onnx.TensorProto.BFLOAT16 in types  # int8 weights, bf16 scales
    loaded = load_model(directory)
    if spec:
        quantize_model(loaded, spec, tiny_unet_calib)
    env = reference_tensors(loaded) if model == "unet" else dit_reference_tensors(loaded)
    bf16 = {n: v.bfloat16() if v.is_floating_point() and n != "timestep" else v for n, v in env.items()}
    for name, out in block_outputs_in_reference(tmp_path / "g", manifest, bf16).items():
        assert sqnr_db(env[name].numpy(), out) > (25 if spec else 40), name  # vs the float32 (fake-quant) model
    result = run_cli("run", tmp_path / "g", "--out", tmp_path / "images")
    assert result.returncode == 2 and "bf16 graphs, which ONNX Runtime's CPU provider cannot run" in result.stderr


def dit_reference_tensors(loaded, t=700.0, batch=3):
    torch.manual_seed(1)
    adapter = loaded.adapter
    env = adapter.named_inputs(torch.randn(batch, *adapter.sample_shape), torch.full((batch,), t),
                               torch.tensor([0, 1, 2]))
    blocks = adapter.blocks(loaded.model, split=adapter.cache_split(loaded.model))
    with torch.no_grad():
        run_blocks(blocks, env, ("noise_pred",), keep=env)
    return env


class _LargeBlock(torch.nn.Module):
    """One linear layer of 2.16 GB: past protobuf's 2 GB limit on its own (as SDXL's up0 is in FP16)."""

    inputs, outputs = ("x",), ("y",)

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(32768, 16512, bias=False)
        self.norm = torch.nn.LayerNorm(16512)

    def forward(self, x):
        return self.norm(self.proj(x))


@pytest.mark.slow  # about a minute; 8.3 GiB peak while torch's exporter traces the block
def test_a_block_over_2gb_exports_into_a_small_graph_and_its_weight_file(tmp_path):
    from exporter.export.graphs import export_graph
    from exporter.export.passes import WeightFile

    torch.manual_seed(0)
    block = _LargeBlock().eval()
    assert block.proj.weight.numel() * 4 > 2**31
    env = {"x": torch.randn(2, 32768)}
    with torch.no_grad():
        env["y"] = block(env["x"])
    expected = env["y"].numpy()
    weights = WeightFile(tmp_path / "large.weights")
    export_graph(block, env, weights, tmp_path / "large.onnx")  # includes onnx.checker's full check

    assert sorted(p.name for p in tmp_path.iterdir()) == ["large.onnx", "large.weights"]  # no trace leftovers
    assert (tmp_path / "large.onnx").stat().st_size < 10_000
    assert (tmp_path / "large.weights").stat().st_size >= block.proj.weight.numel() * 4
    del block
    session = ort.InferenceSession(str(tmp_path / "large.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": env["x"].numpy()})
    assert np.abs(got - expected).max() <= 1e-4


def test_a_simulation_only_format_is_refused_before_any_work(tiny_unet_dir, tiny_unet_calib, tmp_path):
    from exporter.recipe import RecipeError

    spec = QuantizationSpec(precision=[PrecisionOverride("*attn*", weights="int6", activations="int8")])
    with pytest.raises(RecipeError, match=r"precision\[0\] \(\*attn\*\): int6 is simulation only"):
        export_graphs(tiny_unet_dir, tmp_path / "g", calib=tiny_unet_calib, quantization=spec, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_export_leaves_nothing_half_written(tiny_unet_dir, tmp_path, monkeypatch):
    from exporter.export import graphs

    real, calls = graphs.export_graph, []

    def second_graph_fails(*args, **kwargs):
        calls.append(args)
        if len(calls) == 2:
            raise RuntimeError("trace failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(graphs, "export_graph", second_graph_fails)
    with pytest.raises(RuntimeError, match="trace failed"):
        export_graphs(tiny_unet_dir, tmp_path / "g", progress=False)
    assert len(calls) == 2 and list(tmp_path.iterdir()) == []


def test_exporting_a_block_leaves_the_model_in_eval_mode(tiny_dit_dir, tmp_path):
    """torch.onnx.export restores the exported module's own mode recursively; a block wrapper is
    training by default, and a DiT in training mode drops class labels at random."""
    from exporter.export.graphs import example_tensors, export_graph
    from exporter.export.passes import WeightFile
    from exporter.models import load_conditioning

    loaded = load_model(tiny_dit_dir)
    blocks = loaded.adapter.blocks(loaded.model, split=loaded.adapter.cache_split(loaded.model))
    env = example_tensors(loaded, blocks, load_conditioning(loaded.default_conditioning, loaded.adapter))
    block = next(b for b in blocks if any("class_embedder" in n for n, _ in b.named_modules()))
    modes = {m: m.training for m in block.modules()}
    with torch.no_grad():
        before = block(*(env[n] for n in block.inputs))
    export_graph(block, env, WeightFile(tmp_path / "b.weights"), tmp_path / "b.onnx")
    assert {m: m.training for m in block.modules()} == modes and not loaded.model.training
    torch.manual_seed(3)
    with torch.no_grad():
        for _ in range(5):  # label dropout would replace some labels by the null class
            after = block(*(env[n] for n in block.inputs))
            assert all(torch.equal(a, b) for a, b in zip(after, before))


def test_an_out_export_cannot_rename_into_place_is_refused_before_any_work(tmp_path, monkeypatch):
    # a symbolic link to an empty folder, or ".": refused only after the whole export before
    import pytest

    from exporter.errors import UsageError

    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    with pytest.raises(UsageError, match="link is a symbolic link"):
        export_graphs("no-such-model", tmp_path / "link", progress=False)  # refused before the model is read
    monkeypatch.chdir(tmp_path / "empty")
    with pytest.raises(UsageError, match=r"--out \.: give the output folder a name"):
        export_graphs("no-such-model", ".", progress=False)
