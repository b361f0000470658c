"""What a user's shell sees: the command list, exit codes, one-line errors without tracebacks."""

import argparse
import json
import re
import shutil
from pathlib import Path

import pytest

from exporter.quant.ptq import INT4_FALLBACK_REASON


def test_help_lists_the_subcommands(run_cli):
    import re

    result = run_cli("--help")
    assert result.returncode == 0
    listed = re.findall(r"^    (\w+) ", result.stdout, flags=re.MULTILINE)  # argparse's list of subcommands
    assert listed == ["sample", "calibrate", "export", "finetune", "build", "run", "bench", "report", "lint",
                      "parity", "eval", "pipeline"]


def test_help_of_the_commands_running_graphs_names_the_backends_environment(run_cli):
    from exporter.runtime import ort_conv, ort_integer

    for command in ("run", "parity", "pipeline", "bench"):
        result = run_cli(command, "--help")
        assert result.returncode == 0
        assert ort_integer.ENV in result.stdout and ort_conv.ENV in result.stdout, command
        assert f"unset: {ort_conv.DEFAULT_BUDGET_MB}" in result.stdout


def test_the_readme_lists_every_option_of_every_command():
    """README "Commands" names each subcommand with exactly the long options its parser takes, so the
    two cannot drift apart (-h, -v, -q, common to all, are left out there)."""
    from exporter.cli import build_parser

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("\n## Commands\n", 1)[1].split("```", 2)[1]
    listed: dict[str, set[str]] = {}
    command = None
    for line in block.splitlines():
        if match := re.match(r"exporter (\w+)", line):
            command = match.group(1)
        if command is not None:  # a command's line, or one continuing it
            listed.setdefault(command, set()).update(re.findall(r"--[\w-]+", line.split("#")[0]))
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(listed) == set(subparsers.choices)
    options = {name: {o for a in parser._actions for o in a.option_strings if o.startswith("--")}
               for name, parser in subparsers.choices.items()}
    for name, taken in options.items():
        assert listed[name] == taken - {"--help", "--verbose", "--quiet"}, name
    # and every command line elsewhere in the README and docs/ (code spans and blocks) uses options that exist
    docs = sorted((Path(__file__).parents[1] / "docs").glob("*.md"))
    assert len(docs) >= 8  # the README's "Documentation" table: a doc moved away takes its commands out of this check
    text = "\n".join([readme, *(d.read_text() for d in docs)])
    for match in re.finditer(r"exporter (?:-[qv] )?(\w+)([^`\n]*)", text):
        if match.group(1) in options:
            used = set(re.findall(r"(?<![\w-])--[\w-]+", match.group(2).split("#")[0]))
            assert used <= options[match.group(1)], match.group(0)


@pytest.mark.parametrize("option", ["--per-row", "--steps", "--batch-size", "--cache-interval", "--threads"])
@pytest.mark.parametrize("value", ["0", "-2", "x"])
def test_counts_below_one_are_refused_by_the_parser(option, value, capsys):
    """0 images per row, 0 steps or a batch of 0 used to mean "the default", or crash deep in the loop."""
    from exporter.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["run", "graphs", option, value, "--out", "o"])
    assert exit_info.value.code == 2
    assert f"argument {option}: invalid value '{value}': a whole number >= 1" in capsys.readouterr().err


def test_parity_defaults_are_the_parity_modules():
    """cli.py writes them out (importing exporter.parity would load torch before parsing)."""
    from exporter.cli import build_parser
    from exporter.parity.inputs import BATCH, SAMPLES

    parser = build_parser()
    args = parser.parse_args(["parity", "graphs"])
    assert (args.samples, args.batch) == (SAMPLES, None)  # no --batch: BATCH, or what fits in memory
    parity = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["parity"]
    assert f"default {BATCH}," in next(a.help for a in parity._actions if a.dest == "batch")


