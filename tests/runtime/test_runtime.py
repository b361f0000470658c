"""The runtime over exported graphs: same images as PyTorch, group selection by t, DeepCache plans."""

import json

import numpy as np
import pytest
import torch

from exporter.errors import NonFiniteError, UsageError
from exporter.export import export_graphs, read_manifest
from exporter.models import load_conditioning, load_model
from exporter.recipe import QuantizationSpec
from exporter.runtime import Runtime, refresh_steps
from exporter.runtime.backends import _quiet_thread_pool, _shared_cpu_arena
from exporter.sampling.loop import SampleSettings, generate


def pytorch_latents(model_dir, rows, steps, scheduler, guidance, latent=None):
    loaded = load_model(model_dir)
    cond = load_conditioning(loaded.default_conditioning, loaded.adapter)
    settings = SampleSettings(rows=tuple(rows), per_row=2, steps=steps, scheduler=scheduler, guidance=guidance, seed=3)
    return generate(lambda x, t, c, s: loaded.adapter.denoise(loaded.model, x, t, c),
                    loaded.adapter.sample_shape_at(loaded.model, latent), loaded.scheduler_config, cond, settings, False)


@pytest.fixture(scope="module")
def unet_graphs(tiny_unet_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("graphs") / "fp32"
    export_graphs(str(tiny_unet_dir), out, progress=False)
    return out


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "dpm++"])
def test_fp32_graphs_reproduce_the_pytorch_loop(tiny_unet_dir, unet_graphs, scheduler):
    ours = Runtime.load(unet_graphs).generate(rows=[0, 2], per_row=2, steps=8, scheduler=scheduler, guidance=2.0,
                                              seed=3, progress=False)
    theirs = pytorch_latents(tiny_unet_dir, [0, 2], 8, scheduler, 2.0)
    assert ours.keys() == theirs.keys()
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) <= 1e-3


def test_unet_graphs_run_at_another_latent_size(tiny_unet_dir, unet_graphs):
    """The graphs are traced at one size but dynamic in height and width: a non-square latent the
    tiny UNet's one downsampling divides gives PyTorch's latents at that size, cached or not."""
    runtime = Runtime.load(unet_graphs)
    ours = runtime.generate(rows=[0, 2], per_row=2, steps=8, guidance=2.0, seed=3, latent=(10, 14), progress=False)
    theirs = pytorch_latents(tiny_unet_dir, [0, 2], 8, "ddim", 2.0, latent=(10, 14))
    assert ours.keys() == theirs.keys() and {tuple(v.shape) for v in ours.values()} == {(1, 10, 14)}
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) <= 1e-3
    cached = runtime.generate(rows=[0], per_row=1, steps=6, guidance=2.0, latent=(6, 12), cache_interval=3,
                              progress=False)
    assert tuple(cached[(0, 0)].shape) == (1, 6, 12) and torch.isfinite(cached[(0, 0)]).all()
    with pytest.raises(UsageError, match=r"latent 9x8: these UNet2DConditionModel graphs take heights and widths "
                                         r"that are multiples of 2 \(one halving per downsampling\)"):
        runtime.generate(rows=[0], per_row=1, steps=2, latent=(9, 8), progress=False)


def test_dit_graphs_with_class_labels(tiny_dit_dir, tmp_path):
    export_graphs(str(tiny_dit_dir), tmp_path / "g", progress=False)
    runtime = Runtime.load(tmp_path / "g")
    ours = runtime.generate(rows=[1, 3], per_row=2, steps=6, scheduler="ddim", guidance=2.0, seed=3, progress=False)
    theirs = pytorch_latents(tiny_dit_dir, [1, 3], 6, "ddim", 2.0)
    assert ours.keys() == theirs.keys()
    assert max(float((ours[k] - theirs[k]).abs().max()) for k in ours) <= 1e-3
    assert runtime.manifest["latent_multiple"] is None  # the adapter's: a transformer's token count is fixed
    # and its graphs say so: only the batch is dynamic, in the manifest and in the ONNX files (TensorRT
    # profiles or trtexec shapes of another size would fail inside the graph)
    import onnx

    for block in runtime.manifest["blocks"]:
        for tensor in block["inputs"]:
            assert [d for d in tensor["shape"] if isinstance(d, str)] == ["batch"], (block["name"], tensor)
        graph = onnx.load(str(tmp_path / "g" / block["graphs"][0]), load_external_data=False).graph
        for value in graph.input:  # what a TensorRT profile or trtexec's --shapes sets
            assert [d.dim_param for d in value.type.tensor_type.shape.dim if d.dim_param] == ["batch"], value.name
    own = runtime.generate(rows=[1], per_row=1, steps=2, latent=(8, 8), progress=False)  # its own size
    assert own.keys() == {(1, 0)} and tuple(own[(1, 0)].shape) == (1, 8, 8) and torch.isfinite(own[(1, 0)]).all()
    with pytest.raises(UsageError, match=r"DiTTransformer2DModel graphs are exported for latent 8x8 only"):
        runtime.generate(rows=[1], per_row=1, steps=2, latent=(8, 12), progress=False)


