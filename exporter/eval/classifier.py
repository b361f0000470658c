"""The digits classifier behind the yardstick: accuracy and the features for FD-digits.

A small MLP (256 -> 128 -> 64 -> 10, ReLU) trained by scikit-learn on a fixed 80% split of the
16x16 digits, with a fixed seed: the same weights on every machine in about two seconds, so nothing
is committed or downloaded. Its 64-wide penultimate activations play the role Inception features
play in FID.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np

SEED = 0
HIDDEN = (128, 64)


class DigitsClassifier:
    def __init__(self):
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.model_selection import train_test_split
        from sklearn.neural_network import MLPClassifier

        from exporter.reference.digits import load_digits_16

        images, labels = load_digits_16()
        x = images.reshape(len(images), -1)
        x_train, x_test, y_train, y_test = train_test_split(
            x, labels, test_size=0.2, random_state=SEED, stratify=labels
        )
        self._mlp = MLPClassifier(hidden_layer_sizes=HIDDEN, alpha=1e-3, max_iter=300, random_state=SEED)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self._mlp.fit(x_train, y_train)
        self.test_accuracy = float(self._mlp.score(x_test, y_test))
        self.real_images = x  # all 1,797 real digits: the reference distribution for FD-digits

    @staticmethod
    def _flatten(images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, dtype=np.float32)
        return images.reshape(len(images), -1)

    def features(self, images: np.ndarray) -> np.ndarray:
        """Penultimate-layer activations [N, 64] for images [N, 16, 16] (or [N, 256]) in [-1, 1]."""
        h = self._flatten(images)
        for w, b in zip(self._mlp.coefs_[:-1], self._mlp.intercepts_[:-1]):
            h = np.maximum(h @ w + b, 0.0)
        return h

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self._mlp.predict(self._flatten(images))


@functools.lru_cache(maxsize=1)
def get_classifier() -> DigitsClassifier:
    return DigitsClassifier()
