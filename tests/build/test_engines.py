import json
import subprocess
import sys

import onnx
import pytest
import torch

from exporter.build.engines import build_engines
from exporter.build.gating import BuildError
from exporter.build.profiles import block_profiles
from exporter.errors import UsageError
from exporter.export import read_manifest
from exporter.export.manifest import ManifestError
from exporter.recipe import BuildSpec
from exporter.runtime import Runtime

from .conftest import A10, L4


def test_build_writes_one_engine_per_graph_and_a_manifest_the_runtime_can_check(tiny_int8_graphs, fake_tensorrt,
                                                                                 tmp_path):
    graphs = read_manifest(tiny_int8_graphs)
    quantized_node = next(n.name for n in onnx.load(str(tiny_int8_graphs / "mid.g1.onnx"),
                                                    load_external_data=False).graph.node if n.op_type == "Conv")
    fake_tensorrt["fallen_back"].add(quantized_node)
    manifest = build_engines(tiny_int8_graphs, tmp_path / "e", BuildSpec(images=[1, 2, 4]), progress=False)

    assert read_manifest(tmp_path / "e") == manifest  # every plan present and matching its sha256
    assert manifest["kind"] == "tensorrt" and manifest["tensorrt"]["gpu"] == "NVIDIA L4"
    assert manifest["tensorrt"]["flags"]["strongly_typed"] and manifest["tensorrt"]["batch"] == [2, 4, 8]
    assert manifest["tensorrt"]["flags"]["hardware_compatibility"] == "none"
    for block, source in zip(manifest["blocks"], graphs["blocks"]):
        assert block["engines"] == [g.replace(".onnx", ".plan") for g in source["graphs"]]
        for origin in block["source_graphs"].values():
            assert origin["sha256"] == graphs["files"][origin["graph"]]
    # each block's min / opt / max input shapes: images [1, 2, 4] with guidance, batches 2, 4, 8
    profiles = block_profiles(graphs, BuildSpec(images=[1, 2, 4]))
    for block in manifest["blocks"]:
        assert block["profile"] == {n: [list(s) for s in shapes] for n, shapes in profiles[block["name"]].items()}
        assert [t["name"] for t in next(b for b in graphs["blocks"] if b["name"] == block["name"])["inputs"]] \
            == list(block["profile"])
    assert manifest["blocks"][0]["profile"]["sample"] == [[2, 1, 8, 8], [4, 1, 8, 8], [8, 1, 8, 8]]
    assert len(fake_tensorrt["built"]) == sum(len(b["graphs"]) for b in graphs["blocks"])
    for built in fake_tensorrt["built"]:  # the profile each engine was built with is its block's
        block = next(b for b in graphs["blocks"] if built["graph"].name in b["graphs"])
        assert {n: [list(s) for s in shapes] for n, shapes in built["profile"].items()} == \
            {n: [list(s) for s in shapes] for n, shapes in profiles[block["name"]].items()}
    assert (tmp_path / "e" / "timing.cache").is_file()  # one cache, shared by every build
    assert json.loads((tmp_path / "e" / "timing.cache.json").read_text()) == L4.to_dict()  # and who wrote it
    report = json.loads((tmp_path / "e" / "precision.json").read_text())
    fell_back = [r for r in report if r["status"] == "fell back"]
    assert {r["node"] for r in fell_back} == {quantized_node} and "mid.g1.onnx" in {r["graph"] for r in fell_back}
    assert all(r["status"] == "ok" for r in report if r["node"] != quantized_node)

    (tmp_path / "e" / "mid.g0.plan").write_bytes(b"swapped")
    with pytest.raises(ManifestError, match="mid.g0.plan: sha256 mismatch"):
        read_manifest(tmp_path / "e")