def test_out_of_memory_in_parity_names_its_own_options(monkeypatch, capsys):
    """parity has no --batch-size, and its --latent is the size it compares at, not a cost to cut."""
    from exporter import parity
    from exporter.cli import main

    def exhausted(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(parity, "check_parity", exhausted)
    assert main(["parity", "graphs"]) == 2
    assert capsys.readouterr().err == ("error: out of memory (MemoryError); a smaller --batch (samples per call) or "
                                       "--samples needs less\n")


def one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture
def broken_copy(tiny_unet_dir, tmp_path):
    return shutil.copytree(tiny_unet_dir, tmp_path / "model")


def test_missing_model_directory(run_cli, tmp_path):
    one_line_error(run_cli("sample", "--model", tmp_path / "absent", "--out", tmp_path / "o"),
                   "model directory not found", "absent")
    assert not (tmp_path / "o").exists()
    one_line_error(run_cli("sample", "--out", tmp_path / "o"), "no model: pass --model")


def test_corrupted_weights(run_cli, broken_copy, tmp_path):
    (broken_copy / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    one_line_error(run_cli("sample", "--model", broken_copy, "--out", tmp_path / "o"),
                   "diffusion_pytorch_model.safetensors", "corrupted")


def test_missing_and_corrupted_conditioning(run_cli, broken_copy, tmp_path):
    one_line_error(run_cli("sample", "--model", broken_copy, "--cond", tmp_path / "none.safetensors",
                           "--out", tmp_path / "o"), "conditioning file not found", "none.safetensors")
    (broken_copy / "conditioning.safetensors").write_text("not safetensors")
    one_line_error(run_cli("sample", "--model", broken_copy, "--out", tmp_path / "o"),
                   "conditioning.safetensors", "not a readable safetensors file")


def test_unknown_reference_name_and_bad_images_folder(run_cli, tmp_path):
    one_line_error(run_cli("sample", "--model", "digits-vae", "--out", tmp_path / "o"),
                   "model directory not found: digits-vae (nor a reference name: digits-unet, digits-dit)")
    one_line_error(run_cli("eval", "--images", tmp_path / "nothing"), "image folder not found")
    (tmp_path / "empty").mkdir()
    one_line_error(run_cli("eval", "--images", tmp_path / "empty"), "no images named <row>_<k>.png")


def test_fake_quantized_sampling_from_a_bundled_format(run_cli, tiny_unet_dir, tmp_path):
    import json

    calib = tmp_path / "calib"
    result = run_cli("-q", "calibrate", "--model", tiny_unet_dir, "--format", "w4a8", "--trajectories", "2",
                     "--out", calib)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "w4a8"
    result = run_cli("-q", "sample", "--model", tiny_unet_dir, "--calib", calib, "--format", "w4a8", "--rows", "0",
                     "--per-row", "2", "--steps", "3", "--out", out)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "samples.json").read_text())["precision"] == "w4a8"
    summary = json.loads((out / "quantization.json").read_text())
    # W4A8 where TensorRT runs INT4 (the one Linear layer with whole blocks of 64 input features),
    # INT8 weights on every other layer, and the time-embedding layers' INT8 weights with float
    # input (adapter default); every layer that is not W4A8 listed with its reason
    assert set(map(tuple, summary["formats"].values())) == {("int4", "int8"), ("int8", "int8"), ("int8", None)}
    assert [n for n, f in summary["formats"].items() if f[0] == "int4"] == [
        "mid_block.attentions.0.transformer_blocks.0.ff.net.2"]
    assert all(e["reason"] for e in summary["excluded"] + summary["precision_overrides"])
    assert {o["layer"] for o in summary["precision_overrides"]} == {
        n for n, f in summary["formats"].items() if f[0] == "int8"}
    assert {o["reason"] for o in summary["precision_overrides"] if o["activations"]} == {INT4_FALLBACK_REASON}

    one_line_error(run_cli("sample", "--model", tiny_unet_dir, "--format", "int8", "--out", tmp_path / "o"),
                   "quantized activations need --calib")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("quantization:\n  weights: int8\n  group: 4\n")
    one_line_error(run_cli("sample", "--model", tiny_unet_dir, "--calib", calib, "--recipe", recipe,
                           "--out", tmp_path / "o"), "r.yaml.quantization: unknown key(s) ['group']")
    # a finetune: section is run by exporter finetune / pipeline; sample and export say they leave it out
    recipe.write_text("quantization:\n  weights: int8\nfinetune:\n  rank: 4\n")
    for command in ("sample", "export"):
        result = run_cli(command, "--model", tiny_unet_dir, "--recipe", recipe, "--out", tmp_path / "o")
        one_line_error(result, "quantized activations need --calib")
        assert "r.yaml has a finetune: section, which this command does not run (PTQ only)" in result.stderr


