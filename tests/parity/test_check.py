"""Parity: every graph against PyTorch with polygraphy, golden files that polygraphy's CLI replays,
and a broken graph traced to its layer."""

import json
import logging
import re
import shutil
import subprocess
import weakref
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from polygraphy.json import load_json

from exporter.errors import UsageError
from exporter.export import export_graphs
from exporter.export.manifest import ManifestError, read_manifest, sha256_file
from exporter.parity import check_parity, format_parity
from exporter.parity.check import GraphParity, self_sensitivity
from exporter.parity.runners import TorchBlockRunner
from exporter.quant.formats import FORMATS
from exporter.quant.ptq import QuantLayer
from exporter.recipe import QuantizationSpec
from exporter.runtime import backends, ort_fusion
from exporter.runtime.ort_integer import ENV


def test_int8_graphs_pass_and_polygraphy_replays_the_golden_outputs(tiny_unet_dir, tiny_unet_calib, tmp_path):
    folder = tmp_path / "g"
    export_graphs(str(tiny_unet_dir), folder, calib=tiny_unet_calib, quantization=QuantizationSpec(groups=2),
                  progress=False)
    results, e2e = check_parity(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert len(results) == sum(len(b["graphs"]) for b in manifest["blocks"])
    assert all(r.passed and r.polygraphy_passed for r in results), [(r.graph, r.outputs) for r in results]
    assert e2e["passed"] and e2e["psnr_db"] >= 30
    commands = (folder / "parity" / "COMMANDS.txt").read_text().splitlines()
    # a header, then one command per graph in the manifest's order (parity checks them group by group)
    assert commands[0].startswith("# ") and [c.split()[2] for c in commands[1:]] == [
        g for b in manifest["blocks"] for g in b["graphs"]]
    assert commands[-1].startswith("polygraphy run head.onnx --onnxrt")
    assert re.search(r"--compare snr --snr-threshold 40 --input-shapes \w+:\[\d+(,\d+)*\]$", commands[-1])  # --trt
    replay = subprocess.run(commands[-1].split(), cwd=folder, capture_output=True, text=True, timeout=300,
                            check=False)
    assert replay.returncode == 0 and "PASSED" in replay.stdout + replay.stderr
    # the replay holds every sample parity compared (several timesteps of the group), in one call
    (inputs,) = load_json(str(folder / "parity" / "mid.g0.inputs.json"))
    ((_, (golden,)),) = load_json(str(folder / "parity" / "mid.g0.golden.json"))
    samples = {len(v) for v in [*inputs.values(), *golden.values()]}
    assert len(samples) == 1 and 8 < samples.pop() <= 64
    # a near miss a mean-absolute-error check lets through: one of 16 output channels' weights 20 %
    # off (measured 34.9 dB against the 40 dB threshold; mean |error| 0.4 % of the output's rms)
    path = folder / "mid.g0.onnx"
    model = onnx.load(str(path), load_external_data=False)
    scale = next(i for i in model.graph.initializer if i.name.endswith("resnets.1.conv2.weight_scale"))
    values = numpy_helper.to_array(scale).copy()
    values[0] *= 1.2
    scale.CopyFrom(numpy_helper.from_array(values, scale.name))
    onnx.save(model, str(path))
    line = next(c for c in commands if c.startswith("polygraphy run mid.g0.onnx "))
    replay = subprocess.run(line.split(), cwd=folder, capture_output=True, text=True, timeout=300, check=False)
    assert replay.returncode != 0 and "FAILED" in replay.stdout + replay.stderr


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])  # bf16: run by ONNX's reference implementation
def test_a_wrong_weight_scale_fails_and_is_traced_to_its_layer(dtype, tiny_unet_dir, tiny_unet_calib, tmp_path,
                                                               run_cli):
    folder = tmp_path / "g"
    export_graphs(str(tiny_unet_dir), folder, calib=tiny_unet_calib, quantization=QuantizationSpec(groups=1),
                  dtype=dtype, progress=False)
    path = folder / "mid.onnx"
    model = onnx.load(str(path), load_external_data=False)
    scale = next(i for i in model.graph.initializer if i.name.endswith("resnets.1.conv2.weight_scale"))
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 1.5, scale.name))
    onnx.save(model, str(path))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["mid.onnx"] = sha256_file(path)
    (folder / "manifest.json").write_text(json.dumps(manifest))

    results, _ = check_parity(folder, end_to_end_check=False)
    failed = [r for r in results if not r.passed]
    assert [r.graph for r in failed] == ["mid.onnx"]
    assert failed[0].first_diverging_layer == "mid_block.resnets.1.conv2"
    # a real error: float-level noise alone (float32's or bfloat16's) moves PyTorch far less than the graph errs
    assert failed[0].self_sqnr > min(sqnr for sqnr, _ in failed[0].outputs.values()) + 15
    result = run_cli("-q", "parity", folder, "--blocks-only")
    assert result.returncode == 1 and "first diverging layer: mid_block.resnets.1.conv2" in result.stdout


