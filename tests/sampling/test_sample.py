"""``exporter sample`` on models that are not the reference: same outputs, same guarantees."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from exporter import UsageError
from exporter.cli import main
from exporter.errors import NonFiniteError
from exporter.imageio import read_image_folder
from exporter.models.non_finite import first_non_finite_module
from exporter.sampling.pytorch import sample_pytorch


def test_cli_sample_on_random_init_unet_writes_named_images_and_grid(tiny_unet_dir, tmp_path):
    out = tmp_path / "out"
    rc = main(["-q", "sample", "--model", str(tiny_unet_dir), "--rows", "0,2", "--per-row", "3", "--steps", "4",
               "--scheduler", "ddim", "--guidance", "2.5", "--seed", "7", "--out", str(out)])
    assert rc == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["0_0.png", "0_1.png", "0_2.png", "2_0.png", "2_1.png", "2_2.png", "grid.png", "samples.json"]
    record = json.loads((out / "samples.json").read_text())
    assert record["rows"] == [0, 2] and record["guidance"] == 2.5 and record["seed"] == 7
    from PIL import Image

    with Image.open(out / "grid.png") as grid:  # 2 rows x 3 columns of 8x8 images shown 4x, 2 px gaps
        assert grid.size == (3 * (32 + 2) + 2, 2 * (32 + 2) + 2)


def test_sample_at_another_latent_size(tiny_unet_dir, tiny_dit_dir, tmp_path):
    images = run(tiny_unet_dir, tmp_path / "unet", rows=[0], latent=(6, 12))
    assert {v.shape for v in images.values()} == {(6, 12)}
    assert json.loads((tmp_path / "unet" / "samples.json").read_text())["latent"] == [6, 12]
    assert {v.shape for v in run(tiny_dit_dir, tmp_path / "dit", rows=[0], latent=(8, 8)).values()} == {(8, 8)}
    with pytest.raises(UsageError, match=r"latent 7x8: this UNet2DConditionModel takes .* multiples of 2"):
        run(tiny_unet_dir, tmp_path / "odd", latent=(7, 8))
    with pytest.raises(UsageError, match=r"latent 12x8: DiTTransformer2DModel models run at their own latent size "
                                         r"only \(8x8\)"):
        run(tiny_dit_dir, tmp_path / "wide", latent=(12, 8))


def test_no_images_no_steps_and_empty_batches_are_usage_errors(tiny_unet_dir, tmp_path):
    for option in ("per_row", "steps", "batch_size"):
        with pytest.raises(UsageError, match=f"{option} must be a positive whole number, got 0"):
            run(tiny_unet_dir, tmp_path / option, **{option: 0})
    with pytest.raises(UsageError, match="rows is empty"):
        run(tiny_unet_dir, tmp_path / "rows", rows=[])
    with pytest.raises(UsageError, match="guidance must be a finite number, got nan"):  # NaN turned guidance off
        run(tiny_unet_dir, tmp_path / "nan", guidance=float("nan"))


def run(model_dir, out, **kw):
    options = {"rows": [0, 1, 2], "per_row": 2, "steps": 3, "seed": 0, "progress": False}
    options.update(kw)
    sample_pytorch(str(model_dir), out, **options)
    return read_image_folder(out)


def test_same_seed_same_images_and_independent_of_batching_and_rows(tiny_unet_dir, tmp_path):
    a = run(tiny_unet_dir, tmp_path / "a", guidance=3.0)
    b = run(tiny_unet_dir, tmp_path / "b", guidance=3.0, batch_size=1)
    c = run(tiny_unet_dir, tmp_path / "c", guidance=3.0, rows=[2])
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    for key in c:
        np.testing.assert_array_equal(a[key], c[key])
    for name in a:
        assert (tmp_path / "a" / f"{name[0]}_{name[1]}.png").read_bytes() == \
            (tmp_path / "b" / f"{name[0]}_{name[1]}.png").read_bytes()


def test_seed_and_guidance_change_images(tiny_unet_dir, tmp_path):
    base = run(tiny_unet_dir, tmp_path / "a")
    other_seed = run(tiny_unet_dir, tmp_path / "b", seed=1)
    guided = run(tiny_unet_dir, tmp_path / "c", guidance=4.0)
    assert all(not np.array_equal(base[k], other_seed[k]) for k in base)
    assert any(not np.array_equal(base[k], guided[k]) for k in base)


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++", "euler"])
def test_every_scheduler_runs_on_unet_dit_and_pixart(tiny_unet_dir, tiny_dit_dir, tiny_pixart_dir, tmp_path,
                                                     scheduler):
    for i, model in enumerate((tiny_unet_dir, tiny_dit_dir, tiny_pixart_dir)):
        images = run(model, tmp_path / str(i), scheduler=scheduler, guidance=2.0)
        assert len(images) == 6
        assert all(np.isfinite(img).all() and img.shape == (8, 8) for img in images.values())


def test_row_outside_conditioning_is_a_usage_error(tiny_unet_dir, tmp_path):
    with pytest.raises(UsageError, match=r"row\(s\) \[3\] out of range: .*conditioning.safetensors has 3 rows"):
        run(tiny_unet_dir, tmp_path / "a", rows=[0, 3])
    assert not (tmp_path / "a").exists()  # nothing written before the check


def test_unconditional_and_class_conditional_unet2d(tiny_unet2d_dirs, tmp_path):
    plain, with_classes = tiny_unet2d_dirs
    sample_pytorch(str(plain), tmp_path / "u", per_row=2, steps=3, progress=False)
    assert sorted(read_image_folder(tmp_path / "u")) == [(0, 0), (0, 1)]  # no conditioning: one row
    images = run(with_classes, tmp_path / "c", guidance=2.0)
    assert len(images) == 6 and all(np.isfinite(v).all() for v in images.values())


def test_an_overflow_stops_sampling_at_the_first_step_naming_the_module(tiny_unet_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_unet_dir, model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    tensors["down_blocks.0.resnets.0.conv2.weight"] *= 1e25  # finite, but its output squared overflows FP32
    save_file(tensors, str(weights))
    with pytest.raises(NonFiniteError, match=r"step 0 \(t=\d+\): module down_blocks\.0\.\S+ \(\w+\) turned finite "
                       r"inputs \(largest \|value\| \S+e\+\d\d\) into \d+ NaN/Inf of \d+ values$"):
        run(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # no black images written


class _Log(torch.nn.Module):
    def forward(self, x):
        return torch.log(x)


class _Parent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner, self.log = torch.nn.Linear(2, 2), _Log()

    def forward(self, x):
        return self.log(self.inner(x) * 0 - 1)  # the child gets finite input and makes NaN


def test_the_innermost_module_that_made_the_nan_is_named_and_not_its_parents():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), _Parent())
    found = first_non_finite_module(model, lambda: model(torch.ones(3, 2)))
    assert found.startswith("module 1.log (_Log) turned finite inputs (largest |value| 1) into 6 NaN/Inf of 6 values")
    assert "holds" not in found
    assert first_non_finite_module(model, lambda: model(torch.full((3, 2), float("nan")))).startswith("no module turned")
