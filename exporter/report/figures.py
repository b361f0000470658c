"""The report's pictures, drawn with matplotlib (headless): each function writes one PNG.

* :func:`variant_grid`: rows = variants, columns = the same seeds, so differences are seen;
* :func:`activation_ranges`: per-t input range of the layers whose range moves most over t, with
  the timestep-group boundaries the calibration chose;
* :func:`parity_bars`: per-graph SQNR of PyTorch fake quant vs ONNX Runtime, threshold line;
* :func:`speed_quality`: speed-up over PyTorch against PSNR vs FP32 (the mean over the images that
  differ; the label says how many are identical), one point per variant.
"""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import numpy as np

from exporter.fileio import atomic_write_bytes
from exporter.imageio import read_image_folder

IDENTICAL_DB = 60.0  # lowest height for "identical to FP32" (no PSNR: every pixel equal); above every other point


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, out: Path, tight: bool = True) -> Path:
    if tight:
        fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format=out.suffix.lstrip("."))
    plt.close(fig)
    return atomic_write_bytes(out, buffer.getvalue())


def variant_grid(folders: dict[str, Path], out: Path, columns: int = 12) -> Path | None:
    """Image grid: one row per variant (label on the left), the same ``columns`` seeds in each;
    None when the variants share no image name (row and seed) to put side by side."""
    images = {name: read_image_folder(folder) for name, folder in folders.items()}
    keys = sorted(set.intersection(*(set(v) for v in images.values())), key=lambda rk: (rk[1], rk[0]))[:columns]
    if not keys:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(images), len(keys), figsize=(0.75 * len(keys) + 2.2, 0.75 * len(images) + 0.3),
                             dpi=100, squeeze=False)
    for r, (name, imgs) in enumerate(images.items()):
        for c, key in enumerate(keys):
            ax = axes[r][c]
            img = np.clip((imgs[key] + 1.0) / 2.0, 0.0, 1.0)
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
            if r == 0:
                ax.set_title(f"{key[0]}_{key[1]}", fontsize=7)
    fig.subplots_adjust(left=2.0 / (0.75 * len(keys) + 2.2), right=0.99, top=0.97, bottom=0.01,
                        wspace=0.05, hspace=0.05)
    return _save(plt, fig, out, tight=False)