def test_misuse_found_in_review_ends_in_one_error_line(run_cli, broken_copy, tmp_path):
    """Each of these ended in a Python traceback (or, for the folder, in two runs' images read as one)."""
    from safetensors.torch import load_file, save_file

    sample = ("sample", "--model", broken_copy, "--rows", "0", "--per-row", "1", "--steps", "2")
    (tmp_path / "a_file").write_text("")
    one_line_error(run_cli(*sample, "--out", tmp_path / "a_file"), "a_file", "not an empty folder")
    one_line_error(run_cli(*sample, "--steps", "1001", "--out", tmp_path / "o"), "1001 denoising steps",
                   "at most 1000")
    assert run_cli(*sample, "--out", tmp_path / "o").returncode == 0
    one_line_error(run_cli(*sample, "--out", tmp_path / "o"), "not an empty folder")  # a second run's images
    # a sample too large to allocate: torch's allocator raises RuntimeError, not MemoryError (10^14 values,
    # past the 128 TiB a process can address, so it fails whatever the kernel's overcommit setting)
    one_line_error(run_cli(*sample, "--latent", "10000000", "--out", tmp_path / "big"), "out of memory", "--latent")
    result = run_cli("eval", "--images", tmp_path / "o", "--reference", tmp_path / "o", "--no-digits",
                     "--json", tmp_path)  # a folder where the file goes
    one_line_error(result, f"a folder where a file is to be written: '{tmp_path}'")
    # images of another model: no digit yardstick (it would score any 16x16 picture), only the comparison
    one_line_error(run_cli("eval", "--images", tmp_path / "o", "--no-digits"), "pass --reference")
    result = run_cli("eval", "--images", tmp_path / "o", "--reference", tmp_path / "o", "--no-digits")
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert result.returncode == 0 and "accuracy" not in metrics and "fd_digits" not in metrics
    assert metrics["n_identical"] == metrics["n_images"] == 1
    weights = broken_copy / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    del tensors["conv_out.weight"]
    save_file(tensors, str(weights))
    one_line_error(run_cli(*sample, "--out", tmp_path / "o2"), "lacks 1 tensor(s)", "conv_out.weight")
    for bad, message in ((("--rows", "2-0,1"), "runs backwards"), (("--guidance", "nan"), "a finite number")):
        result = run_cli(*sample, *bad, "--out", tmp_path / "o3")
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_an_edited_manifest_without_a_key_or_with_damaged_contents_is_refused(tiny_unet_dir, run_cli, tmp_path):
    import json
    import re

    from exporter.export import ManifestError, export_graphs, read_manifest

    export_graphs(str(tiny_unet_dir), tmp_path / "g", progress=False)
    manifest = json.loads((tmp_path / "g" / "manifest.json").read_text())
    del manifest["blocks"]
    (tmp_path / "g" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="manifest.json: no blocks: the manifest was edited or cut short"):
        read_manifest(tmp_path / "g")
    # keys present, contents damaged: one line naming what, not a KeyError deep in the runtime
    export_graphs(str(tiny_unet_dir), tmp_path / "h", progress=False)
    original = json.loads((tmp_path / "h" / "manifest.json").read_text())
    assert read_manifest(tmp_path / "h")["versions"]["onnxruntime"]  # the export passes' tools are recorded
    name = original["blocks"][0]["name"]
    for edit, message in (
            (lambda m: m["blocks"][0].pop("graphs"), f"block {name}: 'graphs' must list 1 file"),
            (lambda m: m["blocks"][0].pop("weights"), f"block {name}: no 'weights' file"),
            (lambda m: m.update(files=list(m["files"])), "'files' must map file names to sha256 digests"),
            (lambda m: m["blocks"][1].update(inputs="sample"),
             f"block {original['blocks'][1]['name']}: 'inputs' must be a list of tensors with a name"),
            (lambda m: m["blocks"][0]["outputs"][0].pop("dtype"),
             f"block {name}: 'outputs' must be a list of tensors with a name, a dtype and a shape"),
            (lambda m: m.update(groups={"ranges": []}), "'groups' must be null or hold a list of t ranges"),
            (lambda m: m.update(blocks=[]), "'blocks' must be a non-empty list"),
            # each of these was a KeyError, TypeError or IndexError at load or at the first cached step
            (lambda m: m.update(cache=None), "'cache' must map each cached feature to the blocks"),
            (lambda m: next(iter(m["cache"]["features"].values())).append("up9"),
             "'cache' must map each cached feature to the blocks that run with it, all of them blocks here"),
            (lambda m: m.update(sample_shape="x"), "'sample_shape' must be [channels, height, width]"),
            (lambda m: m.update(sampling_defaults=None), "'sampling_defaults' and 'scheduler_config' must be"),
            (lambda m: m["source"].pop("model_class"), "'source' must name the model class"),
            (lambda m: m["files"].update({"a\0b": "0" * 64}), "a file name holds a NUL character")):
        damaged = json.loads(json.dumps(original))
        edit(damaged)
        (tmp_path / "h" / "manifest.json").write_text(json.dumps(damaged))
        with pytest.raises(ManifestError, match=f"manifest.json: {re.escape(message)}.*edited or damaged; re-export"):
            read_manifest(tmp_path / "h")


