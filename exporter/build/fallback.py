"""FP8 graphs rewritten as INT8 ones, for GPUs without FP8 (``build: {fp8_fallback: int8}``).

Activations: an FP8 E4M3 scale ``s`` covers [-448 s, 448 s]; the INT8 scale covering the same
range is ``448 s / 127`` (same calibrated range, min-max style). Weights: the FP8 values are
dequantized and requantized to INT8 per output channel (max observer). Zero points become int8
zeros. Graph structure, names and every other initializer stay as they are, so the lint rules and
the block interfaces hold unchanged.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from exporter.export.passes import WeightFile

log = logging.getLogger(__name__)

FP8_MAX = 448.0
INT8_MAX = 127.0


def _weight_axis(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)


def _requantize_weight(values: np.ndarray, scale: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """FP8 weight (and its per-channel or per-tensor scale) -> INT8 weight and scale."""
    axis %= values.ndim
    shape = [1] * values.ndim
    if scale.ndim:
        shape[axis] = -1
    weights = values.astype(np.float32) * scale.reshape(shape)
    reduce = tuple(i for i in range(values.ndim) if i != axis or not scale.ndim)
    amax = np.abs(weights).max(axis=reduce) if scale.ndim else np.abs(weights).max()
    new_scale = (np.where(amax > 0, amax, 1.0) / INT8_MAX).astype(scale.dtype)
    q = np.clip(np.rint(weights / new_scale.reshape(shape if scale.ndim else [])), -128, 127).astype(np.int8)
    return q, new_scale


def fp8_to_int8(model: onnx.ModelProto) -> int:
    """Rewrite ``model`` (weights loaded) in place; returns the number of Q/DQ nodes converted.

    Converted scales and zero points are new initializers: the export stores identical small
    constants once, so an FP8 scale may also be another layer's scale or a float constant elsewhere."""
    inits = {i.name: i for i in model.graph.initializer}
    fp8 = TensorProto.FLOAT8E4M3FN
    converted = 0

    def add(name: str, array: np.ndarray) -> str:
        if name not in inits:
            inits[name] = model.graph.initializer.add()
            inits[name].CopyFrom(numpy_helper.from_array(array, name))
        return name

    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 2:
            continue
        data, scale = node.input[0], node.input[1]
        zero = node.input[2] if len(node.input) > 2 else ""
        if node.op_type == "DequantizeLinear" and data in inits and inits[data].data_type == fp8:  # a weight
            q, new_scale = _requantize_weight(numpy_helper.to_array(inits[data]),
                                              numpy_helper.to_array(inits[scale]), _weight_axis(node))
            inits[data].CopyFrom(numpy_helper.from_array(q, data))  # each weight has its own DQ
            node.input[1] = add(f"{data}.int8_scale", new_scale)
            if zero:
                node.input[2] = add(f"{data}.int8_zero_point", np.zeros(new_scale.shape, np.int8))
            converted += 1
        elif zero in inits and inits[zero].data_type == fp8:  # an activation's Q or DQ
            fp8_scale = numpy_helper.to_array(inits[scale])  # in the graph's float type (fp16 / bf16 / fp32)
            int8_scale = (fp8_scale.astype(np.float32) * np.float32(FP8_MAX / INT8_MAX)).astype(fp8_scale.dtype)
            node.input[1] = add(f"{scale}.int8", int8_scale)
            node.input[2] = add(f"{zero}.int8", np.zeros(numpy_helper.to_array(inits[zero]).shape, np.int8))
            converted += 1
    used = {name for node in model.graph.node for name in node.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return converted


def convert_folder(graphs: Path, manifest: dict, out: Path) -> None:
    """Every graph of ``graphs`` converted into ``out`` (same file names, one weight file per
    block, shared by its groups' graphs as in the export)."""
    out.mkdir(parents=True, exist_ok=True)
    for block in manifest["blocks"]:
        weights = WeightFile(out / block["weights"])
        for graph in block["graphs"]:
            model = onnx.load(str(graphs / graph))  # with its external weights
            count = fp8_to_int8(model)
            weights.externalize(model)
            onnx.save_model(model, str(out / graph))
            log.debug("%s: %d FP8 Q/DQ nodes converted to INT8", graph, count)
