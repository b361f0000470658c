"""Static reshape targets: the shape arithmetic of dynamic-shape graphs, resolved at export.

The TorchScript exporter writes every ``x.reshape(batch, -1, heads, head_dim)`` with ``batch``
read at run time: Shape -> Gather -> Unsqueeze -> Concat -> Reshape, and the attention scale as
Shape -> Gather -> Cast -> Sqrt -> Div -> Sqrt. On the small reference models those chains are a
third of all nodes (``digits-unet`` INT8: 11,229 nodes before, 8,170 after), every one a layer for
TensorRT's parser; ONNX Runtime optimises most of them away itself (measured side by side: 2 %
faster without them). ONNX's own Reshape semantics need none of it when the dims are known symbolically: a
target dim equal to the input dim at the same position is ``0`` (copy), a static dim is its
number, and one remaining dim is ``-1`` (inferred). So:

1. symbolic shape inference (ONNX Runtime's, with the graph inputs' named dynamic axes) on a
   weight-free copy of the graph;
2. every Reshape whose target is computed gets that constant target when at most one dim is
   neither static nor copied (``[batch, H*W, C] -> [batch, H, W, C]`` keeps its computed target);
3. the inferred shapes go into ``value_info``, so the constant folding that follows also folds
   ``Shape -> Gather`` of static dims (the attention scale becomes one constant) and drops the
   chains nobody reads any more.

When inference fails on a graph, the graph is left as the exporter wrote it (correct, only slower).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

log = logging.getLogger(__name__)

Dims = list  # per dim: an int (static), a str (symbolic, e.g. "batch" or "h*w"), or None (unknown)
Shapes = dict  # tensor name -> (ONNX element type, Dims)


def static_reshapes(model: onnx.ModelProto) -> int:
    """Give computed Reshape targets a constant target where the dims allow; returns how many.
    Also leaves the inferred shapes in ``model.graph.value_info`` for constant folding."""
    shapes = symbolic_shapes(model)
    if shapes is None:
        return 0
    constants = {init.name for init in model.graph.initializer}
    constants |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    dims = {name: d for name, (_, d) in shapes.items()}
    changed = 0
    for node in model.graph.node:
        if node.op_type != "Reshape" or node.input[1] in constants or _attr(node, "allowzero"):
            continue
        target = constant_target(dims.get(node.input[0]), dims.get(node.output[0]))
        if target is None:
            continue
        name = f"{node.output[0]}/static_shape"
        model.graph.initializer.append(numpy_helper.from_array(np.array(target, dtype=np.int64), name))
        node.input[1] = name
        changed += 1
    graph_io = {v.name for v in (*model.graph.input, *model.graph.output)}
    del model.graph.value_info[:]
    model.graph.value_info.extend(helper.make_tensor_value_info(name, elem, shape)
                                  for name, (elem, shape) in shapes.items() if name not in graph_io)
    return changed


def constant_target(source: Dims | None, result: Dims | None) -> list[int] | None:
    """The Reshape target giving ``result`` from ``source`` with ONNX's 0 (copy the input dim at the
    same position) and -1 (infer one dim); None when two or more dims are only known at run time."""
    if not source or not result:
        return None
    target, inferred = [], 0
    for i, dim in enumerate(result):
        if isinstance(dim, int) and dim > 0:
            target.append(dim)
        elif isinstance(dim, str) and i < len(source) and source[i] == dim:
            target.append(0)
        elif isinstance(dim, int):  # an empty dim: -1 could not be inferred
            return None
        else:
            target.append(-1)
            inferred += 1
    return target if inferred <= 1 else None


def symbolic_shapes(model: onnx.ModelProto) -> Shapes | None:
    """Every tensor's type and dims by ONNX Runtime's symbolic shape inference, or None."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    # SymbolicShapeInference.infer_shapes, minus what it does when some tensor stays unknown: write
    # sym_shape_infer_temp.onnx into the working directory and raise. A partial result is used as it
    # is (tensors without a shape keep their computed targets), unless a merge pinned an input dim.
    try:
        inference = SymbolicShapeInference(int_max=2**31 - 1, auto_merge=True, guess_output_rank=False, verbose=0)
        inference._preprocess(_weightless(model))
        while inference.run_:
            inference._infer_impl()
        inference._update_output_from_vi()
        inferred = inference.out_mp_
    except Exception as e:  # noqa: BLE001  (its errors are of many kinds; the pass is an optimisation)
        log.debug("symbolic shape inference failed (%s: %s): reshape targets stay computed", type(e).__name__, e)
        return None
    # auto_merge assumes dims that meet in a broadcast are equal. Where that pins a dynamic dim of the
    # graph's inputs to a number (batch broadcast against a static 2 is valid at batch 1 too), a
    # target written from these shapes would refuse inputs the graph takes: none is used. (Input dims
    # merged with each other, a skip's height with the hidden state's in a UNet's Concat, stay
    # symbols: the targets copy or infer them, 0 or -1.)
    dynamic = {d.dim_param for i in model.graph.input for d in i.type.tensor_type.shape.dim if d.dim_param}
    pinned = {s: v for s, v in inference.suggested_merge_.items() if s in dynamic and isinstance(v, int)}
    if pinned:
        log.debug("symbolic shape inference pinned input dims %s: reshape targets stay computed", pinned)
        return None
    shapes: Shapes = {}
    for info in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        if not info.type.HasField("tensor_type"):
            continue
        tensor = info.type.tensor_type
        if not tensor.HasField("shape"):
            continue
        shapes[info.name] = (tensor.elem_type, [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                                for d in tensor.shape.dim])
    return shapes


def _weightless(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with its weights (external data, and any other large initializer) turned into
    inputs of the same type and shape: inference needs their shapes, not their bytes."""
    small, as_inputs = [], []
    for init in model.graph.initializer:
        if init.data_location != TensorProto.EXTERNAL and (
                init.data_type in (TensorProto.INT64, TensorProto.INT32) or np.prod(init.dims, dtype=np.int64) <= 64):
            small.append(init)
        else:
            as_inputs.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    graph = helper.make_graph(list(model.graph.node), model.graph.name, [*model.graph.input, *as_inputs],
                              list(model.graph.output), small)
    return helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def _attr(node, name: str) -> int:
    return next((a.i for a in node.attribute if a.name == name), 0)
