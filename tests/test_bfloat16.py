"""bfloat16 crosses between NumPy (ml_dtypes) and PyTorch bit for bit (the TensorRT backend's I/O)."""

import numpy as np
import torch

from exporter.bfloat16 import BFLOAT16, comparable, to_numpy, to_torch


def test_bfloat16_round_trips_bit_for_bit_and_other_types_pass_through():
    values = torch.tensor([[0.0, -1.5, 3.140625, 65504.0], [1e30, -1e-30, float("inf"), float("nan")]])
    tensor = values.to(torch.bfloat16)
    array = to_numpy(tensor)
    assert array.dtype == BFLOAT16 and array.shape == (2, 4)
    assert np.array_equal(array.view(np.uint16), tensor.view(torch.int16).numpy().view(np.uint16))
    back = to_torch(array[:, ::2])  # strided: made contiguous
    assert back.dtype == torch.bfloat16 and torch.equal(back.view(torch.int16), tensor[:, ::2].view(torch.int16))
    assert comparable(tensor).dtype == np.float32 and comparable(array).dtype == np.float32
    np.testing.assert_array_equal(comparable(array), tensor.float().numpy())
    scalar = np.array(3.0, BFLOAT16)  # a 0-d input stays 0-d (np.ascontiguousarray alone makes it [1])
    assert to_torch(scalar).shape == () and to_torch(np.array(2.0, np.float32)).shape == ()
    half = np.ones(3, np.float16)
    assert to_torch(half).dtype == torch.float16 and to_numpy(torch.ones(3)).dtype == np.float32
    assert comparable(half).dtype == np.float16
