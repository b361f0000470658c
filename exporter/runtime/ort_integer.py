"""Integer matrix products for ONNX Runtime's CPU provider: a rewrite of the session's copy of a
Q/DQ graph, never of the file.

A quantized Linear layer is exported the way ``torch.onnx`` writes ``F.linear``: the int8 weight
[out, in], its DequantizeLinear (per output channel, axis 0), then a Transpose into the MatMul.
TensorRT folds that Transpose into its INT8 GEMM. ONNX Runtime does not: its QDQ fusion to
``com.microsoft.MatMulIntegerToFloat`` (int8 x int8, int32 accumulation, one float scaling) needs
the DequantizeLinear straight into the MatMul, so it dequantizes the weight at every call and runs
a float GEMM. This rewrite stores the weight transposed, [in, out] with its scales on axis 1, and
drops the Transpose: the same products, fused. Measured on ``digits-dit``'s INT8 ``blocks.2``: 0.91
-> 0.49 ms at 2 images (FP32 graph 0.65), 21.6 -> 13.5 ms at 80 (FP32 23.0).

The backend reads each such weight from the block's weight file once, transposes it, and hands
it to the sessions of all timestep groups as an in-memory initializer (``add_external_initializers``),
so the copy still serializes small and no session loads the tensor of the original layout.

Only where the CPU multiplies int8 in 32-bit lanes (x86 AVX-VNNI / AVX512-VNNI, ARM dot product):
without VNNI, ONNX Runtime's u8 x s8 kernel adds pairs of products in 16 bits (VPMADDUBSW), which
can saturate (why ORT's own quantization tool offers 7-bit weights, ``reduce_range``, for CPUs
without VNNI); the graphs then keep running in float, as written. Forced on an AVX2-only CPU, the
rewrite took ``digits-unet``'s INT8 blocks from 43.1 dB against PyTorch to 24.8 dB and its images
from 42.9 to 37.4 dB (``exporter parity`` compares the runtime's sessions too and fails them).
``EXPORTER_ORT_INTEGER_MATMUL=0`` or ``=1`` overrides the detection.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from exporter.errors import UsageError
from exporter.runtime.ort_fusion import GraphIndex

log = logging.getLogger(__name__)
_WARNED: set[str] = set()  # the forced-on warning, once per process

INT8_DOT_FLAGS = {"avx512_vnni", "avx_vnni", "asimddp"}  # /proc/cpuinfo flags of 32-bit int8 dot products
ENV = "EXPORTER_ORT_INTEGER_MATMUL"
_ON, _OFF = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def integer_matmul_enabled(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """The environment's override, else whether this CPU has int8 dot products."""
    forced = os.environ.get(ENV, "").strip()
    if not forced:
        return cpu_has_int8_dot_products(cpuinfo)
    if forced.lower() not in _ON | _OFF:
        raise UsageError(f"{ENV}={forced!r}: expected 1 (on) or 0 (off); unset, the CPU decides")
    on = forced.lower() in _ON
    if on and not cpu_has_int8_dot_products(cpuinfo) and forced not in _WARNED:
        _WARNED.add(forced)
        log.warning("%s=%s on a CPU without int8 dot products: ONNX Runtime's integer kernel can saturate here "
                    "(measured on an AVX2-only CPU: digits-unet's INT8 blocks 24.8 dB against PyTorch, 43.1 dB as "
                    "written; its images 37.4 dB instead of 42.9); exporter parity checks the sessions as the "
                    "runtime runs them", ENV, forced)
    return on


