"""scikit-learn's bundled digits data at the reference models' resolution.

The 1,797 8x8 images (pixel values 0..16) are upsampled bilinearly to 16x16 and scaled to
[-1, 1]. The same tensor feeds the training script in ``tools/`` and the quality yardstick in
``exporter.eval``, so "real digits" means exactly one thing across the project.
"""

from __future__ import annotations

import numpy as np

RESOLUTION = 16
NUM_CLASSES = 10


def load_digits_16() -> tuple[np.ndarray, np.ndarray]:
    """Return ``(images, labels)``: float32 [1797, 1, 16, 16] in [-1, 1] and int64 [1797]."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]  # [N, 1, 8, 8] in [0, 1]
    x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bilinear", align_corners=False)
    x = x.clamp(0.0, 1.0) * 2.0 - 1.0
    return x.numpy(), digits.target.astype(np.int64)