class CountingBackend:
    def __init__(self, backend):
        self.backend, self.calls = backend, []

    def run(self, graph, feeds, outputs):
        self.calls.append(graph)
        return self.backend.run(graph, feeds, outputs)


def test_cached_steps_run_only_the_branch_blocks(unet_graphs):
    runtime = Runtime.load(unet_graphs)
    counter = runtime.backend = CountingBackend(runtime.backend)
    plan = runtime.cache_plan(steps=7, interval=3, branch=None, schedule="uniform")
    assert plan.full_steps == {0, 3, 6}
    all_blocks = [b["name"] for b in runtime.blocks]
    assert set(plan.shallow_blocks) < set(all_blocks) and "mid" not in plan.shallow_blocks
    runtime.generate(rows=[0], per_row=1, steps=7, guidance=1.0, cache_interval=3, progress=False)
    graphs = [c.removesuffix(".onnx") for c in counter.calls]
    assert len(graphs) == 3 * len(all_blocks) + 4 * len(plan.shallow_blocks)
    assert graphs.count("mid") == 3 and graphs.count("head") == 7
    with pytest.raises(UsageError, match="unknown cache branch 'nope'"):
        runtime.cache_plan(7, 3, "nope", "uniform")
    with pytest.raises(UsageError, match="cache interval must be >= 1"):
        runtime.cache_plan(7, 0, None, "uniform")


def test_refresh_schedules():
    assert refresh_steps(20, 5) == [0, 5, 10, 15]
    quadratic = refresh_steps(20, 5, "quadratic")
    assert len(quadratic) == 4 and quadratic[0] == 0 and quadratic[1] - quadratic[0] < quadratic[-1] - quadratic[-2]
    # as many full steps as uniform, all distinct, also where early positions round alike
    assert refresh_steps(20, 2, "quadratic") == [0, 1, 2, 3, 4, 6, 8, 11, 15, 19]
    for steps in range(1, 60):
        for interval in range(1, 8):
            quadratic = refresh_steps(steps, interval, "quadratic")
            assert len(quadratic) == len(refresh_steps(steps, interval)), (steps, interval)
            assert quadratic[0] == 0 and quadratic == sorted(set(quadratic)) and quadratic[-1] < steps


def test_each_step_uses_the_graph_of_its_timestep_group(tiny_unet_dir, tiny_unet_calib, tmp_path):
    export_graphs(str(tiny_unet_dir), tmp_path / "g", calib=tiny_unet_calib, quantization=QuantizationSpec(groups=2),
                  progress=False)
    runtime = Runtime.load(tmp_path / "g")
    counter = runtime.backend = CountingBackend(runtime.backend)
    runtime.generate(rows=[0], per_row=1, steps=6, scheduler="ddim", guidance=1.0, progress=False)
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(runtime.manifest["scheduler_config"])
    scheduler.set_timesteps(6)
    t_values = scheduler.timesteps.tolist()
    expected = [f"mid.g{runtime.groups.group_of(t)}.onnx" for t in t_values]
    assert [c for c in counter.calls if c.startswith("mid.")] == expected
    assert len(set(expected)) == 2


