"""bfloat16 between NumPy and PyTorch.

NumPy has no bfloat16; ml_dtypes adds one, which ONNX's reference implementation and ONNX Runtime
use, while polygraphy and TensorRT's tensors take ``torch.bfloat16``. Both hold the same 16 bits,
so conversions are views: exact, and free. Every other dtype passes through.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


def to_torch(array: np.ndarray) -> torch.Tensor:
    array = np.ascontiguousarray(array).reshape(np.shape(array))  # ascontiguousarray makes a scalar [1]
    if array.dtype == BFLOAT16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(BFLOAT16)
    return tensor.numpy()


def comparable(x) -> np.ndarray:
    """A tensor or array as NumPy for comparisons: bfloat16 widened to float32 (NumPy arithmetic
    on ml_dtypes' type would round every intermediate to bfloat16), anything else as it is."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return x.float().numpy() if x.dtype == torch.bfloat16 else x.numpy()
    x = np.asarray(x)
    return x.astype(np.float32) if x.dtype == BFLOAT16 else x
