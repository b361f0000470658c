"""``exporter parity``: PyTorch ⇄ ONNX Runtime, per block and timestep group, with polygraphy.

For every graph, real inputs are taken from calibration data (recorded model inputs spread over
the timesteps of the graph's group, run through the PyTorch blocks so every block sees what it
sees in a denoising trajectory; ``inputs.SAMPLES`` says why 64 of them). polygraphy's ``Comparator`` runs the PyTorch block (FP32, or
fake-quantized exactly as exported: the scales of the export's record, ``quantization.json``, so the
inputs may come from any calibration of the model) and the graph in ONNX Runtime (bf16 graphs, which its CPU
provider cannot run: in ONNX's reference implementation, ``ReferenceRunner``) on them and
compares every output over all the samples by SQNR (``SnrCompareFunc``, the graph's threshold; a Q/DQ graph
legitimately differs from PyTorch by one quantization step wherever float rounding upstream flips
a rounding decision, so max-error checks would flag isolated elements); the table adds max abs. A graph below its SQNR threshold is
bisected: every layer's output is compared (polygraphy marks all graph outputs; the PyTorch side
hooks the modules) and the first layer below the threshold is named, next to PyTorch's own
sensitivity: the SQNR of PyTorch against itself with its inputs and every quantizer's input
perturbed by a few float32 ulps, which tells a block that is numerically that sensitive
(quantizer rounding flips cascading) from a graph that computes something else. With ``engines``
(an ``exporter build`` folder, GPU machines), each graph's TensorRT engine joins the same
polygraphy comparison as a third runner. Where the runtime's ONNX Runtime backend runs a graph as a
rewritten copy (fused attention, integer MatMuls, float conv weights: ``exporter.runtime``), that
session joins it too, so the check covers what ``exporter run`` executes as well as the file
TensorRT builds from.
Every runner is compared with PyTorch.

Next to the graphs, ``parity/`` receives per graph the inputs, PyTorch's outputs (golden, as
polygraphy RunResults), a data-loader script and the command that repeats the check without
this package (all the samples in one call): ``polygraphy run G.onnx --onnxrt --data-loader-script parity/G_data_loader.py
--load-outputs parity/G.golden.json --compare snr --snr-threshold T`` with the graph's threshold T
in ``parity/COMMANDS.txt`` (on a GPU machine ``--trt --strongly-typed`` in place of ``--onnxrt``):
polygraphy's SNR is this module's SQNR.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from exporter.bfloat16 import comparable
from exporter.errors import UsageError
from exporter.export.manifest import check_latent, layer_formats, node_scope, read_manifest, read_record
from exporter.parity.calls import call_bytes, largest_tensor_bytes, samples_per_call
from exporter.parity.engines import check_engine_batch, engine_runners
from exporter.parity.inputs import BATCH, SAMPLES, group_inputs, open_calibration, samples_per_group, split_batches
from exporter.parity.report import save_golden, warn_of_large_replays

log = logging.getLogger(__name__)

# Per-graph SQNR thresholds against the float32 PyTorch reference, by (graph float type, quantized).
# FP16 graphs are compared with the same float32 reference: FP16 rounding (11-bit mantissa, about
# 66 dB per operation) bounds the unquantized ones and flips more rounding decisions in Q/DQ ones.
# BF16 has 3 bits fewer (about 48 dB per operation): unquantized blocks of the reference models
# measured 43.3 to 53.8 dB (PyTorch's own bf16: 44.0 to 53.8). In quantized bf16 blocks, float
# differences of bf16 size alone move the fake-quant PyTorch model down to 26.5 dB (the
# self-sensitivity probe below, digits-unet FP8), so their threshold sits under that.
THRESHOLD_DB = {("fp32", False): 80.0, ("fp32", True): 40.0, ("fp16", False): 60.0, ("fp16", True): 30.0,
                ("bf16", False): 40.0, ("bf16", True): 25.0}
# Relative input noise of the sensitivity probe: a few float32 ulps, the size of the differences
# between two correct implementations of the layers upstream.
SENSITIVITY_NOISE = 1e-6


@dataclass
class GraphParity:
    block: str
    graph: str
    group: int
    outputs: dict[str, tuple[float, float]]  # name -> (SQNR dB, max abs diff)
    threshold: float
    polygraphy_passed: bool
    first_diverging_layer: str | None = None
    # PyTorch against itself with its inputs and quantizer inputs perturbed by SENSITIVITY_NOISE
    # (relative): how far float-level differences alone move this block's output (failing graphs)
    self_sqnr: float | None = None
    engine: str | None = None  # with --engines: the TensorRT engine built from this graph
    engine_outputs: dict[str, tuple[float, float]] | None = None  # PyTorch vs TensorRT
    runtime: str | None = None  # what the runtime's session runs differently from the file, if anything
    runtime_outputs: dict[str, tuple[float, float]] | None = None  # PyTorch vs the runtime's session
    replay_bytes: int | None = None  # the estimated memory of its replay command (all samples in one call)

    @property
    def file_passed(self) -> bool:
        """The graph file itself (ONNX Runtime or the reference) against PyTorch."""
        return all(sqnr >= self.threshold for sqnr, _ in self.outputs.values())

    @property
    def passed(self) -> bool:
        compared = [*self.outputs.values(), *(self.engine_outputs or {}).values(),
                    *(self.runtime_outputs or {}).values()]
        return all(sqnr >= self.threshold for sqnr, _ in compared)


def sqnr_db(reference: np.ndarray, x: np.ndarray) -> float:
    noise = float(np.mean((reference.astype(np.float64) - x) ** 2))
    signal = float(np.mean(reference.astype(np.float64) ** 2))
    if not np.isfinite(noise):  # NaN/Inf in either: the worst SQNR, so every `< threshold` test fails it
        return float("-inf")
    return float("inf") if noise == 0 else 10 * np.log10(max(signal, 1e-30) / noise)


def check_parity(folder: str | Path, calib: str | Path | None = None, write_golden: bool = True,
                 end_to_end_check: bool = True, engines: str | Path | None = None,
                 blocks_to_check: list[str] | None = None, samples: int = SAMPLES, batch: int | None = None,
                 latent: tuple[int, int] | None = None, progress: bool = False) -> tuple[list[GraphParity], dict | None]:
    """Per-graph parity results, and the end-to-end comparison (None when skipped). With
    ``engines`` (a folder built from these graphs; GPU machines), every graph's TensorRT engine
    runs in the same polygraphy comparison and is held to the same threshold. ``blocks_to_check``
    limits the per-block comparison to those blocks (every block still runs in PyTorch, to make
    their inputs). ``samples`` recorded inputs go through each graph (and PyTorch) ``batch`` at a
    time, and each output's SQNR is over all of them: at real size (64x64 latents, 4096-token
    attention) each sample of a batch costs about 1 GB of attention scores, so without ``batch``
    a graph takes ``inputs.BATCH`` or as many as fit in memory (``calls.samples_per_call``).
    ``latent`` (height, width): the per-block comparison at that size (the recorded latents resized),
    e.g. the largest an engine's profile takes; the end-to-end one stays at the model's own size."""
    import onnxruntime as ort
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator, SnrCompareFunc
    from polygraphy.logger import G_LOGGER
    from tqdm.auto import tqdm

    from exporter.models import load_model
    from exporter.parity.runners import TorchBlockRunner, graph_typed
    from exporter.quant.ptq import quantize_model
    from exporter.quant.timestep_groups import TimestepGroups
    from exporter.recipe import quantization_from_dict
    from exporter.runtime.backends import (
        QDQ_FUSIONS,
        OnnxRuntimeBackend,
        cpu_disabled_optimizers,
        holds_int4_weights,
        optimization_level,
    )

    if not log.isEnabledFor(logging.DEBUG):  # polygraphy's per-run INFO lines would drown the table
        G_LOGGER.module_severity = G_LOGGER.WARNING
    folder = Path(folder)
    manifest = read_manifest(folder)
    if latent is not None:
        check_latent(manifest, latent)
    # checked before work
    names = [e["name"] for e in manifest["blocks"]]
    unknown = sorted(set(blocks_to_check or ()) - set(names))
    if unknown:  # before the model is loaded and quantized: minutes at real size
        raise UsageError(f"unknown block(s) {unknown}; {folder} has {', '.join(names)}")
    trt_runners, engine_batch = engine_runners(Path(engines) if engines else None, folder, manifest, latent)
    if engine_batch is not None:  # calls of one size, inside the engines' profile
        batch = batch or BATCH
        if batch > engine_batch[2]:
            log.info("%d samples per call instead of %d: the engines take at most %d", engine_batch[2], batch,
                     engine_batch[2])
            batch = engine_batch[2]
    loaded = load_model(manifest["source"]["model"])
    calib = Path(calib) if calib is not None else (Path(manifest["source"]["calibration"])
                                                   if manifest["source"].get("calibration") else None)
    quantization = manifest["quantization"]
    if quantization is not None:  # rebuild the fake-quant model the graphs were exported from: their scales
        spec = quantization_from_dict(quantization["spec"], "manifest.quantization.spec")
        summary = quantize_model(loaded, spec, keep_float_weights=bool(manifest["source"].get("finetuned")),
                                 record=read_record(folder, manifest))
        rebuilt = summary["formats"]
        exported = layer_formats(manifest)
        if rebuilt != exported:  # e.g. the spec left defaults to the adapter, whose defaults changed
            changed = sorted(k for k in rebuilt.keys() | exported.keys() if rebuilt.get(k) != exported.get(k))
            raise UsageError(f"{folder}: its recipe now quantizes {len(changed)} layer(s) differently from the "
                             f"exported graphs (first: {changed[0]}: {rebuilt.get(changed[0])} here, "
                             f"{exported.get(changed[0])} in the graphs); re-export")
        if manifest["source"].get("finetuned"):
            from exporter.finetune import apply_finetune

            apply_finetune(loaded, manifest["source"]["finetuned"], spec)
    context = getattr(loaded.model, "_exporter_context", None)
    groups = TimestepGroups.from_dict(manifest["groups"]) if manifest["groups"] else None
    group_of = groups.group_of if groups else (lambda t: 0)
    blocks = {b.name: b for b in loaded.adapter.blocks(loaded.model, split=loaded.adapter.cache_split(loaded.model))}
    if names != list(blocks):
        raise UsageError(f"{folder}: the model's blocks no longer match the exported ones; re-export")
    data = open_calibration(calib, loaded)
    counts = samples_per_group(data, group_of, samples)
    uncovered = sorted(set(range(len(groups) if groups else 1)) - set(counts))
    if uncovered:  # every graph is checked, or parity fails: a graph left out is not a passed one
        raise UsageError(f"{calib} holds no sample at any t of timestep group(s) {uncovered} "
                         f"(t ranges {[groups.ranges[g] for g in uncovered] if groups else 'all'}): pass a "
                         "calibration that covers them (--calib), e.g. the one the graphs were exported from")
    if engine_batch is not None:
        check_engine_batch(counts, batch, engine_batch, calib)
    threshold = THRESHOLD_DB[(manifest.get("dtype", "fp32"), quantization is not None)]
    level = optimization_level(manifest)
    disabled = cpu_disabled_optimizers(level)  # the graphs' own sessions, on this CPU
    # the runtime's own sessions (bf16 graphs: ONNX Runtime's CPU provider has none)
    runtime = OnnxRuntimeBackend(folder, manifest) if manifest.get("dtype") != "bf16" else None
    results, start = [], time.perf_counter()
    checked = [e for e in manifest["blocks"] if not blocks_to_check or e["name"] in blocks_to_check]
    bar = tqdm(total=sum(len(e["graphs"]) for e in checked), desc="parity", unit="graph", disable=not progress or None)
    order = {graph: i for i, graph in enumerate(g for e in manifest["blocks"] for g in e["graphs"])}
    first = next(iter(counts))  # a block without per-group graphs: checked on this group's inputs
    for group in counts:  # one group's inputs held at a time
        todo = [(entry, graph) for entry in checked for g, graph in enumerate(entry["graphs"])
                if (g if len(entry["graphs"]) > 1 else first) == group]
        if not todo:
            continue
        inputs = group_inputs(manifest, loaded, list(blocks.values()), data, group_of, group, samples, latent)
        t, env = inputs["t"][0], inputs["env"]  # t: picks the group's scales in PyTorch
        del inputs
        for entry, graph in todo:
            bar.update(1)
            feed = {i["name"]: graph_typed(env[i["name"]], i["dtype"]) for i in entry["inputs"]}  # the graph's types
            largest = largest_tensor_bytes(folder / graph, feed) if batch is None or write_golden else None
            feeds = split_batches(feed, batch or samples_per_call(folder / graph, largest, BATCH))
            torch_runner = TorchBlockRunner(blocks[entry["name"]], entry["inputs"], context, t)
            # polygraphy's sessions (and `polygraphy run --onnxrt`) cannot set the accuracy level of
            # ORT's INT4 MatMul fusion (exact_int4_matmuls): graphs with INT4 weights run without it
            file_disabled = disabled
            if (level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL and QDQ_FUSIONS not in disabled
                    and manifest.get("dtype") != "bf16" and holds_int4_weights(folder / graph)):
                file_disabled = [*disabled, QDQ_FUSIONS]
            onnx_runner = graph_runner(folder / graph, manifest, level, disabled=file_disabled)
            plan, trt_runner = trt_runners.get(graph, (None, None))
            runtime_session = runtime.open(graph, rewritten_only=True) if runtime else None  # None: as written
            rewritten = runtime.rewrites(graph) if runtime_session is not None else ""
            runners = [torch_runner, onnx_runner] + ([trt_runner] if trt_runner else []) \
                + ([OnnxrtRunner(runtime_session, name="runtime-session")] if rewritten else [])
            batches = Comparator.run(runners, data_loader=feeds)
            del runners, runtime_session  # one runtime session alive at a time (a real-size block's weights)
            run = joined(batches)
            (torch_out,), (ort_out,) = run[0][1], run[1][1]  # ort_out: ONNX Runtime's, or the reference's
            accuracy = Comparator.compare_accuracy(  # every runner against PyTorch, by the same SQNR
                run, comparisons=[(0, i) for i in range(1, len(run))],
                compare_func=SnrCompareFunc(snr_threshold=threshold))
            result = GraphParity(entry["name"], graph, group, _against(torch_out, ort_out), threshold,
                                 bool(accuracy), engine=plan, runtime=rewritten or None)
            if trt_runner is not None:
                result.engine_outputs = _against(torch_out, run[2][1][0])
            if rewritten:
                result.runtime_outputs = _against(torch_out, run[-1][1][0])
            worst = None
            if not result.file_passed:  # the file itself: find the layer, in its worst call
                ort_calls = [{n: comparable(v) for n, v in call.items()} for call in batches[1][1]]
                per_call = [min(sqnr for sqnr, _ in _against(a, b).values()) for a, b in zip(batches[0][1], ort_calls)]
                worst = per_call.index(min(per_call))
            # ONNX Runtime's outputs are views into the arena of the session that made them, which they
            # keep alive after the session is gone (8.8 GiB for the SD 1.5 layout's up3.layer2 at 8 samples
            # a call); `run` holds copies
            del batches
            if worst is not None:
                result.first_diverging_layer = bisect(folder / graph, blocks[entry["name"]], entry, feeds[worst],
                                                      context, t, threshold, level, manifest, file_disabled)
            if not result.passed:
                result.self_sqnr = self_sensitivity(torch_runner, feeds, torch_out)
            if write_golden:
                # the replay as parity ran it: ORT's basic level leaves out its QDQ fusions too
                save_golden(folder, graph, feed, run[0], threshold,
                            basic=bool(file_disabled) or level != ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                            order=order)
                result.replay_bytes = call_bytes(largest, len(next(iter(feed.values()))))
            results.append(result)
            # every runner's outputs, copied: not kept through the next graph's run (the SD 1.5 layout's
            # up3.layer2 at 64 samples: 335 MB per runner)
            del run, torch_out, ort_out
        del env, feed, feeds  # before the next group's inputs are made
    bar.close()
    results.sort(key=lambda r: order[r.graph])  # the manifest's order, as the table shows them
    if write_golden:
        warn_of_large_replays(results)
    log.info("compared %d graphs with PyTorch in %.1fs (%d below threshold)", len(results),
             time.perf_counter() - start, sum(not r.passed for r in results))
    if end_to_end_check and manifest.get("dtype") == "bf16":
        log.warning("end to end not checked: the runtime runs bf16 graphs on TensorRT only (ONNX Runtime's CPU "
                    "provider has no bfloat16 kernels); build engines and pass --engines on a GPU machine")
        end_to_end_check = False
    if not end_to_end_check:
        return results, None
    start = time.perf_counter()
    e2e = end_to_end(folder, manifest, loaded)
    log.info("end to end: %d images, %d steps, runtime vs PyTorch in %.1fs", e2e["images"], e2e["steps"],
             time.perf_counter() - start)
    return results, e2e


def joined(run):
    """polygraphy ``RunResults`` of one iteration per call as one iteration per runner holding all
    the samples, so every comparison (and the golden outputs) covers all of them. TensorRT returns
    bf16 engines' outputs as torch bfloat16 tensors, which polygraphy cannot compare with PyTorch's
    NumPy float32 outputs (it converts them with .numpy()): widened here."""
    from polygraphy.comparator import RunResults
    from polygraphy.comparator.struct import IterationResult

    whole = RunResults()
    for name, iterations in run:  # np.concatenate copies, even a single call's outputs
        outputs = {n: np.concatenate([comparable(it[n]) for it in iterations]) for n in iterations[0]}
        whole.append((name, [IterationResult(outputs, sum(it.runtime or 0 for it in iterations), name)]))
    return whole


def _against(reference: dict, outputs) -> dict[str, tuple[float, float]]:
    """Per output: (SQNR in dB, max abs difference) of ``outputs`` against ``reference``."""
    return {n: (sqnr_db(reference[n], outputs[n]), float(np.abs(reference[n] - outputs[n]).max())) for n in reference}


def graph_runner(path: Path, manifest: dict, level, outputs: list[str] | None = None, disabled: list[str] = ()):
    """The polygraphy runner for a graph: ONNX Runtime (CPU), or for bf16 graphs, which its CPU
    provider cannot run, ONNX's reference implementation. ``outputs``: intermediate tensors to
    return instead of the graph's outputs (bisection). ``disabled``: ONNX Runtime optimizers not to
    run (``cpu_disabled_optimizers``: its QDQ fusions where its integer kernel is not exact)."""
    import onnxruntime as ort
    from polygraphy.backend.onnx import modify_outputs
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    from exporter.parity.runners import ReferenceRunner

    if manifest.get("dtype") == "bf16":
        return ReferenceRunner(path, outputs)
    options = ort.SessionOptions()
    if level is not None:
        options.graph_optimization_level = level
    if outputs is None:
        if not disabled:  # polygraphy's own loader, as `polygraphy run --onnxrt` opens it
            return OnnxrtRunner(SessionFromOnnx(str(path), providers=["CPUExecutionProvider"],
                                                graph_optimization_level=level))
        return OnnxrtRunner(partial(ort.InferenceSession, str(path), options, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=list(disabled)))
    import onnx

    from exporter.runtime.backends import session_from_proto

    marked = modify_outputs(onnx.load(str(path), load_external_data=False), outputs=outputs)
    return OnnxrtRunner(session_from_proto(marked, path.parent, options, ["CPUExecutionProvider"], disabled))


def bisect(graph_path: Path, block, entry: dict, feed: dict, context, t: float, threshold: float,
           level=None, manifest: dict | None = None, disabled: list[str] = ()) -> str | None:
    """The first layer (in graph order) whose output falls below ``threshold`` dB against PyTorch.

    A wrong scale or weight shows as a sharp drop at its layer. Where error only accumulates (FP8
    rounding decisions flipped by float-level differences upstream, layer after layer), the layer
    named is merely where the accumulated error crosses the threshold."""
    import onnx
    from polygraphy.comparator import Comparator

    from exporter.parity.runners import TorchBlockRunner

    model = onnx.load(str(graph_path), load_external_data=False)
    last_node_of = {}  # module path -> output of the last node in its scope
    for node in model.graph.node:
        if node.output:
            last_node_of[node_scope(node)] = node.output[0]
    order = list(dict.fromkeys(node_scope(n) for n in model.graph.node))
    marked = list(dict.fromkeys(last_node_of[p] for p in entry["modules"] if p in last_node_of))
    captured: dict = {}
    torch_runner = TorchBlockRunner(block, entry["inputs"], context, t, capture=captured)
    onnx_runner = graph_runner(graph_path, manifest or {}, level, outputs=marked, disabled=disabled)
    run = Comparator.run([torch_runner, onnx_runner], data_loader=[feed])
    (ort_out,) = run[1][1]
    for path in order:
        if (path in entry["modules"] and path in captured and last_node_of.get(path) in ort_out
                and sqnr_db(captured[path], ort_out[last_node_of[path]]) < threshold):
            return entry["modules"][path]
    return None


def self_sensitivity(torch_runner, feeds: list[dict], torch_out) -> float:
    """Worst output SQNR of PyTorch against itself with the block's inputs and the input of every
    activation quantizer inside it multiplied by (1 + N(0, SENSITIVITY_NOISE)) (FP16 / BF16 graphs:
    that type's machine epsilon); ``feeds``: the calls ``torch_out`` (all of them joined) came from.

    Quantized blocks are discontinuous: a rounding decision that flips moves a value by a whole
    step, and downstream quantizers can flip in turn. ONNX Runtime's float differences arise
    inside the block too (its GroupNorm, Softmax, accumulation order), where input noise alone may
    never reach a rounding decision that sits near a tie, so the noise goes in front of every
    quantizer as well. When this number is near or below the threshold, the block is that
    sensitive by itself, and a failing ONNX Runtime comparison says so rather than that the graph
    computes something else."""
    from exporter.quant.ptq import QuantLayer

    rng = np.random.default_rng(0)
    # an FP16 or BF16 graph's float differences are that type's size: noise of that resolution (in
    # the float32 reference too), or it would round away at FP16/BF16 inputs
    floats = [v for feed in feeds for v in feed.values() if _is_float(v)]
    level = max([SENSITIVITY_NOISE] + [float(torch.finfo(v.dtype).eps) if isinstance(v, torch.Tensor)
                                       else float(np.finfo(v.dtype).eps) for v in floats])

    def perturb(v):
        if isinstance(v, torch.Tensor):  # bfloat16 inputs
            return torch.from_numpy(perturb(v.float().numpy())).to(v.dtype)
        return (v * (1 + level * rng.standard_normal(v.shape))).astype(v.dtype)

    def perturb_input(module, args):  # the same noise in front of a quantizer (inference: no grad)
        return (torch.from_numpy(perturb(args[0].numpy())), *args[1:])

    hooks = [m.register_forward_pre_hook(perturb_input) for m in torch_runner.block.modules()
             if isinstance(m, QuantLayer) and m.afmt is not None]
    try:
        with torch_runner:
            perturbed = [torch_runner.infer({n: perturb(v) if _is_float(v) else v for n, v in feed.items()})
                         for feed in feeds]
    finally:
        for hook in hooks:
            hook.remove()
    return min(sqnr_db(torch_out[n], np.concatenate([p[n] for p in perturbed])) for n in torch_out)


def _is_float(v) -> bool:
    return v.is_floating_point() if isinstance(v, torch.Tensor) else np.issubdtype(v.dtype, np.floating)


def end_to_end(folder: Path, manifest: dict, loaded, rows=(0, 1, 2, 3), per_row: int = 2) -> dict:
    """The runtime's images against the PyTorch pipeline's (FP32 or fake-quantized), same seeds."""
    from exporter.models import load_conditioning
    from exporter.runtime import Runtime
    from exporter.sampling.loop import SampleSettings, generate

    defaults = {"steps": 20, "scheduler": "ddim", "guidance": 1.0, **manifest["sampling_defaults"]}
    conditioning = load_conditioning(loaded.default_conditioning, loaded.adapter)
    rows = tuple(r for r in rows if conditioning.num_rows is None or r < conditioning.num_rows)
    settings = SampleSettings(rows=rows, per_row=per_row, steps=defaults["steps"], scheduler=defaults["scheduler"],
                              guidance=defaults["guidance"], seed=0)
    context = getattr(loaded.model, "_exporter_context", None)

    def denoise(x, t, c, step):
        if context is not None:
            context.t = float(t[0])
        return loaded.adapter.denoise(loaded.model, x, t, c)

    ours = Runtime.load(folder).generate(rows=list(rows), per_row=per_row, steps=settings.steps,
                                         scheduler=settings.scheduler, guidance=settings.guidance, progress=False)
    theirs = generate(denoise, loaded.adapter.sample_shape, loaded.scheduler_config, conditioning, settings, False)
    diff = max(float((ours[k] - theirs[k]).abs().max()) for k in ours)
    # images live in [-1, 1]: PSNR over that peak-to-peak range of 2
    mse = float(np.mean([float(((ours[k].clamp(-1, 1) - theirs[k].clamp(-1, 1)) ** 2).mean()) for k in ours]))
    psnr = float("inf") if mse == 0 else float(10 * np.log10(4.0 / mse))
    exact = manifest["quantization"] is None and manifest.get("dtype", "fp32") == "fp32"
    limit = {"max_abs": 1e-3} if exact else {"psnr_db": 30.0}
    passed = bool(diff <= limit["max_abs"] if "max_abs" in limit else psnr >= limit["psnr_db"])
    return {"images": len(ours), "steps": settings.steps, "max_abs_latents": diff, "psnr_db": psnr,
            "limit": limit, "passed": passed}