def test_cli_run_writes_images_and_record(unet_graphs, tmp_path, run_cli):
    result = run_cli("-q", "run", unet_graphs, "--rows", "0,1", "--per-row", "2", "--steps", "4",
                     "--cache-interval", "2", "--out", tmp_path / "o")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "o").glob("*_*.png")) == ["0_0.png", "0_1.png", "1_0.png", "1_1.png"]
    record = json.loads((tmp_path / "o" / "samples.json").read_text())
    assert record["cache_interval"] == 2 and record["block_seconds"] and record["latent"] == [8, 8]
    # the branch that ran (the shallowest, chosen by the runtime) and its full steps, not the option's None
    features = read_manifest(unet_graphs)["cache"]["features"]
    assert record["cache_branch"] == min(features, key=lambda f: len(features[f]))
    assert record["full_steps"] == [0, 2]
    result = run_cli("-q", "run", unet_graphs, "--rows", "0", "--per-row", "1", "--steps", "2", "--latent", "6x10",
                     "--out", tmp_path / "wide")
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "wide" / "samples.json").read_text())
    assert record["latent"] == [6, 10]
    # what ran, where options were left out: the manifest's sampling defaults, not null
    defaults = {"scheduler": "ddim", "guidance": 1.0, **read_manifest(unet_graphs)["sampling_defaults"]}
    assert (record["scheduler"], record["guidance"], record["batch_size"]) == (defaults["scheduler"],
                                                                               defaults["guidance"], 40)
    from PIL import Image

    with Image.open(tmp_path / "wide" / "0_0.png") as image:
        assert image.size == (10, 6)  # width x height
    result = run_cli("-q", "run", unet_graphs, "--latent", "7", "--out", tmp_path / "odd")
    assert result.returncode == 2 and "multiples of 2" in result.stderr
    result = run_cli("-q", "run", unet_graphs, "--latent", "6x", "--out", tmp_path / "bad")
    assert result.returncode == 2 and "invalid latent size '6x'" in result.stderr


def test_fp16_overflow_stops_the_run_and_names_the_block(tiny_unet_dir, tmp_path):
    export_graphs(str(tiny_unet_dir), tmp_path / "fp16", dtype="fp16", progress=False)
    runtime = Runtime.load(tmp_path / "fp16")
    cond, _ = load_conditioning(tmp_path / "fp16" / runtime.manifest["conditioning"], runtime.adapter).batch([0])
    plan = runtime.cache_plan(4, 1, None, "uniform")
    t = torch.tensor([500.0])
    x = torch.full((1, *runtime.adapter.sample_shape), 3e4)
    assert torch.isfinite(runtime.denoise(x, t, cond, 0, plan, {})).all()
    # still finite in FP16 (max 65504), but conv_in's sums over it are not
    with pytest.raises(NonFiniteError, match=r"step 0 \(t=500, timestep group 0\): block stem \(stem.onnx\) turned "
                                             r"finite inputs \(largest \|value\| 6e\+04\) into \d+ NaN/Inf .* "
                                             r"\(FP16 overflows past 65504\)"):
        runtime.denoise(torch.full_like(x, 6e4), t, cond, 0, plan, {})


class PoisoningBackend:
    """Puts a NaN into one block's first output from a given call of that block on."""

    def __init__(self, backend, graph: str, from_call: int):
        self.backend, self.graph, self.from_call, self.calls = backend, graph, from_call, 0

    def run(self, graph, feeds, outputs):
        results = self.backend.run(graph, feeds, outputs)
        if graph == self.graph:
            self.calls += 1
            if self.calls > self.from_call:
                results[0] = results[0].copy()
                results[0].flat[0] = np.nan
        return results


def test_a_nan_deep_in_the_model_names_its_block_and_step(unet_graphs):
    runtime = Runtime.load(unet_graphs)
    runtime.backend = PoisoningBackend(runtime.backend, "mid.onnx", from_call=2)
    with pytest.raises(NonFiniteError, match=r"step 2 \(t=\d+, timestep group 0\): block mid \(mid.onnx\) turned "
                                             r"finite inputs .* into 1 NaN/Inf of \d+ values in "):
        runtime.generate(rows=[0], per_row=2, steps=5, guidance=2.0, progress=False)


