"""Calibration data: block inputs recorded along full-precision denoising trajectories."""

from exporter.calibrate.record import CalibrationData, CalibrationError, calibrate

__all__ = ["CalibrationData", "CalibrationError", "calibrate"]
