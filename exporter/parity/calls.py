"""How many samples go through a graph per call when ``--batch`` is not given: ``inputs.BATCH``,
or fewer for a graph whose largest tensors would not fit in memory.

At real size a call's memory is the graph's largest intermediate tensors, not its inputs: the SD 1.5
layout's last up layer holds its self-attention scores, [8, 4096, 4096] float32 per sample (512 MiB),
and ONNX Runtime running the graph as written took about 1.1 GiB per sample of a call (scores and
softmax alive together). So the estimate is ``TENSORS_PER_SAMPLE`` times the largest tensor ONNX
shape inference finds at one sample, and a call may take ``MEMORY_SHARE`` of the memory available
when the graph is checked (PyTorch's block and the runtime's session run the same samples beside it)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

TENSORS_PER_SAMPLE = 2  # the largest tensor and the op's output beside it (scores -> softmax)
MEMORY_SHARE = 0.5


def largest_tensor_bytes(graph: Path, feed: dict) -> int | None:
    """Bytes of the largest intermediate tensor of ``graph`` at one sample of ``feed`` (each input
    batch first), from ONNX shape inference; None when inference leaves every shape open."""
    import onnx
    from onnx import helper, shape_inference

    model = onnx.load(str(graph), load_external_data=False)  # shapes only: the weights stay on disk
    for graph_input in model.graph.input:
        if graph_input.name in feed:
            sample = (1, *np.shape(feed[graph_input.name])[1:])
            for dim, size in zip(graph_input.type.tensor_type.shape.dim, sample):
                dim.Clear()
                dim.dim_value = int(size)
    del model.graph.value_info[:]  # the export's symbolic shapes: inferred again at this sample
    try:
        inferred = shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as error:  # noqa: BLE001 (an estimate: without it the default stands)
        log.debug("%s: no shape inference (%s)", graph.name, error)
        return None
    largest = 0
    for value in inferred.graph.value_info:
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in tensor.shape.dim]
        if dims and all(dims) and tensor.elem_type != onnx.TensorProto.UNDEFINED:
            itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)).itemsize
            largest = max(largest, math.prod(dims) * itemsize)
    return largest or None


def available_bytes() -> int | None:
    """The memory the kernel can give without swapping (``MemAvailable``); None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def samples_per_call(graph: Path, largest: int | None, default: int) -> int:
    """``default``, or fewer when that many samples' ``largest`` tensors (``largest_tensor_bytes``
    of ``graph``; None: unknown) would take more than ``MEMORY_SHARE`` of the available memory (at
    least 1)."""
    available = available_bytes()
    if largest is None or available is None:
        return default
    fits = max(1, int(available * MEMORY_SHARE // call_bytes(largest, 1)))
    if fits >= default:
        return default
    log.info("%s: %d sample(s) per call instead of %d: its largest tensor takes %.2f GiB per sample and "
             "%.1f GiB are available (--batch sets the number)", graph.name, fits, default, largest / 2**30,
             available / 2**30)
    return fits


def call_bytes(largest: int | None, samples: int) -> int | None:
    """What one call of ``samples`` samples is estimated to take (None: unknown), a lower bound:
    the graph's weights, inputs and outputs come on top (the SD 1.5 layout's ``up3.layer2``, 8
    samples: 8.0 GiB estimated, 9.2 GiB peak for its replay). The replay commands run all of a
    graph's samples in one call."""
    return None if largest is None else TENSORS_PER_SAMPLE * largest * samples
