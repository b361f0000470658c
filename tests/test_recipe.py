"""Recipes: typed, strict (every unknown key or bad value is an error naming it), bundled per format."""

import logging

import pytest

from exporter import reference
from exporter.quant.formats import get_format
from exporter.recipe import (
    FORMATS,
    RECIPES_DIR,
    UNQUANTIZED_FORMATS,
    Exclusion,
    PrecisionOverride,
    QuantizationSpec,
    RecipeError,
    bundled_recipe_path,
    load_recipe,
    recipe_from_dict,
    resolve_recipe,
)


def test_quantization_section_builds_typed_objects():
    recipe = recipe_from_dict({"quantization": {
        "weights": "int4", "activations": None, "groups": 2,
        "exclude": [{"pattern": "conv_in", "reason": "first layer"}],
        "precision": [{"pattern": "up_blocks.2.*", "weights": "int8", "activations": "int8"}]}})
    q = recipe.quantization
    assert q.activations is None and q.groups == 2
    assert q.exclude == [Exclusion("conv_in", "first layer")]
    assert q.precision == [PrecisionOverride("up_blocks.2.*", "int8", "int8")]
    assert recipe_from_dict({"quantization": None}).quantization is None


@pytest.mark.parametrize("section, fragment", [
    ({"weigths": "int8"}, "recipe.quantization: unknown key(s) ['weigths']"),
    ({"weights": "int3"}, "recipe.quantization.weights: unknown format 'int3'"),
    ({"act_observer": "entropy"}, "recipe.quantization.act_observer"),
    ({"groups": 0}, "groups and block_size must be >= 1"),
    ({"groups": "4"}, "recipe.quantization.groups: expected int"),
    ({"exclude": [{"pattern": "conv_in"}]}, "recipe.quantization.exclude[0]: missing key(s) ['reason']"),
    ({"precision": [{"pattern": "x", "weights": "int8", "activations": "fp4"}]},
     "recipe.quantization.precision[0].activations: unknown format 'fp4'"),
])
def test_mistakes_name_the_key(section, fragment):
    with pytest.raises(RecipeError) as error:
        recipe_from_dict({"quantization": section})
    assert fragment in str(error.value)


def test_every_bundled_recipe_loads_and_format_picks_the_tuned_one(tmp_path):
    files = sorted(RECIPES_DIR.glob("*/*.yaml"))
    assert {f.stem for f in files if f.parent.name == "default"} == set(FORMATS)
    for path in files:
        load_recipe(path)
    for model in ("digits-unet", "digits-dit"):
        for fmt in FORMATS:
            path = bundled_recipe_path(fmt, model)
            assert path.is_file()
            if fmt not in UNQUANTIZED_FORMATS:
                assert path.parent.name == model  # tuned per reference model, exclusions listed
                assert load_recipe(path).quantization.exclude
    assert bundled_recipe_path("int8", "/some/model/dir").parent.name == "default"
    # the bundled folder picks its tuned recipe; a user's folder never a recipe from inside itself
    assert bundled_recipe_path("int8", str(reference.path("digits-dit"))).parent.name == "digits-dit"
    user_model = tmp_path / "model"
    (user_model / "int8.yaml").parent.mkdir()
    (user_model / "int8.yaml").write_text("quantization: {}\n")
    assert bundled_recipe_path("int8", str(user_model)) == RECIPES_DIR / "default" / "int8.yaml"
    assert resolve_recipe(None, "fp32", "digits-unet").quantization is None
    with pytest.raises(RecipeError, match="unknown format 'int2'"):
        bundled_recipe_path("int2")
    with pytest.raises(RecipeError, match="not both"):
        resolve_recipe(RECIPES_DIR / "default" / "int8.yaml", "int8", None)


def test_naive_is_the_baseline_and_the_defaults_are_not():
    naive, default = QuantizationSpec.naive(), QuantizationSpec()
    assert (naive.groups, naive.split_shortcut, naive.act_observer, naive.weight_observer) == (1, False, "max", "max")
    assert default != naive


@pytest.mark.parametrize("model", ["digits-unet", "digits-dit"])
def test_reference_recipes_list_the_adapter_defaults_and_fit_the_model(model):
    from exporter import reference
    from exporter.models import load_model
    from exporter.quant.ptq import INT4_FALLBACK_REASON, plan_layers

    loaded = load_model(reference.path(model))
    defaults = plan_layers(loaded.model, loaded.adapter, QuantizationSpec())
    assert defaults[1] and defaults[2]  # layers kept in float, layers weight-only INT8
    for fmt in (f for f in FORMATS if f not in UNQUANTIZED_FORMATS):
        spec = load_recipe(bundled_recipe_path(fmt, model)).quantization
        plan, excluded, overridden = plan_layers(loaded.model, loaded.adapter, spec)  # raises on a pattern matching nothing
        # the bundled recipes spell out the adapter's defaults that apply to the model (so a reader
        # sees every decision): the same layers in float and weight-only INT8, for the same reasons
        assert {(e.pattern, e.reason) for e in spec.exclude} <= set(loaded.adapter.default_exclusions), fmt
        assert {(o.pattern, o.reason) for o in spec.precision} <= set(loaded.adapter.default_weight_only), fmt
        # plus, in the INT4 formats, INT8 weights where TensorRT cannot run INT4 (with that reason)
        fallback = [o for o in overridden if o["reason"] == INT4_FALLBACK_REASON]
        assert excluded == defaults[1] and [o for o in overridden if o not in fallback] == defaults[2], fmt
        assert all(plan[o["layer"]] == (get_format("int8"), None) for o in overridden if o not in fallback)
        assert bool(fallback) == (spec.weights == "int4" and model == "digits-unet"), fmt  # the DiT: all Linear
        assert all(plan[o["layer"]][0] == get_format("int8") for o in fallback)


