"""exporter report: every picture is drawn from the run's data and none is blank."""

import json

import numpy as np
import pytest
from PIL import Image

from exporter.errors import UsageError
from exporter.imageio import write_image_folder
from exporter.report import build_report

pytest.importorskip("matplotlib")


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
