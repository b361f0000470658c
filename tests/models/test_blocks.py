"""Running a model's blocks in order reproduces the model; the partition has the promised shape."""

import pytest
import torch

from exporter import UsageError, reference
from exporter.models import load_conditioning, load_model
from exporter.models.blocks import blocks_to_run_with_cache, partition, run_blocks

SPLITS = [(), ("down0", "up2"), ("*",)]


def max_diff_blocks_vs_model(directory, split, batch=3):
    loaded = load_model(directory)
    adapter, model = loaded.adapter, loaded.model
    cond = load_conditioning(loaded.default_conditioning, adapter)
    rows = [r % (cond.num_rows or 1) for r in range(batch)]
    c, _ = cond.batch(rows)
    torch.manual_seed(0)
    x = torch.randn(batch, *adapter.sample_shape)
    t = torch.tensor([999, 500, 3][:batch])
    with torch.no_grad():
        expected = raw_output(adapter, model, x, t, c)
        blocks = adapter.blocks(model, split=split)
        (got,) = run_blocks(blocks, adapter.named_inputs(x, t, c), ("noise_pred",))
    return (got - expected).abs().max().item(), blocks


def raw_output(adapter, model, x, t, c):
    """The model's own forward (learned-sigma channels included), called as diffusers documents."""
    if adapter.class_name == "PixArtTransformer2DModel":
        added = {"resolution": None, "aspect_ratio": None}
        return model(x, encoder_hidden_states=c, timestep=t, added_cond_kwargs=added, return_dict=False)[0]
    key = "encoder_hidden_states" if adapter.conditioning == "embeddings" else "class_labels"
    return model(x, t, return_dict=False, **{key: c})[0]


@pytest.mark.parametrize("split", [(), ("*",)])
def test_tiny_pixart_blocks_reproduce_the_model(tiny_pixart_dir, split):
    diff, blocks = max_diff_blocks_vs_model(tiny_pixart_dir, split)
    assert diff <= 1e-5
    assert [b.name for b in blocks] == ["stem", "blocks.0", "blocks.1", "head"]


@pytest.mark.parametrize("split", SPLITS)
def test_tiny_unet_and_dit_blocks_reproduce_the_model(tiny_unet_dir, tiny_dit_dir, split):
    unet_split = ("down0", "up1") if split == ("down0", "up2") else split  # the tiny UNet has 2 levels
    assert max_diff_blocks_vs_model(tiny_unet_dir, unet_split)[0] <= 1e-5
    dit_split = ("blocks.0",) if split == ("down0", "up2") else split
    assert max_diff_blocks_vs_model(tiny_dit_dir, dit_split)[0] <= 1e-5


@pytest.mark.parametrize("split", [(), ("down0", "up1"), ("*",)])
def test_unet2d_blocks_reproduce_the_model_with_and_without_classes(tiny_unet2d_dirs, split):
    stems = []
    for directory in tiny_unet2d_dirs:
        diff, blocks = max_diff_blocks_vs_model(directory, split)
        assert diff <= 1e-5
        stems.append(set(blocks[0].inputs))
    unconditional, with_classes = stems
    assert "class_labels" not in unconditional and with_classes == unconditional | {"class_labels"}


@pytest.mark.parametrize("split", SPLITS)
def test_reference_unet_blocks_reproduce_the_model(split):
    diff, _blocks = max_diff_blocks_vs_model(reference.path("digits-unet"), split)
    assert diff <= 1e-5


def test_reference_dit_blocks_reproduce_the_model():
    diff, blocks = max_diff_blocks_vs_model(reference.path("digits-dit"), ())
    assert diff <= 1e-5
    assert [b.name for b in blocks] == ["stem"] + [f"blocks.{i}" for i in range(6)] + ["head"]


