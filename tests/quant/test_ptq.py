"""PTQ on a tiny model from real (recorded) calibration data: structure, groups, and accuracy."""

import fnmatch
import json

import pytest
import torch

from exporter.calibrate import calibrate
from exporter.errors import UsageError
from exporter.models import load_conditioning, load_model
from exporter.quant.formats import FORMATS, fake_quant
from exporter.quant.ptq import INT4_FALLBACK_REASON, QuantLayer, quantize_model
from exporter.recipe import CalibrationSpec, QuantizationSpec


@pytest.fixture(scope="module")
def calib_dir(tiny_unet_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("calib")
    calibrate(str(tiny_unet_dir), out, CalibrationSpec(trajectories=4, steps=6, batch_trajectories=4, guidance=2.0),
              progress=False)
    return out


def sqnr_db(ref, x):
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - x).pow(2).mean()))


def outputs(loaded, t):
    cond = load_conditioning(loaded.default_conditioning, loaded.adapter)
    torch.manual_seed(0)
    x = torch.randn(6, *loaded.adapter.sample_shape)
    c, _ = cond.batch([0, 1, 2, 0, 1, 2])
    context = getattr(loaded.model, "_exporter_context", None)
    if context is not None:
        context.t = float(t)
    with torch.no_grad():
        return loaded.adapter.denoise(loaded.model, x, torch.full((6,), t), c)


def test_every_non_excluded_layer_is_quantized_with_split_sites(tiny_unet_dir, calib_dir):
    loaded = load_model(tiny_unet_dir)
    names = [n for n, m in loaded.model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    excluded = [n for n in names if any(fnmatch.fnmatch(n, p) for p, _ in loaded.adapter.default_exclusions)]
    sites = loaded.adapter.split_shortcut_sites(loaded.model)
    summary = quantize_model(loaded, QuantizationSpec(groups=2, split_shortcut=True), calib_dir)
    assert summary["quantized_layers"] == len(names) - len(excluded) > 0
    assert summary["split_shortcut_layers"] == sorted(sites) and sites
    assert sorted(e["layer"] for e in summary["excluded"]) == sorted(excluded)
    weight_only = [n for n in names if any(fnmatch.fnmatch(n, p) for p, _ in loaded.adapter.default_weight_only)]
    assert [o["layer"] for o in summary["precision_overrides"]] == weight_only and weight_only
    assert all(summary["formats"][n] == ["int8", None] for n in weight_only)
    ranges = summary["groups"]["ranges"]
    assert len(ranges) == 2 and ranges[0][1] < ranges[1][0]
    layer = loaded.model.get_submodule(next(iter(sites)))
    assert isinstance(layer, QuantLayer) and layer.act_scale.shape == (2, 2)  # 2 groups x 2 split parts


def test_a_record_restores_the_same_scales_and_groups_without_calibration_data(tiny_unet_dir, calib_dir):
    spec = QuantizationSpec(groups=2, split_shortcut=True, act_observer="percentile")
    measured = load_model(tiny_unet_dir)
    summary = json.loads(json.dumps(quantize_model(measured, spec, calib_dir)))  # as quantization.json holds it
    restored = load_model(tiny_unet_dir)
    again = quantize_model(restored, spec, record=summary)  # no calibration folder: nothing is measured
    assert again["groups"] == summary["groups"] and again["calibration_sha256"] == summary["calibration_sha256"]
    measured_layers = {n: m for n, m in measured.model.named_modules() if isinstance(m, QuantLayer) and m.afmt}
    restored_layers = {n: m for n, m in restored.model.named_modules() if isinstance(m, QuantLayer) and m.afmt}
    assert measured_layers.keys() == restored_layers.keys() and any(m.split for m in measured_layers.values())
    for name, layer in measured_layers.items():  # bit for bit, through JSON
        assert torch.equal(layer.act_scale, restored_layers[name].act_scale), name
    # a record without scales (written before them) or for other layers: refused, not half applied
    with pytest.raises(UsageError, match="holds no activation scales"):
        quantize_model(load_model(tiny_unet_dir), spec, record={k: v for k, v in summary.items() if k != "act_scales"})
    fewer = {**summary, "act_scales": dict(list(summary["act_scales"].items())[1:])}
    with pytest.raises(UsageError, match=r"quantizes 1 layer\(s\) differently .*only the recipe quantizes"):
        quantize_model(load_model(tiny_unet_dir), spec, record=fewer)


def test_int8_close_to_fp32_and_int4_weights_further_on_the_reference_unet(tmp_path):
    from exporter import reference

    calibrate("digits-unet", tmp_path, CalibrationSpec(trajectories=8, steps=10), progress=False)
    fp = outputs(load_model(reference.path("digits-unet")), 549)
    results = {}
    configs = {"w8a8": QuantizationSpec.naive(), "w4a8": QuantizationSpec.naive("int4"),
               "w8a4": QuantizationSpec.naive("int8", "int4")}
    for name, config in configs.items():
        loaded = load_model(reference.path("digits-unet"))
        quantize_model(loaded, config, tmp_path)
        results[name] = sqnr_db(fp, outputs(loaded, 549))
    # one denoiser call on noise at a calibrated t: INT8 is near-lossless, 4 bits cost the most
    assert results["w8a8"] > 30, results
    assert results["w8a4"] < results["w4a8"] < results["w8a8"], results


def test_quant_layer_computes_fake_quant_of_input_and_weight(tiny_unet_dir, calib_dir):
    loaded = load_model(tiny_unet_dir)
    quantize_model(loaded, QuantizationSpec.naive(), calib_dir)
    layer = next(m for m in loaded.model.modules()  # the first are the weight-only time-embedding layers
                 if isinstance(m, QuantLayer) and isinstance(m.layer, torch.nn.Linear) and m.afmt is not None)
    loaded.model._exporter_context.t = 500.0
    x = torch.randn(3, layer.layer.in_features) * 2
    w_amax = layer.layer.weight.abs().amax(dim=1)
    expected = torch.nn.functional.linear(
        fake_quant(x, layer.act_scale[0, 0], FORMATS["int8"]),
        fake_quant(layer.layer.weight, w_amax / 127, FORMATS["int8"], axis=0), layer.layer.bias)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)


