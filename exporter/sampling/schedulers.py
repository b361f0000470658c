"""The samplers users pick by name, all built from the model's own training-noise config."""

from __future__ import annotations

from exporter.errors import UsageError

SCHEDULERS = ("ddim", "dpm++", "euler")


def make_scheduler(name: str, config: dict):
    """A fresh diffusers scheduler ``name`` sharing the model's noise schedule (``config``)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "dpm++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config)
    raise UsageError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
