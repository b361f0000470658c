"""exporter report: every picture is drawn from the run's data and none is blank."""

import json

import numpy as np
import pytest
from PIL import Image

from exporter.errors import UsageError
from exporter.imageio import write_image_folder
from exporter.report import build_report


def variant(name, kind="runtime", precision="fp32", interval=1, speedup=1.0, psnr=None):
    return {"name": name, "kind": kind, "precision": precision, "interval": interval, "schedule": "uniform",
            "seconds": [1.0], "images": 4, "ms_per_image": {"median": 250.0, "min": 250.0, "max": 250.0},
            "speedup_vs_pytorch": speedup, "speedup_vs_ort_fp32": speedup, "peak_rss_mb": 400.0,
            "artifact_mb": 7.0, "accuracy": 1.0, "fd_digits": 6.0, "psnr_vs_fp32": psnr}


@pytest.fixture
def bench_run(tmp_path):
    rng = np.random.default_rng(0)
    variants = [variant("pytorch-fp32", "pytorch"), variant("deepcache-3", "deepcache", interval=3, speedup=2.0, psnr=30.0),
                variant("ort-int8-cache3", precision="int8", interval=3, speedup=2.5, psnr=29.0)]
    for v in variants:
        write_image_folder(tmp_path / "m" / "images" / v["name"],
                           {(r, k): rng.uniform(-1, 1, (1, 16, 16)).astype(np.float32) for r in range(2) for k in range(2)})
    graphs = tmp_path / "m" / "graphs" / "int8"
    graphs.mkdir(parents=True)
    (graphs / "quantization.json").write_text(json.dumps({
        "per_t_amax": {"timesteps": [1, 500, 999], "layers": {"a": [1.0, 2.0, 4.0], "b": [3.0, 3.0, 3.1]}},
        "groups": {"ranges": [[1, 400], [600, 999]]}}))
    parity = [{"block": "stem", "graph": f"stem.g{g}.onnx", "group": g, "threshold_db": 40.0, "sqnr_db": 45.0 + g,
               "passed": True} for g in range(2)]
    result = {"images": 4, "steps": 20, "guidance": 1.5, "rounds": 1, "backend": "onnxruntime",
              "variants": variants, "batch_size": 1, "throughput_batch": 40, "parity": {"int8": parity}, "graphs": {"int8": str(graphs)}}
    (tmp_path / "bench.json").write_text(json.dumps({"quick": True, "models": {"m": result}}))
    return tmp_path


def test_report_links_non_blank_pictures(bench_run):
    report = build_report(bench_run)
    text = report.read_text()
    links = [line.split("](")[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]
    assert sorted(links) == ["act_ranges_m.png", "grid_m.png", "parity_m_int8.png", "speed_quality_m.png"]
    for link in links:
        pixels = np.asarray(Image.open(report.parent / link).convert("L"), dtype=np.float32)
        assert pixels.shape[0] > 100 and pixels.std() > 5, link  # drawn, not an empty canvas
    assert "| deepcache-3 |" in text and "| ort-int8-cache3 |" in text


def test_report_refuses_a_folder_without_bench_results(tmp_path):
    with pytest.raises(UsageError, match="exporter bench"):
        build_report(tmp_path)
    (tmp_path / "bench.json").write_text("{not json")
    with pytest.raises(UsageError, match="not a bench result"):
        build_report(tmp_path)


@pytest.fixture
def drawn(monkeypatch):
    """The figures' axes as drawn, captured just before each is saved."""
    from exporter.report import figures

    axes = []
    save = figures._save

    def capture(plt, fig, out, tight=True):
        axes.append(fig.axes[0])
        return save(plt, fig, out, tight)

    monkeypatch.setattr(figures, "_save", capture)
    return axes


def test_parity_bars_keep_the_threshold_in_view_when_every_graph_misses_it(tmp_path, drawn):
    from exporter.report.figures import parity_bars

    graphs = [{"graph": f"b.g{g}.onnx", "group": g, "threshold_db": 40.0, "sqnr_db": 20.0 + g} for g in range(3)]
    parity_bars(graphs, tmp_path / "p.png", "all below")
    (ax,) = drawn
    threshold = [line.get_ydata()[0] for line in ax.get_lines()]
    assert threshold == [40.0] and ax.get_ylim()[1] > 40.0  # before: the axis ended at 1.1 x 22 dB


def test_activation_ranges_draw_each_layer_once(tmp_path, drawn):
    from exporter.report.figures import activation_ranges

    record = {"per_t_amax": {"timesteps": [1, 500, 999], "layers": {"a": [1.0, 2.0, 4.0], "b": [3.0, 3.0, 3.1]}}}
    activation_ranges(record, tmp_path / "a.png", "two layers")
    (ax,) = drawn
    assert sorted(line.get_label().split()[0] for line in ax.get_lines()) == ["a", "b"]  # "b" was drawn twice


def test_speed_quality_labels_say_how_many_images_are_identical(tmp_path, drawn):
    from exporter.report.figures import speed_quality

    variants = [variant("ort-fp32", psnr=None), {**variant("ort-int8", precision="int8", psnr=31.0),
                                                 "identical_vs_fp32": 3}]
    speed_quality(variants, tmp_path / "s.png", "labels")
    (ax,) = drawn
    assert sorted(t.get_text() for t in ax.texts) == ["ort-fp32", "ort-int8 (3/4 identical)"]


def test_report_leaves_the_grid_out_when_the_images_cannot_be_compared(bench_run):
    images = bench_run / "m" / "images"
    for png in (images / "deepcache-3").iterdir():  # no image name in common with the other variants
        png.rename(png.with_name(png.name.replace("0_", "7_").replace("1_", "8_")))
    text = build_report(bench_run).read_text()
    assert "Image grid left out: the variants share no image name" in text and "![parity int8]" in text
    for png in (images / "deepcache-3").iterdir():
        png.unlink()
    text = build_report(bench_run).read_text()
    assert "Image grid left out:" in text and "no images named" in text and "![speed vs quality]" in text