def test_the_runtimes_rewritten_sessions_are_checked_and_a_broken_rewrite_is_caught(tiny_int8_graphs, monkeypatch):
    # what the runtime rewrites on this CPU (fused attention everywhere; integer MatMuls where the CPU
    # has int8 dot products), so the comparison covers what `exporter run` executes
    manifest = read_manifest(tiny_int8_graphs)
    backend = backends.OnnxRuntimeBackend(tiny_int8_graphs, manifest)
    expected = {}
    for graph in [g for block in manifest["blocks"] for g in block["graphs"]]:
        backend.open(graph)
        if backend.rewrites(graph):
            expected[graph] = backend.rewrites(graph)
    assert any("fused attention" in what for what in expected.values())
    results, _ = check_parity(tiny_int8_graphs, write_golden=False, end_to_end_check=False)
    assert {r.graph: r.runtime for r in results if r.runtime_outputs} == expected
    assert all(r.passed and r.polygraphy_passed for r in results), [(r.graph, r.runtime_outputs) for r in results]

    real = ort_fusion.fuse_attention

    def fused_at_another_temperature(model):  # a rewrite that computes something else than the file
        fused = real(model)
        for node in [n for n in model.graph.node if n.op_type == "MultiHeadAttention"]:
            node.attribute.append(onnx.helper.make_attribute("scale", 3.0))
        return fused

    monkeypatch.setattr(ort_fusion, "fuse_attention", fused_at_another_temperature)
    results, _ = check_parity(tiny_int8_graphs, write_golden=False, end_to_end_check=False)
    failed = [r for r in results if not r.passed]
    assert {r.graph for r in failed} == {g for g, what in expected.items() if "fused attention" in what}
    for r in failed:  # the files pass (nothing to bisect); the runtime's copies do not
        assert min(s for s, _ in r.outputs.values()) >= r.threshold > min(s for s, _ in r.runtime_outputs.values())
        assert r.first_diverging_layer is None and not r.polygraphy_passed
    assert "FAIL: the runtime's rewrite of a passing graph" in format_parity(results)


def test_without_integer_products_parity_and_its_replay_leave_out_onnx_runtimes_qdq_fusions(tiny_int8_graphs,
                                                                                              monkeypatch):
    monkeypatch.setenv(ENV, "0")  # as on a CPU without int8 dot products
    results, _ = check_parity(tiny_int8_graphs, end_to_end_check=False, blocks_to_check=["head"])
    assert [r.graph for r in results] == ["head.onnx"] and results[0].passed
    line = (tiny_int8_graphs / "parity" / "COMMANDS.txt").read_text().splitlines()[-1]
    assert line.startswith("polygraphy run head.onnx --onnxrt --graph-optimization-level ORT_ENABLE_BASIC ")
    replay = subprocess.run(line.split(), cwd=tiny_int8_graphs, capture_output=True, text=True, timeout=300,
                            check=False)
    assert replay.returncode == 0 and "PASSED" in replay.stdout + replay.stderr


