"""Recipes: typed configuration loaded from YAML; unknown keys are errors, never skipped.

A recipe fully describes a run. Sections map onto dataclasses; the loader checks every key and
type and names the file and the key path on any mistake.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from exporter.errors import ExporterError
from exporter.reference import name_of

log = logging.getLogger(__name__)


class RecipeError(ExporterError):
    """A recipe file is unreadable or has a key or value that does not exist / does not fit."""


# TensorRT's INT4 block sizes ("Working with Quantized Types"), largest first: the quantizer
# (quant.ptq.int4_block) picks from them and lint (export.lint) enforces them.
TENSORRT_INT4_BLOCKS = (128, 64)


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
    # [h, w] of the latents the trajectories denoise (None: the model's own size): calibrate at the size
    # the graphs will run at (UNets; docs/deployment.md, "Other latent sizes")
    latent: list[int] | None = None

    def validate(self, where: str) -> None:
        from exporter.sampling.schedulers import SCHEDULERS

        if self.scheduler not in SCHEDULERS:
            raise RecipeError(f"{where}.scheduler: {self.scheduler!r} is not one of {', '.join(SCHEDULERS)}")
        if not math.isfinite(self.guidance):
            raise RecipeError(f"{where}.guidance must be a finite number")
        if self.rows is not None and (not self.rows or min(self.rows) < 0):
            raise RecipeError(f"{where}.rows must be a non-empty list of rows >= 0 (or absent: all rows)")
        if self.timestep_sampling not in ("uniform", "normal"):
            raise RecipeError(f"{where}.timestep_sampling: {self.timestep_sampling!r} is not uniform or normal")
        for name in ("trajectories", "steps", "batch_trajectories"):
            if getattr(self, name) < 1:
                raise RecipeError(f"{where}.{name} must be >= 1")
        if self.steps_per_trajectory is not None and not 1 <= self.steps_per_trajectory <= self.steps:
            raise RecipeError(f"{where}.steps_per_trajectory must lie in [1, steps]")
        if self.timestep_sampling == "normal" and (self.steps_per_trajectory or self.steps) >= self.steps:
            # the draws are distinct steps of a trajectory: drawing all of them is every step, uniform
            raise RecipeError(f"{where}.timestep_sampling: normal draws steps_per_trajectory of the {self.steps} "
                              "steps around 0.4 T; set steps_per_trajectory below steps (recording every step "
                              "is uniform sampling)")
        if self.seed < 0:  # numpy's generators take no negative seed
            raise RecipeError(f"{where}.seed must be >= 0")
        if self.latent is not None and (len(self.latent) != 2 or min(self.latent) < 1):
            raise RecipeError(f"{where}.latent must be [height, width], both >= 1")


@dataclass
class Exclusion:
    """Layers (fnmatch pattern over module names) kept in floating point, and why."""

    pattern: str
    reason: str


@dataclass
class PrecisionOverride:
    """Mixed precision: layers matching ``pattern`` use these formats instead (first match wins)."""

    pattern: str
    weights: str
    activations: str | None  # None: weight-only
    reason: str | None = None  # recorded in quantization.json next to the layers it covers


@dataclass
class QuantizationSpec:
    """How to quantize (PTQ). The defaults are the best settings measured on the reference models
    (docs/quantization.md); ``naive()`` is the baseline they are compared against."""

    weights: str = "int8"  # int8 | fp8 | int4 (blocked) | int6 (simulation only)
    activations: str | None = "int8"  # int8 | fp8 | int4 | int6 (simulation only) | None: weight-only
    weight_observer: str = "mse"  # max | mse
    act_observer: str = "mse"  # max | percentile | mse
    percentile: float = 99.99  # for act_observer: percentile
    groups: int = 4  # timestep groups: activation scales per bin of t (1: one global scale)
    split_shortcut: bool = True  # separate scales for the two halves of an up-block skip concat
    block_size: int = 128  # INT4 weights: blocks of input features (TensorRT: 128 or 64, see quant.ptq.int4_block)
    exclude: list[Exclusion] | None = None  # None: the architecture adapter's defaults (with reasons)
    precision: list[PrecisionOverride] | None = None  # None: the adapter's defaults (weight-only INT8 layers)

    @classmethod
    def naive(cls, weights: str = "int8", activations: str | None = "int8") -> QuantizationSpec:
        """Plain PTQ: min-max ranges, one global activation scale, no split shortcut."""
        return cls(weights=weights, activations=activations, weight_observer="max", act_observer="max",
                   groups=1, split_shortcut=False)

    def validate(self, where: str) -> None:
        from exporter.quant.formats import FORMATS
        from exporter.quant.observers import METHODS

        def check_format(value, key, allow_none=False):
            if value is None and allow_none:
                return
            if value not in FORMATS:
                raise RecipeError(f"{where}.{key}: unknown format {value!r}; known: {', '.join(FORMATS)}")

        check_format(self.weights, "weights")
        check_format(self.activations, "activations", allow_none=True)
        for i, override in enumerate(self.precision or ()):
            check_format(override.weights, f"precision[{i}].weights")
            check_format(override.activations, f"precision[{i}].activations", allow_none=True)
        if self.weight_observer not in ("max", "mse"):
            raise RecipeError(f"{where}.weight_observer: {self.weight_observer!r} is not max or mse")
        if self.act_observer not in METHODS:
            raise RecipeError(f"{where}.act_observer: {self.act_observer!r} is not one of {', '.join(METHODS)}")
        if not 50.0 < self.percentile <= 100.0:
            raise RecipeError(f"{where}.percentile must lie in (50, 100]")
        if self.groups < 1 or self.block_size < 1:
            raise RecipeError(f"{where}: groups and block_size must be >= 1")

    def require_exportable(self, where: str = "quantization") -> None:
        """Refuse formats that exist only as PyTorch simulation (int6): ONNX has no type to store them.
        Warn about INT4 blocks TensorRT does not take: ONNX Runtime runs them, lint fails them."""
        from exporter.quant.formats import EXPORTABLE

        used = [(where, self.weights), (where, self.activations)]
        used += [(f"{where}.precision[{i}] ({o.pattern})", f) for i, o in enumerate(self.precision or ())
                 for f in (o.weights, o.activations)]
        for key, fmt in used:
            if fmt is not None and fmt not in EXPORTABLE:
                raise RecipeError(f"{key}: {fmt} is simulation only (no ONNX type holds it) and cannot be "
                                  f"exported; exportable formats: {', '.join(EXPORTABLE)}")
        int4_weights = "int4" in {self.weights, *(o.weights for o in self.precision or ())}
        if int4_weights and self.block_size not in TENSORRT_INT4_BLOCKS:
            log.warning("%s.block_size %d: TensorRT takes INT4 weights in blocks of %s input features only; "
                        "layers whose inputs are whole blocks of %d get them, and those graphs run on ONNX "
                        "Runtime but exporter lint fails them (int4-block)", where, self.block_size,
                        " or ".join(map(str, TENSORRT_INT4_BLOCKS)), self.block_size)


@dataclass
class FinetuneSpec:
    """EfficientDM-style finetuning after PTQ (``exporter finetune``): data-free distillation from
    the FP32 model along its own DDIM trajectories, one optimizer step per denoising step."""

    method: str = "qalora"  # qalora: LoRA + activation steps train; qat: every weight + steps (baseline)
    rank: int = 8  # LoRA rank
    trajectories: int = 64  # images whose FP32 trajectories are distilled (each with its CFG twin)
    batch: int = 8  # trajectories per optimizer step
    steps: int = 20  # DDIM steps per trajectory
    guidance: float = 1.5
    lr: float = 2e-4  # LoRA (or QAT weight) learning rate, scaled per layer by its weight step size
    scale_lr: float = 2e-4  # activation step sizes, learned as log(step) (relative updates)
    seed: int = 2000
    checkpoint_every: int = 1  # save (and allow resuming) every N trajectory batches

    def validate(self, where: str) -> None:
        if self.method not in ("qalora", "qat"):
            raise RecipeError(f"{where}.method: {self.method!r} is not qalora or qat")
        for name in ("rank", "trajectories", "batch", "steps", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise RecipeError(f"{where}.{name} must be >= 1")
        # written so NaN fails too (every comparison with NaN is False)
        if not (0 < self.lr < math.inf and 0 <= self.scale_lr < math.inf):
            raise RecipeError(f"{where}: lr must be a finite number > 0 and scale_lr a finite number >= 0")
        if not math.isfinite(self.guidance):
            raise RecipeError(f"{where}.guidance must be a finite number")


HARDWARE_COMPATIBILITY = ("none", "same_compute_capability", "ampere_plus")


@dataclass
class BuildSpec:
    """How ``exporter build`` turns graphs into TensorRT engines."""

    images: list[int] = field(default_factory=lambda: [1, 4, 16])  # min, opt, max images per model call
    cfg: bool = True  # classifier-free guidance runs batched: the engines see twice the images
    latent: list[list[int]] | None = None  # [[h, w] min, [h, w] opt, [h, w] max]; None: the model's size only
    optimization_level: int = 3  # TensorRT's builder optimization level (0-5; 3 is its default)
    refittable: bool = False
    weight_streaming: bool = False
    fp8_fallback: str | None = None  # "int8": FP8 graphs become INT8 on GPUs without FP8; None: stop
    timing_cache: str | None = None  # a timing cache file to reuse across builds; None: <engines>/timing.cache
    # which GPUs the engines may run on (TensorRT's hardware compatibility level): "none" (the GPU
    # model they were built on), "same_compute_capability" (TensorRT 10.9+) or "ampere_plus";
    # the wider, the fewer tactics TensorRT may use
    hardware_compatibility: str = "none"
    # engines that later TensorRT releases run too (TensorRT's version compatibility); the engines
    # folder then carries TensorRT's lean runtime library, once, instead of one copy per engine
    version_compatible: bool = False

    def validate(self, where: str) -> None:
        if len(self.images) != 3 or not 1 <= self.images[0] <= self.images[1] <= self.images[2]:
            raise RecipeError(f"{where}.images must be [min, opt, max] with 1 <= min <= opt <= max")
        if self.latent is not None:
            if len(self.latent) != 3 or any(len(hw) != 2 or min(hw) < 1 for hw in self.latent):
                raise RecipeError(f"{where}.latent must be [[h, w], [h, w], [h, w]] (min, opt, max)")
            for axis in (0, 1):
                if not self.latent[0][axis] <= self.latent[1][axis] <= self.latent[2][axis]:
                    raise RecipeError(f"{where}.latent: min <= opt <= max must hold for height and width")
        if not 0 <= self.optimization_level <= 5:
            raise RecipeError(f"{where}.optimization_level must lie in [0, 5]")
        if self.fp8_fallback not in (None, "int8"):
            raise RecipeError(f"{where}.fp8_fallback: {self.fp8_fallback!r} is not int8 or null")
        if self.hardware_compatibility not in HARDWARE_COMPATIBILITY:
            raise RecipeError(f"{where}.hardware_compatibility: {self.hardware_compatibility!r} is not one of "
                              f"{', '.join(HARDWARE_COMPATIBILITY)}")


EXPORT_DTYPES = ("fp32", "fp16", "bf16")


@dataclass
class ExportSpec:
    """How ``exporter export`` writes the graphs (``--dtype`` overrides ``dtype``)."""

    # the type of everything not quantized: fp16 or bf16 for TensorRT (a strongly typed network runs
    # each layer in the type its graph declares), fp32 for ONNX Runtime on CPU
    dtype: str = "fp32"

    def validate(self, where: str) -> None:
        if self.dtype not in EXPORT_DTYPES:
            raise RecipeError(f"{where}.dtype: {self.dtype!r} is not one of {', '.join(EXPORT_DTYPES)}")


@dataclass
class SamplingSpec:
    """What ``exporter pipeline`` samples and compares; its flags (``--rows``, ``--steps``, ...) override
    each field. Calibration's trajectories are the ``calibration:`` section's, not these."""

    rows: list[int] = field(default_factory=lambda: list(range(10)))  # conditioning rows
    per_row: int = 8  # images per row
    steps: int | None = None  # None: the model's sampling.json, else 20
    scheduler: str | None = None  # ddim, dpm++ or euler; None: the model's, else ddim
    guidance: float | None = None  # classifier-free guidance scale (<= 1: off); None: the model's
    seed: int = 0
    cache_interval: int = 3  # DeepCache interval of the cached variant <format>-cacheN; 1: no cached variant

    def validate(self, where: str) -> None:
        from exporter.sampling.schedulers import SCHEDULERS

        if not self.rows or min(self.rows) < 0:
            raise RecipeError(f"{where}.rows must be a non-empty list of rows >= 0")
        for name in ("per_row", "steps", "cache_interval"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise RecipeError(f"{where}.{name} must be >= 1")
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise RecipeError(f"{where}.scheduler: {self.scheduler!r} is not one of {', '.join(SCHEDULERS)}")
        if self.guidance is not None and not math.isfinite(self.guidance):
            raise RecipeError(f"{where}.guidance must be a finite number")


@dataclass
class Recipe:
    model: str | None = None
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    quantization: QuantizationSpec | None = field(default_factory=QuantizationSpec)  # None: unquantized
    finetune: FinetuneSpec | None = None  # None: PTQ only
    export: ExportSpec = field(default_factory=ExportSpec)
    build: BuildSpec = field(default_factory=BuildSpec)
    sampling: SamplingSpec = field(default_factory=SamplingSpec)

    def validate(self, where: str = "recipe") -> None:
        self.calibration.validate(f"{where}.calibration")
        self.export.validate(f"{where}.export")
        self.sampling.validate(f"{where}.sampling")
        if self.finetune is not None:
            if self.quantization is None:
                raise RecipeError(f"{where}.finetune needs a quantization section (it finetunes a quantized model)")
            self.finetune.validate(f"{where}.finetune")
        self.build.validate(f"{where}.build")
        if self.quantization is not None:
            self.quantization.validate(f"{where}.quantization")


def _convert(value, hint, where: str):
    """``value`` from YAML checked against the type ``hint``; dataclasses are built recursively."""
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, where)
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        return [_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise RecipeError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def _build(cls, data, where: str):
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown}; known: {', '.join(sorted(fields))}")
    missing = sorted(f.name for f in dataclasses.fields(cls) if f.name not in data
                     and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
    if missing:
        raise RecipeError(f"{where}: missing key(s) {missing}")
    return cls(**{key: _convert(value, hints[key], f"{where}.{key}") for key, value in data.items()})


def recipe_from_dict(data: dict, where: str = "recipe") -> Recipe:
    recipe = _build(Recipe, data or {}, where)
    recipe.validate(where)
    return recipe


def quantization_from_dict(data: dict, where: str = "quantization") -> QuantizationSpec:
    """A ``QuantizationSpec`` from its dict form (as saved in manifests and summaries)."""
    spec = _build(QuantizationSpec, data, where)
    spec.validate(where)
    return spec


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
    except IsADirectoryError:
        raise RecipeError(f"{path} is a folder; --recipe takes a YAML file") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a YAML recipe (not UTF-8 text)") from None
    except OSError as e:
        raise RecipeError(f"{path}: cannot be read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return recipe_from_dict(data, where=str(path))


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


RECIPES_DIR = Path(__file__).parent / "recipes"
FORMATS = ("fp32", "fp16", "int8", "fp8", "w4a16", "w4a8", "w4a4")  # --format choices
UNQUANTIZED_FORMATS = ("fp32", "fp16")  # fp16: the FP32 model exported with FP16 float parts (export.dtype)


def bundled_recipe_path(fmt: str, model: str | None = None) -> Path:
    """The bundled recipe for a format: tuned per reference model, else the generic default."""
    if fmt not in FORMATS:
        raise RecipeError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    # a reference model by name or by its bundled folder; a user's folder never picks a recipe from inside it
    name = name_of(model) if model else None
    tuned = RECIPES_DIR / name / f"{fmt}.yaml" if name else None
    return tuned if tuned is not None and tuned.is_file() else RECIPES_DIR / "default" / f"{fmt}.yaml"


def resolve_recipe(recipe: str | Path | None, fmt: str | None, model: str | None) -> Recipe:
    """The recipe of a run: a file (``--recipe``), a bundled one (``--format``), or the defaults."""
    if recipe is not None and fmt is not None:
        raise RecipeError("give --recipe or --format, not both")
    if fmt is not None:
        return load_recipe(bundled_recipe_path(fmt, model))
    return load_recipe(recipe)