def test_non_finite_latents_are_reported_as_the_input(unet_graphs):
    runtime = Runtime.load(unet_graphs)
    cond, _ = load_conditioning(unet_graphs / runtime.manifest["conditioning"], runtime.adapter).batch([0])
    x = torch.zeros(1, *runtime.adapter.sample_shape)
    x[0, 0, 0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="the input sample of block stem was already NaN/Inf"):
        runtime.denoise(x, torch.tensor([10.0]), cond, 3, runtime.cache_plan(4, 1, None, "uniform"), {})


def test_sessions_share_one_cpu_arena_and_compute_the_same(unet_graphs):
    """Every session of the ONNX Runtime backend takes its memory from the one process-wide CPU arena
    (not an arena per graph), and a session on it computes bit for bit what one with its own arena
    computes."""
    import onnxruntime as ort

    runtime = Runtime.load(unet_graphs)
    rng = np.random.default_rng(0)
    for block in runtime.blocks:
        graph, names = block["graphs"][0], [o["name"] for o in block["outputs"]]
        feeds = {t["name"]: rng.standard_normal([2, *t["trace_shape"][1:]]).astype(t["dtype"]) for t in block["inputs"]}
        options = runtime.backend.session(graph).get_session_options()
        assert options.get_session_config_entry("session.use_env_allocators") == "1"
        outputs = []
        for shared in (False, True):
            options = ort.SessionOptions()
            options.graph_optimization_level = runtime.backend.level
            _quiet_thread_pool(options, None)
            if shared:
                _shared_cpu_arena(options)
            session = ort.InferenceSession(str(unet_graphs / graph), options, providers=["CPUExecutionProvider"])
            outputs.append(session.run(names, feeds))
        for own, on_shared in zip(*outputs):
            np.testing.assert_array_equal(on_shared, own)


def test_engine_batches_stay_inside_the_profile_whatever_the_recipe_said_of_guidance():
    from exporter.runtime.runtime import engine_batch_size

    def engines(images, cfg):
        return {"tensorrt": {"images": images, "cfg": cfg, "batch": [n * (2 if cfg else 1) for n in images]}}

    twenty = SampleSettings(rows=(0, 1), per_row=10, batch_size=40)
    assert engine_batch_size(engines([1, 4, 16], True), twenty, guided=True) == 16  # 32 samples per call
    assert engine_batch_size(engines([1, 4, 16], False), twenty, guided=False) == 16
    # built without cfg, run with guidance: half the images per call, not 16 (32 samples, past the max)
    assert engine_batch_size(engines([1, 4, 16], False), twenty, guided=True) == 8
    with pytest.raises(UsageError, match="take 1 to 1 samples per model call .* would call them with 2"):
        engine_batch_size(engines([1, 1, 1], False), twenty, guided=True)
    # built with cfg (at least 2 samples per call), run without guidance one image at a time
    with pytest.raises(UsageError, match="take 2 to 32 samples .* without guidance .* with 1"):
        engine_batch_size(engines([1, 4, 16], True), SampleSettings(rows=(0,), per_row=1), guided=False)
    # the last call's remainder counts too: 20 images at 8 per call end with 4
    assert engine_batch_size(engines([4, 8, 8], False), twenty, guided=False) == 8
    with pytest.raises(UsageError, match="with 3"):
        engine_batch_size(engines([4, 8, 8], False), SampleSettings(rows=(0,), per_row=11), guided=False)