def test_blocks_are_compared_at_another_latent_size(tiny_int8_graphs, tmp_path, run_cli):
    """``latent``: the recorded latents resized, every block's inputs (and so the golden files the
    replay commands read) at that size; sizes the graphs cannot take are refused before any work."""
    folder = tmp_path / "g"
    shutil.copytree(tiny_int8_graphs, folder)
    results, _ = check_parity(folder, end_to_end_check=False, latent=(10, 14))
    assert len(results) == sum(len(b["graphs"]) for b in read_manifest(folder)["blocks"])
    assert all(r.passed and r.polygraphy_passed for r in results), [(r.graph, r.outputs) for r in results]
    inputs = load_json(str(folder / "parity" / "stem.inputs.json"))[0]
    assert inputs["sample"].shape[2:] == (10, 14)
    deep = [v.shape[2:] for v in load_json(str(folder / "parity" / "up0.g0.inputs.json"))[0].values() if v.ndim == 4]
    assert deep and set(deep) == {(5, 7)}  # the tiny UNet's one downsampling: half the latent
    result = run_cli("-q", "parity", folder, "--blocks-only", "--latent", "9x8")
    assert result.returncode == 2 and "latent 9x8: these UNet2DConditionModel graphs take heights and widths that are " \
        "multiples of 2" in result.stderr


def test_a_graphs_outputs_are_released_before_the_next_graph_runs(tiny_int8_graphs, monkeypatch):
    """ONNX Runtime's output arrays are views into their session's arena and keep all of it alive
    (8.8 GiB at real size) for as long as they are referenced; parity's copies of every runner's
    outputs (335 MB per runner at real size and 64 samples) are not needed past their graph either."""
    from polygraphy.comparator import Comparator

    from exporter.parity import check

    outputs, checked = [], []
    compare, join = Comparator.run, check.joined

    def run_and_watch(runners, *args, **kwargs):
        batches = compare(runners, *args, **kwargs)
        outputs[:] = [weakref.ref(v) for call in batches[1][1] for v in call.values()]  # ONNX Runtime's
        return batches

    def join_and_watch(batches):
        run = join(batches)
        outputs.extend(weakref.ref(v) for _, (iteration,) in run for v in iteration.values())  # the copies
        return run

    def next_graph(*args, **kwargs):
        checked.append(bool(outputs) and all(ref() is None for ref in outputs))
        return check_graph_runner(*args, **kwargs)

    check_graph_runner = check.graph_runner
    monkeypatch.setattr(Comparator, "run", staticmethod(run_and_watch))
    monkeypatch.setattr(check, "joined", join_and_watch)
    monkeypatch.setattr(check, "graph_runner", next_graph)
    results, _ = check_parity(tiny_int8_graphs, blocks_to_check=["down1", "mid"], write_golden=False,
                              end_to_end_check=False)
    assert len(checked) == len(results) == 4 and checked[0] is False and all(checked[1:]), checked


def test_no_replay_writes_no_replay_files_and_the_default_reports_their_size(tiny_int8_graphs, tmp_path, run_cli):
    folder = tmp_path / "g"
    shutil.copytree(tiny_int8_graphs, folder)
    shutil.rmtree(folder / "parity", ignore_errors=True)
    result = run_cli("-q", "parity", folder, "--blocks-only", "--blocks", "stem", "--no-replay")
    assert result.returncode == 0, result.stderr
    assert not (folder / "parity").exists() and "replay files" not in result.stdout
    result = run_cli("-q", "parity", folder, "--blocks-only", "--blocks", "stem")
    assert result.returncode == 0, result.stderr
    size = sum(f.stat().st_size for f in (folder / "parity").iterdir())
    assert sorted(f.name for f in (folder / "parity").iterdir()) == [
        "COMMANDS.txt", "stem.golden.json", "stem.inputs.json", "stem_data_loader.py"]
    assert f"{folder / 'parity'}, {size / 1e6:.1f} MB in all (--no-replay skips them)" in result.stdout


