"""Calibration recording: what is recorded, that it is consistent with the model, and resuming."""

import json
import re

import pytest
import torch

from exporter.calibrate import CalibrationData, CalibrationError, calibrate
from exporter.cli import main
from exporter.errors import UsageError
from exporter.models import load_model
from exporter.recipe import CalibrationSpec, RecipeError

SPEC = CalibrationSpec(trajectories=3, steps=4, batch_trajectories=2, guidance=2.0, seed=5)


def test_records_every_block_input_with_t_for_both_cfg_halves(tiny_unet_dir, tmp_path):
    state = calibrate(str(tiny_unet_dir), tmp_path, SPEC, progress=False)
    assert sorted(state["shards"]) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert state["complete"] and len(state["coverage"]) == 4
    # 3 trajectories x 4 steps x 2 (conditional + null) samples per timestep
    assert all(count == 6 for count in state["coverage"].values())
    data = CalibrationData(tmp_path)
    first = next(iter(data))
    assert first["t"].shape == (16,) and first["null_condition"].sum() == 8
    assert set(data.state["tensors"]) <= set(first)
    assert first["sample"].shape == (16, 1, 8, 8) and first["encoder_hidden_states"].shape == (16, 2, 8)


def test_recorded_inputs_reproduce_the_recorded_downstream_tensors(tiny_unet_dir, tmp_path):
    calibrate(str(tiny_unet_dir), tmp_path, SPEC, progress=False)
    shards = list(CalibrationData(tmp_path))
    loaded = load_model(tiny_unet_dir)
    blocks = {b.name: b for b in loaded.adapter.blocks(loaded.model)}
    data = shards[1]
    checked = 0
    with torch.no_grad():
        for block in blocks.values():  # each block's outputs that a later block reads are recorded as inputs
            outputs = block(*(data[n] for n in block.inputs))
            for name, tensor in zip(block.outputs, outputs):
                if name in data:
                    torch.testing.assert_close(tensor, data[name], rtol=0, atol=1e-6, msg=f"{block.name}: {name}")
                    checked += 1
    assert "mid" in blocks["up0"].inputs and checked >= len(blocks) - 1  # every block but the head feeds another


def test_interrupted_run_resumes_and_keeps_verified_shards(tiny_unet_dir, tmp_path):
    calibrate(str(tiny_unet_dir), tmp_path, SPEC, progress=False)
    first = (tmp_path / "shard-00000.safetensors").stat().st_mtime_ns
    second_bytes = (tmp_path / "shard-00001.safetensors").read_bytes()
    (tmp_path / "shard-00001.safetensors").unlink()  # as if interrupted before the last shard
    state = json.loads((tmp_path / "spec.json").read_text())
    state["complete"] = False
    (tmp_path / "spec.json").write_text(json.dumps(state))
    with pytest.raises(CalibrationError, match="incomplete"):
        CalibrationData(tmp_path)
    calibrate(str(tiny_unet_dir), tmp_path, SPEC, progress=False)
    assert (tmp_path / "shard-00000.safetensors").stat().st_mtime_ns == first  # kept, not recomputed
    assert (tmp_path / "shard-00001.safetensors").read_bytes() == second_bytes  # deterministic
    CalibrationData(tmp_path)


