"""The quality yardstick: digit accuracy, FD-digits, PSNR/SSIM against a reference folder."""

from exporter.eval.metrics import frechet_distance, psnr, ssim
from exporter.eval.yardstick import evaluate, format_table, psnr_text

__all__ = ["evaluate", "format_table", "frechet_distance", "psnr", "psnr_text", "ssim"]