def test_unet_partition_structure():
    loaded = load_model(reference.path("digits-unet"))
    blocks = loaded.adapter.blocks(loaded.model)
    assert [b.name for b in blocks] == ["stem", "down0", "down1", "down2", "mid", "up0", "up1", "up2", "head"]
    stem, down0 = blocks[0], blocks[1]
    assert stem.inputs == ("sample", "timestep") and stem.outputs == ("skip0", "temb")
    # down0 = 2 resnet+attention layers and a downsampler; all three outputs are skips for up2
    assert down0.inputs == ("skip0", "temb", "encoder_hidden_states")
    assert down0.outputs == ("skip1", "skip2", "skip3")
    up2 = blocks[7]
    assert up2.inputs == ("up1_upsample", "skip2", "temb", "encoder_hidden_states", "skip1", "skip0")
    assert blocks[-1].inputs == ("up2_2",) and blocks[-1].outputs == ("noise_pred",)

    layered = loaded.adapter.blocks(loaded.model, split=("down0", "up2"))
    names = [b.name for b in layered]
    assert names[:5] == ["stem", "down0.layer0", "down0.layer1", "down0.downsample", "down1"]
    assert names[-4:] == ["up2.layer0", "up2.layer1", "up2.layer2", "head"]
    # DeepCache's shallowest branch: the last up layer reads the deep feature and skip0 only
    assert layered[-2].inputs == ("up2_1", "skip0", "temb", "encoder_hidden_states")


def test_unknown_split_is_an_error():
    loaded = load_model(reference.path("digits-dit"))
    with pytest.raises(UsageError, match=r"cannot split unknown block\(s\) \['down9'\]"):
        loaded.adapter.blocks(loaded.model, split=("down9",))


def test_split_shortcut_sites_match_the_tensors_the_up_layers_concatenate():
    loaded = load_model(reference.path("digits-unet"))
    sites = loaded.adapter.split_shortcut_sites(loaded.model)
    # every up-block resnet changes width, so each of the 3 x 3 has a 1x1 shortcut
    assert len(sites) == 9
    # Run the layer-level units and record the up path's channel count entering each concat.
    seen = {}
    units = loaded.adapter.units(loaded.model)
    for unit in units:
        if unit.name.startswith("up") and ".layer" in unit.name:
            block, layer = unit.name[2:].split(".layer")
            key = f"up_blocks.{block}.resnets.{layer}.conv_shortcut"
            unit.module.register_forward_pre_hook(lambda m, args, key=key: seen.update({key: args[0].shape[1]}))
    x = torch.randn(2, 1, 16, 16)
    cond = torch.randn(2, 4, 32)
    with torch.no_grad():
        run_blocks(partition(units, ("noise_pred",)),
                   loaded.adapter.named_inputs(x, torch.tensor([10, 900]), cond), ("noise_pred",))
    assert sites == seen
    assert list(sites.values()) == [64, 64, 64, 64, 48, 48, 48, 32, 32]
    dit = load_model(reference.path("digits-dit"))
    assert dit.adapter.split_shortcut_sites(dit.model) == {}


def test_unet2d_split_shortcut_sites(tiny_unet2d_dirs):
    loaded = load_model(tiny_unet2d_dirs[0])
    sites = loaded.adapter.split_shortcut_sites(loaded.model)
    # up0 reads mid (16) + skip 16, then 16 + 8; up1 reads the upsampled 16 + 8, then 8 + 8
    assert sites == {"up_blocks.0.resnets.0.conv_shortcut": 16, "up_blocks.0.resnets.1.conv_shortcut": 16,
                     "up_blocks.1.resnets.0.conv_shortcut": 16, "up_blocks.1.resnets.1.conv_shortcut": 8}


def test_deepcache_shallow_path_is_found_from_the_dependencies():
    loaded = load_model(reference.path("digits-unet"))
    layered = loaded.adapter.blocks(loaded.model, split=("down0", "up2"))
    inputs = ("sample", "timestep", "encoder_hidden_states")
    assert "up2_0" in loaded.adapter.cacheable_features(layered)
    # the paper's shallowest branch: first down layer + last up layers live, everything else cached
    assert blocks_to_run_with_cache(layered, "up2_0", inputs) == \
        ["stem", "down0.layer0", "up2.layer1", "up2.layer2", "head"]
    assert blocks_to_run_with_cache(layered, "up1_upsample", inputs) == \
        ["stem", "down0.layer0", "down0.layer1", "up2.layer0", "up2.layer1", "up2.layer2", "head"]
    whole = loaded.adapter.blocks(loaded.model)
    assert loaded.adapter.cacheable_features(whole) == ["mid", "up0_upsample", "up1_upsample"]
    assert blocks_to_run_with_cache(whole, "up1_upsample", inputs) == ["stem", "down0", "up2", "head"]
    with pytest.raises(UsageError, match="no block reads 'noise_pred'"):
        blocks_to_run_with_cache(whole, "noise_pred", inputs)