def test_engines_from_another_gpu_are_refused_before_loading(tiny_int8_graphs, fake_tensorrt, tmp_path):
    build_engines(tiny_int8_graphs, tmp_path / "e", progress=False)
    fake_tensorrt["device"] = A10
    with pytest.raises(BuildError, match=r"built for compute capability 8\.9 \(NVIDIA L4\), this GPU \(NVIDIA A10\) "
                                         r"is 8\.6.*rebuild them here with 'exporter build"):
        Runtime.load(tmp_path / "e")
    with pytest.raises(UsageError, match="holds TensorRT engines"):
        Runtime.load(tmp_path / "e", backend="onnxruntime")
    with pytest.raises(UsageError, match="build engines first"):
        Runtime.load(tiny_int8_graphs, backend="tensorrt")


def test_fp8_graphs_stop_without_output_or_fall_back_to_int8_when_the_recipe_allows(tiny_fp8_graphs, fake_tensorrt,
                                                                                   tmp_path):
    fake_tensorrt["device"] = A10
    with pytest.raises(BuildError, match="FP8 needs compute capability >= 8.9"):
        build_engines(tiny_fp8_graphs, tmp_path / "e", progress=False)
    assert not (tmp_path / "e").exists() and not (tmp_path / "e.partial").exists()
    assert not fake_tensorrt["built"]

    manifest = build_engines(tiny_fp8_graphs, tmp_path / "e", BuildSpec(fp8_fallback="int8"), progress=False)
    assert manifest["tensorrt"]["fallback"]["to"] == "int8" and manifest["tensorrt"]["precision"] == ["int8"]
    types = {i.data_type for b in fake_tensorrt["built"] for i in b["model"].graph.initializer}
    assert onnx.TensorProto.INT8 in types and onnx.TensorProto.FLOAT8E4M3FN not in types
    fake_tensorrt["device"] = L4
    built = len(fake_tensorrt["built"])
    build_engines(tiny_fp8_graphs, tmp_path / "e2", BuildSpec(fp8_fallback="int8"), progress=False)
    fp8_types = {i.data_type for b in fake_tensorrt["built"][built:] for i in b["model"].graph.initializer}
    assert onnx.TensorProto.FLOAT8E4M3FN in fp8_types  # no fallback where FP8 runs


def test_a_failing_build_leaves_no_partial_folder(tiny_int8_graphs, fake_tensorrt, monkeypatch, tmp_path):
    from exporter.build import tensorrt

    def broken(graph, plan, *args):
        plan.write_bytes(b"half")
        raise BuildError(f"TensorRT could not build {graph.name}")

    monkeypatch.setattr(tensorrt, "build_engine", broken)
    with pytest.raises(BuildError, match="could not build"):
        build_engines(tiny_int8_graphs, tmp_path / "e", progress=False)
    assert not (tmp_path / "e").exists() and not (tmp_path / "e.partial").exists()


def test_a_shared_timing_cache_from_another_tensorrt_is_set_aside_and_one_from_here_reused(tiny_int8_graphs,
                                                                                          fake_tensorrt, tmp_path):
    cache = tmp_path / "shared" / "timing.cache"
    cache.parent.mkdir()
    cache.write_bytes(b"timings of TensorRT 10")
    older = {**L4.to_dict(), "tensorrt": "10.13.0.34"}
    (tmp_path / "shared" / "timing.cache.json").write_text(json.dumps(older))
    loaded = fake_tensorrt["cache_found"]

    build_engines(tiny_int8_graphs, tmp_path / "e1", BuildSpec(timing_cache=str(cache)), progress=False)
    assert loaded[0] is False  # the build started a new cache (its later engines share it)
    aside = tmp_path / "shared" / "timing.cache.tensorrt-10.13.0.34-NVIDIA_L4"
    assert aside.read_bytes() == b"timings of TensorRT 10"
    assert json.loads((tmp_path / "shared" / "timing.cache.tensorrt-10.13.0.34-NVIDIA_L4.json").read_text()) == older
    assert json.loads((tmp_path / "shared" / "timing.cache.json").read_text()) == L4.to_dict()

    loaded.clear()
    build_engines(tiny_int8_graphs, tmp_path / "e2", BuildSpec(timing_cache=str(cache)), progress=False)
    assert loaded and all(loaded)  # this machine's cache is reused from the first engine on
    assert (tmp_path / "e2" / "manifest.json").is_file() and not (tmp_path / "e2" / "timing.cache.json").exists()


