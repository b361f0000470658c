#!/usr/bin/env python
"""A Stable Diffusion-layout UNet with random weights, as a local diffusers pipeline folder.

    python tools/make_sd_layout.py /tmp/sd15                  # SD 1.5: 860 M parameters, 3.4 GB, ~20 s
    python tools/make_sd_layout.py /tmp/sdxl --layout sdxl    # SDXL base: 2.6 B parameters, 10.3 GB

The UNet configs are diffusers' published ones (runwayml/stable-diffusion-v1-5 and
stabilityai/stable-diffusion-xl-base-1.0, unet/config.json), the scheduler SD's DDIM settings, and
the conditioning file holds random CLIP-sized embeddings (``cond`` [2, 77, D], ``uncond`` zeros).
Nothing is downloaded: this is for measuring what the exporter does at real size (time, memory,
file sizes), not image quality.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from safetensors.torch import save_file

LAYOUTS = {
    "sd15": {
        "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "block_out_channels": (320, 640, 1280, 1280),
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32},
    "sdxl": {
        "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
        "block_out_channels": (320, 640, 1280),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20), "cross_attention_dim": 2048,
        "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="sd15")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = LAYOUTS[args.layout]
    unet = UNet2DConditionModel(**config)
    unet.save_pretrained(args.out / "unet", safe_serialization=True)
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1).save_config(args.out / "scheduler")
    width = config["cross_attention_dim"]
    tensors = {"cond": torch.randn(2, 77, width), "uncond": torch.zeros(1, 77, width)}
    if config.get("addition_embed_type") == "text_time":  # SDXL's pooled text embedding + size/crop ids
        tensors |= {"text_embeds": torch.randn(2, 1280), "uncond_text_embeds": torch.zeros(1, 1280),
                    "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]])}
    save_file(tensors, str(args.out / "conditioning.safetensors"))
    print(f"wrote {args.out}: {sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M parameters")


if __name__ == "__main__":
    main()
