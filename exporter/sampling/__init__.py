"""The denoising loop shared by the FP32 PyTorch reference sampler and (later) the runtime."""

from exporter.sampling.loop import SampleSettings, generate
from exporter.sampling.schedulers import SCHEDULERS, make_scheduler

__all__ = ["SCHEDULERS", "SampleSettings", "generate", "make_scheduler"]
