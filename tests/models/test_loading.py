import json
import shutil

import pytest
import torch

from exporter import ConditioningError, ModelError
from exporter.models import load_conditioning, load_model
from tests.conftest import save_tiny_unet


def test_pipeline_dir_loads_with_its_scheduler_and_conditioning(tiny_unet_dir):
    loaded = load_model(tiny_unet_dir)
    assert loaded.adapter.class_name == "UNet2DConditionModel"
    assert loaded.model_dir == tiny_unet_dir / "unet"
    assert loaded.scheduler_config["beta_schedule"] == "squaredcos_cap_v2"
    assert loaded.default_conditioning == tiny_unet_dir / "conditioning.safetensors"
    assert not loaded.model.training
    assert loaded.adapter.sample_shape == (1, 8, 8)


def test_bare_model_dir_falls_back_to_default_scheduler(tmp_path, caplog):
    save_tiny_unet(tmp_path, pipeline_layout=False)
    loaded = load_model(tmp_path)
    assert loaded.model_dir == tmp_path
    assert loaded.scheduler_config["num_train_timesteps"] == 1000
    assert "no scheduler" in caplog.text


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_directory_names_it(tmp_path):
    with pytest.raises(ModelError, match="model directory not found: .*nope"):
        load_model(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        load_model(tmp_path)


def test_corrupted_config_names_the_file(tiny_unet_dir, tmp_path):
    d = copy_model(tiny_unet_dir, tmp_path / "m")
    (d / "unet" / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match=r"unet/config.json: corrupted model config"):
        load_model(d)


def test_truncated_weights_name_the_file(tiny_unet_dir, tmp_path):
    d = copy_model(tiny_unet_dir, tmp_path / "m")
    weights = d / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelError, match=r"diffusion_pytorch_model.safetensors: corrupted safetensors"):
        load_model(d)


def test_pickled_checkpoint_is_refused_not_loaded(tiny_unet_dir, tmp_path):
    d = copy_model(tiny_unet_dir, tmp_path / "m")
    (d / "unet" / "diffusion_pytorch_model.safetensors").rename(d / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelError, match="pickled checkpoints are not loaded"):
        load_model(d)


def test_unsupported_class_lists_supported(tiny_unet_dir, tmp_path):
    d = copy_model(tiny_unet_dir, tmp_path / "m")
    cfg = json.loads((d / "unet" / "config.json").read_text())
    cfg["_class_name"] = "AutoencoderKL"
    (d / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="'AutoencoderKL' is not supported; supported: DiTTransformer2DModel"):
        load_model(d)


def test_weights_that_do_not_fit_the_config(tiny_unet_dir, tmp_path):
    d = copy_model(tiny_unet_dir, tmp_path / "m")
    cfg = json.loads((d / "unet" / "config.json").read_text())
    cfg["block_out_channels"] = [16, 32]
    (d / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="could not load UNet2DConditionModel"):
        load_model(d)