def test_version_compatible_engines_carry_one_lean_runtime_checked_like_every_file(tiny_int8_graphs, fake_tensorrt,
                                                                                   monkeypatch, tmp_path):
    from exporter.build import lean

    monkeypatch.setattr(lean, "search_dirs", lambda: [tmp_path / "nowhere"])
    with pytest.raises(BuildError, match=r"lean runtime \(libnvinfer_lean.so.10\), found nowhere"):
        build_engines(tiny_int8_graphs, tmp_path / "e", BuildSpec(version_compatible=True), progress=False)
    assert not (tmp_path / "e").exists() and not (tmp_path / "e.partial").exists() and not fake_tensorrt["built"]

    installed = tmp_path / "trt" / "libnvinfer_lean.so.10"
    installed.parent.mkdir()
    installed.write_bytes(b"TensorRT 10.13.0.35 lean runtime")
    monkeypatch.setattr(lean, "search_dirs", lambda: [tmp_path / "nowhere", installed.parent])
    manifest = build_engines(tiny_int8_graphs, tmp_path / "e", BuildSpec(version_compatible=True), progress=False)
    assert manifest["tensorrt"]["flags"]["version_compatible"]
    assert manifest["tensorrt"]["lean_runtime"] == "libnvinfer_lean.so.10" and "libnvinfer_lean.so.10" in manifest["files"]
    assert (tmp_path / "e" / "libnvinfer_lean.so.10").read_bytes() == installed.read_bytes()
    # every engine was checked against the copy that ships, present while it was built
    assert {b["lean_runtime"].name for b in fake_tensorrt["built"]} == {"libnvinfer_lean.so.10"}
    assert all(b["lean_runtime_present"] for b in fake_tensorrt["built"])
    assert read_manifest(tmp_path / "e") == manifest

    (tmp_path / "e" / "libnvinfer_lean.so.10").write_bytes(b"another library")  # native code: checked before loading
    with pytest.raises(ManifestError, match="libnvinfer_lean.so.10: sha256 mismatch"):
        Runtime.load(tmp_path / "e")
    plain = build_engines(tiny_int8_graphs, tmp_path / "plain", progress=False)
    assert plain["tensorrt"]["lean_runtime"] is None and not plain["tensorrt"]["flags"]["version_compatible"]
    assert not any(name.startswith("libnvinfer") for name in plain["files"])


def test_build_command_says_where_version_compatible_engines_run(tiny_int8_graphs, fake_tensorrt, monkeypatch,
                                                                  tmp_path, capsys):
    from exporter.build import lean
    from exporter.cli import main

    (tmp_path / "libnvinfer_lean.so.10").write_bytes(b"lean runtime")
    monkeypatch.setattr(lean, "search_dirs", lambda: [tmp_path])
    recipe = tmp_path / "vc.yaml"
    recipe.write_text("build:\n  version_compatible: true\n")
    assert main(["-q", "build", str(tiny_int8_graphs), "--out", str(tmp_path / "vc"), "--recipe", str(recipe)]) == 0
    assert ("(TensorRT 10.13.0.35, NVIDIA L4; version-compatible: they run on TensorRT 10.13.0.35 and later releases, "
            "on the lean runtime libnvinfer_lean.so.10 shipped with them)") in capsys.readouterr().out
    assert main(["-q", "build", str(tiny_int8_graphs), "--out", str(tmp_path / "plain")]) == 0
    assert "(TensorRT 10.13.0.35, NVIDIA L4)\n" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without a GPU")
def test_build_without_gpu_fails_fast_with_what_is_missing(tiny_int8_graphs, run_cli, tmp_path):
    result = run_cli("build", tiny_int8_graphs, "--out", tmp_path / "engines")
    assert result.returncode == 2
    assert "error: TensorRT engines are built and run on an NVIDIA GPU; this machine lacks" in result.stderr
    assert "a CUDA GPU" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "engines").exists() and not (tmp_path / "engines.partial").exists()


