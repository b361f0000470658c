"""``exporter lint``: check exported graphs against TensorRT's explicit-quantization rules and
show, per block, which compute layers are quantized and which stay in float, and why.

A quantized layer that TensorRT cannot fuse silently runs in float, and the engine is no faster:
this report makes that visible before any build. Rules (violations make the command fail):

* ``one-sided``: a Conv/ConvTranspose/MatMul/Gemm with Q/DQ on only one of activation and weight
  (allowed for weight-only layers, which the manifest declares);
* ``zero-point``: every Q/DQ zero point is 0 (symmetric);
* ``weight-axis``: per-channel weight scales lie on the output-channel axis;
* ``int4-layer``, ``int4-layout``, ``int4-block``: INT4 (blocked) weights only where TensorRT runs
  them: a GEMM (MatMul/Gemm; ModelOpt has no INT4 convolution either), its DequantizeLinear feeding
  it directly with the weight [in, out] blocked along the input features (ModelOpt's layout), in
  whole blocks of 64 or 128 (TensorRT's ONNX parser ignores ``block_size`` and infers the block from
  the weight and scale shapes, so a partial last block would be dequantized differently);
* ``activation-scale``: activation scales are per tensor (scalars);
* ``int4-activation``: no activation is quantized to INT4 (TensorRT quantizes activations to INT8,
  FP8 or FP4 and supports INT4 for weight-only quantization: W4A4 graphs are for ONNX Runtime);
* ``dangling``: every QuantizeLinear feeds a DequantizeLinear, every DequantizeLinear is used and
  reads a constant (a weight) or a QuantizeLinear's output;
* ``scale``: every Q/DQ scale is a constant (TensorRT needs them at build time), finite and positive
  (a zero scale divides by zero, a negative one flips signs), weight scales in the external weight
  files included;
* ``float``: no layer the manifest declares quantized runs in float (its Q/DQ pairs lost on the way).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from exporter.errors import UsageError
from exporter.export.manifest import node_scope, read_manifest
from exporter.recipe import TENSORRT_INT4_BLOCKS

COMPUTE = ("Conv", "ConvTranspose", "MatMul", "Gemm")
PASS_THROUGH = ("Transpose", "Reshape", "Slice")  # weight layout ops between a weight DQ and its layer


@dataclass
class BlockReport:
    block: str
    graph: str
    quantized: list[str] = field(default_factory=list)
    quantized_nodes: dict[str, str] = field(default_factory=dict)  # ONNX node name -> model layer
    weight_only: list[str] = field(default_factory=list)  # quantized weights, float input: float compute
    weight_only_reasons: dict[str, str] = field(default_factory=dict)  # layer -> reason of its precision override
    float_layers: dict[str, str] = field(default_factory=dict)  # layer -> reason
    attention_matmuls: int = 0
    violations: list[str] = field(default_factory=list)


def lint_graph(path: Path, block: dict, manifest: dict) -> BlockReport:
    graph = onnx.load(str(path), load_external_data=False).graph
    report = BlockReport(block["name"], path.name)
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in graph.output}
    inits = {i.name: i for i in graph.initializer}
    excluded = {e["layer"]: e["reason"] for e in (manifest["quantization"] or {}).get("excluded", [])}
    overridden = {o["layer"]: o["reason"] for o in (manifest["quantization"] or {}).get("precision_overrides", [])}
    quantized = block["quantized_layers"]

    def dq_behind(tensor: str, through=()):
        node = producer.get(tensor)
        while node is not None and node.op_type in through:
            node = producer.get(node.input[0])
        return node if node is not None and node.op_type == "DequantizeLinear" else None

    def constant(tensor: str, through=()):
        """The TensorProto of an initializer or a Constant node's output (behind any ``through``
        ops); None for a run-time tensor."""
        node = producer.get(tensor)
        while node is not None and node.op_type in through:
            tensor = node.input[0]
            node = producer.get(tensor)
        return _constant_value(node) if node is not None and node.op_type == "Constant" else inits.get(tensor)

    int4_activations, checked_scales = [], set()
    for node in graph.node:
        is_qdq = node.op_type in ("QuantizeLinear", "DequantizeLinear")
        zero_point = constant(node.input[2]) if is_qdq and len(node.input) > 2 and node.input[2] else None
        if zero_point is not None and numpy_helper.to_array(zero_point).any():
            report.violations.append(f"zero-point: {node.name} has a non-zero zero point")
        if is_qdq and node.input[1] not in checked_scales:  # a Q and its DQ share one scale: one line for both
            checked_scales.add(node.input[1])
            scale = constant(node.input[1])
            problem = "run-time (not constant)" if scale is None else _scale_problem(scale, path.parent)
            if problem:
                report.violations.append(f"scale: {node.name} has {problem} scale(s); TensorRT needs every scale "
                                         "a build-time constant, finite and > 0")
        if node.op_type == "QuantizeLinear":
            users = consumers.get(node.output[0], [])
            if not users or any(u.op_type != "DequantizeLinear" for u in users):
                report.violations.append(f"dangling: {node.name} does not feed a DequantizeLinear")
            scale = constant(node.input[1])
            if scale is not None and len(scale.dims) > 0:
                report.violations.append(f"activation-scale: {node.name} quantizes an activation per channel")
            to_int4 = any(a.name == "output_dtype" and a.i == onnx.TensorProto.INT4 for a in node.attribute)
            if to_int4 or (zero_point is not None and zero_point.data_type == onnx.TensorProto.INT4):
                int4_activations.append(node.name)
        if node.op_type == "DequantizeLinear":
            if not consumers.get(node.output[0]) and node.output[0] not in outputs:
                report.violations.append(f"dangling: {node.name}'s output is unused")
            source = producer.get(node.input[0])
            if constant(node.input[0]) is None and (source is None or source.op_type != "QuantizeLinear"):
                report.violations.append(f"dangling: {node.name} dequantizes {node.input[0]}, which is neither a "
                                         "constant nor a QuantizeLinear's output")
        if node.op_type not in COMPUTE:
            continue
        act_dq = dq_behind(node.input[0])
        w_dq = dq_behind(node.input[1], PASS_THROUGH)
        if w_dq is not None and constant(w_dq.input[0]) is None:  # a Q/DQ'd activation, not a weight
            w_dq = None
        weight_is_constant = w_dq is not None or constant(node.input[1], PASS_THROUGH) is not None
        if not weight_is_constant:  # activation x activation (attention scores, attention x values)
            report.attention_matmuls += 1
            continue
        layer = block["modules"].get(node_scope(node), node_scope(node))
        if w_dq is not None:
            _check_weight_axis(node, w_dq, producer, inits, report, layer)
        if act_dq is not None and w_dq is not None:
            report.quantized.append(layer)
            report.quantized_nodes[node.name] = layer
        elif w_dq is not None and layer in quantized and quantized[layer][1] is None:  # declared weight-only
            report.weight_only.append(layer)
            if layer in overridden:  # not every layer of a weight-only format: those a recipe singled out
                report.weight_only_reasons[layer] = overridden[layer]
        elif act_dq is not None or w_dq is not None:
            side = "activation" if act_dq is not None else "weight"
            report.violations.append(f"one-sided: {layer} ({node.name}) has Q/DQ on its {side} only; "
                                     "TensorRT runs it in float")
        elif quantized.get(layer, [None, None])[0] is not None:
            report.violations.append(f"float: {layer} ({node.name}) is quantized in the manifest but has no Q/DQ; "
                                     "TensorRT runs it in float")
        else:
            report.float_layers[layer] = excluded.get(layer, "not quantized (unquantized export)"
                                                      if manifest["quantization"] is None else "not quantized")
    if int4_activations:  # one line per graph: a W4A4 graph has one per quantized layer
        report.violations.append(f"int4-activation: {len(int4_activations)} QuantizeLinear node(s) quantize "
                                 f"activations to INT4 (first: {int4_activations[0]}); TensorRT supports INT4 "
                                 "for weight-only quantization only")
    report.quantized = sorted(set(report.quantized))  # a split shortcut is two convolutions of one layer
    report.weight_only = sorted(set(report.weight_only))
    return report


def _scale_problem(scale, folder: Path) -> str | None:
    if scale is None:
        return None
    values = numpy_helper.to_array(scale, base_dir=str(folder)).astype(np.float64)  # external: read from its file
    if not np.isfinite(values).all():
        return "non-finite"
    return "zero or negative" if (values <= 0).any() else None


def _constant_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """A Constant node's value as a TensorProto, whichever attribute holds it (a scale written as
    ``value_float`` is as constant as an initializer); None for sparse and string values."""
    for a in node.attribute:
        if a.name == "value":
            return a.t
        if a.name in ("value_float", "value_floats", "value_int", "value_ints"):
            dtype = np.float32 if "float" in a.name else np.int64
            return numpy_helper.from_array(np.array(onnx.helper.get_attribute_value(a), dtype))
    return None


def _check_weight_axis(node, dq, producer, inits, report: BlockReport, layer: str) -> None:
    attrs = {a.name: a.i for a in dq.attribute}
    weight = inits.get(dq.input[0])
    if weight is None:
        return
    if "block_size" in attrs:
        report.violations += _int4_block_problems(node, dq, producer[node.input[1]], weight, attrs)
        return
    scale = inits.get(dq.input[1])
    if scale is None or len(scale.dims) == 0:
        return  # per-tensor weight scale: allowed
    axis = attrs.get("axis", 1)
    transposed, tensor = False, node.input[1]  # a Transpose anywhere between the DQ and the layer
    while (feeder := producer.get(tensor)) is not None and feeder is not dq:
        transposed |= feeder.op_type == "Transpose"
        tensor = feeder.input[0]
    if node.op_type == "ConvTranspose":  # its weight is [in, out / groups, kh, kw]
        expected = 1
    elif node.op_type == "Conv" or transposed:
        expected = 0
    elif node.op_type == "Gemm":
        expected = 0 if any(a.name == "transB" and a.i == 1 for a in node.attribute) else 1
    else:
        expected = len(weight.dims) - 1
    if axis % len(weight.dims) != expected:
        report.violations.append(f"weight-axis: {dq.name} scales axis {axis}, not the output-channel axis {expected}")


def _int4_block_problems(node, dq, feeder, weight, attrs: dict) -> list[str]:
    """TensorRT's INT4 rules (module docstring): a GEMM's weight, the DequantizeLinear feeding it
    directly, whole blocks of 64 or 128 along the input features."""
    if node.op_type == "Conv":
        return [f"int4-layer: {dq.name} feeds a Conv; TensorRT runs INT4 weights only in GEMMs (MatMul/Gemm)"]
    if feeder is not dq:
        return [(f"int4-layout: {dq.name} reaches {node.name} through a {feeder.op_type}; TensorRT's INT4 GEMMs "
                 "take the DequantizeLinear output directly (weight [in, out] blocked along axis 0)")]
    k_axis = 1 if any(a.name == "transB" and a.i == 1 for a in node.attribute) else 0
    axis, block, dims = attrs.get("axis", 1) % len(weight.dims), attrs["block_size"], list(weight.dims)
    if len(dims) != 2 or axis != k_axis:
        return [f"int4-layout: {dq.name} blocks axis {axis} of a {dims} weight, not its input-feature axis {k_axis}"]
    if block not in TENSORRT_INT4_BLOCKS:
        sizes = " and ".join(map(str, sorted(TENSORRT_INT4_BLOCKS)))
        return [f"int4-block: {dq.name} has blocks of {block}; TensorRT supports {sizes}"]
    if dims[k_axis] % block:
        return [(f"int4-block: {dq.name}'s {dims[k_axis]} input features are not whole blocks of {block}; "
                 "TensorRT infers the block size from the shapes and would dequantize other blocks than ONNX Runtime")]
    return []


def lint_folder(folder: str | Path) -> list[BlockReport]:
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest.get("kind") == "tensorrt":  # plans, not graphs: the graphs they were built from are linted
        raise UsageError(f"{folder} holds TensorRT engines; lint the graphs they were built from: "
                         f"exporter lint {manifest['source']['graphs']}")
    return [lint_graph(folder / graph, block, manifest) for block in manifest["blocks"] for graph in block["graphs"]]


def format_lint(reports: list[BlockReport]) -> str:
    lines = ["| block | graph | quantized | weight-only | float | attention matmuls |", "|---|---|---|---|---|---|"]
    reasons: dict[str, str] = {}
    weight_only: dict[str, str] = {}
    for r in reports:
        lines.append(f"| {r.block} | {r.graph} | {len(r.quantized)} | {len(r.weight_only)} | {len(r.float_layers)} "
                     f"| {r.attention_matmuls} |")
        reasons.update(r.float_layers)
        weight_only.update(r.weight_only_reasons)
    lines.append("\n" + format_layer_counts(layer_counts(reports)))
    if reasons:
        lines.append("layers left in float, and why:")
        lines += [f"  {layer}: {reason}" for layer, reason in sorted(reasons.items())]
    if weight_only:
        lines.append("weight-only layers (quantized weights, float input and compute), and why:")
        lines += [f"  {layer}: {reason}" for layer, reason in sorted(weight_only.items())]
    violations = named_violations(reports)
    lines += [f"VIOLATION {v}" for v in violations]
    lines.append(f"{len(violations)} rule violation(s)" if violations else "no rule violations")
    return "\n".join(lines)


def layer_counts(reports: list[BlockReport]) -> dict[str, int]:
    """Compute layers over all graphs: quantized, weight-only (quantized weights, float input) and float."""
    return {"quantized": sum(len(r.quantized) for r in reports),
            "weight-only": sum(len(r.weight_only) for r in reports),
            "float": sum(len(r.float_layers) for r in reports)}


def format_layer_counts(counts: dict[str, int]) -> str:
    return (f"compute layers over all graphs: {counts['quantized']} quantized, {counts['weight-only']} "
            f"weight-only, {counts['float']} in float")


def named_violations(reports: list[BlockReport]) -> list[str]:
    """Every rule violation, prefixed with its graph's file name (the same rule often fails in every group)."""
    return [f"{r.graph}: {v}" for r in reports for v in r.violations]
