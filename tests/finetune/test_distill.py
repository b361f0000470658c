import dataclasses
import json
from collections import Counter

import onnx
import pytest
import torch
from safetensors.torch import load_file, save_file

from exporter.calibrate import CalibrationError
from exporter.errors import UsageError
from exporter.export import export_graphs
from exporter.finetune import FinetuneError, apply_finetune, finetune
from exporter.finetune import distill as distill_module
from exporter.models import load_model
from exporter.parity import check_parity
from exporter.quant.ptq import quantize_model
from exporter.recipe import FinetuneSpec, QuantizationSpec

QUANT = QuantizationSpec(weights="int4", activations="int8", groups=2, split_shortcut=True)
SPEC = FinetuneSpec(rank=4, trajectories=4, batch=2, steps=3, guidance=2.0, lr=1e-2, scale_lr=1e-2)


@pytest.fixture(scope="module")
def finetuned(tiny_unet_dir, tiny_unet_calib, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "run"
    record = finetune(str(tiny_unet_dir), tiny_unet_calib, QUANT, SPEC, out, progress=False)
    return out, record


def test_finetuning_trains_adapters_and_steps_and_an_interrupted_run_resumes_identically(
        finetuned, tiny_unet_dir, tiny_unet_calib, tmp_path, monkeypatch):
    out, record = finetuned
    assert record["done_batches"] == 2 and len(record["losses"]) == 2
    tensors = load_file(str(out / "finetune.safetensors"))
    assert any(k.endswith("lora_B") and v.abs().max() > 0 for k, v in tensors.items())  # B left zero
    assert any(".log_step_g" in k and v.abs().max() > 0 for k, v in tensors.items())

    real_write = distill_module.atomic_write_json

    def killed_after_first_checkpoint(path, data):
        real_write(path, data)
        raise KeyboardInterrupt

    monkeypatch.setattr(distill_module, "atomic_write_json", killed_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        finetune(str(tiny_unet_dir), tiny_unet_calib, QUANT, SPEC, tmp_path / "run", progress=False)
    assert json.loads((tmp_path / "run" / "finetune.json").read_text())["done_batches"] == 1
    monkeypatch.setattr(distill_module, "atomic_write_json", real_write)
    resumed = finetune(str(tiny_unet_dir), tiny_unet_calib, QUANT, SPEC, tmp_path / "run", progress=False)
    assert resumed["losses"] == record["losses"]
    again = load_file(str(tmp_path / "run" / "finetune.safetensors"))
    for key, value in tensors.items():
        assert (again[key] == value).all(), key

    with pytest.raises(UsageError, match="another model, calibration or recipe"):
        finetune(str(tiny_unet_dir), tiny_unet_calib, QUANT, FinetuneSpec(rank=2, trajectories=4, batch=2, steps=3),
                 tmp_path / "run", progress=False)
    (tmp_path / "run" / "finetune.safetensors").unlink()  # a record alone is still another run's
    with pytest.raises(UsageError, match="another model, calibration or recipe"):
        finetune(str(tiny_unet_dir), tiny_unet_calib, QUANT, FinetuneSpec(rank=2, trajectories=4, batch=2, steps=3),
                 tmp_path / "run", progress=False)

    # killed between the last checkpoint and its record: the checkpoint's own record says where it stands
    calls = []

    def killed_before_the_second_record(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_write(path, data)

    monkeypatch.setattr(distill_module, "atomic_write_json", killed_before_the_second_record)
    with pytest.raises(KeyboardInterrupt):
        finetune(str(tiny_unet_dir), tiny_unet_calib, QUANT, SPEC, tmp_path / "late", progress=False)
    assert json.loads((tmp_path / "late" / "finetune.json").read_text())["done_batches"] == 1
    monkeypatch.setattr(distill_module, "atomic_write_json", real_write)
    resumed = finetune(str(tiny_unet_dir), tiny_unet_calib, QUANT, SPEC, tmp_path / "late", progress=False)
    assert resumed["losses"] == record["losses"]  # the last batch not trained twice
    assert json.loads((tmp_path / "late" / "finetune.json").read_text())["done_batches"] == 2
    again = load_file(str(tmp_path / "late" / "finetune.safetensors"))
    assert all((again[key] == value).all() for key, value in tensors.items())


def test_a_damaged_finetune_folder_is_refused_in_one_line(finetuned, tiny_unet_dir, tiny_unet_calib, tmp_path):
    import shutil

    out, record = finetuned
    loaded = load_model(tiny_unet_dir)
    quantize_model(loaded, QUANT, tiny_unet_calib)

    def damaged(name, edit):
        folder = tmp_path / name
        shutil.copytree(out, folder)
        edit(folder)
        return folder

    cases = {
        "not JSON": damaged("json", lambda f: (f / "finetune.json").write_text("{oops")),
        "lacks groups": damaged("key", lambda f: (f / "finetune.json").write_text(
            json.dumps({k: v for k, v in record.items() if k != "groups"}))),
        "does not fit this version": damaged("spec", lambda f: (f / "finetune.json").write_text(
            json.dumps({**record, "finetune": {**record["finetune"], "foo": 1}}))),
        "finetune.safetensors is damaged": damaged("trunc", lambda f: (f / "finetune.safetensors").write_bytes(
            (out / "finetune.safetensors").read_bytes()[:1000])),
    }
    for message, folder in cases.items():
        with pytest.raises(FinetuneError, match=message):
            apply_finetune(loaded, folder, QUANT)
    # an optimizer moment of the wrong shape, met on resume
    tensors = load_file(str(out / "finetune.safetensors"))
    key = next(k for k in tensors if k.startswith("optimizer.") and k.endswith("exp_avg"))
    folder = damaged("adam", lambda f: save_file({**tensors, key: torch.zeros(3)}, str(f / "finetune.safetensors")))
    (folder / "finetune.json").write_text(json.dumps({**record, "done_batches": 1}))
    with pytest.raises(FinetuneError, match=f"{key} does not fit the optimizer"):
        finetune(str(tiny_unet_dir), tiny_unet_calib, QUANT, SPEC, folder, progress=False)


def test_the_finetuned_model_exports_like_ptq_and_keeps_parity(finetuned, tiny_unet_dir, tiny_unet_calib, tmp_path):
    out, _ = finetuned
    ptq = export_graphs(str(tiny_unet_dir), tmp_path / "ptq", calib=tiny_unet_calib, quantization=QUANT,
                        progress=False)
    tuned = export_graphs(str(tiny_unet_dir), tmp_path / "ft", calib=tiny_unet_calib, quantization=QUANT,
                          progress=False, finetuned=out)
    assert tuned["source"]["finetuned"] == str(out.resolve())
    changed = 0
    for a, b in zip(ptq["blocks"], tuned["blocks"]):
        for graph in a["graphs"]:
            ops = [Counter(n.op_type for n in onnx.load(str(folder / graph), load_external_data=False).graph.node)
                   for folder in (tmp_path / "ptq", tmp_path / "ft")]
            assert ops[0] == ops[1], graph  # no LoRA op: the adapters live in the quantized weights
        changed += tuned["files"][b["weights"]] != ptq["files"][a["weights"]]
    assert changed  # ... which did change
    results, _ = check_parity(tmp_path / "ft", end_to_end_check=False, write_golden=False)
    assert all(r.passed for r in results) and min(s for r in results for s, _ in r.outputs.values()) >= 40, \
        [(r.graph, r.outputs, r.runtime_outputs) for r in results if not r.passed]


def test_a_finetune_is_refused_where_it_does_not_fit(finetuned, tiny_unet_dir, tiny_unet_calib, tmp_path):
    out, _ = finetuned
    loaded = load_model(tiny_unet_dir)
    other = QuantizationSpec(weights="int4", activations="int8", groups=1)
    quantize_model(loaded, other, tiny_unet_calib)
    with pytest.raises(FinetuneError, match="other timestep groups"):
        apply_finetune(loaded, out, other)
    # same timestep groups (they come from the calibration), another format: the learned steps
    # would multiply scales they were not trained on
    fp8 = dataclasses.replace(QUANT, weights="fp8", activations="fp8")
    loaded = load_model(tiny_unet_dir)
    quantize_model(loaded, fp8, tiny_unet_calib)
    with pytest.raises(FinetuneError, match="finetuned with another quantization"):
        apply_finetune(loaded, out, fp8)
    record = json.loads((out / "finetune.json").read_text())
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "finetune.safetensors").write_bytes((out / "finetune.safetensors").read_bytes())
    (tmp_path / "partial" / "finetune.json").write_text(json.dumps({**record, "done_batches": 1}))
    with pytest.raises(FinetuneError, match="stopped after 1 of 2 batches"):
        apply_finetune(loaded, tmp_path / "partial", other)
    with pytest.raises(FinetuneError, match="not a finetune folder"):
        apply_finetune(loaded, tmp_path, other)


def test_a_diverging_finetune_stops_at_the_first_nan_and_keeps_the_last_good_checkpoint(
        finetuned, tiny_unet_dir, tiny_unet_calib, tmp_path):
    too_fast = dataclasses.replace(SPEC, lr=10.0, scale_lr=30.0)  # measured: NaN gradients in the 2nd batch
    with pytest.raises(FinetuneError, match=r"diverged in trajectory batch 2 of 2, denoising step \d \(t=\d+\): "
                       r"the (loss|gradient of \S+) .*still holds the state after batch 1 .*lr 10, scale_lr 30"):
        finetune(str(tiny_unet_dir), tiny_unet_calib, QUANT, too_fast, tmp_path / "run", progress=False)
    assert json.loads((tmp_path / "run" / "finetune.json").read_text())["done_batches"] == 1
    kept = load_file(str(tmp_path / "run" / "finetune.safetensors"))
    assert all(torch.isfinite(v).all() for v in kept.values())

    # a checkpoint holding NaN (a run that diverged before finetune stopped at it) is refused when merged
    out, _ = finetuned
    (tmp_path / "nan").mkdir()
    (tmp_path / "nan" / "finetune.json").write_bytes((out / "finetune.json").read_bytes())
    tensors = load_file(str(out / "finetune.safetensors"))
    key = min(k for k in tensors if k.endswith("lora_B"))
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, str(tmp_path / "nan" / "finetune.safetensors"))
    loaded = load_model(tiny_unet_dir)
    quantize_model(loaded, QUANT, tiny_unet_calib)
    with pytest.raises(FinetuneError, match=f"{key} holds NaN/Inf"):
        apply_finetune(loaded, tmp_path / "nan", QUANT)


def test_cli_finetunes_a_dit_and_samples_and_exports_from_the_run(tiny_dit_dir, tmp_path, run_cli):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("quantization: {weights: int4, activations: int8, groups: 1}\n"
                      "finetune: {rank: 2, trajectories: 2, batch: 2, steps: 2}\n")
    assert run_cli("calibrate", "--model", tiny_dit_dir, "--recipe", recipe, "--trajectories", "2",
                   "--out", tmp_path / "c").returncode == 0
    result = run_cli("finetune", "--model", tiny_dit_dir, "--calib", tmp_path / "c", "--recipe", recipe,
                     "--out", tmp_path / "ft")
    assert result.returncode == 0, result.stderr
    assert "export with: exporter export --finetuned" in result.stdout
    result = run_cli("sample", "--finetuned", tmp_path / "ft", "--rows", "0",  # the run brings its model
                     "--per-row", "2", "--steps", "2", "--out", tmp_path / "img")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "img" / "samples.json").read_text())["finetuned"] == str(tmp_path / "ft")
    result = run_cli("export", "--finetuned", tmp_path / "ft", "--out", tmp_path / "g")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "g" / "manifest.json").read_text())["source"]["finetuned"]
    result = run_cli("export", "--finetuned", tmp_path / "nothing", "--out", tmp_path / "g2")
    assert result.returncode == 2 and "not a finetune folder" in result.stderr
    # the run's own calibration and quantization are used; options naming others would be ignored silently
    result = run_cli("export", "--finetuned", tmp_path / "ft", "--calib", tmp_path / "c", "--format", "int8",
                     "--out", tmp_path / "g3")
    assert result.returncode == 2 and "leave out --calib, --format" in result.stderr


