"""The bundled reference models, trained on scikit-learn's digits by ``tools/train_reference.py``.

* ``digits-unet``: Stable-Diffusion-style ``UNet2DConditionModel`` conditioned by cross-attention on a
  learned prompt embedding per digit.
* ``digits-dit``: class-conditional ``DiTTransformer2DModel`` (adaLN-Zero, patch size 2).

Each is a diffusers pipeline-layout directory shipped inside the package, so an installed
``exporter`` finds it without any download.
"""

from __future__ import annotations

from pathlib import Path

from exporter.errors import ModelError

NAMES = ("digits-unet", "digits-dit")
_HERE = Path(__file__).resolve().parent


def path(name: str) -> Path:
    """Directory of the bundled reference model ``name`` (one of ``NAMES``)."""
    if name not in NAMES:
        raise ModelError(f"unknown reference model {name!r}; bundled ones are: {', '.join(NAMES)}")
    directory = _HERE / name
    if not directory.is_dir():
        raise ModelError(
            f"reference model {name!r} is missing from the installation ({directory}); "
            f"reinstall exporter or retrain it with tools/train_reference.py {name}"
        )
    return directory


def resolve(model: str) -> Path:
    """A ``--model`` argument: a bundled reference name or a path to a model directory."""
    if model in NAMES:
        return path(model)
    return Path(model).expanduser()


def name_of(model: str) -> str | None:
    """The reference name ``model`` stands for, given as a name or as its bundled directory; else None."""
    if model in NAMES:
        return model
    here = Path(model).expanduser().resolve()
    return next((n for n in NAMES if (_HERE / n).resolve() == here), None)
