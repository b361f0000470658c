"""Graph passes after ``torch.onnx.export``: INT4 types, opset, and shared external weights.

* INT4: PyTorch has no int4 dtype, so INT4 weights and zero points are exported as int8 buffers
  whose names carry ``int4`` (``exporter.quant.onnx_ops.INT4_MARK``) and retyped here; INT4
  blocked DequantizeLinear needs opset 21 (the TorchScript exporter stops at 20; the ops it emits
  mean the same at 21).
* External weights: every initializer of at least ``EXTERNAL_MIN_BYTES`` goes to one weight file
  per block. Graphs of different timestep groups of a block differ only in activation scales
  (scalars, kept inline), so their weights are written once and every group's graph points at
  the same bytes (same name and sha256 -> same offset). This also keeps graphs of any size under
  protobuf's 2 GB limit.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
from onnx import TensorProto, numpy_helper

from exporter.quant.onnx_ops import INT4_MARK

EXTERNAL_MIN_BYTES = 1024
ALIGN = 64  # byte alignment of each tensor in the weight file (lets runtimes map it directly)
INT4_OPSET = 21


def retype_int4(model: onnx.ModelProto) -> bool:
    """Turn the int8 stand-ins of INT4 tensors into INT4 initializers; True if any were found."""
    import ml_dtypes

    found = False
    for init in model.graph.initializer:
        if INT4_MARK in init.name and init.data_type == TensorProto.INT8:
            values = numpy_helper.to_array(init)
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

    def externalize(self, model: onnx.ModelProto) -> None:
        for init in model.graph.initializer:
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


def finalize(model: onnx.ModelProto, weights: WeightFile) -> onnx.ModelProto:
    """INT4 retyping and opset, stale value_info dropped, weights moved to the shared file."""
    if retype_int4(model):
        set_opset(model, INT4_OPSET)
    # the exporter's value_info still says int8 where INT4 now flows; shapes are re-inferred on load
    del model.graph.value_info[:]
    weights.externalize(model)
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

