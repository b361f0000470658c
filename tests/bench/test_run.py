"""The DeepCache benchmark's arithmetic (timings themselves are never asserted)."""

from pathlib import Path

from exporter.bench import ideal_speedup


def test_ideal_speedup_is_amdahl_over_full_and_cached_steps():
    blocks = {"stem": 1.0, "down": 3.0, "mid": 4.0, "up": 1.0, "head": 1.0}
    # 20 steps, 7 full (10 s each) and 13 cached running stem + up + head (3 s each)
    assert abs(ideal_speedup(blocks, ["stem", "up", "head"], 20, 7) - 200 / (70 + 39)) < 1e-12
    assert ideal_speedup(blocks, list(blocks), 20, 7) == 1.0


def test_plan_has_every_kind_of_variant_once():
    from exporter.bench.variants import plan_variants

    names = [v.name for v in plan_variants(True, ["int8", "fp8"], [2, 5], ["uniform", "quadratic"], True)]
    assert names == ["pytorch-fp32", "deepcache-2", "deepcache-5", "ort-fp32", "ort-int8", "ort-fp8",
                     "ort-fp32-cache2", "ort-fp32-cache2-quadratic", "ort-fp32-cache5", "ort-fp32-cache5-quadratic",
                     "ort-int8-cache2", "ort-int8-cache2-quadratic", "ort-int8-cache5", "ort-int8-cache5-quadratic"]
    dit = [v.name for v in plan_variants(False, ["int8"], [3], ["uniform"], True)]
    assert dit == ["pytorch-fp32", "ort-fp32", "ort-int8", "ort-fp32-cache3", "ort-int8-cache3"]  # no DeepCache


def test_latency_variants_take_turns_row_by_row_and_keep_every_image():
    from types import SimpleNamespace

    from exporter.bench.run import BenchPlan, _latency
    from exporter.bench.variants import Variant
    from exporter.sampling.loop import SampleSettings

    calls = []

    def runner(name):
        def run(s):
            calls.append((name, s.rows, s.per_row))
            run.runtime.seconds.update({"block": 0.5})
            return {(row, k): name for row in s.rows for k in range(s.per_row)}
        run.runtime = SimpleNamespace(seconds={})
        return run

    variants = [Variant("ort-fp32", "runtime"), Variant("ort-fp32-cache3", "runtime", interval=3)]
    runners = {v.name: runner(v.name) for v in variants}
    settings = SampleSettings(rows=(0, 1, 2), per_row=2, batch_size=1)
    plan = BenchPlan(("int8",), (3,), ("uniform",), settings.rows, settings.per_row, rounds=2)
    seconds, block_seconds, graph_seconds, images = _latency("m", variants, runners, settings, plan,
                                                             progress=False)

    timed = [(name, rows) for name, rows, per_row in calls if per_row == 2]  # the warm-up runs per_row=1
    a, b = "ort-fp32", "ort-fp32-cache3"
    assert timed == [(a, (0,)), (b, (0,)), (b, (1,)), (a, (1,)), (a, (2,)), (b, (2,)),   # round 1
                     (b, (0,)), (a, (0,)), (a, (1,)), (b, (1,)), (b, (2,)), (a, (2,))]   # round 2
    assert {k: len(v) for k, v in seconds.items()} == {a: 2, b: 2}  # one total per round
    assert images[b] == {(row, k): b for row in (0, 1, 2) for k in (0, 1)}
    # per-block seconds: uncached variants only, summed over a round's slices, averaged over rounds
    assert block_seconds == {"fp32": {"block": 1.5}}
    # seconds in graphs: every runtime variant, one total per round over its slices
    assert graph_seconds == {a: [1.5, 1.5], b: [1.5, 1.5]}


def test_loop_time_is_what_the_graphs_leave_per_step():
    from exporter.bench.run import loop_time

    # 3 rounds of 4 images x 10 steps: 2.0 s each, of which 1.6 / 1.2 / 1.7 s in graphs
    got = loop_time([2.0, 2.0, 2.0], [1.6, 1.2, 1.7], images=4, steps=10)
    assert abs(got["graphs_ms_per_image"] - 400.0) < 1e-9  # median 1.6 s over 4 images
    assert abs(got["loop_ms_per_step"] - 10.0) < 1e-9  # median of 0.4 / 0.8 / 0.3 s over 40 steps


