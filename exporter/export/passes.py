"""Graph passes after ``torch.onnx.export``: simplification, INT4 types, opset, shared external weights.

* Simplification: the TorchScript exporter leaves the shape arithmetic of every reshape as
  Shape/Gather/Unsqueeze/Concat chains with ``Constant`` nodes, ``Identity`` nodes for shared
  buffers, and long scope-derived tensor names (``/layers.0/attention/.../MatMul_output_0``).
  Reshape targets known symbolically become constants (:mod:`exporter.export.shapes`), everything
  computable from constants is folded (onnx-graphsurgeon, never a Q/DQ node, so weights stay
  quantized), identities are bypassed, an Einsum that only permutes becomes a Transpose,
  identical small constants are stored once, and intermediate tensors get short names. Node
  names keep their scopes (lint and parity bisection map nodes to model layers through them). On
  ``digits-unet`` INT8 this roughly halves each graph file; for TensorRT it means fewer shape
  layers to parse.
* BF16: ONNX gives Conv, InstanceNormalization, Sqrt and friends a bfloat16 type from opset 22
  on, so bf16 graphs are declared at 22 (the TorchScript exporter traces them at 20; every op it
  emits means the same at 22, which only added types). ONNX Runtime's CPU provider, which folds
  constants for graphsurgeon, has no bfloat16 kernels for some of the constant arithmetic (the
  attention scale's Sqrt): what it cannot fold, ONNX's reference implementation folds.
* INT4: PyTorch has no int4 dtype, so INT4 weights and zero points are exported as int8 (zero
  points: uint8) buffers whose names carry ``int4`` (``exporter.quant.onnx_ops.INT4_MARK``) and
  retyped here; INT4 blocked DequantizeLinear needs opset 21 (the TorchScript exporter stops at 20;
  the ops it emits mean the same at 21).
* External weights: every initializer of at least ``EXTERNAL_MIN_BYTES`` (weights, biases,
  per-channel scales) goes to one weight file per block. They are out of the graph from the trace
  on (in a scratch folder while the passes run): the passes serialize the graph (ONNX Runtime
  evaluating what they fold, shape inference), which protobuf refuses past 2 GB, and one block can
  hold more (SDXL's up0 is 2.4 GB in FP16). The passes work on shapes and on constants the size of
  shapes and scalars; the few nodes computed from weights alone are folded by the reference
  implementation, which reads the scratch files. Graphs of different timestep groups of a
  block differ only in activation scales (scalars, kept inline), so their weights are written once
  and every group's graph points at the same bytes (same name and sha256 -> same offset).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
from onnx import TensorProto, numpy_helper
from onnx.external_data_helper import load_external_data_for_tensor

from exporter.export.shapes import static_reshapes
from exporter.quant.onnx_ops import INT4_MARK

BF16_OPSET = 22
EXTERNAL_MIN_BYTES = 128  # per-channel vectors too: the groups' graphs share them
ALIGN = 64  # byte alignment of each tensor in the weight file (lets runtimes map it directly)
INT4_OPSET = 21


def retype_int4(model: onnx.ModelProto, base_dir: Path | None = None) -> bool:
    """Turn the int8 stand-ins of INT4 tensors into INT4 initializers; True if any were found.
    ``base_dir``: where external ones are."""
    import ml_dtypes

    found = False
    for init in model.graph.initializer:
        if INT4_MARK in init.name and init.data_type in (TensorProto.INT8, TensorProto.UINT8):  # uint8: zero points
            values = _array(init, base_dir)
            if values.min(initial=0) < -8 or values.max(initial=0) > 7:
                raise ValueError(f"initializer {init.name} holds values outside INT4's [-8, 7]")
            init.CopyFrom(numpy_helper.from_array(values.astype(ml_dtypes.int4), init.name))
            found = True
    return found


def set_opset(model: onnx.ModelProto, version: int) -> None:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = version


class WeightFile:
    """One block's external weight file, shared by the graphs of all its timestep groups."""

    def __init__(self, path: Path):
        self.path = path
        self.index: dict[tuple[str, str], tuple[int, int]] = {}  # (name, sha256) -> (offset, length)
        path.write_bytes(b"")

    def externalize(self, model: onnx.ModelProto, base_dir: Path | None = None) -> None:
        """Every initializer of ``EXTERNAL_MIN_BYTES`` or more, inline or in external files in
        ``base_dir``, appended here (once per name and content) and referenced from ``model``;
        smaller ones inline."""
        for init in model.graph.initializer:
            if init.data_location == TensorProto.EXTERNAL:
                loaded = _loaded(init, base_dir)
                data = loaded.raw_data
                if len(data) < EXTERNAL_MIN_BYTES:  # back inline
                    init.CopyFrom(loaded)
                    continue
            else:
                if not init.HasField("raw_data"):  # e.g. float_data: normalise to raw bytes first
                    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init), init.name))
                data = init.raw_data
                if len(data) < EXTERNAL_MIN_BYTES:
                    continue
            key = (init.name, hashlib.sha256(data).hexdigest())
            if key not in self.index:
                with self.path.open("ab") as f:
                    offset = f.tell()
                    pad = -offset % ALIGN
                    f.write(b"\0" * pad + data)
                self.index[key] = (offset + pad, len(data))
            offset, length = self.index[key]
            init.ClearField("raw_data")
            init.data_location = TensorProto.EXTERNAL
            del init.external_data[:]
            for k, v in (("location", self.path.name), ("offset", str(offset)), ("length", str(length))):
                entry = init.external_data.add()
                entry.key, entry.value = k, v


