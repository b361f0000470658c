"""Value types of the ``exporter`` command's options: what each value must be, refused by argparse
(one usage line and exit 2) before any work."""

from __future__ import annotations

import argparse
import math


def parse_rows(text: str) -> list[int]:
    """``0,1,5`` or ``0-9`` or a mix: ``0-3,7``."""
    rows: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = part.split("-")
                if int(hi) < int(lo):
                    raise argparse.ArgumentTypeError(f"invalid rows {text!r}: range {part} runs backwards")
                rows.extend(range(int(lo), int(hi) + 1))
            elif part:
                rows.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid rows {text!r}: use e.g. 0,1,2 or 0-9") from None
    if not rows:
        raise argparse.ArgumentTypeError("no rows given")
    return rows


def positive_int(text: str) -> int:
    """A count that must be at least 1 (images, steps, batch sizes, intervals, threads)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: a whole number >= 1")
    return value


def names_from(choices) -> callable:
    """An argparse type for a comma-separated list drawn from ``choices`` (the tools' --models, --formats)."""
    choices = list(choices)

    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: a comma-separated list of {', '.join(choices)}")
        return names

    return parse


def finite_float(text: str) -> float:
    """A number that is not NaN or infinite (a NaN guidance scale would silently turn guidance off)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: a finite number")
    return value


def parse_latent(text: str) -> tuple[int, int]:
    """``HxW`` (``24x32``) or one number for a square latent."""
    try:
        sizes = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        sizes = ()
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"invalid latent size {text!r}: use HxW (e.g. 24x32) or N for NxN")
    return sizes
