"""The whole pipeline on a tiny model: every stage runs and the summary holds each variant's metrics."""

import json


def test_pipeline_runs_every_stage_and_summarises(tiny_unet_dir, tmp_path, run_cli):
    recipe = tmp_path / "w8a8.yaml"
    recipe.write_text("calibration:\n  trajectories: 4\n  steps: 6\n  batch_trajectories: 4\n  guidance: 2.0\n"
                      "quantization:\n  weights: int8\n  activations: int8\n  groups: 2\n")
    out = tmp_path / "run"
    result = run_cli("-q", "pipeline", "--model", tiny_unet_dir, "--recipe", recipe, "--rows", "0,1", "--per-row", "2",
                     "--steps", "6", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["stages"]) == {"calibrate", "export", "lint", "parity", "run", "eval"}
    assert set(summary["metrics"]) == {"pytorch-fp32", "fp32", "w8a8", "w8a8-cache3"}
    assert summary["metrics"]["fp32"]["psnr_mean"] is None or summary["metrics"]["fp32"]["psnr_mean"] > 60
    assert summary["parity"]["w8a8"]["graphs_passed"] == summary["parity"]["w8a8"]["graphs"] > 0
    assert not summary["lint_violations"]
    layers = summary["lint_layers"]
    assert layers["quantized"] > 0 and set(layers) == {"quantized", "weight-only", "float"}
    assert (f"lint: compute layers over all graphs: {layers['quantized']} quantized, {layers['weight-only']} "
            f"weight-only, {layers['float']} in float; no rule violations") in result.stdout
    assert "| w8a8-cache3 |" in result.stdout
    again = run_cli("pipeline", "--model", tiny_unet_dir, "--recipe", recipe, "--out", out)
    assert again.returncode == 2 and "earlier pipeline run" in again.stderr


def test_a_recipe_without_quantization_runs_the_fp32_pipeline_as_its_sampling_section_says(
        tiny_unet_dir, tmp_path, run_cli):
    recipe = tmp_path / "baseline.yaml"
    recipe.write_text("quantization: null\nsampling:\n  rows: [1]\n  per_row: 3\n  steps: 4\n  scheduler: euler\n"
                      "  seed: 7\n")
    out = tmp_path / "run"
    result = run_cli("-q", "pipeline", "--model", tiny_unet_dir, "--recipe", recipe, "--per-row", "2", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["format"] == "fp32" and set(summary["metrics"]) == {"pytorch-fp32", "fp32"}
    # the recipe's sampling, --per-row overriding it; the model's guidance filled in
    assert summary["sampling"] == {"rows": [1], "per_row": 2, "steps": 4, "scheduler": "euler", "seed": 7,
                                   "guidance": summary["sampling"]["guidance"], "cache_interval": 3}
    assert sorted(p.name for p in (out / "images" / "fp32").glob("*_*.png")) == ["1_0.png", "1_1.png"]
    settings = json.loads((out / "images" / "pytorch-fp32" / "samples.json").read_text())
    assert (settings["steps"], settings["scheduler"], settings["seed"]) == (4, "euler", 7)
    assert "parity skipped" in result.stdout and not summary["lint_violations"]


def test_the_fp16_format_runs_fp16_graphs_beside_the_fp32_baseline(tiny_unet_dir, tmp_path, run_cli):
    out = tmp_path / "run"
    result = run_cli("-q", "pipeline", "--model", tiny_unet_dir, "--format", "fp16", "--rows", "0", "--per-row", "2",
                     "--steps", "4", "--cache-interval", "2", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["format"] == "fp16" and set(summary["metrics"]) == {"pytorch-fp32", "fp32", "fp16", "fp16-cache2"}
    assert json.loads((out / "graphs" / "fp16" / "manifest.json").read_text())["dtype"] == "fp16"
    assert summary["metrics"]["fp16"]["psnr_mean"] > 30  # FP16 rounding only, against PyTorch FP32
    bf16 = tmp_path / "bf16.yaml"
    bf16.write_text("quantization: null\nexport:\n  dtype: bf16\n")
    result = run_cli("pipeline", "--model", tiny_unet_dir, "--recipe", bf16, "--out", tmp_path / "b")
    assert result.returncode == 2 and "no bf16 kernels" in result.stderr and not (tmp_path / "b").exists()


def test_what_the_run_stage_would_refuse_is_refused_before_calibrating(tiny_unet_dir, tmp_path, monkeypatch):
    # before: refused after calibration, export, lint and parity, and the folder then blocked a rerun
    import pytest

    from exporter.errors import UsageError
    from exporter.pipeline import run_pipeline

    out = tmp_path / "run"
    for options, message in (({"rows": [3]}, r"row\(s\) \[3\] out of range"),
                             ({"rows": [0], "steps": 1001}, "1001 denoising steps")):
        with pytest.raises(UsageError, match=message):
            run_pipeline(str(tiny_unet_dir), out, "int8", progress=False, **options)
    monkeypatch.setenv("EXPORTER_ORT_INTEGER_MATMUL", "maybe")
    with pytest.raises(UsageError, match="EXPORTER_ORT_INTEGER_MATMUL='maybe'"):
        run_pipeline(str(tiny_unet_dir), out, "int8", rows=[0], progress=False)
    assert not out.exists()  # nothing calibrated, nothing in the way of the corrected command


def test_a_folder_with_an_earlier_runs_images_or_summary_is_refused(tiny_unet_dir, tmp_path):
    # graphs/ deleted to export again, images/ kept: the new images were written among the old
    # ones and all of them scored as one run
    import pytest

    from exporter.errors import UsageError
    from exporter.pipeline import run_pipeline

    old = tmp_path / "run" / "images" / "pytorch-fp32"
    old.mkdir(parents=True)
    (old / "9_0.png").write_bytes(b"")
    with pytest.raises(UsageError, match=r"holds an earlier pipeline run \(images\)"):
        run_pipeline(str(tiny_unet_dir), tmp_path / "run", "int8", progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "summary.json").write_text("{}")
    with pytest.raises(UsageError, match=r"holds an earlier pipeline run \(summary.json\)"):
        run_pipeline(str(tiny_unet_dir), tmp_path / "other", "int8", progress=False)