def test_a_manifest_with_edited_timestep_groups_is_refused(tiny_int8_graphs, tmp_path):
    # the thresholds are written for servers of their own and must be the ranges' midpoints, which
    # the runtime switches at: an edited one would silently not be followed
    import json
    import re
    import shutil

    from exporter.export import ManifestError, read_manifest
    from exporter.quant.timestep_groups import TimestepGroups

    folder = tmp_path / "g"
    shutil.copytree(tiny_int8_graphs, folder)
    original = read_manifest(folder)
    groups = TimestepGroups.from_dict(original["groups"])
    (_, high), (after, _) = groups.ranges[:2]
    assert original["groups"]["thresholds"][0] == (high + after) / 2
    assert groups.group_of(original["groups"]["thresholds"][0]) == 1 and groups.group_of(high) == 0
    for edit, message in (
            (lambda g: g["ranges"].reverse(), "'groups' ranges must be [low, high] pairs of t in increasing order"),
            (lambda g: g["ranges"][0].append(1.0), "'groups' ranges must be [low, high] pairs"),
            (lambda g: g["ranges"][0].__setitem__(1, "high"), "'groups' ranges must be [low, high] pairs"),
            (lambda g: g["thresholds"].__setitem__(0, g["thresholds"][0] + 1),
             "'groups' thresholds must be the midpoints between neighbouring ranges")):
        damaged = json.loads(json.dumps(original))
        edit(damaged["groups"])
        (folder / "manifest.json").write_text(json.dumps(damaged))
        with pytest.raises(ManifestError, match=f"manifest.json: {re.escape(message)}.*edited or damaged; re-export"):
            read_manifest(folder)


def test_format_fp16_exports_fp16_graphs_and_dtype_overrides_the_recipe(run_cli, tiny_unet_dir, tmp_path):
    import json

    result = run_cli("-q", "export", "--model", tiny_unet_dir, "--format", "fp16", "--out", tmp_path / "a")
    assert result.returncode == 0, result.stderr
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["dtype"] == "fp16" and manifest["quantization"] is None
    result = run_cli("-q", "export", "--model", tiny_unet_dir, "--format", "fp16", "--dtype", "fp32",
                     "--out", tmp_path / "b")
    assert result.returncode == 0 and json.loads((tmp_path / "b" / "manifest.json").read_text())["dtype"] == "fp32"
    result = run_cli("sample", "--model", tiny_unet_dir, "--format", "fp16", "--out", tmp_path / "c")
    assert result.returncode == 2 and "sample runs PyTorch in FP32" in result.stderr
    result = run_cli("sample", "--model", tiny_unet_dir, "--format", "fp32", "--calib", tmp_path, "--out", tmp_path / "c")
    assert result.returncode == 2 and "--calib with an unquantized recipe (fp32)" in result.stderr
    recipe = tmp_path / "r.yaml"
    recipe.write_text("quantization: null\nexport:\n  dtype: fp64\n")
    result = run_cli("export", "--model", tiny_unet_dir, "--recipe", recipe, "--out", tmp_path / "d")
    assert result.returncode == 2 and "export.dtype: 'fp64' is not one of fp32, fp16, bf16" in result.stderr


def test_the_tools_refuse_bad_options_before_any_work(tmp_path):
    # before: a KeyError or a pool error after minutes of calibration, or --steps 0 silently the full run
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "work" / "graphs").mkdir(parents=True)
    out = ["--out", str(tmp_path / "out")]
    for tool, options, message in (
            ("ptq_evidence.py", [*out, "--formats", "int4"], "argument --formats: invalid value 'int4'"),
            ("ptq_evidence.py", [*out, "--workers", "0"], "argument --workers: invalid value '0'"),
            ("finetune_evidence.py", [*out, "--models", "digits-unett"], "argument --models: invalid value"),
            ("train_reference.py", [*out, "digits-dit", "--steps", "0"], "argument --steps: invalid value '0'"),
            ("real_size.py", ["--work", str(tmp_path / "work")], "holds an earlier run's graphs")):
        result = subprocess.run([sys.executable, str(root / "tools" / tool), *options], capture_output=True, text=True,
                                timeout=120, check=False)
        assert result.returncode == 2 and message in result.stderr, (tool, result.stderr[-2000:])
    assert not (tmp_path / "out").exists()