def activation_ranges(quantization: dict, out: Path, title: str, lines: int = 4) -> Path | None:
    """From a quantization record (``quantization.json`` of an export or a fake-quant sample run)
    with per-t ranges: the ``lines`` layers whose range varies most over t, plus the flattest."""
    per_t = quantization.get("per_t_amax")
    if not per_t:
        return None
    plt = _pyplot()
    ts, layers = per_t["timesteps"], per_t["layers"]
    spread = {n: max(v) / max(min(v), 1e-12) for n, v in layers.items()}
    chosen = []  # the widest-varying layers, skipping ones reading the same tensor (q/k/v), + the flattest
    for name in sorted(spread, key=spread.get, reverse=True):
        if len(chosen) < lines and all(layers[name] != layers[c] for c in chosen):
            chosen.append(name)
    flattest = min(spread, key=spread.get)
    if flattest not in chosen:  # with few layers it may already be among the widest-varying ones
        chosen.append(flattest)
    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=110)
    for name in chosen:
        ax.plot(ts, layers[name], marker="o", markersize=3, label=f"{name} ({spread[name]:.1f}x)")
    ranges = (quantization.get("groups") or {}).get("ranges", [])
    for (_, last), (first, _) in itertools.pairwise(ranges):  # the lookup threshold between two groups
        ax.axvline((last + first) / 2, color="grey", linestyle="--", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("timestep t (noise level; sampling runs right to left)")
    ax.set_ylabel("max |input| at t")
    ax.set_title(f"{title}: activation range per t; dashed: the {len(ranges)} timestep groups", fontsize=9)
    ax.legend(fontsize=7)
    return _save(plt, fig, out)


def parity_bars(graphs: list[dict], out: Path, title: str) -> Path:
    """Bars of per-graph SQNR (``{"graph", "group", "sqnr_db", "threshold_db"}``), colour per group."""
    plt = _pyplot()
    from matplotlib.patches import Patch

    fig, ax = plt.subplots(figsize=(max(6.0, 0.16 * len(graphs) + 2.0), 4.0), dpi=110)
    colors = plt.get_cmap("tab10")
    x = np.arange(len(graphs))
    threshold = graphs[0]["threshold_db"]
    finite = [g["sqnr_db"] for g in graphs if g["sqnr_db"] is not None]
    top = max([*finite, threshold]) * 1.1  # the threshold line stays in view when every graph misses it
    heights = [top if g["sqnr_db"] is None else g["sqnr_db"] for g in graphs]  # None: identical outputs
    bars = ax.bar(x, heights, color=[colors(g["group"] % 10) for g in graphs])
    for bar, g in zip(bars, graphs):
        if g["sqnr_db"] is None:
            bar.set_hatch("//")
            ax.annotate("identical", (bar.get_x() + bar.get_width() / 2, top / 2), rotation=90, fontsize=6,
                        ha="center", va="center", backgroundcolor="white")
    ax.axhline(threshold, color="red", linestyle="--", linewidth=1, label=f"threshold {threshold:.0f} dB")
    ax.set_xticks(x, [g["graph"].removesuffix(".onnx") for g in graphs], rotation=90, fontsize=6)
    ax.set_ylabel("SQNR, PyTorch vs ONNX Runtime (dB)")
    ax.set_ylim(0, top * 1.05)
    handles = [ax.get_legend_handles_labels()[0][0]]
    handles += [Patch(color=colors(g % 10), label=f"timestep group {g}") for g in sorted({g["group"] for g in graphs})]
    ax.legend(handles=handles, fontsize=7, loc="lower right")
    ax.set_title(title, fontsize=9)
    return _save(plt, fig, out)


def speed_quality(variants: list[dict], out: Path, title: str) -> Path:
    """Speed-up over PyTorch FP32 (x) against PSNR vs FP32 (y), one labelled point per variant."""
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, NullFormatter

    styles = {"pytorch": ("black", "s"), "deepcache": ("tab:orange", "D")}
    fig, ax = plt.subplots(figsize=(8.0, 5.0), dpi=110)
    identical = max([IDENTICAL_DB] + [v["psnr_vs_fp32"] + 5 for v in variants if v["psnr_vs_fp32"] is not None])
    for v in variants:
        psnr = identical if v["psnr_vs_fp32"] is None else v["psnr_vs_fp32"]
        color, marker = styles.get(v["kind"], ("tab:blue" if v["precision"] == "fp32" else "tab:green", "o"))
        ax.scatter(v["speedup_vs_pytorch"], psnr, color=color, marker=marker,
                   facecolors=color if v["interval"] == 1 else "none", s=40)
        # the PSNR is the mean over the images that differ from FP32: say how many did not
        same = v.get("identical_vs_fp32") if v["psnr_vs_fp32"] is not None else None
        label = v["name"] + (f" ({same}/{v['images']} identical)" if same and v.get("images") else "")
        ax.annotate(label, (v["speedup_vs_pytorch"], psnr), fontsize=6, xytext=(4, 2), textcoords="offset points")
    ax.axvline(1.0, color="grey", linewidth=0.6)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}x"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks([t for t in (0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 6, 8, 12, 16)
                   if min(v["speedup_vs_pytorch"] for v in variants) / 1.2 <= t
                   <= max(v["speedup_vs_pytorch"] for v in variants) * 1.2])
    ax.set_xlabel("speed-up over the PyTorch FP32 loop (measured, same run)")
    ax.set_ylabel(f"PSNR vs PyTorch FP32 (dB; identical drawn at {identical:.0f})")
    ax.set_title(f"{title}\nblack: PyTorch, orange: DeepCache package, blue: runtime FP32, green: runtime "
                 "quantized; hollow: cached", fontsize=8)
    return _save(plt, fig, out)