def test_nan_or_inf_weights_are_refused_naming_the_weight(tiny_unet_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    for value in (float("nan"), float("inf")):
        d = copy_model(tiny_unet_dir, tmp_path / str(value))
        weights = d / "unet" / "diffusion_pytorch_model.safetensors"
        tensors = load_file(str(weights))
        tensors["mid_block.resnets.0.conv1.weight"].view(-1)[3] = value
        save_file(tensors, str(weights))
        with pytest.raises(ModelError, match=r"unet: the weight mid_block\.resnets\.0\.conv1\.weight holds NaN/Inf"):
            load_model(d)


def test_dit_drops_learned_sigma(tiny_dit_dir):
    loaded = load_model(tiny_dit_dir)
    cond = load_conditioning(loaded.default_conditioning, loaded.adapter)
    x = torch.randn(2, 1, 8, 8)
    eps = loaded.adapter.denoise(loaded.model, x, torch.tensor([10, 500]), cond.cond[:2])
    assert eps.shape == x.shape  # the config has out_channels=2 (epsilon + variance)
    both = loaded.model(x, torch.tensor([10, 500]), class_labels=cond.cond[:2], return_dict=False)[0]
    assert both.shape[1] == 2 and torch.equal(eps, both[:, :1])  # the epsilon half, not the variance


def test_conditioning_checks(tiny_unet_dir, tmp_path):
    from safetensors.torch import save_file

    adapter = load_model(tiny_unet_dir).adapter
    with pytest.raises(ConditioningError, match="conditioning file not found"):
        load_conditioning(tmp_path / "missing.safetensors", adapter)
    with pytest.raises(ConditioningError, match="needs conditioning: pass --cond"):
        load_conditioning(None, adapter)
    bad = tmp_path / "bad.safetensors"
    save_file({"cond": torch.randn(3, 2, 8)}, str(bad))
    with pytest.raises(ConditioningError, match=r"missing tensor\(s\) \['uncond'\]"):
        load_conditioning(bad, adapter)
    save_file({"cond": torch.randn(3, 2, 5), "uncond": torch.randn(1, 2, 5)}, str(bad))
    with pytest.raises(ConditioningError, match="5 wide but the model expects 8"):
        load_conditioning(bad, adapter)
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(ConditioningError, match="not a readable safetensors file"):
        load_conditioning(bad, adapter)


def test_class_labels_and_the_null_class_must_be_rows_of_the_class_table(tiny_dit_dir, tiny_unet2d_dirs, tmp_path):
    from safetensors.torch import save_file

    dit = load_model(tiny_dit_dir).adapter  # 4 classes; diffusers keeps row 4 for guidance's null class
    file = tmp_path / "c.safetensors"
    for labels, null, message in ((torch.zeros(0, dtype=torch.int64), 4, "'class_labels' is empty"),
                                  (torch.arange(4), 2, r"'null_class' 2 is not the model's null class \(index 4"),
                                  (torch.arange(4), 5, r"'null_class' 5 is not the model's null class \(index 4"),
                                  (torch.tensor([4]), 4, r"class labels must lie in \[0, 4\)")):
        save_file({"class_labels": labels, "null_class": torch.tensor([null])}, str(file))
        with pytest.raises(ConditioningError, match=message):
            load_conditioning(file, dit)
    unet2d = load_model(tiny_unet2d_dirs[1]).adapter  # nn.Embedding(3): no row of its own for the null class
    save_file({"class_labels": torch.arange(3), "null_class": torch.tensor([3])}, str(file))
    with pytest.raises(ConditioningError, match=r"a row of its class table, in \[0, 3\)"):
        load_conditioning(file, unet2d)
    save_file({"class_labels": torch.arange(3), "null_class": torch.tensor([2])}, str(file))
    assert load_conditioning(file, unet2d).uncond.tolist() == [2]


def test_model_options_the_conditioning_cannot_drive_are_refused_at_load():
    from exporter.models.adapters import adapter_for

    unet = {"sample_size": 8, "in_channels": 1, "cross_attention_dim": 32}
    for extra, key in (({"num_class_embeds": 10}, "num_class_embeds"),
                       ({"addition_embed_type": "text_image"}, "addition_embed_type"),
                       ({"encoder_hid_dim": 16, "encoder_hid_dim_type": "image_proj"}, "encoder_hid_dim_type")):
        with pytest.raises(ModelError, match=f"UNet2DConditionModel with .*'{key}'.* is not supported"):
            adapter_for("UNet2DConditionModel", unet | extra)
    # a text projection inside the model: the file's embeddings have its input width
    assert adapter_for("UNet2DConditionModel", unet | {"encoder_hid_dim": 16}).embedding_dim == 16
    assert adapter_for("UNet2DConditionModel", unet).embedding_dim == 32
    pixart = {"sample_size": 128, "in_channels": 4, "caption_channels": 64}
    with pytest.raises(ModelError, match="resolution/aspect-ratio conditioning"):
        adapter_for("PixArtTransformer2DModel", pixart)
    assert adapter_for("PixArtTransformer2DModel", pixart | {"use_additional_conditions": False}).embedding_dim == 64


@pytest.mark.parametrize(("defaults", "message"), [
    ('{"guidance": NaN}', "guidance must be a finite number, got nan"),  # json reads NaN; it would turn guidance off
    ('{"guidance": "7.5"}', "guidance must be a finite number, got '7.5'"),
    ('{"steps": 0}', "steps must be a positive whole number, got 0"),
    ('{"scheduler": "pndm"}', "scheduler 'pndm' is not one of ddim, dpm\\+\\+, euler"),
    ('{"guidence": 2}', r"unknown key\(s\) \['guidence'\]"),
])
def test_sampling_defaults_are_checked_when_the_model_loads(tiny_unet_dir, tmp_path, defaults, message):
    model = tmp_path / "m"
    shutil.copytree(tiny_unet_dir, model)
    (model / "sampling.json").write_text(defaults)
    with pytest.raises(ModelError, match=rf"sampling.json: {message}"):
        load_model(model)


def test_a_legacy_transformer2d_checkpoint_loads_as_the_class_its_norm_type_names(tiny_dit_dir, tmp_path):
    """The published DiT-XL-2 and PixArt-alpha configs say Transformer2DModel; diffusers picks the
    class by norm_type, and so does the loader."""
    d = copy_model(tiny_dit_dir, tmp_path / "dit")
    config_file = d / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "_class_name": "Transformer2DModel", "norm_type": "ada_norm_zero"}))
    loaded, original = load_model(d), load_model(tiny_dit_dir)
    assert loaded.adapter.class_name == "DiTTransformer2DModel"
    x, t, labels = torch.randn(2, 1, 8, 8), torch.tensor([10, 900]), torch.tensor([0, 3])
    assert torch.equal(loaded.adapter.denoise(loaded.model, x, t, labels),
                       original.adapter.denoise(original.model, x, t, labels))
    config_file.write_text(json.dumps({**config, "_class_name": "Transformer2DModel", "norm_type": "layer_norm"}))
    with pytest.raises(ModelError, match="Transformer2DModel with norm_type 'layer_norm' is not supported"):
        load_model(d)