def cpu_has_int8_dot_products(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU's flags (where Linux lists them; elsewhere: no) include 32-bit int8 dot products."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = {f for line in text.splitlines() if line.startswith(("flags", "Features")) for f in line.split()}
    return bool(flags & INT8_DOT_FLAGS)


def integer_matmuls(model: onnx.ModelProto, folder: Path, cache: dict | None = None) -> dict[str, object]:
    """Rewrite, in place, each MatMul of a quantized input and a transposed int8 weight to take the
    weight transposed in storage; returns the new weights by initializer name (for the session).
    Weight-only layers (float input) are left as written: there is no integer product to fuse.
    ``cache`` (per backend) keeps one transposed copy of a weight for the graphs of all timestep
    groups, which share the block's weight file."""
    cache = {} if cache is None else cache
    graph = model.graph
    g = GraphIndex(graph)
    initializers = {t.name: t for t in graph.initializer}
    new_weights: dict[str, object] = {}  # name -> OrtValue
    dropped = []
    for transpose in [n for n in graph.node if n.op_type == "Transpose"]:
        dq = g.op(transpose.input[0], "DequantizeLinear")
        weight = initializers.get(dq.input[0]) if dq is not None else None
        if weight is None or weight.data_type != onnx.TensorProto.INT8 or len(weight.dims) != 2:
            continue
        if attribute(transpose, "perm", [1, 0]) != [1, 0] or len(g.consumers[dq.output[0]]) != 1:
            continue
        if len(dq.input) > 2 and dq.input[2] and nonzero_zero_point(initializers.get(dq.input[2]), folder):
            continue
        scale = initializers.get(dq.input[1])
        per_channel = scale is None or int(np.prod(scale.dims)) > 1
        if per_channel and attribute(dq, "axis", 1) % 2 != 0:  # scales along the input features (not ours)
            continue
        if attribute(dq, "block_size", 0):  # blocked scales would need transposing too (INT4 is never here)
            continue
        matmuls = g.consumers[transpose.output[0]]
        if not matmuls or not all(m.op_type == "MatMul" and m.input[1] == transpose.output[0] and
                                  g.op(m.input[0], "DequantizeLinear") is not None for m in matmuls):
            continue
        name = f"{weight.name}/transposed"
        # file, offset, length: the same tensor for the graphs of every group of a block (a weight
        # stored in the graph itself is transposed for that graph alone)
        where = tuple((e.key, e.value) for e in weight.external_data)
        value = cache.get(where) if where else None
        if value is None:
            value = _in_memory(np.ascontiguousarray(numpy_helper.to_array(weight, base_dir=str(folder)).T))
            if where:
                cache[where] = value
        if name not in new_weights:  # one weight read by two layers: declared once
            new_weights[name] = value
            graph.initializer.append(_declared(name, value.shape()))
        dq.input[0] = name
        axis = attribute(dq, "axis", 1)
        for a in [a for a in dq.attribute if a.name == "axis"]:
            dq.attribute.remove(a)
        dq.attribute.append(helper.make_attribute("axis", 1 - axis % 2))  # per-tensor scales ignore it
        for m in matmuls:
            m.input[1] = dq.output[0]
        dropped.append(transpose)
    for node in dropped:
        graph.node.remove(node)
    used = {i for n in graph.node for i in n.input}
    for t in [t for t in graph.initializer if t.name not in used]:  # the weights of the original layout
        graph.initializer.remove(t)
    return new_weights


def _in_memory(value: np.ndarray):
    """An OrtValue over ``value`` (it keeps the array alive; the session reads it in place)."""
    import onnxruntime as ort

    return ort.OrtValue.ortvalue_from_numpy(value)


def _declared(name: str, shape: list[int]) -> onnx.TensorProto:
    """An initializer declared as external data: the session receives its values from memory."""
    tensor = onnx.TensorProto(name=name, data_type=onnx.TensorProto.INT8, dims=shape,
                              data_location=onnx.TensorProto.EXTERNAL)
    tensor.external_data.add(key="location", value="in-memory")
    return tensor


def attribute(node, name: str, default):
    """The value of ``node``'s attribute ``name`` (a list for repeated values), else ``default``."""
    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return list(value) if isinstance(value, (list, tuple)) else value
    return default


def nonzero_zero_point(tensor, folder: Path) -> bool:
    """A zero point that is not a known all-zero initializer counts as nonzero (the layer is left)."""
    return tensor is None or bool(numpy_helper.to_array(tensor, base_dir=str(folder)).any())
