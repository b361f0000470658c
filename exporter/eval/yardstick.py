"""The quality yardstick every stage reports: digit accuracy, FD-digits, and PSNR/SSIM vs a reference.

Images are a folder of ``<row>_<k>.png``; for the digits reference models row ``i`` asks for digit
``i``, so the row is the label. PSNR/SSIM pair each image with the same-named image of a reference
folder generated from the same seeds (e.g. the FP32 model), which isolates what quantization or
caching changed.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np

from exporter.errors import ImageFolderError
from exporter.eval.classifier import get_classifier
from exporter.eval.metrics import frechet_distance, psnr, ssim
from exporter.imageio import read_image_folder
from exporter.reference.digits import NUM_CLASSES

log = logging.getLogger(__name__)


def _stack(images: dict, keys, folder) -> np.ndarray:
    arrays = [images[k] for k in keys]
    if arrays[0].ndim == 3:  # RGB: the digits classifier reads luminance
        arrays = [a.mean(-1) for a in arrays]
    sizes = sorted({a.shape for a in arrays})
    if len(sizes) > 1:
        raise ImageFolderError(f"{folder}: images of {len(sizes)} sizes ({', '.join('x'.join(map(str, s)) for s in sizes)}); "
                               "one run's images share one size")
    return np.stack(arrays)


def evaluate(images_dir: str | Path, reference_dir: str | Path | None = None, digits: bool = True) -> dict:
    """Digit accuracy and FD-digits (16x16 digit images only), PSNR/SSIM against ``reference_dir``.
    With ``digits=False`` (any other model) only the comparison with the reference is made."""
    start = time.perf_counter()
    images = read_image_folder(images_dir)
    keys = sorted(images)
    batch = _stack(images, keys, images_dir) if digits else None
    if batch is not None and batch.shape[1:] != (16, 16):  # e.g. exporter run --latent
        if reference_dir is None:
            raise ImageFolderError(f"{images_dir}: the digits yardstick needs 16x16 images, got "
                                   f"{batch.shape[1]}x{batch.shape[2]}; pass --reference to compare them with "
                                   "images of the same seeds and size")
        log.warning("%s: %dx%d images; the digits yardstick (accuracy, FD-digits) needs 16x16, so only the "
                    "comparison with %s is made", images_dir, batch.shape[1], batch.shape[2], reference_dir)
        batch = None
    if batch is None:
        result = {"images": str(images_dir), "n_images": len(keys)}
        if reference_dir is not None:
            result.update(compare(images, read_image_folder(reference_dir), images_dir, reference_dir))
        return result
    clf = get_classifier()
    result: dict = {"images": str(images_dir), "n_images": len(keys), "classifier_test_accuracy": clf.test_accuracy}

    labelled = [i for i, (row, _) in enumerate(keys) if row < NUM_CLASSES]
    if labelled:
        predicted = clf.predict(batch[labelled])
        rows = np.array([keys[i][0] for i in labelled])
        result["accuracy"] = float((predicted == rows).mean())
        result["accuracy_per_row"] = {
            str(r): float((predicted[rows == r] == r).mean()) for r in sorted(set(rows.tolist()))
        }
    if len(keys) > 1:  # a covariance needs two images at least
        real = clf.features(clf.real_images)
        result["fd_digits"] = frechet_distance(clf.features(batch), real)
        # What a perfect generator scores with this many images (FD is biased upwards at small N).
        subset = np.random.default_rng(0).choice(len(clf.real_images), size=len(keys), replace=len(keys) > len(real))
        result["fd_digits_real_floor"] = frechet_distance(real[subset], real)
    else:
        log.warning("%s: one image; FD-digits needs two at least and is left out", images_dir)

    if reference_dir is not None:
        result.update(compare(images, read_image_folder(reference_dir), images_dir, reference_dir))
    log.info("evaluated %d images in %.1fs", len(keys), time.perf_counter() - start)
    return result


def compare(images: dict, reference: dict, images_dir, reference_dir) -> dict:
    common = sorted(set(images) & set(reference))
    if not common:
        raise ImageFolderError(f"{images_dir} and {reference_dir} share no <row>_<k>.png names to compare")
    for key in common:  # every pair: one odd file must not end in a broadcasting error
        if images[key].shape != reference[key].shape:
            raise ImageFolderError(f"{images_dir} holds {'x'.join(map(str, images[key].shape))} images and "
                                   f"{reference_dir} {'x'.join(map(str, reference[key].shape))} (first: "
                                   f"{key[0]}_{key[1]}.png): compare images of the same size (the same --latent)")
    missing = len(images) - len(common)
    if missing:
        log.warning("%d image(s) in %s have no counterpart in %s", missing, images_dir, reference_dir)
    psnrs = [psnr(images[k], reference[k]) for k in common]
    finite = [p for p in psnrs if math.isfinite(p)]
    return {
        "reference": str(reference_dir),
        "n_compared": len(common),
        # Identical images have infinite PSNR; the mean is over the finite ones (JSON has no inf).
        "psnr_mean": float(np.mean(finite)) if finite else None,
        "psnr_min": float(min(finite)) if finite else None,
        "n_identical": len(psnrs) - len(finite),
        "ssim_mean": _mean_or_none([ssim(images[k], reference[k]) for k in common]),  # None: under 3 pixels
    }


def _mean_or_none(values: list) -> float | None:
    return None if any(v is None for v in values) else float(np.mean(values))


def psnr_text(result: dict) -> str:
    """PSNR against the reference in one cell: the mean over the images that differ, and how many are
    identical (a mean over 1 differing image of 80 must not read like 80 images at that PSNR)."""
    if "n_compared" not in result:
        return "—"
    if result["psnr_mean"] is None:
        return "identical"
    text = f"{result['psnr_mean']:.2f} dB"
    return text + (f" ({result['n_identical']}/{result['n_compared']} identical)" if result["n_identical"] else "")


def format_table(result: dict) -> str:
    rows = [("images", str(result["n_images"]))]
    if "accuracy" in result:
        rows.append(("accuracy", f"{100 * result['accuracy']:.1f} %"))
    if "fd_digits" in result:
        rows.append(("FD-digits", (f"{result['fd_digits']:.2f}  (real-digit floor at this N: "
                                   f"{result['fd_digits_real_floor']:.2f})")))
    if "n_compared" in result:
        psnr_mean = result["psnr_mean"]
        rows.append(("PSNR vs reference", "identical" if psnr_mean is None else f"{psnr_mean:.2f} dB mean, "
                     f"{result['psnr_min']:.2f} dB min ({result['n_identical']} identical)"))
        rows.append(("SSIM vs reference", "—" if result["ssim_mean"] is None else f"{result['ssim_mean']:.4f}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
