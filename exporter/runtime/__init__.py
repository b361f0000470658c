"""Runtime: the denoising loop over exported graphs (per-t group selection, DeepCache caching)."""

from exporter.runtime.runtime import Runtime, refresh_steps

__all__ = ["Runtime", "refresh_steps"]
