"""The bundled reference models: present, safe to load, and good enough to measure quality with."""

import json

import pytest
import torch
from safetensors.torch import load_file

from exporter import ModelError, reference
from exporter.cli import main
from exporter.eval import evaluate
from exporter.sampling.pytorch import sample_pytorch


def test_path_finds_both_and_rejects_unknown_names():
    assert reference.path("digits-unet").joinpath("unet", "config.json").is_file()
    assert reference.path("digits-dit").joinpath("transformer", "config.json").is_file()
    with pytest.raises(ModelError, match="unknown reference model 'digits-vae'; bundled ones are: digits-unet"):
        reference.path("digits-vae")


@pytest.mark.parametrize("name", reference.NAMES)
def test_shipped_files_are_small_safetensors_and_json(name):
    files = [p for p in reference.path(name).rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= {".json", ".safetensors"}
    assert sum(p.stat().st_size for p in files) < 12 * 2**20
    meta = json.loads((reference.path(name) / "training.json").read_text())
    assert meta["model"] == name and meta["steps"] > 0


def test_conditioning_layouts():
    unet = load_file(str(reference.path("digits-unet") / "conditioning.safetensors"))
    assert unet["cond"].shape[0] == 10 and unet["uncond"].shape == (1, *unet["cond"].shape[1:])
    config = json.loads((reference.path("digits-unet") / "unet" / "config.json").read_text())
    assert unet["cond"].shape[2] == config["cross_attention_dim"]
    assert config["down_block_types"] == ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
    assert config["up_block_types"] == ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
    assert config["layers_per_block"] == 2
    dit = load_file(str(reference.path("digits-dit") / "conditioning.safetensors"))
    assert torch.equal(dit["class_labels"], torch.arange(10)) and dit["null_class"].tolist() == [10]


@pytest.mark.parametrize("name", reference.NAMES)
def test_reference_quality_at_20_ddim_steps_with_guidance(name, tmp_path):
    """The issue's bar: class accuracy >= 90% over 10 rows x 8 images, 20 DDIM steps, guidance."""
    record = sample_pytorch(name, tmp_path, rows=list(range(10)), per_row=8, steps=20, scheduler="ddim",
                              seed=0, progress=False)
    assert record["guidance"] > 1.0  # the model's default guidance is on
    metrics = evaluate(tmp_path)
    assert metrics["accuracy"] >= 0.90, metrics
    assert metrics["fd_digits"] < 10 * metrics["fd_digits_real_floor"], metrics


def test_fp32_pipeline_on_the_reference_dit(tmp_path):
    rc = main(["-q", "pipeline", "--model", "digits-dit", "--format", "fp32", "--rows", "0-9", "--per-row", "1",
               "--steps", "8", "--out", str(tmp_path)])
    assert rc == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["metrics"]["pytorch-fp32"]["n_images"] == 10
    assert summary["metrics"]["fp32"]["psnr_mean"] is None  # runtime images identical to PyTorch's
    assert (tmp_path / "images" / "fp32" / "grid.png").is_file()
