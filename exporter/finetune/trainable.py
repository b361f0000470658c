"""Trainable views of PTQ'd layers: quantization-aware LoRA and temporal learned step sizes.

``TrainableQuantLayer`` wraps a ``QuantLayer`` during finetuning only:

* QALoRA (EfficientDM): a rank-r adapter with ``B = 0`` at the start; the merged weight
  ``W + B·A`` goes through the layer's weight quantizer (fixed PTQ scales, straight-through
  rounding), so the adapter learns what survives quantization. For a convolution A has the
  layer's kernel and B is 1×1, so ``B·A`` is a kernel of the same shape.
* Temporal LSQ: the activation step of every timestep group (and split-shortcut part) is learned
  as ``step = ptq_step · exp(θ)``, θ = 0 at the start, one parameter per group; rounding is
  straight-through, so the gradient reaching the step is LSQ's (round(x/s) − x/s inside the range,
  the clamp bound outside).
* ``method="qat"``: the naive baseline EfficientDM compares against: the whole weight trains.

``merge()`` writes the result back into the ``QuantLayer`` (new quantized weight values, new
activation scales), so the exported graph is exactly a PTQ graph: no adapter op anywhere.
"""

from __future__ import annotations

import math

import torch

from exporter.quant.formats import QuantFormat, compact, dequantize, fake_quant, quantize
from exporter.quant.ptq import QuantLayer


def round_ste(v: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Rounding to the format's grid (already scaled by 1/step) with a straight-through gradient."""
    if fmt.kind == "fp8":
        rounded = v.clamp(fmt.qmin, fmt.qmax).to(torch.float8_e4m3fn).to(v.dtype)
    else:
        rounded = torch.round(v)
    return v + (rounded - v).detach()


def lsq_fake_quant(x: torch.Tensor, step: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    return round_ste(torch.clamp(x / step, fmt.qmin, fmt.qmax), fmt) * step


class TrainableQuantLayer(torch.nn.Module):
    def __init__(self, layer: QuantLayer, rank: int, method: str = "qalora", generator: torch.Generator | None = None):
        super().__init__()
        self.q, self.method = layer, method
        weight = layer.layer.weight.detach()
        if method == "qat":
            self.weight = torch.nn.Parameter(weight.clone())
        else:
            self.register_buffer("weight", weight.clone())
            rank = min(rank, weight.shape[0], weight[0].numel())
            self.lora_A = torch.nn.Parameter(torch.empty(rank, *weight.shape[1:]))
            torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)  # like nn.Linear / peft
            self.lora_B = torch.nn.Parameter(torch.zeros(weight.shape[0], rank))
        if layer.afmt is not None:
            # One parameter per timestep group (EfficientDM's TALSQ): on a denoising step of group g the
            # other groups' steps get no gradient (None, not 0), so Adam leaves them and their moments
            # alone; one [groups, parts] parameter let momentum move every group on every step.
            for group in range(layer.act_scale.shape[0]):
                self.register_parameter(f"log_step_g{group}", torch.nn.Parameter(
                    torch.zeros_like(layer.act_scale[group], dtype=torch.float32)))

    @property
    def weight_step(self) -> float:
        """Mean weight quantization step: the scale-aware learning rate is proportional to it."""
        return float(self.q.weight_scale.float().mean())

    def merged_weight(self) -> torch.Tensor:
        if self.method == "qat":
            return self.weight
        return self.weight + (self.lora_B @ self.lora_A.flatten(1)).reshape(self.weight.shape)

    def _quantized_weight(self, w: torch.Tensor) -> torch.Tensor:
        q = self.q
        if q.block_size:  # INT4: blocks over the flattened [out, in * kh * kw] weight
            fq = fake_quant(w.flatten(1), q.weight_scale, q.wfmt, axis=1, block_size=q.block_size).reshape(w.shape)
        else:
            fq = fake_quant(w, q.weight_scale, q.wfmt, axis=0)
        return w + (fq - w).detach()  # straight-through

    def log_steps(self) -> list[torch.nn.Parameter]:
        """The learned log-step of every timestep group, in group order (empty without activation quantization)."""
        if self.q.afmt is None:
            return []
        return [getattr(self, f"log_step_g{group}") for group in range(self.q.act_scale.shape[0])]

    def log_step(self) -> torch.Tensor:
        """All groups' learned log-steps as one [groups, parts] tensor, detached (for checks and merging)."""
        return torch.stack([p.detach() for p in self.log_steps()])

    def act_steps(self, group: int) -> torch.Tensor:
        return self.q.act_scale[group].float() * torch.exp(getattr(self, f"log_step_g{group}"))

    def forward(self, x):
        q = self.q
        if q.afmt is not None:
            steps = self.act_steps(q.context.group)
            x = torch.cat([lsq_fake_quant(p, s, q.afmt) for p, s in zip(q.parts(x), steps)], dim=1)
        return q._compute(x, self._quantized_weight(self.merged_weight()), q.layer.bias)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the training result into the QuantLayer (weights requantized with the PTQ scales)."""
        q = self.q
        w = self.merged_weight().detach().float()
        if q.block_size:
            q.weight_values = compact(quantize(w.flatten(1), q.weight_scale, q.wfmt, axis=1, block_size=q.block_size),
                                      q.wfmt)
            wq = dequantize(q.weight_values, q.weight_scale, axis=1, block_size=q.block_size)
        else:
            q.weight_values = compact(quantize(w, q.weight_scale, q.wfmt, axis=0), q.wfmt)
            wq = dequantize(q.weight_values, q.weight_scale, axis=0)
        q.weight_q.copy_(wq.reshape(q.weight_q.shape))
        if q.afmt is not None:
            q.act_scale = (q.act_scale.float() * torch.exp(self.log_step())).to(q.act_scale.dtype)