@pytest.mark.parametrize(("class_name", "change", "message"), [
    ("UNet2DConditionModel", {"sample_size": None}, "has sample_size None: set it in config.json"),
    ("UNet2DModel", {"sample_size": [8]}, r"has sample_size \[8\]"),
    ("UNet2DConditionModel", {"in_channels": 9, "out_channels": 4}, "in_channels 9 and out_channels 4 is not supported"),
    ("UNet2DConditionModel", {"cross_attention_dim": [8, 16]}, r"'cross_attention_dim': \[8, 16\]"),
    ("DiTTransformer2DModel", {"sample_size": 9, "num_embeds_ada_norm": 4}, "sample size 9x9 with patch_size 2"),
    ("PixArtTransformer2DModel", {"sample_size": 10, "patch_size": 4, "use_additional_conditions": False},
     "sample size 10x10 with patch_size 4"),
])
def test_configs_the_tool_cannot_sample_are_refused_when_the_model_loads(class_name, change, message):
    from exporter.models import adapter_for

    base = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "cross_attention_dim": 8}
    with pytest.raises(ModelError, match=message):
        adapter_for(class_name, base | change)
    learned_sigma = adapter_for(class_name, base | {"out_channels": 8} | {k: v for k, v in change.items()
                                                                          if k == "num_embeds_ada_norm"})
    assert learned_sigma.sample_shape == (4, 8, 8)  # accepted: the noise is the output's first 4 channels
    assert learned_sigma.postprocess(torch.arange(8.0).reshape(1, 8, 1, 1)).flatten().tolist() == [0, 1, 2, 3]


def test_per_block_cross_attention_widths_of_one_value_take_that_embedding_width():
    from exporter.models import adapter_for

    config = {"sample_size": 8, "in_channels": 1, "cross_attention_dim": [8, 8]}
    assert adapter_for("UNet2DConditionModel", config).embedding_dim == 8


def test_a_unet2d_size_its_downsamplings_do_not_halve_is_refused_before_sampling(tiny_unet2d_dirs, tmp_path):
    d = copy_model(tiny_unet2d_dirs[0], tmp_path / "m")  # 2 levels: multiples of 2
    config_file = d / "unet" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "sample_size": 7}))
    loaded = load_model(d)
    with pytest.raises(ModelError, match="UNet2DModel of sample size 7x7: diffusers runs it only at sizes .*"
                                         r"\(multiples of 2\)"):
        loaded.adapter.sample_shape_at(loaded.model, None)
    assert loaded.adapter.sample_shape_at(loaded.model, (6, 10)) == (1, 6, 10)


def test_a_weights_variant_under_its_own_name_is_named_in_the_error(tiny_unet_dir, tmp_path):
    d = copy_model(tiny_unet_dir, tmp_path / "m")
    weights = d / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_name("diffusion_pytorch_model.fp16.safetensors"))
    with pytest.raises(ModelError, match="weights not found: .* found diffusion_pytorch_model.fp16.safetensors, "
                                         "a weights variant: copy or link it"):
        load_model(d)


def test_an_unconditional_model_takes_no_conditioning_file_and_no_guidance(tiny_unet2d_dirs, tmp_path):
    from exporter.sampling.pytorch import sample_pytorch

    uncond = tiny_unet2d_dirs[0]
    cond_file = tiny_unet2d_dirs[1] / "conditioning.safetensors"
    with pytest.raises(ConditioningError, match="is unconditional; it takes no conditioning file"):
        sample_pytorch(str(uncond), tmp_path / "a", cond=cond_file, per_row=1, steps=2, progress=False)
    with pytest.raises(ConditioningError, match="guidance 5: this UNet2DModel is unconditional"):
        sample_pytorch(str(uncond), tmp_path / "b", guidance=5.0, per_row=1, steps=2, progress=False)
    record = sample_pytorch(str(uncond), tmp_path / "c", guidance=1.0, per_row=1, steps=2, progress=False)
    assert record["guidance"] == 1.0 and record["conditioning"] is None


@pytest.mark.parametrize("index", ['{"weight_map": ["diffusion_pytorch_model.safetensors"]}', '{"metadata": {}}',
                                   '{"weight_map": {"a": "../elsewhere.safetensors"}}'])
def test_a_weights_index_that_is_not_one_is_refused_naming_it(tiny_unet_dir, tmp_path, index):
    d = copy_model(tiny_unet_dir, tmp_path / "m")
    (d / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(index)
    with pytest.raises(ModelError, match=r"index.json: not a weights index \(a 'weight_map' of tensor name"):
        load_model(d)