def test_call_turns_keep_the_batches():
    from exporter.bench.run import call_turns
    from exporter.sampling.loop import SampleSettings

    settings = SampleSettings(rows=(0, 1), per_row=8, batch_size=1)
    assert [s.rows for s in call_turns(settings)] == [(0,), (1,)]
    assert [s.rows for s in call_turns(SampleSettings(rows=(0, 1), per_row=8, batch_size=4))] == [(0,), (1,)]
    # 8 images per row in calls of 3 would split differently row by row: one turn, as without turns
    assert call_turns(SampleSettings(rows=(0, 1), per_row=8, batch_size=3)) == [
        SampleSettings(rows=(0, 1), per_row=8, batch_size=3)]
    # calls of whole rows (throughput: 40 images, 8 per row): one call's rows per turn
    assert [s.rows for s in call_turns(SampleSettings(rows=tuple(range(10)), per_row=8, batch_size=40))] == [
        (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)]
    assert [s.rows for s in call_turns(SampleSettings(rows=(0, 1, 2, 3), per_row=4, batch_size=40))] == [
        (0, 1, 2, 3)]  # --quick: 16 images, one call


def test_throughput_runs_one_untimed_batch_of_its_size_first_then_takes_turns_call_by_call():
    # the latency rounds ran one image per call: the first call at the throughput batch would be timed cold
    from exporter.bench.run import BenchPlan, _throughput
    from exporter.bench.variants import Variant
    from exporter.sampling.loop import SampleSettings

    calls = []
    variants = [Variant("pytorch-fp32", "pytorch"), Variant("ort-fp32", "runtime"),
                Variant("ort-fp32-cache3", "runtime", interval=3), Variant("ort-int8", "runtime", "int8")]
    runners = {v.name: (lambda s, n=v.name: calls.append((n, s.rows, s.steps, s.batch_size))) for v in variants}
    settings = SampleSettings(rows=tuple(range(10)), per_row=8, steps=20, batch_size=1)
    plan = BenchPlan(("int8",), (2, 3, 5), ("uniform",), settings.rows, settings.per_row, rounds=2)
    seconds = _throughput(variants, runners, settings, plan)
    chosen = ["pytorch-fp32", "ort-fp32", "ort-fp32-cache3"]
    assert calls[:3] == [(n, tuple(range(5)), 3, 40) for n in chosen]  # 5 rows x 8 = one call of 40, 3 steps
    # then turns of one call each (rows 0-4, rows 5-9), the order reversing every turn, over 2 rounds
    first, second = tuple(range(5)), tuple(range(5, 10))
    order = [(first, chosen), (second, chosen[::-1])] * 2
    assert calls[3:] == [(n, rows, 20, 40) for rows, names in order for n in names]
    assert {k: len(v) for k, v in seconds.items()} == dict.fromkeys(chosen, 2)  # one total per round


def test_a_bench_folder_of_the_other_mode_or_two_models_of_one_name_are_refused(tmp_path):
    import json

    import pytest

    from exporter.bench.run import model_name, run_bench
    from exporter.errors import UsageError

    assert model_name("digits-unet") == "digits-unet" and model_name("/models/sd15/") == "sd15"
    assert model_name("..") == Path.cwd().parent.name  # not "..": its folders would land beside --out
    (tmp_path / "bench.json").write_text(json.dumps({"quick": True, "models": {}}))
    with pytest.raises(UsageError, match="holds a quick bench; choose another --out"):
        run_bench(tmp_path, quick=False)
    (tmp_path / "bench.json").write_text("{not json")
    with pytest.raises(UsageError, match="bench.json is not a bench result"):
        run_bench(tmp_path, quick=True)
    for model in ("a/m", "b/m"):  # model folders as far as the up-front check looks
        (tmp_path / model).mkdir(parents=True)
        (tmp_path / model / "config.json").write_text("{}")
    with pytest.raises(UsageError, match="two models of one name"):
        run_bench(tmp_path / "new", quick=True, models=(str(tmp_path / "a/m"), str(tmp_path / "b/m")))
    assert not (tmp_path / "new").exists()