def test_wrong_options_and_conditioning_are_refused_before_a_graph_runs(unet_graphs, tmp_path):
    from safetensors.torch import save_file

    from exporter.errors import ConditioningError

    runtime = Runtime.load(unet_graphs)
    # a branch or schedule that does not exist is an error even where interval 1 would not use it
    with pytest.raises(UsageError, match="unknown cache branch 'bogus'"):
        runtime.generate(rows=[0], per_row=1, steps=2, cache_branch="bogus", progress=False)
    with pytest.raises(UsageError, match="unknown cache schedule 'sometimes'"):
        runtime.generate(rows=[0], per_row=1, steps=2, cache_schedule="sometimes", progress=False)
    shipped = load_conditioning(unet_graphs / runtime.manifest["conditioning"], runtime.adapter)
    rows, seq, dim = shipped.cond.shape
    # a text length the graphs were not exported for: named, before ONNX Runtime's shape error
    save_file({"cond": torch.zeros(rows, seq + 3, dim), "uncond": torch.zeros(1, seq + 3, dim)}, tmp_path / "long.st")
    runtime.backend = CountingBackend(runtime.backend)
    with pytest.raises(ConditioningError, match=rf"encoder_hidden_states as \[batch, {seq}, {dim}\] but the "
                                                rf"conditioning gives \[1, {seq + 3}, {dim}\]"):
        runtime.generate(cond=tmp_path / "long.st", rows=[0], per_row=1, steps=2, progress=False)
    assert runtime.backend.calls == []
    # NaN in an embedding would pass QuantizeLinear as a finite number: refused at load, naming the row
    cond = shipped.cond.clone()
    cond[1, 0, 0] = float("nan")
    save_file({"cond": cond, "uncond": shipped.uncond}, tmp_path / "nan.st")
    with pytest.raises(ConditioningError, match=r"nan.st: 'cond' holds NaN/Inf \(in row\(s\) \[1\]\)"):
        runtime.generate(cond=tmp_path / "nan.st", rows=[0], per_row=1, steps=2, progress=False)
    # a repeated row is one row: each image denoised once
    images = runtime.generate(rows=[1, 0, 1], per_row=1, steps=1, progress=False)
    assert list(images) == [(1, 0), (0, 0)] and runtime.settings.rows == (1, 0)


def test_the_conditioning_file_is_read_once_while_it_stays_the_same(unet_graphs, tmp_path, monkeypatch):
    # a server (or the bench) calls generate per request: the file is not re-read and re-checked inside
    # every timed call, and a changed file is read again
    import os

    from safetensors.torch import save_file

    from exporter.runtime import runtime as runtime_module

    reads = []
    real = runtime_module.load_conditioning
    monkeypatch.setattr(runtime_module, "load_conditioning", lambda path, adapter: reads.append(path) or real(path, adapter))
    runtime = Runtime.load(unet_graphs)
    first = runtime.generate(rows=[0], per_row=1, steps=1, progress=False)
    runtime.generate(rows=[1], per_row=1, steps=1, progress=False)
    assert len(reads) == 1
    shipped = load_conditioning(unet_graphs / runtime.manifest["conditioning"], runtime.adapter)
    file = tmp_path / "c.safetensors"
    save_file({"cond": shipped.cond, "uncond": shipped.uncond}, str(file))
    same = runtime.generate(cond=file, rows=[0], per_row=1, steps=1, progress=False)
    assert len(reads) == 2 and torch.equal(same[(0, 0)], first[(0, 0)])
    save_file({"cond": shipped.cond.flip(0), "uncond": shipped.uncond}, str(file))
    os.utime(file, ns=(1, 1))  # another file, even where the clock would give the same time
    flipped = runtime.generate(cond=file, rows=[0], per_row=1, steps=1, progress=False)
    assert len(reads) == 3 and not torch.equal(flipped[(0, 0)], first[(0, 0)])


def test_a_file_changed_after_load_is_refused_when_it_is_opened(unet_graphs, tmp_path):
    # sessions open on first use, maybe long after Runtime.load verified the folder: a graph, weight or
    # conditioning file changed in between is refused then, naming it; one merely touched still runs
    import shutil

    from exporter.export.manifest import ManifestError

    folder = tmp_path / "g"
    shutil.copytree(unet_graphs, folder)
    runtime = Runtime.load(folder)
    (folder / "mid.onnx").touch()  # a new stat, the same bytes: hashed again and accepted
    runtime.generate(rows=[0], per_row=1, steps=1, progress=False)
    weights = folder / "up0.weights"
    runtime = Runtime.load(folder)
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(ManifestError, match=r"up0\.weights: sha256 mismatch: .* after .* was loaded"):
        runtime.generate(rows=[0], per_row=1, steps=1, progress=False)
    shutil.rmtree(folder)
    shutil.copytree(unet_graphs, folder)
    runtime = Runtime.load(folder)
    conditioning = folder / runtime.manifest["conditioning"]
    conditioning.write_bytes(conditioning.read_bytes()[:-4])
    with pytest.raises(ManifestError, match=rf"{conditioning.name}: sha256 mismatch"):
        runtime.generate(rows=[0], per_row=1, steps=1, progress=False)
