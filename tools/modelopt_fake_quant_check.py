#!/usr/bin/env python
"""Why exporter.quant has its own fake quantization instead of nvidia-modelopt's.

    python tools/modelopt_fake_quant_check.py

Compares modelopt's INT8 and FP8 fake quantization with ours (bit-exact with ONNX
QuantizeLinear/DequantizeLinear, tested against ONNX Runtime) on 1M clipped Gaussian values.
"""

import torch
from modelopt.torch.quantization import tensor_quant

from exporter.quant.formats import FORMATS, fake_quant

torch.manual_seed(0)
x = torch.randn(1_000_000) * 3
amax = torch.tensor(7.3)  # clips ~1.5 % of the values, as a calibrated range does
step = float(amax / 127)

ours = fake_quant(x, amax / 127, FORMATS["int8"])
theirs = tensor_quant.fake_tensor_quant(x, amax)
other_integer = int(((ours - theirs).abs() > step / 2).sum())
below = int((x < -127.5 * step).sum())
print(f"INT8: {other_integer} of {x.numel()} values land on another integer "
      f"({below} lie below -127.5 steps: modelopt clamps to [-127, 127], ONNX to [-128, 127]); "
      f"{int((ours != theirs).sum())} differ in the last bits "
      "(modelopt divides by 127/amax, ONNX multiplies by the scale)")
ours = fake_quant(x, amax / 448, FORMATS["fp8"])
theirs = tensor_quant.scaled_e4m3(x, amax, None, 4, 3)
print(f"FP8 E4M3: {int((ours != theirs).sum())} of {x.numel()} values differ")
