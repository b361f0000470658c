"""How a command finds its recipe: ``--format`` / ``--recipe`` (or the bundled int8 recipe), or the
``--finetuned`` run that brings its own model, calibration and quantization."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from exporter.errors import UsageError

log = logging.getLogger("exporter")


def add_recipe_options(p: argparse.ArgumentParser) -> None:
    from exporter.recipe import FORMATS

    group = p.add_mutually_exclusive_group()
    group.add_argument("--recipe", type=Path, help="YAML recipe file")
    group.add_argument("--format", choices=FORMATS, help="use the bundled recipe for this format")


def finetuned_inputs(args) -> tuple[str, Path, object]:
    """(model, calibration, quantization spec) of ``--finetuned DIR``: the run brings its own."""
    from exporter.finetune import finetuned_source

    given = [option for option, value in (("--calib", args.calib), ("--format", args.format),
                                          ("--recipe", args.recipe)) if value is not None]
    if given:  # they would be silently replaced by the run's own
        raise UsageError(f"--finetuned brings its own calibration and quantization; leave out {', '.join(given)}")
    model, calib, quantization = finetuned_source(args.finetuned)
    return args.model or model, calib, quantization


def recipe_of(args):
    """(format, recipe) of ``--format`` / ``--recipe``; with neither, the bundled int8 recipe of the
    model (tuned for a reference model), as ``pipeline`` picks it."""
    from exporter.recipe import resolve_recipe

    fmt = args.format or ("int8" if args.recipe is None else None)
    return fmt, resolve_recipe(args.recipe, fmt, args.model)


def warn_unused_finetune(recipe, source) -> None:
    """A recipe's finetune: section is run by exporter finetune / pipeline only: say so where it is
    read and not used, since the bundled W4A8/W4A4 recipes are tuned for after finetuning."""
    if recipe.finetune is not None:
        log.warning("%s has a finetune: section, which this command does not run (PTQ only); for the finetuned "
                    "model run exporter finetune and pass --finetuned DIR, or use exporter pipeline", source)