def test_mixed_precision_and_recipe_exclusions_apply_per_layer(tiny_unet_dir, calib_dir):
    from exporter.recipe import Exclusion, PrecisionOverride

    loaded = load_model(tiny_unet_dir)
    spec = QuantizationSpec(weights="int8", activations="int8", groups=1, block_size=8,  # the tiny model's widths
                            exclude=[Exclusion("conv_in", "first layer"), Exclusion("conv_out", "last layer")],
                            precision=[PrecisionOverride("up_blocks.*", "int4", None)])
    summary = quantize_model(loaded, spec, calib_dir)
    assert summary["excluded"] == [{"layer": "conv_in", "reason": "first layer"},
                                   {"layer": "conv_out", "reason": "last layer"}]
    formats = summary["formats"]
    assert formats["time_embedding.linear_1"] == ["int8", "int8"]  # the recipe replaced the default exclusions
    ups = {n: f for n, f in formats.items() if n.startswith("up_blocks.")}
    int4 = [n for n, f in ups.items() if f == ["int4", None]]
    # INT4 only on Linear layers in whole blocks (TensorRT's GEMMs); convolutions get INT8 weights
    assert int4 and all(isinstance(loaded.model.get_submodule(n).layer, torch.nn.Linear) for n in int4)
    assert all(loaded.model.get_submodule(n).layer.in_features % 8 == 0 for n in int4)
    fallback = {o["layer"]: o for o in summary["precision_overrides"] if o["reason"] == INT4_FALLBACK_REASON}
    assert set(ups) - set(int4) == set(fallback) and all(ups[n] == ["int8", None] for n in fallback)
    assert any("conv" in n for n in fallback)
    layer = loaded.model.get_submodule(int4[0])
    assert layer.afmt is None and layer.weight_scale.ndim == 2  # INT4: one scale per block of inputs


@pytest.mark.parametrize("field, fragment", [("exclude", "exclude pattern 'down_block.*'"),
                                             ("precision", "precision pattern 'down_block.*'")])
def test_recipe_pattern_matching_no_layer_is_an_error(tiny_unet_dir, calib_dir, field, fragment):
    from exporter.recipe import Exclusion, PrecisionOverride

    entry = Exclusion("down_block.*", "typo") if field == "exclude" else PrecisionOverride("down_block.*", "int4", None)
    with pytest.raises(UsageError, match=fragment.replace(".", r"\.").replace("*", r"\*")):
        quantize_model(load_model(tiny_unet_dir), QuantizationSpec(**{field: [entry]}), calib_dir)


def test_a_layer_no_calibration_data_reaches_is_an_error_naming_it(tiny_unet_dir, calib_dir):
    from exporter.errors import UsageError

    loaded = load_model(tiny_unet_dir)
    loaded.model.unused_head = torch.nn.Linear(4, 4)  # defined but never called, as some models have
    with pytest.raises(UsageError, match="quantizer of layer unused_head left uncalibrated"):
        quantize_model(loaded, QuantizationSpec.naive(), calib_dir)
    layer = QuantLayer("lonely", torch.nn.Linear(4, 4), FORMATS["int8"], FORMATS["int8"], QuantizationSpec(),
                       context=None, split=None)
    layer.mode = "quant"
    with pytest.raises(UsageError, match="layer lonely: activation quantizer is uncalibrated"):
        layer(torch.randn(2, 4))


def test_calibration_of_another_architecture_is_refused(tiny_dit_dir, calib_dir):
    from exporter.errors import UsageError

    with pytest.raises(UsageError, match="recorded from a UNet2DConditionModel, not this DiTTransformer2DModel"):
        quantize_model(load_model(tiny_dit_dir), QuantizationSpec.naive(), calib_dir)


def test_scales_fp16_would_round_to_zero_stay_positive_in_the_exported_graph():
    """A dead input or an all-zero weight row has a floored range (1e-12): its scale, about 1e-14,
    is 0 in FP16, which TensorRT refuses; the exported buffers keep FP16's smallest positive value."""
    linear = torch.nn.Linear(4, 3)
    with torch.no_grad():
        linear.weight[0] = 0.0
    layer = QuantLayer("dead", linear, FORMATS["int8"], FORMATS["int8"], QuantizationSpec(), context=None, split=None)
    layer.act_scale = torch.full((1, 1), 1e-14)
    live = layer.weight_scale[1:].to(torch.float16)
    torch.nn.Module.to(layer, torch.float16)
    assert float(layer.act_scale.half()[0, 0]) == 0.0 and float(layer.weight_scale[0]) == 0.0  # what FP16 makes of them
    layer.prepare_export(0)
    assert float(layer.onnx_act_scale0) == float(layer.weight_scale[0]) == 2.0**-24
    assert torch.equal(layer.weight_scale[1:], live)  # live rows untouched
