"""``exporter export``: one ONNX graph per block and timestep group, plus ``manifest.json``.

The model is cut into blocks at the granularity caching needs (``adapter.cache_split``), each block
traced with ``torch.onnx.export`` (TorchScript exporter, opset 20; 21 where INT4 appears, 22 for
bf16, whose Conv type ONNX added at 22) on real intermediate tensors; a UNet's at the smallest
latent its downsamplings divide (``adapter.trace_sample_shape``), which gives the same dynamic graphs
as its own size in a fraction of the time (FP16 convolutions are slow on a CPU). Quantized layers
trace as QuantizeLinear/DequantizeLinear with the scales of the timestep group being exported
(``QuantLayer.prepare_export``); a block without quantized activations has the same graph for every
group and is written once. Weights go to one external file per block, shared by its groups' graphs
(``exporter.export.passes``).

Everything is written into ``OUT.partial`` and renamed to ``OUT`` at the end, so an interrupted
export never leaves a folder that looks complete.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import onnx
import torch

from exporter.errors import UsageError
from exporter.export.manifest import write_manifest
from exporter.export.passes import BF16_OPSET, WeightFile, finalize
from exporter.fileio import require_staged_folder
from exporter.models import load_conditioning, load_model
from exporter.models.blocks import run_blocks
from exporter.quant.ptq import QuantLayer, quantize_model
from exporter.recipe import QuantizationSpec
from exporter.reference import resolve

log = logging.getLogger(__name__)

OPSET = 20
EXAMPLE_T = 500.0


def example_tensors(loaded, blocks, conditioning, sample_shape=None) -> dict[str, torch.Tensor]:
    """Every tensor the blocks exchange, by name, for a batch of 2 at t = 500, from a latent of
    ``sample_shape`` (default: the model's own)."""
    adapter = loaded.adapter
    sample = torch.randn(2, *(sample_shape or adapter.sample_shape), generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), EXAMPLE_T)  # timesteps are float32 graph inputs (Euler's are fractional)
    cond, _ = conditioning.batch([0, 0]) if conditioning.cond is not None else (None, None)
    context = getattr(loaded.model, "_exporter_context", None)
    if context is not None:
        context.t = EXAMPLE_T
    env = adapter.named_inputs(sample, t, cond)
    with torch.no_grad():
        run_blocks(blocks, env, ("noise_pred",), keep=env)
    return env


def dynamic_axes(names, env, spatial: bool = True) -> dict[str, dict[int, str]]:
    """Batch everywhere; height and width of image-shaped tensors when ``spatial`` (UNets: a
    transformer's token count and position embedding are fixed, so its graphs declare its size)."""
    axes = {}
    for name in names:
        axes[name] = {0: "batch"}
        if spatial and env[name].ndim == 4:
            axes[name].update({2: f"{name}_height", 3: f"{name}_width"})
    return axes


def _trace(block, env, scratch: Path, spatial: bool) -> onnx.ModelProto:
    """The block as traced by torch.onnx.export, its weights external data in ``scratch``.

    Traced into a file, not memory: a block over protobuf's 2 GB limit (SDXL's up0 in FP16 or
    FP32) can only be exported to a path, next to which torch writes its weights. Smaller blocks'
    weights, which torch keeps inline, are moved out too, so the passes never carry them."""
    path = scratch / "traced.onnx"
    # torch.onnx.export traces in eval mode, then restores the mode of ``block`` alone, recursively: a
    # Block wrapper (training by default) would leave the model's modules in training mode (a DiT's
    # label embedding then drops class labels at random in every later PyTorch call)
    modes = {m: m.training for m in block.modules()}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer chatter
        try:
            torch.onnx.export(block, tuple(env[n] for n in block.inputs), str(path), dynamo=False,
                              opset_version=OPSET, input_names=list(block.inputs), output_names=list(block.outputs),
                              dynamic_axes=dynamic_axes((*block.inputs, *block.outputs), env, spatial),
                              do_constant_folding=True)
        finally:
            for module, training in modes.items():
                module.training = training
    model = onnx.load(str(path), load_external_data=False)
    WeightFile(scratch / "traced.weights").externalize(model, scratch)
    return model