def test_a_replay_larger_than_the_available_memory_is_warned_of(tiny_int8_graphs, tmp_path, monkeypatch, caplog):
    """A replay command runs all of a graph's samples in one call: its estimate (twice the graph's
    largest tensor per sample, as for parity's calls) is kept, and parity warns of a replay this
    machine could not run."""
    from exporter.cli import main
    from exporter.parity import calls

    folder = tmp_path / "g"
    shutil.copytree(tiny_int8_graphs, folder)
    results, _ = check_parity(folder, blocks_to_check=["stem"], end_to_end_check=False)
    inputs = load_json(str(folder / "parity" / "stem.inputs.json"))[0]
    samples = len(next(iter(inputs.values())))
    assert results[0].replay_bytes == calls.TENSORS_PER_SAMPLE * calls.largest_tensor_bytes(
        folder / "stem.onnx", inputs) * samples > 0
    assert "exporter parity --samples N writes replays of N samples" in (folder / "parity" / "COMMANDS.txt").read_text()
    with caplog.at_level(logging.WARNING, logger="exporter.parity.report"):
        assert main(["-q", "parity", str(folder), "--blocks-only", "--blocks", "stem"]) == 0
    assert "replay command(s)" not in caplog.text  # this machine has the memory
    monkeypatch.setattr(calls, "available_bytes", lambda: results[0].replay_bytes - 1)
    with caplog.at_level(logging.WARNING, logger="exporter.parity.report"):
        assert main(["-q", "parity", str(folder), "--blocks-only", "--blocks", "stem"]) == 0
    assert "1 replay command(s) need more memory than is available here (the largest, stem.onnx: at least " \
        in caplog.text and "exporter parity --samples N writes replays of N samples" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="exporter.parity.report"):  # no replay written, none warned of
        assert main(["-q", "parity", str(folder), "--blocks-only", "--blocks", "stem", "--no-replay"]) == 0
    assert "replay command(s)" not in caplog.text


def test_bf16_graphs_are_checked_by_the_onnx_reference_implementation(tiny_unet_dir, tiny_unet_calib, tmp_path):
    folder = tmp_path / "g"
    export_graphs(str(tiny_unet_dir), folder, calib=tiny_unet_calib, quantization=QuantizationSpec(groups=2),
                  dtype="bf16", progress=False)
    results, e2e = check_parity(folder)
    assert e2e is None  # the runtime runs bf16 graphs on TensorRT only
    assert all(r.passed and r.polygraphy_passed for r in results), [(r.graph, r.outputs) for r in results]
    assert all(r.threshold == 25.0 for r in results)
    # ONNX Runtime's CPU provider cannot run them: the replay commands are TensorRT's
    assert (folder / "parity" / "COMMANDS.txt").read_text().splitlines()[-1].startswith(
        "polygraphy run head.onnx --trt --strongly-typed")
    inputs = load_json(str(folder / "parity" / "head.inputs.json"))[0]
    assert {v.dtype for v in inputs.values()} == {torch.bfloat16}


def test_graphs_whose_layer_formats_the_recipe_no_longer_rebuilds_are_refused(tiny_unet_dir, tiny_unet_calib,
                                                                                tmp_path):
    folder = tmp_path / "g"
    export_graphs(str(tiny_unet_dir), folder, calib=tiny_unet_calib, quantization=QuantizationSpec(groups=1),
                  progress=False)
    manifest = json.loads((folder / "manifest.json").read_text())
    # what an export from before the weight-only defaults recorded: no overrides, so the rebuilt
    # fake-quant model would quantize the time-embedding layers' inputs the graphs leave in float
    manifest["quantization"]["spec"]["precision"] = []
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match=r"quantizes \d+ layer\(s\) differently .*time_emb.*re-export"):
        check_parity(folder, end_to_end_check=False)


