"""Plain diffusers denoising loop with batched classifier-free guidance.

The loop only needs a ``denoise(sample, t, cond) -> epsilon`` callable, so the same code drives the
PyTorch model now and exported graphs later. Each image's starting noise comes from its own
generator seeded by (seed, row, k): image ``3_1`` starts from the same noise whether rows 0..9 or
only row 3 are asked for, and whatever the batch size, which is what lets runs be compared image by
image. (The images themselves can differ by a grey level between batch sizes: the float kernels of
a batch of 1 and of 40 may sum in another order; measured: 1 image of 20 at batch 1 against 40.)
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from exporter.errors import UsageError
from exporter.models.conditioning import Conditioning, cfg_batch
from exporter.sampling.schedulers import make_scheduler, set_steps

log = logging.getLogger(__name__)

Denoiser = Callable[[torch.Tensor, torch.Tensor, object, int], torch.Tensor]  # (x, t, cond, step)


@dataclass(frozen=True)
class SampleSettings:
    rows: tuple[int, ...]
    per_row: int = 8
    steps: int = 20
    scheduler: str = "ddim"
    guidance: float = 1.0  # <= 1 disables classifier-free guidance (no null-conditioning pass)
    seed: int = 0
    batch_size: int = 40  # images per denoiser call (doubled when guidance is on)

    def __post_init__(self):
        # a repeated row (--rows 0,0 or 0-3,2) would be denoised twice for one image: once, in order
        object.__setattr__(self, "rows", tuple(dict.fromkeys(self.rows)))
        for name in ("per_row", "steps", "batch_size"):  # 0 would silently make no images or no steps
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise UsageError(f"{name} must be a positive whole number, got {value!r}")
        if not self.rows:
            raise UsageError("rows is empty: no image would be made")
        if not math.isfinite(self.guidance):  # NaN > 1 is False: guidance would be silently off
            raise UsageError(f"guidance must be a finite number, got {self.guidance!r}")

    def image_keys(self) -> list[tuple[int, int]]:
        return [(row, k) for row in self.rows for k in range(self.per_row)]


def initial_noise(shape: tuple[int, ...], seed: int, row: int, k: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed((seed * 1_000_003 + row * 10_007 + k) % (2**63))
    return torch.randn(shape, generator=gen)


def denoise_batch(
    denoise,
    scheduler_name: str,
    scheduler_config: dict,
    noise: torch.Tensor,
    cond,
    uncond,
    steps: int,
    guidance: float,
    on_step: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Denoise one batch from its initial noise; returns the final latents.

    ``denoise(model_in, t_batch, cond_in, step)`` sees the CFG-doubled batch ([null; conditional])
    when guidance is on, exactly as an engine would at inference.
    """
    scheduler = make_scheduler(scheduler_name, scheduler_config)
    set_steps(scheduler, steps)
    latents = noise * scheduler.init_noise_sigma
    use_cfg = guidance > 1.0 and cond is not None
    cond_in = cfg_batch(uncond, cond) if use_cfg else cond
    with torch.inference_mode():
        for step, t in enumerate(scheduler.timesteps):
            model_in = scheduler.scale_model_input(latents, t)
            if use_cfg:
                model_in = torch.cat([model_in, model_in])
            eps = denoise(model_in, t.expand(model_in.shape[0]), cond_in, step)
            if use_cfg:
                eps_uncond, eps_cond = eps.chunk(2)
                eps = eps_uncond + guidance * (eps_cond - eps_uncond)
            latents = scheduler.step(eps, t, latents, return_dict=False)[0]
            if on_step is not None:
                on_step()
    return latents


def generate(
    denoise: Denoiser,
    sample_shape: tuple[int, int, int],
    scheduler_config: dict,
    conditioning: Conditioning,
    settings: SampleSettings,
    progress: bool = True,
) -> dict[tuple[int, int], torch.Tensor]:
    """Run the loop; returns {(row, k): image [C, H, W] in the model's output range (about [-1, 1])}."""
    from tqdm.auto import tqdm

    conditioning.check_rows(list(settings.rows))
    keys = settings.image_keys()
    batches = [keys[i : i + settings.batch_size] for i in range(0, len(keys), settings.batch_size)]
    out: dict[tuple[int, int], torch.Tensor] = {}
    start = time.perf_counter()
    bar = tqdm(total=len(batches) * settings.steps, desc="denoising", unit="step", disable=not progress or None)
    for batch in batches:
        noise = torch.stack([initial_noise(sample_shape, settings.seed, r, k) for r, k in batch])
        cond, uncond = conditioning.batch([r for r, _ in batch])
        latents = denoise_batch(denoise, settings.scheduler, scheduler_config,
                                noise, cond, uncond, settings.steps, settings.guidance, on_step=lambda: bar.update(1))
        out.update(zip(batch, latents))
    bar.close()
    log.info("sampled %d images (%d steps, %s, guidance %.2g) in %.1fs", len(keys), settings.steps,
             settings.scheduler, settings.guidance, time.perf_counter() - start)
    return out