def test_a_step_that_makes_activation_steps_inf_or_zero_is_never_written_or_merged(finetuned, tiny_unet_dir,
                                                                                     tiny_unet_calib, tmp_path):
    # finite parameters, unusable model: exp(log step) overflows (or underflows) once it multiplies
    # the PTQ scale; the last optimizer step of a run is checked as well as the ones before
    absurd = dataclasses.replace(SPEC, trajectories=1, batch=1, steps=1, scale_lr=90.0)
    with pytest.raises(FinetuneError, match="log_step makes activation steps Inf or 0"):
        finetune(str(tiny_unet_dir), tiny_unet_calib, QUANT, absurd, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "finetune.safetensors").exists()

    out, _ = finetuned
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "finetune.json").write_bytes((out / "finetune.json").read_bytes())
    tensors = load_file(str(out / "finetune.safetensors"))
    key = min(k for k in tensors if ".log_step_g" in k)
    tensors[key].view(-1)[0] = 90.0  # finite, exp(90) * scale is Inf in float32
    save_file(tensors, str(tmp_path / "big" / "finetune.safetensors"))
    loaded = load_model(tiny_unet_dir)
    quantize_model(loaded, QUANT, tiny_unet_calib)
    with pytest.raises(FinetuneError, match="makes activation steps Inf or 0"):
        apply_finetune(loaded, tmp_path / "big", QUANT)


