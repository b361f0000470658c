"""Image-quality metrics: Frechet distance, PSNR and SSIM, in plain numpy/scipy."""

from __future__ import annotations

import numpy as np


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets ``a`` [N, D] and ``b`` [M, D].

    ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), as in FID. Small sample counts bias it
    upwards, so compare values computed from the same number of images.
    """
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    # Tr((S_a S_b)^(1/2)) = sum of sqrt(eigenvalues of S_a^(1/2) S_b S_a^(1/2)), a symmetric PSD
    # matrix: stable even when a covariance is singular (fewer images than feature dimensions).
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    trace_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a), 0, None)).sum()
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_covmean)
    return max(value, 0.0)


def psnr(image: np.ndarray, reference: np.ndarray, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB (images in [-1, 1]: data range 2). Identical images: inf."""
    mse = float(np.mean((np.asarray(image, np.float64) - np.asarray(reference, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(data_range**2 / mse)


def ssim(image: np.ndarray, reference: np.ndarray, data_range: float = 2.0, win: int = 7) -> float | None:
    """Structural similarity (Wang et al. 2004) with a ``win`` x ``win`` uniform window, as
    scikit-image computes it by default (sample covariance, K1=0.01, K2=0.03, valid region only).

    Images are in [-1, 1] (data range 2) and are shifted to [0, 2] first: SSIM's luminance term
    assumes non-negative intensities (on [-1, 1], an image and its negative would score 0.88).
    Images smaller than the window use the largest odd window that fits; under 3 pixels: None."""
    from scipy.ndimage import uniform_filter

    x, y = np.asarray(image, np.float64), np.asarray(reference, np.float64)
    side = min(x.shape[:2])
    win = min(win, side if side % 2 else side - 1)
    if win < 3:
        return None
    if x.ndim == 3:  # colour: mean over channels
        return float(np.mean([ssim(x[..., c], y[..., c], data_range, win) for c in range(x.shape[-1])]))
    x, y = x + 1.0, y + 1.0
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    n = win * win
    cov_norm = n / (n - 1)
    mx, my = uniform_filter(x, win), uniform_filter(y, win)
    vx = cov_norm * (uniform_filter(x * x, win) - mx * mx)
    vy = cov_norm * (uniform_filter(y * y, win) - my * my)
    vxy = cov_norm * (uniform_filter(x * y, win) - mx * my)
    s = ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    p = win // 2
    return float(s[p:-p, p:-p].mean()) if p else float(s.mean())