def test_dit_cache_skips_the_blocks_before_the_cached_tokens():
    loaded = load_model(reference.path("digits-dit"))
    blocks = loaded.adapter.blocks(loaded.model)
    assert loaded.adapter.cacheable_features(blocks) == [f"hidden{i}" for i in range(6)]
    assert blocks_to_run_with_cache(blocks, "hidden4", ("sample", "timestep", "class_labels")) == \
        ["blocks.4", "blocks.5", "head"]


def test_default_layer_patterns_name_real_layers(tiny_unet2d_dirs, tiny_pixart_dir, tiny_sdxl_dir):
    """Every default pattern (kept in float, or weight-only INT8) has a reason and matches a
    Conv/Linear of every model of its class that has the pattern's top-level module (diffusers
    sets optional ones, like SDXL's ``add_embedding``, to None), and of at least one model."""
    from fnmatch import fnmatch

    matched: set[tuple[type, str]] = set()
    for directory in (reference.path("digits-unet"), reference.path("digits-dit"), tiny_unet2d_dirs[1],
                      tiny_pixart_dir, tiny_sdxl_dir):
        loaded = load_model(directory)
        compute = [n for n, m in loaded.model.named_modules()
                   if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.Embedding))]
        for pattern, reason in loaded.adapter.default_exclusions + loaded.adapter.default_weight_only:
            top = pattern.split(".")[0]
            if not any(c in top for c in "*?[") and getattr(loaded.model, top, None) is None:
                continue
            assert reason and any(fnmatch(n, pattern) for n in compute), (directory, pattern)
            matched.add((type(loaded.adapter), pattern))
    for adapter in {a for a, _ in matched}:
        defaults = {p for p, _ in adapter.default_exclusions + adapter.default_weight_only}
        assert defaults <= {p for a, p in matched if a is adapter}, adapter


def tiny_conditioned_unet(**changes):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    config = {"sample_size": 8, "in_channels": 1, "out_channels": 1, "layers_per_block": 1,
              "block_out_channels": (8, 16), "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
              "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": 8,
              "attention_head_dim": 4, "norm_num_groups": 4}
    return UNet2DConditionModel(**{**config, **changes}).eval()


@pytest.mark.parametrize("changes", [{"mid_block_type": "UNetMidBlock2D"},
                                     {"down_block_types": ("AttnDownBlock2D", "DownBlock2D"),
                                      "up_block_types": ("UpBlock2D", "AttnUpBlock2D")},
                                     {"out_channels": 2}])  # learned variance: [epsilon, variance]
def test_conditioned_unet_layouts_reproduce_diffusers(changes):
    # self-attention blocks and a plain mid block read no text, as diffusers decides (has_cross_attention)
    from exporter.models.adapters import adapter_for

    model = tiny_conditioned_unet(**changes)
    adapter = adapter_for("UNet2DConditionModel", dict(model.config))
    x, t, c = torch.randn(2, 1, 8, 8), torch.tensor([10, 500]), torch.randn(2, 3, 8)
    with torch.no_grad():
        expected = adapter.denoise(model, x, t, c)
        (got,) = run_blocks(adapter.blocks(model, split=("*",)), adapter.named_inputs(x, t, c), ("noise_pred",))
    assert expected.shape == x.shape  # the samplers get epsilon only
    assert (adapter.postprocess(got) - expected).abs().max() <= 1e-5


def test_unet_layouts_the_blocks_cannot_run_are_refused_by_name():
    from exporter.errors import ModelError
    from exporter.models.adapters import adapter_for

    resnet_resampling = tiny_conditioned_unet(down_block_types=("ResnetDownsampleBlock2D", "DownBlock2D"),
                                              up_block_types=("UpBlock2D", "ResnetUpsampleBlock2D"))
    with pytest.raises(ModelError, match="'block types': \\['ResnetDownsampleBlock2D', 'ResnetUpsampleBlock2D'\\]"):
        adapter_for("UNet2DConditionModel", dict(resnet_resampling.config)).blocks(resnet_resampling)
    odd = tiny_conditioned_unet(sample_size=6, block_out_channels=(8, 16, 16),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"))
    with pytest.raises(ModelError, match="sample size 6x6: .* 2 downsamplings halve exactly \\(multiples of 4\\)"):
        adapter_for("UNet2DConditionModel", dict(odd.config)).blocks(odd)
    with pytest.raises(ModelError, match="class_embed_type 'timestep' is not supported"):
        adapter_for("UNet2DModel", {"class_embed_type": "timestep", "in_channels": 1, "sample_size": 8})
