"""Float weights for ONNX Runtime's CPU convolutions: a rewrite of the session's copy of a Q/DQ
graph, never of the file.

A quantized convolution is exported the way TensorRT's explicit quantization reads it: the int8
weight, its DequantizeLinear (per output channel), and a Q/DQ pair on the input; the output stays
float. TensorRT fuses that into an INT8 convolution. ONNX Runtime's CPU provider has no integer
convolution with a float output (its QDQ fusion to ``QLinearConv`` needs a QuantizeLinear after the
convolution), and its constant folding leaves every DequantizeLinear alone while its QDQ fusions are
on. So the convolution runs in float on a weight dequantized again at every call, and since that
weight is not a constant, ORT's blocked-layout (NCHWc) convolution, which the FP32 graphs get, does
not apply: on ``digits-unet``'s INT8 graphs the convolutions took 5.7 s of 21.5 s in ONNX Runtime's
kernels for README command 1's 80 images, against 3.0 s in the FP32 graphs (their reorders
included).

This rewrite writes each such weight's DequantizeLinear as ``Mul(Cast(w, float), scale)``, with
the per-channel scales unsqueezed to broadcast: the same arithmetic (int8 to float32 is exact, the
product is the one rounding, bit for bit what DequantizeLinear gives; tested), but ops that ONNX
Runtime's constant folding does fold when it opens the session. The convolution then gets a
constant float weight, which ORT lays out once for its blocked convolution and keeps; the int8
tensor is dropped after folding. The input's Q/DQ pair stays: the convolution sees the same
quantized activations and the same weights as in the file, only summed in another order.

It costs memory, four bytes per weight instead of one, in every session (one per timestep group),
and it pays only where convolutions are small: README command 1's 80 INT8 images took 15.3 s
instead of 17.2 s (FP32 graphs 15.7 s; one image per call 2.65 instead of 2.83 s, side by side in
one process, 2026-12-04), while on the SD 1.5 layout's INT8 graphs (2 groups, 2.25 GiB of float
conv weights per group) rewriting all of them gave 6.8 instead of 7.2 s per step and raised
``exporter run``'s peak from 2.8 to 7.1 GiB. So a graph is rewritten only when its convolution
weights take at most ``EXPORTER_ORT_FLOAT_CONV_WEIGHTS_MB`` in float32 (default 16; 0 turns the
rewrite off): every graph of the reference models (1.5 MiB at most); of the SD 1.5 layout, the
blocks at 64 x 64 latents (3.5-16 MiB each; peak 3.0 GiB and 22 s for 2 steps, as without it).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from exporter.errors import UsageError
from exporter.runtime.ort_fusion import GraphIndex
from exporter.runtime.ort_integer import attribute, nonzero_zero_point

ENV = "EXPORTER_ORT_FLOAT_CONV_WEIGHTS_MB"
DEFAULT_BUDGET_MB = 16


def float_conv_weights_budget() -> int:
    """Bytes of float convolution weights one session may hold: ``EXPORTER_ORT_FLOAT_CONV_WEIGHTS_MB``
    (0: none), default 16 MiB."""
    value = os.environ.get(ENV, "").strip()
    if not value:
        return DEFAULT_BUDGET_MB * 2**20
    try:
        mib = float(value)
    except ValueError:
        mib = math.nan
    if not 0 <= mib < math.inf:  # also refuses nan
        raise UsageError(f"{ENV}={value!r}: expected a number of MiB >= 0 (0 turns the float conv weights off)")
    return int(mib * 2**20)


def fold_conv_weights(model: onnx.ModelProto, folder: Path, budget: int | None = None) -> int:
    """Rewrite, in place, the DequantizeLinear of each Conv's int8 weight (an initializer, zero zero
    point, per tensor or per channel) as Cast and Mul, which ONNX Runtime folds into a constant;
    returns how many weights were rewritten. Nothing is rewritten when those weights, in float32,
    would exceed ``budget`` bytes (default ``float_conv_weights_budget()``)."""
    budget = float_conv_weights_budget() if budget is None else budget
    graph = model.graph
    g = GraphIndex(graph)
    initializers = {t.name: t for t in graph.initializer}
    found = []  # (DequantizeLinear, weight, scale)
    for dq in [n for n in graph.node if n.op_type == "DequantizeLinear"]:
        weight, scale = initializers.get(dq.input[0]), initializers.get(dq.input[1])
        if weight is None or scale is None or weight.data_type != onnx.TensorProto.INT8:
            continue
        if scale.data_type != onnx.TensorProto.FLOAT or len(scale.dims) > 1 or attribute(dq, "block_size", 0):
            continue
        if len(dq.input) > 2 and dq.input[2] and nonzero_zero_point(initializers.get(dq.input[2]), folder):
            continue
        users = g.consumers[dq.output[0]]
        if users and all(u.op_type == "Conv" and list(u.input).index(dq.output[0]) == 1 for u in users):
            found.append((dq, weight, scale))
    if sum(4 * int(np.prod(weight.dims)) for _, weight, _ in found) > budget:
        return 0
    for dq, weight, scale in found:
        name = dq.output[0]
        nodes = [helper.make_node("Cast", [weight.name], [f"{name}/float"], to=onnx.TensorProto.FLOAT)]
        scales = scale.name
        if scale.dims and scale.dims[0] > 1:  # per channel: [C] -> [C, 1, 1, 1] along the weight's axis
            axis = attribute(dq, "axis", 1) % len(weight.dims)
            others = np.array([d for d in range(len(weight.dims)) if d != axis], dtype=np.int64)
            graph.initializer.append(numpy_helper.from_array(others, f"{name}/axes"))
            nodes.append(helper.make_node("Unsqueeze", [scale.name, f"{name}/axes"], [f"{name}/scales"]))
            scales = f"{name}/scales"
        nodes.append(helper.make_node("Mul", [f"{name}/float", scales], [name], name=f"{dq.name or name}/folded"))
        at = list(graph.node).index(dq)
        graph.node.remove(dq)
        for i, node in enumerate(nodes):
            graph.node.insert(at + i, node)
    return len(found)