def test_a_changed_or_missing_quantization_record_is_refused_naming_it(tiny_int8_graphs, tmp_path):
    folder = tmp_path / "g"
    shutil.copytree(tiny_int8_graphs, folder)
    record = folder / "quantization.json"
    assert read_manifest(folder)["quantization"]["record_sha256"] == sha256_file(record)
    assert "quantization.json" not in read_manifest(folder)["files"]  # not shipped: no part of the deployed size
    summary = json.loads(record.read_text())
    layer = next(iter(summary["act_scales"]))
    summary["act_scales"][layer][0][0] *= 2  # a scale edited after export: PyTorch would no longer be the graphs'
    record.write_text(json.dumps(summary))
    with pytest.raises(ManifestError, match=r"quantization.json: sha256 mismatch"):
        check_parity(folder, end_to_end_check=False)
    record.unlink()
    with pytest.raises(ManifestError, match=r"quantization.json: missing"):
        check_parity(folder, end_to_end_check=False)


def test_an_unknown_block_is_refused_before_the_model_is_loaded(tiny_int8_graphs, monkeypatch):
    import exporter.models

    def no_model(*args, **kwargs):  # at real size, loading and quantizing the model takes minutes
        raise AssertionError("the model was loaded before --blocks was checked")

    monkeypatch.setattr(exporter.models, "load_model", no_model)
    with pytest.raises(UsageError, match=r"unknown block\(s\) \['down9'\]; .* has stem, down0"):
        check_parity(tiny_int8_graphs, blocks_to_check=["down9", "stem"], end_to_end_check=False)


class _TieBlock(torch.nn.Module):
    """floor(x) + 0.5 into an INT8 quantizer of step 1: every value sits on a rounding tie that
    noise on the block's input never reaches (floor absorbs it), as a near-tie behind ONNX
    Runtime's own GroupNorm or Softmax does."""
    outputs = ("y",)

    def __init__(self):
        super().__init__()
        context = SimpleNamespace(t=0.0, group=0)
        self.q = QuantLayer("q", torch.nn.Linear(4, 4, bias=False), FORMATS["int8"], FORMATS["int8"],
                            QuantizationSpec(), context=context, split=None)
        self.q.layer.weight.data = torch.eye(4)
        self.q.weight_q = torch.eye(4)
        self.q.act_scale = torch.ones(1, 1)
        self.q.mode = "quant"

    def forward(self, x):
        return (self.q(torch.floor(x) + 0.5),)


def test_sensitivity_reaches_rounding_decisions_inside_the_block():
    block = _TieBlock()
    feed = {"x": (np.random.default_rng(1).standard_normal((8, 4)) * 10).astype(np.float32)}
    runner = TorchBlockRunner(block, [{"name": "x", "shape": [8, 4], "dtype": "float32"}], block.q.context, 0.0)
    with runner:
        out = runner.infer(feed)
    # each tie flips with the sign of its noise: a one-step error on about half of the values
    assert self_sensitivity(runner, [feed], out) < 25
    # and the hooks are gone afterwards: the block is deterministic again
    with runner:
        assert np.array_equal(runner.infer(feed)["y"], out["y"])


def test_the_table_names_the_failing_output_of_a_graph_and_not_its_passing_ones():
    failing = GraphParity("down1", "down1.g0.onnx", 0, {"skip4": (31.0, 0.1), "skip5": (55.0, 1e-3)}, 40.0, False,
                          first_diverging_layer="/layers.0/conv1/Conv", self_sqnr=70.0)
    rows = {line.split(" | ")[2]: line for line in format_parity([failing]).splitlines() if line.startswith("| down1 ")}
    assert "FAIL (first diverging layer: /layers.0/conv1/Conv" in rows["skip4"]
    assert rows["skip5"].endswith("| ok (another output of this graph fails) |")
    assert "1 below threshold: down1.g0.onnx" in format_parity([failing])