def test_a_refused_calibration_or_a_file_as_out_leaves_nothing_behind(tiny_unet_dir, tmp_path):
    not_calib = tmp_path / "not-calib"
    not_calib.mkdir()
    with pytest.raises(CalibrationError, match="not a calibration folder"):
        finetune(str(tiny_unet_dir), not_calib, QUANT, SPEC, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match=r"--out .*file is a file; finetuning writes a folder"):
        finetune(str(tiny_unet_dir), not_calib, QUANT, SPEC, tmp_path / "file", progress=False)
    (tmp_path / "graphs").mkdir()
    (tmp_path / "graphs" / "manifest.json").write_text("{}")  # another stage's folder: not written into
    with pytest.raises(UsageError, match="graphs exists and is not a finetune folder .*manifest.json"):
        finetune(str(tiny_unet_dir), not_calib, QUANT, SPEC, tmp_path / "graphs", progress=False)


def test_a_folder_recalibrated_since_the_finetune_is_refused(tiny_unet_dir, tmp_path):
    """The learned steps multiply the scales PTQ took from the calibration data: a run is tied to
    that data, not only to its folder's path."""
    import shutil

    from exporter.calibrate import calibrate
    from exporter.recipe import CalibrationSpec

    calib = tmp_path / "calib"
    calibration = CalibrationSpec(trajectories=4, steps=6, batch_trajectories=4, guidance=2.0)
    calibrate(str(tiny_unet_dir), calib, calibration, progress=False)
    quick = dataclasses.replace(SPEC, trajectories=2, batch=2, steps=2)
    finetune(str(tiny_unet_dir), calib, QUANT, quick, tmp_path / "run", progress=False)
    # how often it checkpoints is not what a run is: the finished run is found, nothing retrains
    again = finetune(str(tiny_unet_dir), calib, QUANT, dataclasses.replace(quick, checkpoint_every=5),
                     tmp_path / "run", progress=False)
    assert again["done_batches"] == 1

    shutil.rmtree(calib)
    calibrate(str(tiny_unet_dir), calib, dataclasses.replace(calibration, seed=7), progress=False)
    loaded = load_model(tiny_unet_dir)
    quantize_model(loaded, QUANT, calib)  # same timestep groups (same steps), other scales
    with pytest.raises(FinetuneError, match="other calibration data .* has changed since"):
        apply_finetune(loaded, tmp_path / "run", QUANT)
    with pytest.raises(UsageError, match="another model, calibration or recipe"):
        finetune(str(tiny_unet_dir), calib, QUANT, quick, tmp_path / "run", progress=False)