def test_a_wrong_model_name_is_refused_before_any_model_is_benched(tmp_path):
    import pytest

    from exporter.bench.run import run_bench
    from exporter.errors import ExporterError

    with pytest.raises(ExporterError, match=r"model directory not found: digits-vit \(nor a reference name"):
        run_bench(tmp_path / "new", quick=True, models=("digits-unet", "digits-vit"))
    assert not (tmp_path / "new").exists()  # digits-unet's calibration did not start


def test_the_pytorch_artifact_is_the_weights_it_loads_not_every_safetensors_beside_them(tiny_unet_dir, tmp_path):
    import shutil

    from exporter.models.loading import find_model_dir, weight_files

    model = tmp_path / "m"
    shutil.copytree(tiny_unet_dir, model)
    (model / "text_encoder").mkdir()
    (model / "text_encoder" / "model.safetensors").write_bytes(b"x" * 1000)  # another component
    (model / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"x" * 1000)  # another variant
    assert weight_files(find_model_dir(model)) == [model / "unet" / "diffusion_pytorch_model.safetensors"]


def test_graphs_a_bench_root_holds_are_reused_only_if_this_bench_would_export_them(tiny_int8_graphs, tiny_unet_dir,
                                                                                    tiny_unet_calib, tmp_path):
    import shutil

    from exporter.bench.run import stale_export
    from exporter.calibrate import calibrate
    from exporter.recipe import CalibrationSpec, QuantizationSpec

    def stale(folder, quantization, calib, model=tiny_unet_dir):
        return stale_export(folder, str(model), quantization, calib)

    spec = QuantizationSpec(groups=2)  # what the fixture exported
    assert stale(tiny_int8_graphs, spec, tiny_unet_calib) is None
    assert stale(tiny_int8_graphs, QuantizationSpec(groups=3), tiny_unet_calib) == "exported with another recipe"
    assert stale(tiny_int8_graphs, None, tiny_unet_calib) == "quantized graphs where FP32 ones belong"
    other = tmp_path / "other-calib"
    calibrate(str(tiny_unet_dir), other, CalibrationSpec(trajectories=2, steps=3, guidance=2.0), progress=False)
    assert stale(tiny_int8_graphs, spec, other) == "exported from another calibration"
    elsewhere = tmp_path / "moved-model"  # the same weights in another place: the manifest's path is gone
    shutil.copytree(tiny_unet_dir, elsewhere)
    assert stale(tiny_int8_graphs, spec, tiny_unet_calib, model=elsewhere) == f"exported from {tiny_unet_dir}"
    old = tmp_path / "old"  # a folder of before 2026-12-05, without the PTQ record parity rebuilds PyTorch from
    shutil.copytree(tiny_int8_graphs, old)
    (old / "quantization.json").unlink()
    assert stale(old, spec, tiny_unet_calib).endswith(
        "quantization.json: missing (the quantized graphs' scales are recorded in it); export again")


def test_a_stale_export_in_a_bench_root_is_exported_again_and_a_current_one_kept(tiny_unet_dir, tmp_path):
    from exporter.bench.run import BenchPlan, prepare
    from exporter.export.manifest import read_manifest, read_record

    plan = BenchPlan(("int8",), (3,), ("uniform",), (0,), 1, 1, trajectories=2)
    graphs, _ = prepare(str(tiny_unet_dir), tmp_path, plan, progress=False)
    fp32_manifest = (graphs["fp32"] / "manifest.json").stat().st_mtime_ns
    (graphs["int8"] / "quantization.json").unlink()  # as a folder exported before 2026-12-05 is
    (graphs["int8"] / "left-over").write_text("x")
    again, _ = prepare(str(tiny_unet_dir), tmp_path, plan, progress=False)
    assert again == graphs
    assert read_record(graphs["int8"], read_manifest(graphs["int8"]))["act_scales"]  # exported again
    assert not (graphs["int8"] / "left-over").exists()
    assert (graphs["fp32"] / "manifest.json").stat().st_mtime_ns == fp32_manifest  # still current: kept
