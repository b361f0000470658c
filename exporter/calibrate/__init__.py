"""Calibration data: block inputs recorded along full-precision denoising trajectories."""

from exporter.calibrate.record import CalibrationError, calibrate, load_shards

__all__ = ["CalibrationError", "calibrate", "load_shards"]
