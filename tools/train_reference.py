#!/usr/bin/env python
"""Train the bundled reference models on scikit-learn's digits data (deterministic).

    python tools/train_reference.py digits-unet            # writes exporter/reference/digits-unet/
    python tools/train_reference.py digits-dit --steps 200 --out /tmp/dit   # a quick try

Both are epsilon-prediction DDPM models on 16x16 single-channel digits in [-1, 1], trained with
the condition replaced by a null condition ~10% of the time so classifier-free guidance works:

* ``digits-unet``: a ``UNet2DConditionModel`` laid out like Stable Diffusion (CrossAttnDownBlock2D x2,
  DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D, CrossAttnUpBlock2D x2; 3 resolution levels,
  2 layers per block) conditioned through cross-attention on a learned "prompt embedding" per digit
  (a [seq, dim] table row; row 10 is the null prompt). The table is saved as conditioning.safetensors.
* ``digits-dit``: a class-conditional ``DiTTransformer2DModel`` (adaLN-Zero, patch size 2). Its label
  embedding has the null class built in (index 10), and diffusers drops labels 10% of the time in
  training mode.

The output is a diffusers pipeline-layout directory: ``unet/`` or ``transformer/`` (config.json +
safetensors), ``scheduler/`` and ``conditioning.safetensors``, plus ``training.json`` recording how
it was made. Weights are an exponential moving average of the trained weights. CI never runs this.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exporter.cli_types import finite_float, positive_int
from exporter.reference.digits import NUM_CLASSES, RESOLUTION, load_digits_16

log = logging.getLogger("train_reference")

PROMPT_SEQ, PROMPT_DIM = 4, 32
NULL_DROP_PROB = 0.1

SETTINGS = {
    # steps / batch / lr chosen so each trains in roughly 25 minutes on 2 cores.
    "digits-unet": {"steps": 1800, "batch": 64, "lr": 1e-3},
    "digits-dit": {"steps": 3000, "batch": 128, "lr": 6e-4},
}


def scheduler_config() -> dict:
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="epsilon",
        clip_sample=True,
        timestep_spacing="trailing",  # few-step samplers start at t=999 (pure noise)
    )
    return sched


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=RESOLUTION,
        in_channels=1,
        out_channels=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 48, 64),
        layers_per_block=2,
        cross_attention_dim=PROMPT_DIM,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def build_dit():
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=1,
        out_channels=1,
        num_layers=6,
        sample_size=RESOLUTION,
        patch_size=2,
        num_embeds_ada_norm=NUM_CLASSES,
    )


class UNetTrainee(torch.nn.Module):
    """The UNet plus its learned prompt table (row ``NUM_CLASSES`` is the null prompt)."""

    def __init__(self):
        super().__init__()
        self.model = build_unet()
        self.prompts = torch.nn.Parameter(torch.randn(NUM_CLASSES + 1, PROMPT_SEQ, PROMPT_DIM) * 0.5)

    def forward(self, x, t, labels, generator):
        drop = torch.rand(labels.shape[0], generator=generator) < NULL_DROP_PROB
        labels = torch.where(drop, torch.full_like(labels, NUM_CLASSES), labels)
        return self.model(x, t, encoder_hidden_states=self.prompts[labels]).sample

    def save(self, out: Path) -> None:
        from safetensors.torch import save_file

        self.model.save_pretrained(out / "unet", safe_serialization=True)
        save_file(
            {
                "cond": self.prompts[:NUM_CLASSES].detach().contiguous(),
                "uncond": self.prompts[NUM_CLASSES:].detach().contiguous(),
            },
            str(out / "conditioning.safetensors"),
        )


class DiTTrainee(torch.nn.Module):
    """The DiT; its label embedding drops labels to the null class itself in training mode."""

    def __init__(self):
        super().__init__()
        self.model = build_dit()

    def forward(self, x, t, labels, generator):
        return self.model(x, t, class_labels=labels).sample

    def save(self, out: Path) -> None:
        from safetensors.torch import save_file

        self.model.save_pretrained(out / "transformer", safe_serialization=True)
        save_file(
            {
                "class_labels": torch.arange(NUM_CLASSES, dtype=torch.int64),
                "null_class": torch.tensor([NUM_CLASSES], dtype=torch.int64),
            },
            str(out / "conditioning.safetensors"),
        )


def lr_at(step: int, total: int, base: float) -> float:
    warmup = 100
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def write_pipeline(trainee, out: Path, meta: dict) -> None:
    """Write to a temporary sibling, then swap it in: a crash never leaves half a model."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    trainee.save(tmp)
    scheduler_config().save_config(tmp / "scheduler")
    (tmp / "training.json").write_text(json.dumps(meta, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def train(name: str, steps: int, batch: int, lr: float, seed: int, out: Path, snapshot_every: int) -> None:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    images, labels = (torch.from_numpy(a) for a in load_digits_16())
    trainee = UNetTrainee() if name == "digits-unet" else DiTTrainee()
    ema = copy.deepcopy(trainee).requires_grad_(False)
    sched = scheduler_config()
    alphas_cumprod = sched.alphas_cumprod.float()
    opt = torch.optim.AdamW(trainee.parameters(), lr=lr, weight_decay=0.0)
    n_params = sum(p.numel() for p in trainee.model.parameters())
    log.info("%s: %.2fM parameters, %d steps at batch %d, %d threads", name, n_params / 1e6, steps, batch,
             torch.get_num_threads())

    start, running = time.time(), None
    for step in range(steps):
        idx = torch.randint(0, images.shape[0], (batch,), generator=gen)
        x0, y = images[idx], labels[idx]
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(trainee(xt, t, y, gen), noise)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainee.parameters(), 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), trainee.parameters()):
                pe.lerp_(p, 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % 50 == 0:
            elapsed = time.time() - start
            log.info("step %d/%d loss %.4f  %.0fs elapsed, ~%.0fs left", step + 1, steps, running, elapsed,
                     elapsed / (step + 1) * (steps - step - 1))
        if snapshot_every and (step + 1) % snapshot_every == 0 and step + 1 < steps:
            write_pipeline(ema, out.with_name(out.name + ".snapshot"), {"step": step + 1})

    meta = {
        "model": name, "steps": steps, "batch": batch, "lr": lr, "seed": seed,
        "threads": torch.get_num_threads(), "train_seconds": round(time.time() - start, 1),
        "final_loss_ema": round(running, 5), "parameters": n_params,
        "torch": torch.__version__, "data": "sklearn.datasets.load_digits, bilinear 8x8->16x16, [-1, 1]",
    }
    write_pipeline(ema, out, meta)
    log.info("wrote %s in %.0fs", out, meta["train_seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=sorted(SETTINGS))
    parser.add_argument("--steps", type=positive_int)
    parser.add_argument("--batch", type=positive_int)
    parser.add_argument("--lr", type=finite_float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="default: exporter/reference/<model>")
    parser.add_argument("--snapshot-every", type=int, default=0,
                        help="also write EMA snapshots to <out>.snapshot every N steps (to watch quality)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    cfg = SETTINGS[args.model]
    train(
        args.model,
        steps=args.steps if args.steps is not None else cfg["steps"],
        batch=args.batch if args.batch is not None else cfg["batch"],
        lr=args.lr if args.lr is not None else cfg["lr"],
        seed=args.seed,
        out=args.out or ROOT / "exporter" / "reference" / args.model,
        snapshot_every=args.snapshot_every,
    )


if __name__ == "__main__":
    main()
