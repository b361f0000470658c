"""The ``exporter`` command. Subcommands stay thin: parse, call the stage, report.

Expected user errors (``ExporterError``) print one ``error: ...`` line and exit 2, no traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from exporter import __version__
from exporter.cli_recipes import add_recipe_options, finetuned_inputs, recipe_of, warn_unused_finetune
from exporter.cli_types import finite_float, parse_latent, parse_rows, positive_int
from exporter.errors import ExporterError, UsageError


def add_sampling_options(p: argparse.ArgumentParser, model: bool = True) -> None:
    if model:
        p.add_argument("--model", help="reference name (digits-unet, digits-dit) or model directory (default: the "
                       "recipe's model, or the --finetuned run's)")
    p.add_argument("--cond", type=Path, help="conditioning safetensors (default: the model's or graphs' own)")
    add_image_options(p)
    p.add_argument("--batch-size", type=positive_int, default=40, help="images per denoiser call")
    p.add_argument("--latent", type=parse_latent, metavar="HxW",
                   help="size of the sample the model denoises (the latent; the image itself for pixel-space models "
                   "like the reference ones), default the model's sample_size; UNets take multiples of 2 per "
                   "downsampling, transformer graphs only their export size")


def add_image_options(p: argparse.ArgumentParser, rows_default: str = "all") -> None:
    """Which images, and how they are denoised: the same options wherever images are made."""
    from exporter.sampling import SCHEDULERS

    p.add_argument("--rows", type=parse_rows, help=f"conditioning rows, e.g. 0-9 or 0,3,7 (default: {rows_default})")
    p.add_argument("--per-row", type=positive_int, help="images per row (default 8)")
    p.add_argument("--steps", type=positive_int, help="denoising steps (default: model's sampling.json, else 20)")
    p.add_argument("--scheduler", choices=SCHEDULERS, help="sampler (default: model's, else ddim)")
    p.add_argument("--guidance", type=finite_float, help="classifier-free guidance scale; <= 1 disables it")
    p.add_argument("--seed", type=int, default=0)


def sampling_kwargs(args) -> dict:
    return {"cond": args.cond, "rows": args.rows, "per_row": args.per_row, "steps": args.steps,
            "scheduler": args.scheduler, "guidance": args.guidance, "seed": args.seed, "batch_size": args.batch_size,
            "progress": not args.quiet}


def cmd_sample(args) -> None:
    from exporter.fileio import require_new_folder
    from exporter.sampling.pytorch import sample_pytorch

    require_new_folder(args.out)  # before any work: two runs' images in one folder read as one run
    quantization = None
    if args.finetuned is not None:
        args.model, args.calib, quantization = finetuned_inputs(args)
    elif args.calib is not None or args.recipe is not None or args.format is not None:
        fmt, recipe = recipe_of(args)
        warn_unused_finetune(recipe, args.recipe or f"the bundled {fmt} recipe")
        if recipe.export.dtype != "fp32":  # not a PyTorch precision: sampling would quietly be FP32
            raise UsageError(f"{fmt or args.recipe}: export.dtype {recipe.export.dtype} is a type of the exported "
                             "graphs; sample runs PyTorch in FP32: export the graphs and use exporter run")
        quantization = recipe.quantization
        args.model = args.model or recipe.model
        if quantization is not None and quantization.activations is not None and args.calib is None:
            raise UsageError("quantized activations need --calib (a folder written by exporter calibrate)")
        if quantization is None and args.calib is not None:  # it would be recorded but not used
            raise UsageError(f"--calib with an unquantized recipe ({fmt or args.recipe}): leave out --calib for FP32 "
                             "images, or pick a quantized --format / --recipe")
    if args.model is None:
        raise UsageError("no model: pass --model (or --finetuned DIR, which brings its own, or a recipe with 'model')")
    record = sample_pytorch(args.model, args.out, calib=args.calib, quantization=quantization,
                            finetuned=args.finetuned, latent=args.latent, **sampling_kwargs(args))
    print(f"wrote {record['precision']} images to {args.out}")


def cmd_calibrate(args) -> None:
    import dataclasses

    from exporter.calibrate import calibrate

    _, recipe = recipe_of(args)
    spec = recipe.calibration
    if args.trajectories is not None:
        spec = dataclasses.replace(spec, trajectories=args.trajectories)
        spec.validate("--trajectories")
    if args.latent is not None:
        spec = dataclasses.replace(spec, latent=list(args.latent))
    model = args.model or recipe.model
    if model is None:
        raise UsageError("no model: pass --model or set 'model' in the recipe")
    state = calibrate(model, args.out, spec, cond=args.cond, progress=not args.quiet)
    samples = sum(s["samples"] for s in state["shards"].values())
    t, counts = [float(k) for k in state["coverage"]], list(state["coverage"].values())
    per_t = f"{min(counts)}" if min(counts) == max(counts) else f"{min(counts)}-{max(counts)}"
    at = f" at latent {spec.latent[0]}x{spec.latent[1]}" if spec.latent else ""
    print(f"recorded {samples} samples of {len(state['tensors'])} tensors over {len(t)} timesteps "
          f"(t {min(t):g} to {max(t):g}, {per_t} samples each){at} into {args.out}")


def cmd_finetune(args) -> None:
    from exporter.finetune import finetune
    from exporter.recipe import FinetuneSpec

    _, recipe = recipe_of(args)
    model = args.model or recipe.model
    if model is None:
        raise UsageError("no model: pass --model or set 'model' in the recipe")
    if recipe.quantization is None:
        raise UsageError("finetuning needs a quantized recipe (a format other than fp32)")
    spec = recipe.finetune or FinetuneSpec()
    record = finetune(model, args.calib, recipe.quantization, spec, args.out, progress=not args.quiet)
    print(f"finetuned {spec.method} ({spec.trajectories} trajectories x {spec.steps} steps) in {record['seconds']} s; "
          f"loss {record['losses'][0]:.3g} -> {record['losses'][-1]:.3g}; export with: exporter export "
          f"--finetuned {args.out} --out GRAPHS")


def cmd_export(args) -> None:
    from exporter.export import export_graphs

    dtype = args.dtype or "fp32"
    if args.finetuned is not None:
        model, args.calib, quantization = finetuned_inputs(args)
    else:
        fmt, recipe = recipe_of(args)
        warn_unused_finetune(recipe, args.recipe or f"the bundled {fmt} recipe")
        model = args.model or recipe.model
        if model is None:
            raise UsageError("no model: pass --model or set 'model' in the recipe")
        quantization = recipe.quantization
        dtype = args.dtype or recipe.export.dtype
        if quantization is not None and quantization.activations is not None and args.calib is None:
            raise UsageError("quantized activations need --calib (a folder written by exporter calibrate)")
    manifest = export_graphs(model, args.out, calib=args.calib, quantization=quantization, dtype=dtype,
                             progress=not args.quiet, finetuned=args.finetuned)
    graphs = sum(len(b["graphs"]) for b in manifest["blocks"])
    groups = manifest["groups"]["ranges"] if manifest["groups"] else None
    print(f"exported {graphs} graphs of {len(manifest['blocks'])} blocks"
          + (f" ({len(groups)} timestep groups)" if groups else "") + f" into {args.out}")


def cmd_build(args) -> None:
    from exporter.build.engines import build_engines
    from exporter.recipe import BuildSpec, load_recipe

    spec = load_recipe(args.recipe).build if args.recipe else BuildSpec()
    if args.timing_cache:
        spec.timing_cache = str(args.timing_cache)
    manifest = build_engines(args.graphs, args.out, spec, progress=not args.quiet)
    built = manifest["tensorrt"]
    print(f"built {sum(len(b['engines']) for b in manifest['blocks'])} engines into {args.out} "
          f"(TensorRT {built['version']}, {built['gpu']}"
          + (f"; version-compatible: they run on TensorRT {built['version']} and later releases, on the lean "
             f"runtime {built['lean_runtime']} shipped with them" if built["flags"]["version_compatible"] else "")
          + ")")


def cmd_run(args) -> None:
    import time

    from exporter.fileio import atomic_write_json, require_new_folder
    from exporter.imageio import write_image_folder
    from exporter.runtime import Runtime

    require_new_folder(args.out)  # before any work: two runs' images in one folder read as one run
    start = time.perf_counter()
    runtime = Runtime.load(args.graphs, threads=args.threads)
    images = runtime.generate(cond=args.cond, rows=args.rows, per_row=args.per_row or 8, steps=args.steps,
                              scheduler=args.scheduler, guidance=args.guidance, seed=args.seed,
                              cache_interval=args.cache_interval, cache_branch=args.cache_branch,
                              cache_schedule=args.cache_schedule, batch_size=args.batch_size,
                              latent=args.latent, progress=not args.quiet)
    write_image_folder(args.out, {key: img.numpy() for key, img in images.items()})
    settings = runtime.settings  # what ran: the manifest's sampling defaults where options were left out
    record = {"graphs": str(args.graphs), "backend": runtime.backend.name, "threads": args.threads,
              "rows": list(settings.rows), "per_row": settings.per_row, "steps": settings.steps,
              "scheduler": settings.scheduler, "guidance": settings.guidance, "seed": settings.seed,
              "batch_size": settings.batch_size, "cache_interval": args.cache_interval,
              "cache_branch": runtime.plan.feature, "full_steps": sorted(runtime.plan.full_steps),
              "cache_schedule": args.cache_schedule, "latent": [int(d) for d in next(iter(images.values())).shape[1:]],
              "seconds": round(time.perf_counter() - start, 2),
              "block_seconds": {k: round(v, 3) for k, v in runtime.seconds.items()}}
    atomic_write_json(Path(args.out) / "samples.json", record)
    print(f"wrote {len(images)} images to {args.out}")


def cmd_bench(args) -> None:
    from exporter.bench import format_bench, run_bench

    out = args.out or Path("runs/bench-quick" if args.quick else "runs/bench")
    result = run_bench(out, quick=args.quick, models=tuple(args.models), progress=not args.quiet)
    print(format_bench(result))
    print(f"wrote {out / 'bench.json'} and bench.md; pictures and report: exporter report {out}")


def cmd_report(args) -> None:
    from exporter.report import build_report

    print(f"wrote {build_report(args.run)} and its pictures")


def cmd_lint(args) -> int:
    from exporter.export.lint import format_lint, lint_folder

    reports = lint_folder(args.graphs)
    print(format_lint(reports))
    return 1 if any(r.violations for r in reports) else 0


def cmd_parity(args) -> int:
    from exporter.parity import check_parity, format_parity

    results, e2e = check_parity(args.graphs, calib=args.calib, write_golden=not args.no_replay,
                                end_to_end_check=not args.blocks_only,
                                engines=args.engines, blocks_to_check=args.blocks,
                                samples=args.samples, batch=args.batch, latent=args.latent, progress=not args.quiet)
    print(format_parity(results))
    if e2e is not None:
        print(f"end to end ({e2e['images']} images, {e2e['steps']} steps, runtime vs PyTorch): max abs latents "
              f"{e2e['max_abs_latents']:.2e}, PSNR {e2e['psnr_db']:.1f} dB, limit {e2e['limit']}: "
              + ("ok" if e2e["passed"] else "FAIL"))
    replay = Path(args.graphs) / "parity"
    if not args.no_replay and replay.is_dir():
        size = sum(f.stat().st_size for f in replay.iterdir() if f.is_file())
        print(f"replay files for polygraphy run (inputs, golden outputs, data loaders, COMMANDS.txt): {replay}, "
              f"{size / 1e6:.1f} MB in all (--no-replay skips them)")
    return 0 if all(r.passed for r in results) and (e2e is None or e2e["passed"]) else 1


def cmd_eval(args) -> None:
    from exporter.eval import evaluate, format_table
    from exporter.fileio import atomic_write_json

    if args.no_digits and args.reference is None:
        raise UsageError("--no-digits leaves only the comparison with --reference: pass --reference")
    result = evaluate(args.images, args.reference, digits=not args.no_digits)
    out = args.json or Path(args.images) / "metrics.json"
    atomic_write_json(out, result)
    print(format_table(result))
    print(f"wrote {out}")


def cmd_pipeline(args) -> int:
    from exporter.pipeline import run_pipeline

    options = sampling_kwargs(args)
    options.pop("cond"), options.pop("batch_size")
    fmt = args.format or (None if args.recipe else "int8")
    summary = run_pipeline(args.model, args.out, fmt=fmt, recipe_path=args.recipe, cache_interval=args.cache_interval,
                           **options)
    parity_ok = all(p["graphs_passed"] == p["graphs"] and (p["end_to_end"] is None or p["end_to_end"]["passed"])
                    for p in summary["parity"].values())
    return 0 if parity_ok and not summary["lint_violations"] else 1


# Read where the ONNX Runtime backend opens its sessions (exporter.runtime.ort_integer / ort_conv); named
# here so that --help shows them without importing ONNX.
ORT_ENVIRONMENT = """environment (ONNX Runtime backend; the graph files are never changed, only the sessions' copies):
  EXPORTER_ORT_INTEGER_MATMUL=1|0         quantized Linear layers as integer MatMuls on / off
                                          (unset: on where the CPU has int8 dot products)
  EXPORTER_ORT_FLOAT_CONV_WEIGHTS_MB=N    fold a graph's quantized conv weights to float once when they
                                          take at most N MiB in float32 (unset: 16; 0: never)"""
# The subcommands that open ONNX Runtime sessions show it under their options, line breaks kept.
RUNS_GRAPHS = {"epilog": ORT_ENVIRONMENT, "formatter_class": argparse.RawDescriptionHelpFormatter}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="exporter",
        description="Diffusion models (diffusers UNets and DiTs) from PyTorch to quantized engines, with evidence.",
    )
    parser.add_argument("--version", action="version", version=f"exporter {__version__}")
    # -v/-q work before or after the subcommand; SUPPRESS keeps a subparser from resetting them.
    common = argparse.ArgumentParser(add_help=False)
    for target, default in ((parser, False), (common, argparse.SUPPRESS)):
        target.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")
        target.add_argument("-q", "--quiet", action="store_true", default=default,
                            help="warnings only, no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("sample", parents=[common],
                       help="PyTorch images, FP32 or fake-quantized (--calib): <row>_<k>.png + grid.png")
    add_sampling_options(p)
    p.add_argument("--calib", type=Path, help="fake-quantize with --recipe or --format (default: int8) from "
                   "this calibration folder (not needed for w4a16)")
    add_recipe_options(p)
    p.add_argument("--finetuned", type=Path, help="an exporter finetune folder: its PTQ + finetuned model")
    p.add_argument("--out", type=Path, required=True, help="image folder (must not exist or be empty)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("calibrate", parents=[common], help="record block inputs along FP32 trajectories")
    p.add_argument("--model", help="reference name or model directory (default: the recipe's)")
    add_recipe_options(p)
    p.add_argument("--cond", type=Path, help="conditioning safetensors (default: the model dir's own)")
    p.add_argument("--trajectories", type=positive_int, help="override the recipe's trajectory count")
    p.add_argument("--latent", type=parse_latent, metavar="HxW",
                   help="denoise latents of this size (default: the recipe's calibration.latent, else the model's "
                   "own): calibrate at the size the UNet graphs will run at")
    p.add_argument("--out", type=Path, required=True, help="calibration folder (rerun to resume)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("export", parents=[common], help="ONNX graphs per block and timestep group + manifest.json")
    p.add_argument("--model", help="reference name or model directory (default: the recipe's)")
    p.add_argument("--calib", type=Path, help="calibration folder (needed unless fp32 or weight-only)")
    add_recipe_options(p)
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"],
                   help="type of the unquantized parts: fp16 or bf16 (opset 22, TensorRT 10.6+, Ampere+) for "
                   "TensorRT, fp32 for ONNX Runtime on CPU (default: the recipe's export.dtype, fp32 unless set; "
                   "with --finetuned, fp32)")
    p.add_argument("--finetuned", type=Path, help="an exporter finetune folder (brings its model, calibration, recipe)")
    p.add_argument("--out", type=Path, required=True, help="graphs folder (must not exist or be empty)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("finetune", parents=[common],
                       help="EfficientDM-style finetuning of the PTQ model (QALoRA + temporal LSQ, data-free)")
    p.add_argument("--model", help="reference name or model directory (default: the recipe's)")
    p.add_argument("--calib", type=Path, required=True, help="calibration folder (PTQ starting point)")
    add_recipe_options(p)
    p.add_argument("--out", type=Path, required=True, help="finetune folder (rerun the same command to resume)")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("build", parents=[common], help="TensorRT engines from exported graphs (needs a GPU)")
    p.add_argument("graphs", type=Path, help="folder written by exporter export")
    p.add_argument("--recipe", type=Path, help="recipe whose build: section sets profiles and flags")
    p.add_argument("--timing-cache", type=Path, help="timing cache file shared across builds (one written by "
                   "another TensorRT build or GPU is renamed aside and a new one started)")
    p.add_argument("--out", type=Path, required=True, help="engines folder (must not exist or be empty)")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("run", parents=[common], **RUNS_GRAPHS,
                       help="denoise with exported graphs (ONNX Runtime) or built engines (TensorRT), optional DeepCache")
    p.add_argument("graphs", type=Path, help="folder written by exporter export or exporter build")
    add_sampling_options(p, model=False)
    p.add_argument("--cache-interval", type=positive_int, default=1,
                   help="DeepCache: a full step every N steps (1: off)")
    p.add_argument("--cache-branch", help="cached feature (default: the shallowest branch)")
    p.add_argument("--cache-schedule", default="uniform", choices=["uniform", "quadratic"],
                   help="which steps are full: every N-th, or denser early (same count)")
    p.add_argument("--threads", type=positive_int, help="ONNX Runtime intra-op threads (default: all cores)")
    p.add_argument("--out", type=Path, required=True, help="image folder (must not exist or be empty)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("bench", parents=[common], **RUNS_GRAPHS,
                       help="PyTorch, the DeepCache package and the runtime (FP32, quantized, cached), side by side")
    p.add_argument("--quick", action="store_true",
                   help="16 images, one round, INT8 only, cache interval 3 (a few minutes on 2 cores)")
    p.add_argument("--models", type=lambda s: s.split(","), default=["digits-unet", "digits-dit"],
                   help="comma-separated reference names or model directories (default: both reference models)")
    p.add_argument("--out", type=Path, help="output folder (default runs/bench, with --quick runs/bench-quick)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("report", parents=[common], help="a bench run's tables and pictures in one Markdown file")
    p.add_argument("run", type=Path, help="folder written by exporter bench")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("lint", parents=[common],
                       help="check graphs against TensorRT Q/DQ rules; quantized vs float layers per block")
    p.add_argument("graphs", type=Path, help="folder written by exporter export")
    p.set_defaults(func=cmd_lint)

    p = sub.add_parser("parity", parents=[common], **RUNS_GRAPHS,
                       help="PyTorch vs ONNX Runtime (and TensorRT) per block and group (polygraphy)")
    p.add_argument("graphs", type=Path, help="folder written by exporter export")
    p.add_argument("--calib", type=Path, help="calibration folder the inputs come from (default: the one exported from; "
                   "any calibration of the model: the scales are the export's, from its quantization.json)")
    p.add_argument("--blocks-only", action="store_true", help="skip the end-to-end image comparison")
    p.add_argument("--blocks", type=lambda s: s.split(","), help="check only these blocks, e.g. up3.layer2,head")
    # parity.inputs.SAMPLES and BATCH (not imported: that would load torch before the arguments are read)
    p.add_argument("--samples", type=positive_int, default=64,
                   help="recorded inputs per graph, spread over its timestep group (default 64; every block "
                   "tensor of one group's samples stays in memory: 57 MiB per sample for SD 1.5 at 64x64)")
    p.add_argument("--batch", type=positive_int,
                   help="samples per call of each backend (default 8, fewer for a graph whose largest tensors, "
                   "twice per sample, would take over half the available memory: a graph's explicit attention "
                   "takes about 1.1 GiB per sample of a call for SD 1.5 at 64x64)")
    p.add_argument("--no-replay", action="store_true",
                   help="do not write GRAPHS/parity/ (each checked graph's inputs and PyTorch's outputs, with the "
                   "polygraphy run command that repeats the check): at real size they take GBs")
    p.add_argument("--engines", type=Path, help="engines built from GRAPHS: TensorRT joins the comparison (GPU)")
    p.add_argument("--latent", type=parse_latent, metavar="HxW",
                   help="compare the blocks at this latent size (the recorded latents resized; e.g. the largest of "
                   "the engines' profile); the end-to-end check stays at the model's own size")
    p.set_defaults(func=cmd_parity)

    p = sub.add_parser("eval", parents=[common],
                       help="quality yardstick: accuracy, FD-digits, PSNR/SSIM vs a reference")
    p.add_argument("--images", type=Path, required=True, help="folder of <row>_<k>.png")
    p.add_argument("--reference", type=Path, help="folder generated from the same seeds (e.g. FP32)")
    p.add_argument("--json", type=Path, help="where to write the metrics (default: IMAGES/metrics.json)")
    p.add_argument("--no-digits", action="store_true",
                   help="images of another model than the digits references: no digit accuracy or FD-digits, "
                   "only PSNR/SSIM against --reference")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("pipeline", parents=[common], **RUNS_GRAPHS,
                       help="calibrate, export, lint, parity, run and eval in one go, with a summary table")
    p.add_argument("--model", help="reference name or model directory (default: the recipe's)")
    add_recipe_options(p)
    add_image_options(p, rows_default="the recipe's sampling.rows, 0-9")
    p.add_argument("--cache-interval", type=positive_int,
                   help="DeepCache interval of the cached variant <format>-cacheN (default: the recipe's "
                   "sampling.cache_interval, 3; 1: no cached variant)")
    p.add_argument("--out", type=Path, required=True, help="run root: ROOT/calib, graphs/, images/, summary.json")
    # the sampling options default to the recipe's sampling: section (flags override it)
    p.set_defaults(func=cmd_pipeline, cond=None, batch_size=40, seed=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        code = args.func(args)
    except ExporterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path that cannot be written or read (a file where a folder goes, no permission, ...)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not _out_of_memory(e):
            raise
        hint = ("a smaller --batch (samples per call) or --samples" if args.command == "parity"
                else "a smaller --latent or --batch-size")
        print(f"error: out of memory ({str(e).strip() or type(e).__name__}); {hint} needs less", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return code or 0


def _out_of_memory(error: RuntimeError) -> bool:
    """An allocation failure of torch's CPU allocator or of ONNX Runtime, which raise RuntimeError
    (subclasses) rather than MemoryError."""
    text = str(error)
    return "can't allocate memory" in text or "Failed to allocate memory" in text


if __name__ == "__main__":
    sys.exit(main())
