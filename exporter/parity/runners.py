"""polygraphy runners for a PyTorch block and, for bf16 graphs, ONNX's reference implementation, so
PyTorch and a graph are run and compared by polygraphy's own ``Comparator`` like any two backends."""

from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata
from polygraphy.datatype import DataType

from exporter.bfloat16 import BFLOAT16, comparable, to_numpy


def graph_dtype(name: str):
    """A manifest's dtype name as the type polygraphy feeds: bfloat16 as torch's (polygraphy and
    TensorRT know no NumPy bfloat16), anything else as NumPy's."""
    return torch.bfloat16 if name == "bfloat16" else np.dtype(name)


def graph_typed(values: np.ndarray, name: str):
    """Recorded float32 values in the graph's input type (``graph_dtype``)."""
    return torch.from_numpy(values).to(torch.bfloat16) if name == "bfloat16" else values.astype(name)


class TorchBlockRunner(BaseRunner):
    """Runs ``block`` (FP32 or fake-quantized) at timestep ``t`` (which picks the quantized layers'
    timestep group) and, with ``capture``, records the output of every named module it contains."""

    def __init__(self, block, inputs: list[dict], context=None, t: float | None = None, capture: dict | None = None):
        super().__init__(name="pytorch")
        self.block, self.input_info, self.context, self.t = block, inputs, context, t
        self.capture = capture  # {module path in block: tensor}, filled by hooks when not None
        self._hooks = []

    def activate_impl(self):
        if self.capture is not None:
            for path, module in self.block.named_modules():
                if path:
                    self._hooks.append(module.register_forward_hook(self._hook(path)))

    def _hook(self, path):
        def record(module, args, output):
            if isinstance(output, torch.Tensor):
                self.capture[path] = output.detach().numpy().copy()
        return record

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        for info in self.input_info:
            shape = [d if isinstance(d, int) else -1 for d in info["shape"]]
            meta.add(info["name"], dtype=DataType.from_dtype(graph_dtype(info["dtype"])), shape=shape)
        return meta

    def infer_impl(self, feed_dict):
        if self.context is not None:
            self.context.t = self.t
        start = time.perf_counter()
        with torch.no_grad():
            # the reference is the float32 model, whatever float type the graph's inputs are in
            outputs = self.block(*(_float32(feed_dict[i["name"]]) for i in self.input_info))
        self.inference_time = time.perf_counter() - start  # polygraphy reports it per runner
        # contiguous copies: polygraphy views the arrays, and e.g. an unpatchified DiT output is strided
        names = self.block.outputs
        return OrderedDict((name, np.ascontiguousarray(out.numpy())) for name, out in zip(names, outputs))

    def deactivate_impl(self):
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def _float32(x) -> torch.Tensor:
    """A graph input (NumPy, or torch for bfloat16) as the float32 reference model takes it."""
    x = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return x.float() if x.is_floating_point() else x



class ReferenceRunner(BaseRunner):
    """Runs an ONNX graph with ONNX's reference implementation (``onnx.reference``, NumPy): the
    second backend for bf16 graphs, which ONNX Runtime's CPU provider cannot run (no bfloat16
    Conv or InstanceNormalization kernels). Independent of ONNX Runtime, and slower. bfloat16
    arithmetic is ml_dtypes' (every operation rounded to bfloat16), except that the operations
    that sum many terms accumulate in float32 (``ACCUMULATING``), as TensorRT's and PyTorch's
    bfloat16 kernels do: with every sum in bfloat16, ``digits-unet``'s first block (16x16
    GroupNorms and convolutions) reads 15.5 dB against float32, where PyTorch in bfloat16 keeps
    46.2 dB (45.3 dB with these sums). Takes NumPy arrays or torch tensors (polygraphy's type for
    bfloat16); returns ``outputs`` (default: the graph's; any intermediate tensor may be named, as
    bisection does), bfloat16 ones widened to float32."""

    def __init__(self, path, outputs: list[str] | None = None):
        super().__init__(name="onnx-reference")
        self.path, self.outputs = str(path), outputs

    def activate_impl(self):
        import onnx
        from onnx.reference import ReferenceEvaluator

        model = onnx.load(self.path)  # with its external weights
        self.inputs = list(model.graph.input)
        self.names = self.outputs or [o.name for o in model.graph.output]
        self.evaluator = ReferenceEvaluator(model, new_ops=_float32_accumulation(model))

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        for value in self.inputs:
            tensor = value.type.tensor_type
            shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
            meta.add(value.name, dtype=DataType.from_dtype(tensor.elem_type, "onnx"), shape=shape)
        return meta

    def infer_impl(self, feed_dict):
        feeds = {n: to_numpy(v) if isinstance(v, torch.Tensor) else np.asarray(v) for n, v in feed_dict.items()}
        start = time.perf_counter()
        values = self.evaluator.run(self.names, feeds)
        self.inference_time = time.perf_counter() - start
        return OrderedDict((n, comparable(v)) for n, v in zip(self.names, values))

    def deactivate_impl(self):
        del self.evaluator


# Operations whose bfloat16 kernels (TensorRT's, PyTorch's) accumulate in float32
ACCUMULATING = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum", "InstanceNormalization", "LayerNormalization",
                "GroupNormalization", "Softmax", "ReduceMean", "ReduceSum")


def _float32_accumulation(model) -> list:
    """Reference implementations of ``ACCUMULATING`` for ``model``'s opset that compute bfloat16
    inputs in float32 and round the result to bfloat16."""
    from onnx.reference.ops import load_op

    version = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    used = {node.op_type for node in model.graph.node}
    overrides = []
    for op_type in sorted(used & set(ACCUMULATING)):
        base = load_op("", op_type, version)

        def _run(self, *inputs, _base=base, **attributes):
            if not any(x is not None and x.dtype == BFLOAT16 for x in inputs):
                return _base._run(self, *inputs, **attributes)
            widened = (x.astype(np.float32) if x is not None and x.dtype == BFLOAT16 else x for x in inputs)
            return tuple(y.astype(BFLOAT16) for y in _base._run(self, *widened, **attributes))

        overrides.append(type(op_type, (base,), {"op_domain": "", "_run": _run}))
    return overrides
