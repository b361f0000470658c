#!/usr/bin/env python
"""A Stable Diffusion 1.5-layout UNet with random weights, as a local diffusers pipeline folder.

    python tools/make_sd15_layout.py /tmp/sd15          # 860 M parameters, 3.4 GB, ~20 s

The UNet config is diffusers' published one for SD 1.5 (runwayml/stable-diffusion-v1-5,
unet/config.json), the scheduler SD's DDIM settings, and the conditioning file holds random
CLIP-sized embeddings (``cond`` [2, 77, 768], ``uncond`` zeros). Nothing is downloaded: this is for
measuring what the exporter does at real size (time, memory, file sizes), not image quality.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from safetensors.torch import save_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
    unet.save_pretrained(args.out / "unet", safe_serialization=True)
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1).save_config(args.out / "scheduler")
    save_file({"cond": torch.randn(2, 77, 768), "uncond": torch.zeros(1, 77, 768)},
              str(args.out / "conditioning.safetensors"))
    print(f"wrote {args.out}: {sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M parameters")


if __name__ == "__main__":
    main()