def _loaded(init: onnx.TensorProto, base_dir: Path | None) -> onnx.TensorProto:
    """``init`` if inline, else a copy holding the bytes of its external data (in ``base_dir``);
    ``init`` itself stays external, so the graph never carries the weights."""
    if init.data_location != TensorProto.EXTERNAL:
        return init
    if base_dir is None:
        raise ValueError(f"initializer {init.name} is external data, and no folder was given to read it from")
    loaded = TensorProto()
    loaded.CopyFrom(init)
    load_external_data_for_tensor(loaded, str(base_dir))
    # an inline tensor now, as onnx's load_external_data_for_model leaves it: onnx 1.19.1's to_array
    # reads a tensor still marked external from its file again, relative to the working directory
    loaded.data_location = TensorProto.DEFAULT
    del loaded.external_data[:]
    return loaded


def _array(init: onnx.TensorProto, base_dir: Path | None):
    return numpy_helper.to_array(_loaded(init, base_dir))


def simplify(model: onnx.ModelProto, base_dir: Path | None = None) -> onnx.ModelProto:
    """Fold constant subgraphs (not Q/DQ), bypass Identity nodes, share identical small constants,
    shorten intermediate tensor names. Node order and node names are kept. ``base_dir``: where
    the external initializers are (the weights, which stay there)."""
    import onnx_graphsurgeon as gs

    # identities first: graphsurgeon would fold an Identity of an FP8 zero point into a new constant,
    # and it holds FP8 tensors as uint8 numpy arrays, so that constant would come back as UINT8
    _bypass_identities(model.graph)
    _permutations_as_transpose(model.graph)
    static_reshapes(model)  # constant reshape targets; its inferred shapes let the folding below reach further
    # graphsurgeon's warnings (bf16 has no NumPy type, subgraphs ONNX Runtime cannot fold) are about
    # what this pass handles itself
    severity, gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.severity, gs.logger.G_LOGGER.ERROR
    try:
        graph = gs.import_onnx(model)
        _fold(graph)
    finally:
        gs.logger.G_LOGGER.severity = severity
    graph.cleanup(remove_unused_graph_inputs=False)
    simplified = gs.export_onnx(graph, do_type_check=True)
    _fold_with_reference(simplified.graph, base_dir)
    # graphsurgeon holds FP8 tensors as uint8 (above): initializers that existed before folding
    # are restored byte for byte
    originals = {init.name: init for init in model.graph.initializer}
    for init in simplified.graph.initializer:
        if init.name in originals:
            init.CopyFrom(originals[init.name])
    del simplified.opset_import[:]
    simplified.opset_import.extend(model.opset_import)
    _share_small_constants(simplified.graph)
    _short_tensor_names(simplified.graph)
    return simplified


def _fold(graph) -> None:
    """graphsurgeon's constant folding, never through a Q/DQ node (weights stay quantized)."""
    # graphsurgeon evaluates the foldable subgraph in an ONNX Runtime session, whose optimizer warns
    # about every Unsqueeze it leaves for the fold to do ("UnsqueezeElimination cannot remove node"):
    # noise for the user, so errors only while folding (then ONNX Runtime's default, warnings, again)
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
    try:
        # recursive: a subgraph ONNX Runtime cannot run (bf16 Sqrt) is folded up to that node
        graph.fold_constants(should_exclude_node=lambda node: node.op in ("QuantizeLinear", "DequantizeLinear"),
                             error_ok=False, partitioning="recursive")
    finally:
        onnxruntime.set_default_logger_severity(2)


def _fold_with_reference(graph: onnx.GraphProto, base_dir: Path | None) -> None:
    """Nodes left with only constant inputs (what ONNX Runtime could not fold: bf16 arithmetic, and
    anything computed from external weights, which graphsurgeon cannot read) become constants,
    evaluated by ONNX's reference implementation; never a Q/DQ node."""
    from onnx.reference import ReferenceEvaluator

    values = {init.name: init for init in graph.initializer}
    keep = []
    for node in graph.node:
        if (node.op_type in ("QuantizeLinear", "DequantizeLinear") or not node.input
                or not all(name in values for name in node.input)):
            keep.append(node)
            continue
        outputs = ReferenceEvaluator(node).run(None, {n: _array(values[n], base_dir) for n in node.input})
        for name, value in zip(node.output, outputs):
            values[name] = numpy_helper.from_array(value, name)
            graph.initializer.append(values[name])
    if len(keep) == len(graph.node):
        return
    del graph.node[:]
    graph.node.extend(keep)
    used = {name for node in keep for name in node.input} | {o.name for o in graph.output}
    unused = [init for init in graph.initializer if init.name not in used]
    for init in unused:
        graph.initializer.remove(init)


