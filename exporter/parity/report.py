"""What ``exporter parity`` writes: the result table, and next to the graphs the golden outputs,
data loaders and ``polygraphy run`` commands that repeat each check without this package."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from exporter.parity import calls

if TYPE_CHECKING:
    from exporter.parity.check import GraphParity

log = logging.getLogger(__name__)


def save_golden(folder: Path, graph: str, feed: dict, torch_results, threshold: float, basic: bool = False,
                order: dict[str, int] | None = None) -> None:
    """The replay of one graph's check; its command joins ``parity/COMMANDS.txt``, whose lines
    follow ``order`` (graph file -> its place in the manifest)."""
    from polygraphy.comparator import RunResults
    from polygraphy.json import to_json

    from exporter.fileio import atomic_write_bytes

    def write(path: Path, text: str) -> None:  # a replay never reads half a file
        atomic_write_bytes(path, text.encode())

    out = folder / "parity"
    out.mkdir(exist_ok=True)
    stem = graph.removesuffix(".onnx")
    write(out / f"{stem}.inputs.json", to_json([feed]))
    write(out / f"{stem}.golden.json", to_json(RunResults([("pytorch", torch_results[1])])))
    # polygraphy imports the script by file name: no dots in it
    write(out / f"{stem.replace('.', '_')}_data_loader.py",
        "# polygraphy data loader: the recorded inputs PyTorch's golden outputs were computed from\n"
        "from pathlib import Path\n\nfrom polygraphy.json import load_json\n\n\n"
        "def load_data():\n"
        f"    yield from load_json(str(Path(__file__).with_name('{stem}.inputs.json')))\n")
    commands = out / "COMMANDS.txt"
    # bf16 graphs: ONNX Runtime's CPU provider has no kernels for them, TensorRT runs them
    bf16 = any(isinstance(v, torch.Tensor) and v.dtype == torch.bfloat16 for v in feed.values())
    backend = "--trt --strongly-typed" if bf16 else "--onnxrt" + (" --graph-optimization-level ORT_ENABLE_BASIC"
                                                                    if basic else "")
    # the recorded shapes: with --trt, polygraphy builds its profile from --input-shapes alone (without
    # them, every dynamic axis at 1, and the recorded batch would not fit the engine)
    shapes = " ".join(f"{name}:[{','.join(str(d) for d in value.shape)}]" for name, value in feed.items())
    line = (f"polygraphy run {graph} {backend} --data-loader-script parity/{stem.replace('.', '_')}_data_loader.py "
            f"--load-outputs parity/{stem}.golden.json --compare snr --snr-threshold {threshold:g} "
            f"--input-shapes {shapes}\n")
    header = ("# run from the graphs folder; on a GPU machine replace --onnxrt (and its optimization level) with "
              "--trt --strongly-typed: polygraphy compares each run with the next, so one live backend is compared "
              "with the golden outputs (bf16 graphs: TensorRT only, ONNX Runtime's CPU provider cannot run them); "
              "each command runs all the samples parity compared in one call, and a real-size block's attention takes "
              "about 1 GiB per sample in ONNX Runtime: exporter parity --samples N writes replays of N samples\n")
    lines = [l for l in commands.read_text().splitlines(keepends=True)[1:] if f" {graph} " not in l] \
        if commands.is_file() else []
    order = order or {}  # parity checks the graphs group by group
    lines = sorted([*lines, line], key=lambda l: order.get(l.split()[2], len(order)))
    write(commands, header + "".join(lines))


def warn_of_large_replays(results: list[GraphParity]) -> None:
    """A replay command runs all of its graph's samples in one call (polygraphy compares call by
    call, parity over all the samples): at real size that can be more memory than the machine has."""
    available = calls.available_bytes()
    large = sorted((r for r in results if r.replay_bytes and available and r.replay_bytes > available),
                   key=lambda r: -r.replay_bytes)
    if large:
        log.warning("%d replay command(s) need more memory than is available here (the largest, %s: at least "
                    "%.1f GiB, %.1f GiB available): exporter parity --samples N writes replays of N samples",
                    len(large), large[0].graph, large[0].replay_bytes / 2**30, available / 2**30)


def format_parity(results: list[GraphParity]) -> str:
    lines = ["| block | graph | output | SQNR | max abs | threshold | polygraphy SNR | result |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for name, (sqnr, max_abs) in r.outputs.items():
            if r.passed:
                verdict = "ok"
            elif sqnr < r.threshold:
                verdict = (f"FAIL (first diverging layer: {r.first_diverging_layer}; "
                           f"PyTorch vs itself under float-level noise: {r.self_sqnr:.1f} dB)")
            elif not r.file_passed:
                verdict = "ok (another output of this graph fails)"
            else:
                verdict = "FAIL (the graph passes; the rows below do not)"
            lines.append(f"| {r.block} | {r.graph} | {name} | {sqnr:.1f} dB | {max_abs:.2e} | {r.threshold:.0f} dB "
                         f"| {'pass' if r.polygraphy_passed else 'fail'} | {verdict} |")
        for name, (sqnr, max_abs) in (r.engine_outputs or {}).items():
            lines.append(f"| {r.block} | {r.engine} (TensorRT) | {name} | {sqnr:.1f} dB | {max_abs:.2e} | "
                         f"{r.threshold:.0f} dB | — | {'ok' if sqnr >= r.threshold else 'FAIL'} |")
        for name, (sqnr, max_abs) in (r.runtime_outputs or {}).items():
            verdict = "ok" if sqnr >= r.threshold else "FAIL"
            if sqnr < r.threshold and r.file_passed:
                verdict += ": the runtime's rewrite of a passing graph" + (
                    " (EXPORTER_ORT_INTEGER_MATMUL=0 turns the integer MatMuls off)" if "integer" in r.runtime else "")
            lines.append(f"| {r.block} | {r.graph} as the runtime runs it ({r.runtime}) | {name} | {sqnr:.1f} dB | "
                         f"{max_abs:.2e} | {r.threshold:.0f} dB | — | {verdict} |")
    failed = [r.graph for r in results if not r.passed]
    worst = worst_sqnr(results)
    summary = f"{len(results)} graph(s) checked, worst SQNR {float('nan') if worst is None else worst:.1f} dB"
    rewritten = [r for r in results if r.runtime_outputs]
    if rewritten:
        summary += (f" (as the runtime runs them: {len(rewritten)} rewritten, worst "
                    f"{worst_runtime_sqnr(results):.1f} dB)")
    lines.append(summary + "; " + (f"{len(failed)} below threshold: {', '.join(failed)}" if failed
                                   else "all above threshold"))
    return "\n".join(lines)


def worst_sqnr(results: list[GraphParity]) -> float | None:
    """The lowest SQNR of the graph files against PyTorch (None: no graph checked)."""
    return min((s for r in results for s, _ in r.outputs.values()), default=None)


def worst_runtime_sqnr(results: list[GraphParity]) -> float | None:
    """The lowest SQNR of the runtime's rewritten sessions against PyTorch (None: none rewritten)."""
    return min((s for r in results for s, _ in (r.runtime_outputs or {}).values()), default=None)
