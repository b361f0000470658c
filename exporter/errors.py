"""One error root for everything a user can get wrong; the CLI prints these as one line."""

from __future__ import annotations


class ExporterError(Exception):
    """Base of every expected, user-facing error. The CLI prints ``error: <message>`` and exits 2."""


class ModelError(ExporterError):
    """A model directory is missing, incomplete, corrupted or of an unsupported class."""


class ConditioningError(ExporterError):
    """A conditioning file is missing, corrupted, or does not fit the model."""


class ImageFolderError(ExporterError):
    """A folder of generated images is missing, empty, or not named ``<row>_<k>.png``."""


class UsageError(ExporterError):
    """Options that do not fit together (a row the conditioning lacks, an unknown scheduler, ...)."""


class NonFiniteError(ExporterError):
    """A model call produced NaN or Inf (FP16 overflow, a broken scale): the run stops at the first
    such step and names where it began (the block of a graph or engine, the module of a PyTorch
    model), instead of writing black images."""