def _rename_inputs(graph: onnx.GraphProto, renamed: dict[str, str]) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]


def _permutations_as_transpose(graph: onnx.GraphProto) -> None:
    """An Einsum that only permutes its one input (diffusers' DiT unpatchify,
    ``nhwpqc->nchpwq``) becomes the Transpose it is: ONNX gives Einsum a bfloat16 type only from
    opset 28, past what TensorRT parses, and Transpose is the simpler layer anyway."""
    for node in graph.node:
        if node.op_type != "Einsum" or len(node.input) != 1:
            continue
        equation = onnx.helper.get_attribute_value(node.attribute[0]).decode().replace(" ", "")
        source, _, target = equation.partition("->")
        if sorted(source) != sorted(target) or len(set(source)) != len(source) or not source.isalpha():
            continue
        node.op_type = "Transpose"
        del node.attribute[:]
        node.attribute.append(onnx.helper.make_attribute("perm", [source.index(c) for c in target]))


def _bypass_identities(graph: onnx.GraphProto) -> None:
    outputs = {o.name for o in graph.output}
    keep, renamed = [], {}
    for node in graph.node:
        if node.op_type == "Identity" and node.output[0] not in outputs:
            renamed[node.output[0]] = renamed.get(node.input[0], node.input[0])
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    _rename_inputs(graph, renamed)


def _share_small_constants(graph: onnx.GraphProto) -> None:
    """Zero points, shape constants and the like: one initializer per distinct value."""
    first: dict[tuple, str] = {}
    renamed: dict[str, str] = {}
    keep = []
    io = {v.name for v in (*graph.input, *graph.output)}  # a folded graph output is its own initializer
    for init in graph.initializer:
        if init.data_location == TensorProto.EXTERNAL or init.name in io:  # weights; graph inputs and outputs
            keep.append(init)
            continue
        if not init.HasField("raw_data"):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init), init.name))
        if len(init.raw_data) <= 16:
            # an INT4 zero point is still an 8-bit buffer here (retyped by name later): sharing one
            # with an INT8 zero point of the same bytes would give both layers one type
            key = (init.data_type, INT4_MARK in init.name, tuple(init.dims), init.raw_data)
            if key in first:
                renamed[init.name] = first[key]
                continue
            first[key] = init.name
        keep.append(init)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    _rename_inputs(graph, renamed)


def _short_tensor_names(graph: onnx.GraphProto) -> None:
    """Intermediate tensors and the exporter's anonymous constants (``/scope/Constant_output_0``,
    ``onnx::Mul_12``); graph inputs, outputs and named parameters (``layers.0.conv1.weight_scale``)
    keep their names."""
    keep = {v.name for v in (*graph.input, *graph.output)}
    # names that stay: a short name must not be one of them (a graph input "t0", a parameter "c1")
    taken = keep | {init.name for init in graph.initializer if not init.name.startswith(("/", "onnx::"))}
    renamed: dict[str, str] = {}
    count = 0

    def short(prefix: str) -> str:  # the next short name no tensor of the graph has already
        nonlocal count
        while f"{prefix}{count}" in taken:
            count += 1
        count += 1
        return f"{prefix}{count - 1}"

    for init in graph.initializer:
        if init.name.startswith(("/", "onnx::")) and init.name not in keep:
            renamed[init.name] = short("c")
            init.name = renamed[init.name]
    keep |= {init.name for init in graph.initializer}
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name and name not in keep:
                renamed[name] = short("t")
                node.output[i] = renamed[name]
    _rename_inputs(graph, renamed)


def finalize(model: onnx.ModelProto, weights: WeightFile, opset: int | None = None,
             base_dir: Path | None = None) -> onnx.ModelProto:
    """Opset (``opset``, at least INT4's where INT4 appears), simplification, INT4 retyping, stale
    value_info dropped, weights moved to the shared file. ``base_dir``: where ``model``'s external
    initializers are (the trace's scratch folder)."""
    if opset is not None:
        set_opset(model, opset)  # before simplification: ONNX Runtime folds a graph valid at its opset
    model = simplify(model, base_dir)
    if retype_int4(model, base_dir) and (opset or 0) < INT4_OPSET:
        set_opset(model, INT4_OPSET)
    # the exporter's value_info still says int8 where INT4 now flows; shapes are re-inferred on load
    del model.graph.value_info[:]
    weights.externalize(model, base_dir)
    # The IR version the tools wrote depends on their releases (9 with torch 2.13 and graphsurgeon
    # 0.6.1; 11 with torch 2.8, onnx 1.18 and graphsurgeon 0.5.2, which ONNX Runtime 1.22 refuses);
    # the opset's own is all the graph needs (opsets 21 and 22: 10).
    model.ir_version = onnx.helper.find_min_ir_version_for(list(model.opset_import))
    return model


def initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of weights a graph references (inline + external)."""
    total = 0
    for init in model.graph.initializer:
        if init.data_location == TensorProto.EXTERNAL:
            total += int(next(e.value for e in init.external_data if e.key == "length"))
        else:
            total += len(init.raw_data) or numpy_helper.to_array(init).nbytes
    return total

