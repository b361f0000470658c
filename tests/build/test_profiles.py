import pytest

from exporter.build.profiles import block_profiles
from exporter.errors import UsageError
from exporter.export import read_manifest
from exporter.export.manifest import check_latent
from exporter.recipe import BuildSpec


def test_batch_follows_images_and_cfg_and_spatial_axes_follow_the_latent(tiny_int8_graphs):
    manifest = read_manifest(tiny_int8_graphs)
    profiles = block_profiles(manifest, BuildSpec(images=[1, 4, 16]))
    stem = profiles["stem"]
    assert stem["sample"] == [(2, 1, 8, 8), (8, 1, 8, 8), (32, 1, 8, 8)]  # CFG doubles the images
    assert stem["timestep"] == [(2,), (8,), (32,)]
    attention = profiles["down0.layer0"]
    assert attention["encoder_hidden_states"] == [(2, 2, 8), (8, 2, 8), (32, 2, 8)]  # sequence and width static
    assert attention["temb"] == [(2, 32), (8, 32), (32, 32)]

    profiles = block_profiles(manifest, BuildSpec(images=[1, 1, 2], cfg=False, latent=[[8, 8], [16, 16], [32, 24]]))
    deep = next(b for b in manifest["blocks"] if any(t["trace_shape"][-1] == 4 for t in b["inputs"]))
    name = next(t["name"] for t in deep["inputs"] if t["trace_shape"][-1] == 4)  # a 2x downsampled feature
    channels = next(t["trace_shape"][1] for t in deep["inputs"] if t["name"] == name)
    assert profiles[deep["name"]][name] == [(1, channels, 4, 4), (1, channels, 8, 8), (2, channels, 16, 12)]


def test_a_latent_the_blocks_cannot_take_and_old_manifests_are_errors(tiny_int8_graphs):
    manifest = read_manifest(tiny_int8_graphs)
    with pytest.raises(UsageError, match="does not divide"):
        block_profiles(manifest, BuildSpec(latent=[[8, 8], [9, 9], [16, 16]]))
    for block in manifest["blocks"]:
        for tensor in block["inputs"]:
            del tensor["trace_shape"]
    with pytest.raises(UsageError, match="no traced shape for .*: re-export the graphs with this version"):
        block_profiles(manifest, BuildSpec())


def test_transformer_graphs_keep_their_resolution(tiny_dit_dir, tmp_path):
    from exporter.export import export_graphs

    manifest = export_graphs(str(tiny_dit_dir), tmp_path / "g", progress=False)
    profiles = block_profiles(manifest, BuildSpec())  # its own size is fine
    assert profiles.keys() == {block["name"] for block in manifest["blocks"]}
    first = manifest["blocks"][0]["name"]
    assert [shape[2:] for shape in profiles[first]["sample"]] == [(8, 8)] * 3  # min, opt, max: 8x8 only
    with pytest.raises(UsageError, match="exported for latent"):
        block_profiles(manifest, BuildSpec(latent=[[8, 8], [16, 16], [16, 16]]))


def test_engines_run_latents_inside_their_profile_only(tiny_int8_graphs):
    manifest = read_manifest(tiny_int8_graphs)
    manifest.update(kind="tensorrt", tensorrt={"latent": [[8, 8], [8, 8], [16, 12]]})
    check_latent(manifest, (8, 8))
    check_latent(manifest, (16, 10))
    with pytest.raises(UsageError, match=r"latent 16x14 lies outside the engines' optimization profile "
                                         r"\(8x8 to 16x12\); rebuild with a wider build.latent"):
        check_latent(manifest, (16, 14))
    with pytest.raises(UsageError, match="multiples of 2"):  # inside the profile, but no UNet can take it
        check_latent(manifest, (9, 9))
    # a build.latent that leaves out the model's own size: its own size is refused too
    outside = dict(manifest, tensorrt={"latent": [[12, 12], [16, 16], [16, 16]]})
    with pytest.raises(UsageError, match=r"latent 8x8 lies outside the engines' optimization profile"):
        check_latent(outside, (8, 8))
    for block in manifest["blocks"]:
        for tensor in block["inputs"]:
            del tensor["trace_shape"]
    check_latent(manifest, (8, 8))  # the model's own size needs no traced shapes
    with pytest.raises(UsageError, match="re-export the graphs with this version of the exporter to run other"):
        check_latent(manifest, (16, 8))
