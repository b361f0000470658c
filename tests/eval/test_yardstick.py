"""The yardstick on images whose answer is known: the real digits, noise, and a perturbed copy."""

import numpy as np
import pytest

from exporter import ImageFolderError
from exporter.eval import evaluate, psnr_text
from exporter.eval.classifier import DigitsClassifier, get_classifier
from exporter.imageio import read_image_folder, write_image_folder
from exporter.reference.digits import load_digits_16


def real_digit_folder(path, per_row=8, shift=0.0):
    images, labels = load_digits_16()
    chosen = {}
    for digit in range(10):
        for k, idx in enumerate(np.flatnonzero(labels == digit)[:per_row]):
            chosen[(digit, k)] = np.clip(images[idx] + shift, -1, 1)
    write_image_folder(path, chosen)
    return path


def test_classifier_is_deterministic_and_accurate():
    clf = get_classifier()
    assert clf.test_accuracy >= 0.95
    assert clf.features(clf.real_images[:5]).shape == (5, 64)
    again = DigitsClassifier()  # a second training from scratch: the same network, so FD-digits is reproducible
    assert again.test_accuracy == clf.test_accuracy
    assert np.array_equal(again.features(clf.real_images[:50]), clf.features(clf.real_images[:50]))


def test_real_digits_score_high_and_noise_scores_low(tmp_path):
    real = evaluate(real_digit_folder(tmp_path / "real"))
    assert real["n_images"] == 80 and real["accuracy"] >= 0.95
    noise = {(r, k): np.random.default_rng(r * 8 + k).uniform(-1, 1, (1, 16, 16)) for r in range(10) for k in range(8)}
    write_image_folder(tmp_path / "noise", noise)
    bad = evaluate(tmp_path / "noise")
    assert bad["accuracy"] <= 0.3
    assert bad["fd_digits"] > 5 * real["fd_digits"]
    assert real["fd_digits"] < 2 * real["fd_digits_real_floor"]


def test_psnr_ssim_against_reference(tmp_path):
    ref = real_digit_folder(tmp_path / "ref")
    same = evaluate(ref, ref)
    assert same["n_identical"] == 80 and same["psnr_mean"] is None and same["ssim_mean"] == pytest.approx(1.0)
    shifted = evaluate(real_digit_folder(tmp_path / "shifted", shift=0.1), ref)
    assert 15 < shifted["psnr_mean"] < 40 and shifted["ssim_mean"] < 1.0
    assert psnr_text(same) == "identical"
    assert psnr_text(shifted) == f"{shifted['psnr_mean']:.2f} dB"


def test_psnr_text_says_how_many_images_are_identical(tmp_path):
    """One pixel off by one grey level in one image of 80: the mean PSNR is that image's alone, so the
    cell must say the other 79 are identical."""
    ref = real_digit_folder(tmp_path / "ref")
    images = {k: v[None] for k, v in read_image_folder(ref).items()}  # [H, W] -> [1, H, W]
    key = next(iter(images))
    images[key][0, 0, 0] += 2.0 / 255 * (1 if images[key][0, 0, 0] < 0 else -1)
    write_image_folder(tmp_path / "one", images)
    result = evaluate(tmp_path / "one", ref)
    assert result["n_identical"] == 79
    assert psnr_text(result) == f"{result['psnr_mean']:.2f} dB (79/80 identical)"
    assert psnr_text({"n_images": 80}) == "—"  # no reference given


def test_png_round_trip_is_within_half_a_grey_level(tmp_path):
    img = np.random.default_rng(0).uniform(-1, 1, (1, 16, 16)).astype(np.float32)
    write_image_folder(tmp_path, {(0, 0): img})
    back = read_image_folder(tmp_path)[(0, 0)]
    assert np.abs(back - img[0]).max() <= 1 / 127.5 / 2 + 1e-6


