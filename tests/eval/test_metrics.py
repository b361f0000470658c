import numpy as np
import pytest

from exporter.eval import frechet_distance, psnr, ssim


def test_psnr_known_value_and_identity():
    x = np.random.default_rng(0).uniform(-1, 1, (16, 16))
    assert psnr(x, x) == float("inf")
    # constant error 0.02 over a data range of 2: MSE 4e-4, PSNR = 10 log10(4 / 4e-4) = 40 dB
    assert psnr(x + 0.02, x) == pytest.approx(40.0, abs=1e-9)


def test_ssim_identity_and_degradation():
    rng = np.random.default_rng(0)
    x = np.clip(np.add.outer(np.linspace(-1, 1, 16), np.linspace(-1, 1, 16)), -1, 1)
    assert ssim(x, x) == pytest.approx(1.0)
    slightly = ssim(x + rng.normal(0, 0.02, x.shape), x)
    heavily = ssim(x + rng.normal(0, 0.5, x.shape), x)
    assert 0.9 < slightly < 1.0 and heavily < 0.5 * slightly
    # on intensities shifted to [0, 2]: an image and its negative are anti-correlated, not similar
    # (on raw [-1, 1] values the luminance term flips sign: 0.88)
    assert ssim(-x, x) < 0
    # smaller than the 7-pixel window: the largest odd one that fits; under 3 pixels there is no SSIM
    small = x[:4, :4]
    assert ssim(small, small) == pytest.approx(1.0) and 0 < ssim(small + 0.1, small) < 1
    assert ssim(x[:2, :2], x[:2, :2]) is None


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # same covariance, shifted mean: FD = ||shift||^2
    assert frechet_distance(a, a + np.array([1.0, 2.0, 0.0])) == pytest.approx(5.0, rel=1e-9)
    # isotropic Gaussians N(0, I) vs N(0, 4I) in 3-D: 3 * (1 + 4 - 2*2) = 3
    assert frechet_distance(rng.normal(size=(200000, 3)), 2 * rng.normal(size=(200000, 3))) == pytest.approx(3, rel=0.02)


def test_frechet_distance_matches_scipy_sqrtm_and_handles_few_samples():
    from scipy import linalg

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(500, 6)), rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    few = frechet_distance(rng.normal(size=(10, 64)), rng.normal(size=(1797, 64)))  # singular covariance
    assert np.isfinite(few) and few > 0
