"""Shared fixtures: tiny random-init diffusers models saved exactly as users' models would be."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch


def save_tiny_unet(directory: Path, pipeline_layout: bool = True) -> Path:
    """A 2-level UNet2DConditionModel (random init) with a 3-row conditioning file."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from safetensors.torch import save_file

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(8, 16), cross_attention_dim=8, attention_head_dim=4, norm_num_groups=4,
    )
    model_dir = directory / "unet" if pipeline_layout else directory
    unet.save_pretrained(model_dir, safe_serialization=True)
    if pipeline_layout:
        DDIMScheduler(beta_schedule="squaredcos_cap_v2").save_config(directory / "scheduler")
    save_file({"cond": torch.randn(3, 2, 8), "uncond": torch.zeros(1, 2, 8)}, str(directory / "conditioning.safetensors"))
    return directory


def save_tiny_sdxl_unet(directory: Path) -> Path:
    """A 2-level UNet with SDXL's added conditioning (pooled text + 6 size/crop ids, text_time)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from safetensors.torch import save_file

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(8, 16), cross_attention_dim=8, attention_head_dim=4, norm_num_groups=4,
        transformer_layers_per_block=(1, 2), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=6 + 6 * 4,
    )
    unet.save_pretrained(directory / "unet", safe_serialization=True)
    DDIMScheduler(beta_schedule="squaredcos_cap_v2").save_config(directory / "scheduler")
    save_file({"cond": torch.randn(3, 2, 8), "uncond": torch.zeros(1, 2, 8), "text_embeds": torch.randn(3, 6),
               "uncond_text_embeds": torch.zeros(1, 6), "time_ids": torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]])},
              str(directory / "conditioning.safetensors"))
    return directory


def save_tiny_dit(directory: Path) -> Path:
    from diffusers import DDIMScheduler, DiTTransformer2DModel
    from safetensors.torch import save_file

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=2,
                                num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=4)
    dit.save_pretrained(directory / "transformer", safe_serialization=True)
    DDIMScheduler().save_config(directory / "scheduler")
    save_file({"class_labels": torch.arange(4), "null_class": torch.tensor([4])},
              str(directory / "conditioning.safetensors"))
    return directory


def save_tiny_unet2d(directory: Path, num_classes: int | None = None) -> Path:
    """A 2-level UNet2DModel (self-attention blocks), unconditional or class-conditional."""
    from diffusers import DDIMScheduler, UNet2DModel
    from safetensors.torch import save_file

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                       down_block_types=("AttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "AttnUpBlock2D"),
                       block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=4, num_class_embeds=num_classes)
    unet.save_pretrained(directory / "unet", safe_serialization=True)
    DDIMScheduler().save_config(directory / "scheduler")
    if num_classes:
        save_file({"class_labels": torch.arange(num_classes), "null_class": torch.tensor([0])},
                  str(directory / "conditioning.safetensors"))
    return directory


@pytest.fixture(scope="session")
def tiny_unet2d_dirs(tmp_path_factory) -> list[Path]:
    """[unconditional, class-conditional] UNet2DModel directories."""
    return [save_tiny_unet2d(tmp_path_factory.mktemp("tiny-unet2d")),
            save_tiny_unet2d(tmp_path_factory.mktemp("tiny-unet2d-cls"), num_classes=3)]


@pytest.fixture(scope="session")
def tiny_pixart_dir(tmp_path_factory) -> Path:
    from diffusers import DDIMScheduler, PixArtTransformer2DModel
    from safetensors.torch import save_file

    directory = tmp_path_factory.mktemp("tiny-pixart")
    torch.manual_seed(0)
    PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=2,
                             num_layers=2, sample_size=8, patch_size=2, cross_attention_dim=16, caption_channels=12,
                             norm_num_groups=1).save_pretrained(directory / "transformer", safe_serialization=True)
    DDIMScheduler().save_config(directory / "scheduler")
    save_file({"cond": torch.randn(3, 5, 12), "uncond": torch.zeros(1, 5, 12)}, str(directory / "conditioning.safetensors"))
    return directory


@pytest.fixture(scope="session")
def tiny_unet_dir(tmp_path_factory) -> Path:
    return save_tiny_unet(tmp_path_factory.mktemp("tiny-unet"))


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    return save_tiny_sdxl_unet(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_dit_dir(tmp_path_factory) -> Path:
    return save_tiny_dit(tmp_path_factory.mktemp("tiny-dit"))


@pytest.fixture
def run_cli():
    """Run ``python -m exporter ARGS`` in a subprocess (what a user's shell sees: exit code, stderr)."""

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "exporter", *map(str, args)], capture_output=True, text=True,
                              timeout=600, check=False)

    return run


@pytest.fixture(scope="session")
def tiny_unet_calib(tiny_unet_dir, tmp_path_factory) -> Path:
    """A small complete calibration of the tiny UNet (4 trajectories x 6 steps, CFG on)."""
    from exporter.calibrate import calibrate
    from exporter.recipe import CalibrationSpec

    out = tmp_path_factory.mktemp("tiny-unet-calib")
    calibrate(str(tiny_unet_dir), out, CalibrationSpec(trajectories=4, steps=6, batch_trajectories=4, guidance=2.0),
              progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_int8_graphs(tiny_unet_dir, tiny_unet_calib, tmp_path_factory) -> Path:
    """The tiny UNet's INT8 graphs (2 timestep groups), exported once for every test that only reads them."""
    from exporter.export import export_graphs
    from exporter.recipe import QuantizationSpec

    out = tmp_path_factory.mktemp("int8") / "graphs"
    export_graphs(str(tiny_unet_dir), out, calib=tiny_unet_calib, quantization=QuantizationSpec(groups=2),
                  progress=False)
    return out


def _gpu_missing() -> str | None:
    """Why TensorRT tests cannot run here (None when they can)."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (pip install -e '.[trt]')"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _gpu_missing()
    if reason is None:
        return
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=f"gpu test: {reason}"))