def test_sqnr_of_non_finite_outputs_is_the_worst_and_fails():
    from exporter.parity.check import sqnr_db

    reference = np.linspace(-1, 1, 64, dtype=np.float32)
    broken = reference.copy()
    broken[5] = np.nan
    assert sqnr_db(reference, broken) == sqnr_db(reference, reference * np.inf) == float("-inf")
    assert sqnr_db(reference, reference) == float("inf")
    nan_graph = GraphParity("b", "b.onnx", 0, {"y": (sqnr_db(reference, broken), np.nan)}, 40.0, False, self_sqnr=70.0)
    assert not nan_graph.passed and "| -inf dB |" in format_parity([nan_graph])
    assert "FAIL (first diverging layer" in format_parity([nan_graph])


def test_every_group_is_checked_from_whichever_shard_holds_it(tiny_unet_dir, tiny_unet_calib, tmp_path,
                                                               monkeypatch):
    # one t per trajectory, one trajectory per shard: the first shard holds one group only (before, the
    # other group's graphs were skipped with a warning and parity still passed)
    from exporter.calibrate import CalibrationData, calibrate
    from exporter.parity import check
    from exporter.recipe import CalibrationSpec

    made, alive = [], []  # the groups whose inputs were made; weak references to the last group's tensors

    def one_group_at_a_time(*args, **kwargs):  # at real size, 64 samples of one group: 3.6 GiB
        assert all(r() is None for r in alive), "the previous group's inputs are still held"
        inputs = check_group_inputs(*args, **kwargs)
        made.append(args[5])  # group_inputs(manifest, loaded, blocks, data, group_of, group, ...)
        alive[:] = [weakref.ref(v) for v in inputs["env"].values()]
        return inputs

    check_group_inputs = check.group_inputs
    monkeypatch.setattr(check, "group_inputs", one_group_at_a_time)
    loaded_shards, load_shard = [], CalibrationData.load

    def counted_load(path):
        loaded_shards.append(path.name)
        return load_shard(path)

    monkeypatch.setattr(CalibrationData, "load", staticmethod(counted_load))

    spec = CalibrationSpec(trajectories=4, steps=6, batch_trajectories=1, guidance=2.0, timestep_sampling="normal",
                           steps_per_trajectory=1)
    state = calibrate(str(tiny_unet_dir), tmp_path / "c", spec, progress=False)
    assert len(state["coverage"]) >= 2 and len(state["shards"]["shard-00000.safetensors"]["timesteps"]) == 1
    folder = tmp_path / "g"
    export_graphs(str(tiny_unet_dir), folder, calib=tmp_path / "c", quantization=QuantizationSpec(groups=2),
                  progress=False)
    loaded_shards.clear()  # calibrate and export read them too
    results, _ = check_parity(folder, end_to_end_check=False)
    manifest = read_manifest(folder)
    assert made == [0, 1]
    # each group reads only the shards holding one of its t (here each shard holds one t: each read once)
    assert sorted(loaded_shards) == sorted(state["shards"])
    assert [r.graph for r in results] == [g for b in manifest["blocks"] for g in b["graphs"]]  # the table's order
    assert {r.group for r in results} == {0, 1} and all(r.passed for r in results)
    # inputs from another calibration of the model: the scales stay the export's (quantization.json);
    # before, PyTorch was quantized again from that data, with other scales and groups than the graphs'
    results, _ = check_parity(folder, calib=tiny_unet_calib, end_to_end_check=False)
    assert sorted(r.graph for r in results) == sorted(g for b in manifest["blocks"] for g in b["graphs"])
    assert all(r.passed for r in results), [(r.graph, r.outputs) for r in results if not r.passed]
    # a calibration covering one group only: refused, not half checked
    calibrate(str(tiny_unet_dir), tmp_path / "one", CalibrationSpec(**{**spec.__dict__, "trajectories": 1}),
              progress=False)
    with pytest.raises(UsageError, match=r"holds no sample at any t of timestep group\(s\) \[\d\]"):
        check_parity(folder, calib=tmp_path / "one", end_to_end_check=False)