def test_a_run_killed_in_its_first_shard_resumes(tiny_unet_dir, tmp_path, monkeypatch):
    from exporter.calibrate import record

    calibrate(str(tiny_unet_dir), tmp_path / "clean", SPEC, progress=False)
    real = record.atomic_write_bytes

    def killed_while_writing(path, data):  # what kill -9 leaves: the temporary file, half written
        (path.parent / f".{path.name}.k3x9.tmp").write_bytes(data[: len(data) // 2])
        raise KeyboardInterrupt

    for run, drop_spec in (("run", False), ("old", True)):  # old: killed before spec.json, or an older version
        monkeypatch.setattr(record, "atomic_write_bytes", killed_while_writing)
        with pytest.raises(KeyboardInterrupt):
            calibrate(str(tiny_unet_dir), tmp_path / run, SPEC, progress=False)
        monkeypatch.setattr(record, "atomic_write_bytes", real)
        assert sorted(p.name for p in (tmp_path / run).iterdir()) == [".shard-00000.safetensors.k3x9.tmp",
                                                                       "spec.json"]
        if drop_spec:
            (tmp_path / run / "spec.json").unlink()
        calibrate(str(tiny_unet_dir), tmp_path / run, SPEC, progress=False)
        names = sorted(p.name for p in (tmp_path / run).iterdir())
        assert names == sorted(p.name for p in (tmp_path / "clean").iterdir())  # no debris left
        assert all((tmp_path / run / n).read_bytes() == (tmp_path / "clean" / n).read_bytes() for n in names
                   if n.startswith("shard-"))
        CalibrationData(tmp_path / run)


def test_other_spec_in_same_folder_and_tampered_shard_are_refused(tiny_unet_dir, tmp_path):
    calibrate(str(tiny_unet_dir), tmp_path, SPEC, progress=False)
    with pytest.raises(CalibrationError, match="another model or spec"):
        calibrate(str(tiny_unet_dir), tmp_path, CalibrationSpec(trajectories=1, steps=2), progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text("{}")  # e.g. a graphs folder
    with pytest.raises(CalibrationError, match="other exists and is not a calibration folder"):
        calibrate(str(tiny_unet_dir), tmp_path / "other", SPEC, progress=False)
    shard = tmp_path / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4] + b"\x00\x00\x00\x00")
    with pytest.raises(CalibrationError, match="shard-00000.safetensors: missing or modified"):
        CalibrationData(tmp_path)
    state = json.loads((tmp_path / "spec.json").read_text())
    (tmp_path / "spec.json").write_text(json.dumps({**state, "coverage": {}}))
    with pytest.raises(CalibrationError, match="covers no timesteps"):
        CalibrationData(tmp_path)


def test_resuming_with_other_conditioning_rows_is_refused(tiny_unet_dir, tmp_path):
    from safetensors.torch import save_file

    cond = tmp_path / "cond.safetensors"
    save_file({"cond": torch.randn(3, 2, 8), "uncond": torch.zeros(1, 2, 8)}, str(cond))
    out = tmp_path / "calib"
    calibrate(str(tiny_unet_dir), out, SPEC, cond=cond, progress=False)
    (out / "shard-00001.safetensors").unlink()  # interrupted
    state = json.loads((out / "spec.json").read_text())
    (out / "spec.json").write_text(json.dumps({**state, "complete": False}))
    save_file({"cond": 100 * torch.randn(3, 2, 8), "uncond": torch.zeros(1, 2, 8)}, str(cond))  # same name
    with pytest.raises(CalibrationError, match="recorded with another conditioning file"):
        calibrate(str(tiny_unet_dir), out, SPEC, cond=cond, progress=False)
    del state["conditioning_sha256"]  # a folder from before the hash: its path decides
    (out / "spec.json").write_text(json.dumps({**state, "complete": False}))
    assert calibrate(str(tiny_unet_dir), out, SPEC, cond=cond, progress=False)["complete"]
    with pytest.raises(CalibrationError, match="another conditioning file"):
        calibrate(str(tiny_unet_dir), out, SPEC, progress=False)  # the model's own conditioning


def test_calibration_at_another_latent_size_and_the_graphs_checked_there(tiny_unet_dir, tiny_dit_dir, tmp_path):
    """``latent``: trajectories at the size the graphs will run at; export and per-block parity
    take the recorded inputs as they are, so parity runs at that size too."""
    from polygraphy.json import load_json

    from exporter.export import export_graphs
    from exporter.parity import check_parity
    from exporter.recipe import QuantizationSpec

    spec = CalibrationSpec(trajectories=2, steps=4, batch_trajectories=2, guidance=2.0, latent=[10, 14])
    calibrate(str(tiny_unet_dir), tmp_path / "calib", spec, progress=False)
    first = next(iter(CalibrationData(tmp_path / "calib")))
    assert first["sample"].shape[2:] == (10, 14) and first["skip3"].shape[2:] == (5, 7)  # after the downsampling
    export_graphs(str(tiny_unet_dir), tmp_path / "g", calib=tmp_path / "calib",
                  quantization=QuantizationSpec(groups=2), progress=False)
    results, _ = check_parity(tmp_path / "g", end_to_end_check=False, blocks_to_check=["stem", "mid"])
    assert results and all(r.passed for r in results), [(r.graph, r.outputs) for r in results]
    assert load_json(str(tmp_path / "g" / "parity" / "stem.inputs.json"))[0]["sample"].shape[2:] == (10, 14)
    # a folder written before latent existed (at the model's own size) lacks the key, and still resumes
    native = CalibrationSpec(trajectories=1, steps=2)
    calibrate(str(tiny_unet_dir), tmp_path / "old", native, progress=False)
    state = json.loads((tmp_path / "old" / "spec.json").read_text())
    del state["spec"]["latent"]
    (tmp_path / "old" / "spec.json").write_text(json.dumps(state))
    assert calibrate(str(tiny_unet_dir), tmp_path / "old", native, progress=False)["complete"]
    for model, latent, message in ((tiny_unet_dir, [9, 8], "multiples of 2"), (tiny_dit_dir, [8, 10], "own latent")):
        with pytest.raises(UsageError, match=message):
            calibrate(str(model), tmp_path / "refused", CalibrationSpec(trajectories=1, steps=2, latent=latent),
                      progress=False)
    assert not list((tmp_path / "refused").glob("shard-*"))  # refused before any work
    with pytest.raises(RecipeError, match="latent must be \\[height, width\\]"):
        CalibrationSpec(latent=[8]).validate("calibration")


def test_normal_timestep_sampling_centres_on_0_4_T(tiny_dit_dir, tmp_path):
    spec = CalibrationSpec(trajectories=12, steps=20, steps_per_trajectory=3, timestep_sampling="normal",
                           batch_trajectories=12, guidance=1.0)
    state = calibrate(str(tiny_dit_dir), tmp_path, spec, progress=False)
    counts = {int(t): n for t, n in state["coverage"].items()}
    assert sum(counts.values()) == 36  # no CFG: one sample per recorded step
    assert len(counts) > 3  # uniform sampling of 3 steps per trajectory would record only 3 distinct t
    mean_t = sum(t * n for t, n in counts.items()) / 36
    assert 250 < mean_t < 600  # PTQ4DM: N(400, 400^2) clamped to [0, 999]


def test_normal_timestep_sampling_has_ptq4dms_shape_not_uniforms():
    """N(0.4 T, (0.4 T)^2) clamped: the draws below 0 (16 %) pile on the last step, and the steps
    near t = 400 are drawn about twice as often as those near 850; uniform draws give neither."""
    from collections import Counter

    from exporter.calibrate.record import recorded_steps

    timesteps = list(range(950, -1, -50))  # DDIM's 20 steps of 1000
    spec = CalibrationSpec(trajectories=400, steps=20, steps_per_trajectory=3, timestep_sampling="normal")
    counts = Counter(timesteps[i] for trajectory in range(400) for i in recorded_steps(spec, timesteps, trajectory))
    assert sum(counts.values()) == 1200  # 3 distinct steps per trajectory
    assert counts[0] / 400 > 0.35  # uniform: 3 of 20 steps, 0.15 (measured: 0.46)
    assert counts[350] + counts[400] + counts[450] > 1.5 * (counts[800] + counts[850] + counts[900])  # 199 vs 98


def test_cli_calibrate_with_recipe_and_unknown_key(tiny_unet_dir, tmp_path, run_cli, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("calibration:\n  trajectories: 2\n  steps: 3\n  batch_trajectories: 2\n")
    assert main(["-q", "calibrate", "--model", str(tiny_unet_dir), "--recipe", str(recipe),
                 "--out", str(tmp_path / "c")]) == 0
    # 2 trajectories x 3 steps, each with its CFG null-conditioning twin
    assert re.search(r"recorded 12 samples of \d+ tensors over 3 timesteps \(t \d+ to \d+, 4 samples each\)",
                     capsys.readouterr().out)
    assert json.loads((tmp_path / "c" / "spec.json").read_text())["spec"]["trajectories"] == 2
    recipe.write_text("calibration:\n  trajectorys: 2\n")
    result = run_cli("calibrate", "--model", tiny_unet_dir, "--recipe", recipe, "--out", tmp_path / "d")
    assert result.returncode == 2 and "unknown key(s) ['trajectorys']" in result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(RecipeError, match="timestep_sampling"):
        CalibrationSpec(timestep_sampling="log").validate("x")
    # drawing every step of a trajectory records each once: uniform sampling under PTQ4DM's name
    for every in (None, 20):
        with pytest.raises(RecipeError, match="set steps_per_trajectory below steps"):
            CalibrationSpec(timestep_sampling="normal", steps=20, steps_per_trajectory=every).validate("x")
    CalibrationSpec(timestep_sampling="normal", steps=20, steps_per_trajectory=19).validate("x")
    with pytest.raises(RecipeError, match=r"x.seed must be >= 0"):
        CalibrationSpec(seed=-1).validate("x")


def test_nan_in_recorded_activations_names_the_tensor(tiny_unet_dir, tmp_path):
    loaded = load_model(tiny_unet_dir)
    with torch.no_grad():
        loaded.model.down_blocks[0].resnets[0].conv1.weight *= 1e25  # finite (NaN weights fail at load), overflows
    broken = tmp_path / "broken"
    loaded.model.save_pretrained(broken / "unet", safe_serialization=True)
    (broken / "conditioning.safetensors").write_bytes((tiny_unet_dir / "conditioning.safetensors").read_bytes())
    with pytest.raises(CalibrationError, match=r"NaN/Inf in tensor 'skip1' at t=\d+: the FP model diverged \(module "
                       r"down_blocks\.0\.resnets\.0\.norm2 \(GroupNorm\) turned finite inputs"):
        calibrate(str(broken), tmp_path / "c", SPEC, progress=False)
    assert not list((tmp_path / "c").glob("shard-*"))  # nothing half-written


PEAK_RSS = """
import resource, sys
from exporter.calibrate import calibrate
from exporter.recipe import CalibrationSpec
calibrate("digits-unet", sys.argv[1], CalibrationSpec(trajectories=int(sys.argv[2]), steps=10, batch_trajectories=8),
          progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
"""


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_trajectory_count(tmp_path):
    import subprocess
    import sys

    peaks = {}
    for n in (16, 64):
        out = tmp_path / str(n)
        result = subprocess.run([sys.executable, "-c", PEAK_RSS, str(out), str(n)], capture_output=True, text=True,
                                timeout=600, check=True)
        peaks[n] = int(result.stdout.split()[-1]) / 1024  # MiB
    shard_mib = (tmp_path / "16" / "shard-00000.safetensors").stat().st_size / 2**20
    # Held in memory, the 48 extra trajectories would add 6 shards (~225 MiB). Streamed, the peak
    # only moves by allocator noise (measured: 16 -> 638, 24 -> 639, 48 -> 666, 72 -> 672 MiB).
    assert peaks[64] - peaks[16] < 2 * shard_mib, (peaks, shard_mib)


def test_data_of_another_config_is_refused_where_it_is_used(tiny_unet_dir, tiny_unet_calib, tmp_path):
    # same class, other architecture: before, a shape error or a KeyError deep in PTQ
    import shutil

    from exporter.quant.ptq import quantize_model
    from exporter.recipe import QuantizationSpec

    other = tmp_path / "other"
    shutil.copytree(tiny_unet_dir, other)
    config = json.loads((other / "unet" / "config.json").read_text())
    (other / "unet" / "config.json").write_text(json.dumps({**config, "attention_head_dim": 2}))
    with pytest.raises(UsageError, match=r"recorded from a UNet2DConditionModel of another config "
                                         r"\(attention_head_dim 4 there, 2 here\); calibrate this model"):
        quantize_model(load_model(other), QuantizationSpec(), tiny_unet_calib)
    quantize_model(load_model(tiny_unet_dir), QuantizationSpec(), tiny_unet_calib)  # its own model


def test_other_weights_under_the_same_path_do_not_resume(tiny_unet_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_unet_dir, model)
    out = tmp_path / "calib"
    calibrate(str(model), out, SPEC, progress=False)
    (out / "shard-00001.safetensors").unlink()  # interrupted
    state = json.loads((out / "spec.json").read_text())
    (out / "spec.json").write_text(json.dumps({**state, "complete": False}))
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({n: 3 * t for n, t in load_file(str(weights)).items()}, str(weights))  # retrained, same path
    with pytest.raises(CalibrationError, match="recorded from other weights than .* has now"):
        calibrate(str(model), out, SPEC, progress=False)


def test_the_same_weights_elsewhere_resume_and_another_model_is_refused(tiny_unet_dir, tmp_path):
    # e.g. the bundled reference model of another checkout or install, whose path differs (refused before)
    import shutil

    out = tmp_path / "calib"
    calibrate(str(tiny_unet_dir), out, SPEC, progress=False)
    (out / "shard-00001.safetensors").unlink()  # interrupted
    state = json.loads((out / "spec.json").read_text())
    (out / "spec.json").write_text(json.dumps({**state, "complete": False}))
    kept = (out / "shard-00000.safetensors").stat().st_mtime_ns
    moved = tmp_path / "moved"
    shutil.copytree(tiny_unet_dir, moved)
    resumed = calibrate(str(moved), out, SPEC, progress=False)
    assert (out / "shard-00000.safetensors").stat().st_mtime_ns == kept  # resumed, not recorded again
    assert resumed["complete"] and resumed["model"] == str(moved) and sorted(resumed["shards"]) == sorted(
        state["shards"])
    # a folder from before the config and weights were recorded: the path still decides
    (out / "spec.json").write_text(json.dumps({k: v for k, v in resumed.items()
                                               if k not in ("model_config", "weights_sha256")}))
    with pytest.raises(CalibrationError, match="another model or spec"):
        calibrate(str(tiny_unet_dir), out, SPEC, progress=False)


def test_a_first_run_that_recorded_nothing_does_not_block_the_next(tiny_unet_dir, tmp_path, monkeypatch):
    from exporter.calibrate import record

    out = tmp_path / "calib"
    with pytest.raises(UsageError, match="1001 denoising steps"):  # refused before anything is written
        calibrate(str(tiny_unet_dir), out, CalibrationSpec(steps=1001), progress=False)
    assert not out.exists() or not any(out.iterdir())

    def diverged(*args):
        raise CalibrationError("NaN/Inf in tensor 'sample'")

    monkeypatch.setattr(record, "_record_batch", diverged)
    with pytest.raises(CalibrationError, match="NaN/Inf"):
        calibrate(str(tiny_unet_dir), out, SPEC, progress=False)
    assert json.loads((out / "spec.json").read_text())["shards"] == {}
    monkeypatch.undo()
    other = CalibrationSpec(trajectories=1, steps=2, seed=5)  # another spec: nothing recorded to mix with
    assert calibrate(str(tiny_unet_dir), out, other, progress=False)["complete"]
