#!/usr/bin/env python
"""Measure one PTQ setting end to end on a reference model (until `exporter report` exists).

    exporter calibrate --model digits-unet --out calib_data/unet            # 64 x 20 steps, ~16 s
    exporter sample --model digits-unet --rows 0-9 --per-row 8 --steps 20 --out runs/fp32-unet
    python tools/ptq_probe.py digits-unet calib_data/unet runs/fp32-unet runs/w8a8 '{"weights": "int8", "activations": "int8"}'

Quantizes the model in PyTorch (fake quant with ONNX semantics), samples the same 10 x 8 images
(20 DDIM steps, guidance 1.5, seed 0) and prints accuracy, FD-digits and PSNR against the FP32
folder. The JSON holds ``exporter.quant.ptq.PTQConfig`` fields.
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exporter import reference  # noqa: E402
from exporter.eval import evaluate  # noqa: E402
from exporter.imageio import write_image_folder  # noqa: E402
from exporter.models import load_conditioning, load_model  # noqa: E402
from exporter.quant.ptq import PTQConfig, quantize_model  # noqa: E402
from exporter.sampling.loop import SampleSettings, generate  # noqa: E402


def main() -> None:
    name, calib, fp32_dir, out, config_json = sys.argv[1:6]
    config = PTQConfig(**json.loads(config_json))
    loaded = load_model(reference.path(name))
    summary = quantize_model(loaded, config, calib)
    context = loaded.model._exporter_context
    conditioning = load_conditioning(loaded.default_conditioning, loaded.adapter)

    def denoise(x, t, c):
        context.t = float(t[0])
        return loaded.adapter.denoise(loaded.model, x, t, c)

    settings = SampleSettings(rows=tuple(range(10)), per_row=8, steps=20, guidance=1.5, seed=0)
    images = generate(denoise, loaded.adapter.sample_shape, loaded.scheduler_config, conditioning, settings, False)
    write_image_folder(out, {k: v.numpy() for k, v in images.items()})
    m = evaluate(out, fp32_dir)
    print(f"{config_json}: {summary['quantized_layers']} layers, groups {summary['groups']['ranges'] if summary['groups'] else '-'}"
          f"\n  accuracy {100 * m['accuracy']:.1f} %  FD-digits {m['fd_digits']:.2f}  PSNR vs FP32 {m['psnr_mean']:.2f} dB"
          f"  (quantization {summary['seconds']} s)")


if __name__ == "__main__":
    main()
