"""The samplers users pick by name, all built from the model's own training-noise config.

A pixel-space model trained with ``clip_sample`` (the reference models; DDPM/DDIM configs) expects
the predicted clean image to be clipped to [-range, range] at every step. DDIM honours that key,
diffusers' DPM-Solver++ and Euler ignore it: on the reference UNet they gave FD-digits 66.8 instead
of DDIM's 6.66 (saturated, speckled digits; 2026-12-01). So DPM-Solver++ gets the same clip at its
thresholding hook (``ClippedDPMSolverScheduler``: a plain clip where diffusers' dynamic threshold
would rescale into [-1, 1]), and Euler through ``ClippedEulerScheduler``, for every prediction type.
Latent-space models (Stable Diffusion: ``clip_sample`` false) are left as they are. A config with
``thresholding`` (dynamic thresholding, which DDIM applies instead of the clip) keeps diffusers'
DPM-Solver++, which applies the same thresholding; diffusers' Euler has none, so it is refused there.
"""

from __future__ import annotations

import copy
import functools
import json

from exporter.errors import UsageError

SCHEDULERS = ("ddim", "dpm++", "euler")


def make_scheduler(name: str, config: dict):
    """A fresh diffusers scheduler ``name`` sharing the model's noise schedule (``config``).

    A copy of one built once per (name, config): the loops take a fresh scheduler per batch, and
    building one costs 2.4 ms (diffusers recomputes the 1000-step noise schedule in Python and
    inspects signatures), a copy 0.3 ms; at one image per call that was 0.12 ms of every step."""
    if name not in SCHEDULERS:
        raise UsageError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    key = (name, json.dumps(dict(config), sort_keys=True, default=repr))
    if key not in _BUILT:
        _BUILT[key] = _build(name, dict(config))
    return copy.deepcopy(_BUILT[key])


_BUILT: dict[tuple[str, str], object] = {}  # (name, config as JSON) -> a scheduler never stepped itself


def _build(name: str, config: dict):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    # DDIM's order: dynamic thresholding if the config asks for it, else the clip_sample clip
    thresholding = bool(config.get("thresholding"))
    clip = float(config.get("clip_sample_range", 1.0)) if config.get("clip_sample") and not thresholding else None
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "dpm++":
        if clip is None:  # with thresholding in the config, diffusers' own (DDIM's) dynamic thresholding
            return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
        scheduler = _clipped_dpm_solver().from_config(config, algorithm_type="dpmsolver++", solver_order=2,
                                                      thresholding=True)  # calls _threshold_sample on x0
        scheduler.clip_range = clip
        return scheduler
    if name == "euler":
        if thresholding:
            raise UsageError("scheduler euler: this model's scheduler config asks for dynamic thresholding "
                             "(thresholding: true), which diffusers' Euler does not do; use ddim or dpm++")
        scheduler = _clipped_euler().from_config(config)
        scheduler.clip_range = clip
        return scheduler
    raise AssertionError(name)  # make_scheduler checked the name


@functools.cache  # one class, defined on first use (diffusers is imported lazily)
def _clipped_euler():
    from diffusers import EulerDiscreteScheduler

    class ClippedEulerScheduler(EulerDiscreteScheduler):
        """Euler that clips its predicted clean image like DDIM's ``clip_sample``: the model output is
        replaced by the one that leads to the clipped image."""

        clip_range: float | None = None

        def step(self, model_output, timestep, sample, *args, **kwargs):
            if self.clip_range is not None:
                if self.step_index is None:
                    self._init_step_index(timestep)
                sigma = self.sigmas[self.step_index].to(sample.device, sample.dtype)
                kind = self.config.prediction_type
                # the clean image each prediction type gives (as EulerDiscreteScheduler.step computes it,
                # without churn), clipped, and the model output that gives the clipped one
                if kind == "epsilon":
                    clean = (sample - sigma * model_output).clamp(-self.clip_range, self.clip_range)
                    model_output = (sample - clean) / sigma
                elif kind == "v_prediction":
                    a, b = -sigma / (sigma**2 + 1) ** 0.5, 1 / (sigma**2 + 1)
                    clean = (model_output * a + sample * b).clamp(-self.clip_range, self.clip_range)
                    model_output = (clean - sample * b) / a
                elif kind in ("sample", "original_sample"):
                    model_output = model_output.clamp(-self.clip_range, self.clip_range)
            return super().step(model_output, timestep, sample, *args, **kwargs)

    return ClippedEulerScheduler


@functools.cache
def _clipped_dpm_solver():
    from diffusers import DPMSolverMultistepScheduler

    class ClippedDPMSolverScheduler(DPMSolverMultistepScheduler):
        """DPM-Solver++ whose predicted clean image is clipped like DDIM's ``clip_sample``."""

        clip_range: float = 1.0

        def _threshold_sample(self, sample):
            return sample.clamp(-self.clip_range, self.clip_range)

    return ClippedDPMSolverScheduler


def set_steps(scheduler, steps: int) -> None:
    """``scheduler.set_timesteps(steps)``, with a usage error where the model's training schedule
    has fewer timesteps than asked (diffusers raises a ValueError deep in the loop)."""
    trained = scheduler.config.get("num_train_timesteps")
    if trained is not None and steps > trained:
        raise UsageError(f"{steps} denoising steps: the model's scheduler was trained with {trained} timesteps, "
                         f"so at most {trained} steps")
    scheduler.set_timesteps(steps)
    timesteps = [float(t) for t in scheduler.timesteps]
    if len(timesteps) != steps or len(set(timesteps)) != steps:  # DPM-Solver++ near `trained` steps: NaN
        raise UsageError(f"{steps} denoising steps: {type(scheduler).__name__} with this model's schedule "
                         f"({trained} training timesteps, {scheduler.config.get('timestep_spacing')} spacing) "
                         f"gives {len(set(timesteps))} distinct timestep(s); ask for fewer steps")