def test_build_section_is_typed_and_checked():
    from exporter.recipe import recipe_from_dict

    spec = recipe_from_dict({"build": {"images": [1, 2, 8], "latent": [[8, 8], [16, 16], [32, 32]],
                                       "fp8_fallback": "int8", "hardware_compatibility": "ampere_plus"}}).build
    assert spec.images == [1, 2, 8] and spec.cfg and spec.fp8_fallback == "int8"
    assert spec.hardware_compatibility == "ampere_plus" and recipe_from_dict({}).build.hardware_compatibility == "none"
    assert recipe_from_dict({"build": {"version_compatible": True}}).build.version_compatible
    assert not recipe_from_dict({}).build.version_compatible
    for bad, message in (({"images": [4, 2, 1]}, "build.images must be"),
                         ({"latent": [[8, 8], [4, 4], [16, 16]]}, "min <= opt <= max"),
                         ({"fp8_fallback": "fp16"}, "is not int8 or null"),
                         ({"hardware_compatibility": "ampere"}, "is not one of none, same_compute_capability"),
                         ({"version_compatible": "yes"}, r"build.version_compatible: expected bool, got 'yes'"),
                         ({"profile": 1}, r"unknown key\(s\) \['profile'\]")):
        with pytest.raises(RecipeError, match=message):
            recipe_from_dict({"build": bad})


def test_finetune_section_is_typed_checked_and_needs_quantization():
    from exporter.recipe import recipe_from_dict

    spec = recipe_from_dict({"finetune": {"rank": 4, "trajectories": 16}}).finetune
    assert spec.method == "qalora" and spec.rank == 4 and spec.batch == 8
    assert recipe_from_dict({}).finetune is None  # PTQ only unless asked
    for bad, message in (({"finetune": {"method": "lora"}}, "is not qalora or qat"),
                         ({"finetune": {"rank": 0}}, "rank must be >= 1"),
                         ({"finetune": {"lr": float("nan")}}, "lr must be a finite number > 0"),
                         ({"finetune": {"lr": float("inf")}}, "lr must be a finite number > 0"),
                         ({"finetune": {"scale_lr": float("nan")}}, "scale_lr a finite number >= 0"),
                         ({"finetune": {"guidance": float("nan")}}, "finetune.guidance must be a finite number"),
                         ({"finetune": {"guidance": float("inf")}}, "finetune.guidance must be a finite number"),
                         ({"quantization": None, "finetune": {}}, "needs a quantization section")):
        with pytest.raises(RecipeError, match=message):
            recipe_from_dict(bad)


def test_calibration_values_are_checked_where_the_recipe_is_read():
    from exporter.recipe import recipe_from_dict

    assert recipe_from_dict({"calibration": {"scheduler": "euler", "rows": [0, 3]}}).calibration.rows == [0, 3]
    for bad, message in (({"scheduler": "ddmi"}, r"r.yaml.calibration.scheduler: 'ddmi' is not one of ddim"),
                         ({"rows": [-1]}, r"r.yaml.calibration.rows must be"),
                         ({"rows": []}, r"r.yaml.calibration.rows must be")):
        with pytest.raises(RecipeError, match=message):
            recipe_from_dict({"calibration": bad}, "r.yaml")


def test_sampling_section_is_typed_and_checked():
    from exporter.recipe import SamplingSpec, recipe_from_dict

    assert recipe_from_dict({}).sampling == SamplingSpec(rows=list(range(10)), per_row=8, seed=0, cache_interval=3)
    spec = recipe_from_dict({"sampling": {"rows": [2], "guidance": 3, "scheduler": "dpm++"}}).sampling
    assert (spec.rows, spec.guidance, spec.scheduler, spec.steps) == ([2], 3.0, "dpm++", None)
    for bad, message in (({"scheduler": "ddmi"}, r"r.yaml.sampling.scheduler: 'ddmi' is not one of ddim"),
                         ({"rows": []}, r"r.yaml.sampling.rows must be"),
                         ({"cache_interval": 0}, r"r.yaml.sampling.cache_interval must be >= 1"),
                         ({"guidance": float("nan")}, r"r.yaml.sampling.guidance must be a finite number"),
                         ({"cache": 3}, r"r.yaml.sampling: unknown key\(s\) \['cache'\]")):
        with pytest.raises(RecipeError, match=message):
            recipe_from_dict({"sampling": bad}, "r.yaml")


def test_a_recipe_path_that_is_not_a_yaml_file_is_refused_naming_it(tmp_path):
    (tmp_path / "bin.yaml").write_bytes(bytes(range(200, 256)))
    with pytest.raises(RecipeError, match=r"bin.yaml: not a YAML recipe \(not UTF-8 text\)"):
        load_recipe(tmp_path / "bin.yaml")
    with pytest.raises(RecipeError, match="is a folder; --recipe takes a YAML file"):
        load_recipe(tmp_path)


def test_an_int4_block_size_tensorrt_does_not_take_is_warned_about_at_export(caplog):
    from exporter.recipe import QuantizationSpec

    with caplog.at_level(logging.WARNING, logger="exporter.recipe"):
        QuantizationSpec(weights="int4", activations=None, block_size=128).require_exportable()
        QuantizationSpec(weights="int8", block_size=32).require_exportable()  # no INT4 weights: no blocks
        assert not caplog.records
        QuantizationSpec(weights="int4", activations="int8", block_size=32).require_exportable()
    assert len(caplog.records) == 1
    assert "quantization.block_size 32: TensorRT takes INT4 weights in blocks of 128 or 64 input features only" \
        in caplog.text and "exporter lint fails them (int4-block)" in caplog.text
