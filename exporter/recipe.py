"""Recipes: typed configuration loaded from YAML; unknown keys are errors, never skipped.

A recipe fully describes a run. Sections map onto dataclasses; the loader checks every key and
type and names the file and the key path on any mistake.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from exporter.errors import ExporterError


class RecipeError(ExporterError):
    """A recipe file is unreadable or has a key or value that does not exist / does not fit."""


@dataclass
class CalibrationSpec:
    """Which block inputs to record, along which denoising trajectories."""

    rows: list[int] | None = None  # conditioning rows (None: all), cycled over trajectories
    trajectories: int = 64  # images generated (each adds its CFG null-conditioning twin)
    steps: int = 20
    scheduler: str = "ddim"
    guidance: float = 1.5
    seed: int = 1000  # distinct from the default evaluation seed 0: calibrate on other noise
    timestep_sampling: str = "uniform"  # "uniform" (Q-Diffusion) or "normal" (PTQ4DM, centred at 0.4 T)
    steps_per_trajectory: int | None = None  # recorded steps per trajectory (None: every step)
    batch_trajectories: int = 8  # trajectories per batch: one shard each, the unit of resuming
    split: list[str] = field(default_factory=list)  # blocks recorded layer by layer ("*": all)

    def validate(self, where: str) -> None:
        if self.timestep_sampling not in ("uniform", "normal"):
            raise RecipeError(f"{where}.timestep_sampling: {self.timestep_sampling!r} is not uniform or normal")
        for name in ("trajectories", "steps", "batch_trajectories"):
            if getattr(self, name) < 1:
                raise RecipeError(f"{where}.{name} must be >= 1")
        if self.steps_per_trajectory is not None and not 1 <= self.steps_per_trajectory <= self.steps:
            raise RecipeError(f"{where}.steps_per_trajectory must lie in [1, steps]")


@dataclass
class Recipe:
    model: str | None = None
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)

    def validate(self, where: str = "recipe") -> None:
        self.calibration.validate(f"{where}.calibration")


def _build(cls, data, where: str):
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown}; known: {', '.join(sorted(fields))}")
    values = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            values[key] = _build(hint, value, f"{where}.{key}")
        else:
            values[key] = _check_type(value, hint, f"{where}.{key}")
    return cls(**values)


def _check_type(value, hint, where: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check_type(value, inner, where)
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        return [_check_type(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise RecipeError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def recipe_from_dict(data: dict, where: str = "recipe") -> Recipe:
    recipe = _build(Recipe, data or {}, where)
    recipe.validate(where)
    return recipe


def load_recipe(path: str | Path | None) -> Recipe:
    """Read a YAML recipe (None: all defaults)."""
    if path is None:
        return recipe_from_dict({})
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RecipeError(f"recipe not found: {path}") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return recipe_from_dict(data, where=str(path))


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)