def test_the_cpu_path_never_imports_tensorrt():
    # a finder ahead of every other records each attempt: an import of tensorrt that fails (it is not
    # installed here) and is caught would leave no trace in sys.modules
    code = ("import sys\n"
            "tried = []\n"
            "class Watch:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'tensorrt': tried.append(name)\n"
            "        return None\n"
            "sys.meta_path.insert(0, Watch())\n"
            "import exporter, exporter.cli, exporter.build.engines, exporter.runtime, exporter.parity\n"
            "import exporter.build, exporter.build.gating, exporter.build.precision, exporter.build.lean\n"
            "assert not tried and 'tensorrt' not in sys.modules, f'tensorrt imported: {tried}'\n"
            "import importlib.util\n"
            "importlib.util.find_spec('tensorrt')\n"
            "assert tried == ['tensorrt'], tried  # the watch itself works\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_lint_of_an_engines_folder_points_at_its_graphs(tiny_int8_graphs, fake_tensorrt, tmp_path):
    from exporter.export.lint import lint_folder

    build_engines(tiny_int8_graphs, tmp_path / "e", progress=False)
    import re

    with pytest.raises(UsageError, match="holds TensorRT engines; lint the graphs they were built from: "
                                         + re.escape(f"exporter lint {tiny_int8_graphs}")):
        lint_folder(tmp_path / "e")


def test_parity_against_engines_compares_bfloat16_outputs_and_keeps_each_batch_in_the_profile(
        tiny_int8_graphs, fake_tensorrt, monkeypatch, tmp_path):
    # TensorRT's side of `exporter parity --engines` on CPU: each fake engine runs the graph it was built
    # from on ONNX Runtime and answers in torch bfloat16, as polygraphy's TrtRunner does for bf16 engines
    import polygraphy.backend.trt as polygraphy_trt
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    from exporter.build import tensorrt
    from exporter.parity import check_parity

    engines = tmp_path / "e"
    build_engines(tiny_int8_graphs, engines, BuildSpec(images=[1, 1, 2], cfg=True), progress=False)  # 2 to 4 per call
    batches = []

    class EngineAsItsGraph(OnnxrtRunner):
        def __init__(self, load):  # load: partial(deserialize, runtime, plan)
            graph = load.args[1].read_bytes().removeprefix(b"fake plan of ").decode()
            super().__init__(SessionFromOnnx(str(tiny_int8_graphs / graph)), name=f"engine-{graph}")

        def infer_impl(self, feed_dict):
            batches.append(len(next(iter(feed_dict.values()))))
            return {n: torch.from_numpy(v).to(torch.bfloat16) for n, v in super().infer_impl(feed_dict).items()}

    monkeypatch.setattr(polygraphy_trt, "TrtRunner", EngineAsItsGraph)
    monkeypatch.setattr(tensorrt, "folder_runtime", lambda folder, manifest: None)
    results, _ = check_parity(tiny_int8_graphs, engines=engines, end_to_end_check=False, write_golden=False)
    plans = {g: p for b in read_manifest(engines)["blocks"] for p, s in b["source_graphs"].items() for g in [s["graph"]]}
    for r in results:  # compared (before: polygraphy's TypeError on bfloat16), to bfloat16's precision
        assert r.engine == plans[r.graph] and all(30 < sqnr < 200 for sqnr, _ in r.engine_outputs.values()), r
    assert batches and set(batches) == {4}  # 24 recorded samples per group, the engines' largest batch 4
    with pytest.raises(UsageError, match=r"group \d: 1 recorded sample\(s\) .* calls of 1 or more .* engines take 2 "
                                         r"to 4 per call"):
        check_parity(tiny_int8_graphs, engines=engines, samples=1, end_to_end_check=False, write_golden=False)
    # enough samples, but split into calls of 1 and 2
    with pytest.raises(UsageError, match=r"group \d: 3 recorded sample\(s\) .* calls of 1 or more \(--batch 2"):
        check_parity(tiny_int8_graphs, engines=engines, samples=3, batch=2, end_to_end_check=False,
                     write_golden=False)
