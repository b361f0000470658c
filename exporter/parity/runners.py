"""A polygraphy runner for a PyTorch block, so PyTorch and ONNX Runtime are run and compared by
polygraphy's own ``Comparator`` like any two backends."""

from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata


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
            meta.add(info["name"], dtype=np.dtype(info["dtype"]), shape=shape)
        return meta

    def infer_impl(self, feed_dict):
        if self.context is not None:
            self.context.t = self.t
        start = time.perf_counter()
        with torch.no_grad():
            # the reference is the float32 model, whatever float type the graph's inputs are in
            outputs = self.block(*(_float32(torch.from_numpy(np.asarray(feed_dict[i["name"]])))
                                   for i in self.input_info))
        self.inference_time = time.perf_counter() - start  # polygraphy reports it per runner
        # contiguous copies: polygraphy views the arrays, and e.g. an unpatchified DiT output is strided
        names = self.block.outputs
        return OrderedDict((name, np.ascontiguousarray(out.numpy())) for name, out in zip(names, outputs))

    def deactivate_impl(self):
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def _float32(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.is_floating_point() else x