def test_sixteen_bit_pngs_are_read_on_their_own_scale(tmp_path):
    from PIL import Image

    img = np.random.default_rng(1).uniform(-1, 1, (1, 16, 16)).astype(np.float32)
    write_image_folder(tmp_path / "a", {(0, 0): img})
    eight = np.asarray(Image.open(tmp_path / "a" / "0_0.png"))
    (tmp_path / "b").mkdir()
    Image.fromarray(eight.astype(np.uint16) * 257).save(tmp_path / "b" / "0_0.png")  # the same image, 16 bits
    assert Image.open(tmp_path / "b" / "0_0.png").mode in ("I", "I;16")
    np.testing.assert_allclose(read_image_folder(tmp_path / "b")[(0, 0)], read_image_folder(tmp_path / "a")[(0, 0)],
                               rtol=0, atol=1e-6)


def test_corrupted_png_and_unrelated_reference(tmp_path):
    real_digit_folder(tmp_path / "a", per_row=1)
    (tmp_path / "a" / "3_0.png").write_bytes(b"not a png")
    with pytest.raises(ImageFolderError, match="3_0.png: not a readable PNG"):
        evaluate(tmp_path / "a")
    real_digit_folder(tmp_path / "b", per_row=1)
    write_image_folder(tmp_path / "c", {(11, 5): np.zeros((1, 16, 16))})
    with pytest.raises(ImageFolderError, match="share no <row>_<k>.png names"):
        evaluate(tmp_path / "b", tmp_path / "c")


def test_images_of_another_size_are_compared_but_not_scored_as_digits(tmp_path):
    """``exporter run --latent`` writes images the digits classifier cannot read: with a reference of
    the same size only PSNR/SSIM are reported, without one it is an error saying what to pass, and a
    reference of another size is refused instead of crashing in the comparison."""
    from exporter.eval import format_table

    rng = np.random.default_rng(0)
    wide = {(r, 0): rng.uniform(-1, 1, (1, 24, 32)).astype(np.float32) for r in range(3)}
    write_image_folder(tmp_path / "wide", wide)
    write_image_folder(tmp_path / "wide_ref", {k: np.clip(v + 0.05, -1, 1) for k, v in wide.items()})
    with pytest.raises(ImageFolderError, match="needs 16x16 images, got 24x32; pass --reference"):
        evaluate(tmp_path / "wide")
    result = evaluate(tmp_path / "wide", tmp_path / "wide_ref")
    assert "accuracy" not in result and "fd_digits" not in result
    assert result["n_compared"] == 3 and 20 < result["psnr_mean"] < 40
    assert "FD-digits" not in format_table(result) and "PSNR vs reference" in format_table(result)
    real_digit_folder(tmp_path / "digits", per_row=1)
    with pytest.raises(ImageFolderError, match="holds 24x32 images and .* 16x16 .*: compare images of the same size"):
        evaluate(tmp_path / "wide", tmp_path / "digits")
    # one odd pair among matching ones is named, not a broadcasting error
    import shutil

    shutil.copytree(tmp_path / "wide_ref", tmp_path / "odd")
    shutil.copyfile(tmp_path / "digits" / "0_0.png", tmp_path / "odd" / "2_0.png")
    with pytest.raises(ImageFolderError, match=r"\(first: 2_0.png\): compare images of the same size"):
        evaluate(tmp_path / "wide", tmp_path / "odd")


def test_one_image_is_scored_without_fd_and_mixed_sizes_are_refused(tmp_path):
    import shutil

    images, _labels = load_digits_16()
    write_image_folder(tmp_path / "one", {(0, 0): images[0]})  # FD needs a covariance: two images
    result = evaluate(tmp_path / "one")
    assert result["n_images"] == 1 and "accuracy" in result and "fd_digits" not in result
    write_image_folder(tmp_path / "small", {(0, 0): np.zeros((1, 8, 8), np.float32)})
    shutil.copy(tmp_path / "small" / "0_0.png", tmp_path / "one" / "0_1.png")  # another run's image
    with pytest.raises(ImageFolderError, match="images of 2 sizes"):
        evaluate(tmp_path / "one")