def export_graph(block, env, weights: WeightFile, path: Path, opset: int | None = None, spatial: bool = True) -> None:
    """One graph: traced, simplified, weights appended to ``weights``, saved to ``path``, checked.
    ``spatial``: height and width dynamic (``dynamic_axes``)."""
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".trace-") as scratch:
        onnx.save_model(finalize(_trace(block, env, Path(scratch), spatial), weights, opset, Path(scratch)), path)
    onnx.checker.check_model(str(path), full_check=True)


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def export_graphs(model: str, out: str | Path, calib: str | Path | None = None,
                  quantization: QuantizationSpec | None = None, dtype: str = "fp32", progress: bool = True,
                  finetuned: str | Path | None = None) -> dict:
    """Export ``model`` (FP32, or quantized from ``calib`` with ``quantization``) into ``out``.

    ``dtype`` is the type of everything not quantized (activations between Q/DQ pairs, float
    layers, scales): a strongly typed TensorRT network runs each layer in the type its graph
    declares, so graphs for TensorRT carry fp16 or bf16 (bf16: FP32's range, for models whose
    activations overflow fp16; TensorRT 10.6+ parses its opset 22, Ampere or newer runs it); ONNX
    Runtime on CPU runs the fp32 variant (its CPU provider has no bf16 kernels for Conv or
    InstanceNormalization).
    Calibration and quantized values are computed in fp32 either way. ``finetuned`` (an
    ``exporter finetune`` folder) is merged into the PTQ model before tracing."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    if dtype not in DTYPES:
        raise UsageError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    out = require_staged_folder(out)
    if quantization is not None:
        quantization.require_exportable()
    loaded = load_model(resolve(model))
    adapter = loaded.adapter
    summary = (quantize_model(loaded, quantization, calib, keep_float_weights=finetuned is not None)
               if quantization is not None else None)
    if finetuned is not None:
        from exporter.finetune import apply_finetune

        apply_finetune(loaded, finetuned, quantization)
    context = getattr(loaded.model, "_exporter_context", None)
    groups = context.groups if context is not None else None
    blocks = adapter.blocks(loaded.model, split=adapter.cache_split(loaded.model))
    conditioning = load_conditioning(loaded.default_conditioning, adapter)
    env = example_tensors(loaded, blocks, conditioning)  # the model's own size: the manifest's shapes
    traced_latent = adapter.trace_sample_shape(loaded.model)  # smaller for UNets: same graphs, traced faster
    resizable = adapter.latent_multiple(loaded.model) is not None
    trace_env = env if traced_latent == adapter.sample_shape else example_tensors(loaded, blocks, conditioning,
                                                                                   traced_latent)
    if dtype != "fp32":
        # torch's own .to: diffusers' warns about modules to keep in float32 even when it lists none
        torch.nn.Module.to(loaded.model, DTYPES[dtype])
        env, trace_env = (_retyped(e, DTYPES[dtype]) for e in (env, trace_env))

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        exported = []
        n_graphs = sum(_group_count(b, groups) for b in blocks)
        with tqdm(total=n_graphs, desc="exporting", unit="graph", disable=not progress or None) as bar:
            for block in blocks:
                weights = WeightFile(partial / f"{block.name}.weights")
                layers = [m for m in block.modules() if isinstance(m, QuantLayer)]
                files = []
                for g in range(_group_count(block, groups)):
                    for layer in layers:
                        layer.prepare_export(g)
                    name = f"{block.name}.onnx" if _group_count(block, groups) == 1 else f"{block.name}.g{g}.onnx"
                    export_graph(block, trace_env, weights, partial / name, BF16_OPSET if dtype == "bf16" else None,
                                 spatial=resizable)
                    files.append(name)
                    bar.update(1)
                exported.append({"block": block, "files": files, "weights": weights.path.name, "layers": layers})
        # with the PTQ record, quantization.json (scales, per-t activation ranges, exclusions)
        manifest = write_manifest(partial, loaded, blocks, exported, env, summary, conditioning, calib, dtype, finetuned)
        if out.exists():
            out.rmdir()
        partial.rename(out)
    except BaseException:  # nothing half-written stays behind (a failed trace, Ctrl-C, a full disk)
        shutil.rmtree(partial, ignore_errors=True)
        raise
    log.info("exported %d graphs of %d blocks into %s in %.1fs", n_graphs, len(blocks), out,
             time.perf_counter() - start)
    return manifest


def _retyped(env: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    # the timestep stays float32, as diffusers keeps it in half-precision pipelines (its sinusoidal
    # embedding is computed in float32): bf16 would round t = 999 to 1000 and 501 to 500
    return {n: v.to(dtype) if v.is_floating_point() and n != "timestep" else v for n, v in env.items()}


def _group_count(block, groups) -> int:
    """One graph per timestep group where activation scales differ, else one graph."""
    quantized_inputs = any(isinstance(m, QuantLayer) and m.afmt is not None for m in block.modules())
    return len(groups) if groups is not None and quantized_inputs else 1
