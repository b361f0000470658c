"""The bench's variants: the DeepCache package and our runtime cache the same thing."""

import pytest
import torch

from exporter.bench.variants import Variant, deepcache_available, open_variant
from exporter.export import export_graphs
from exporter.sampling.loop import SampleSettings

# the DeepCache package comes with the test extra; only the tests that open its variant need it
needs_deepcache = pytest.mark.skipif(not deepcache_available(),
                                     reason="the DeepCache package is installed with the test extra")

SETTINGS = SampleSettings(rows=(0, 1, 2), per_row=2, steps=10, scheduler="ddim", guidance=1.5, seed=5)


@pytest.fixture(scope="module")
def graphs(tiny_unet_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "fp32"
    export_graphs(str(tiny_unet_dir), out, progress=False)
    return {"fp32": out}


def run(variant, model, graphs):
    return open_variant(variant, str(model), graphs)(SETTINGS)


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@needs_deepcache
def test_deepcache_every_step_is_the_plain_loop(tiny_unet_dir, graphs):
    plain = run(Variant("pytorch-fp32", "pytorch"), tiny_unet_dir, graphs)
    assert max_diff(run(Variant("deepcache-1", "deepcache", interval=1), tiny_unet_dir, graphs), plain) == 0.0


@needs_deepcache
def test_deepcache_package_and_runtime_cache_agree(tiny_unet_dir, graphs):
    """DeepCacheSDHelper's branch 0 and our shallowest branch reuse the same feature on the same
    steps: the images agree to float precision, and both differ from the uncached ones."""
    plain = run(Variant("pytorch-fp32", "pytorch"), tiny_unet_dir, graphs)
    theirs = run(Variant("deepcache-3", "deepcache", interval=3), tiny_unet_dir, graphs)
    ours = run(Variant("ort-fp32-cache3", "runtime", "fp32", 3), tiny_unet_dir, graphs)
    assert max_diff(theirs, ours) < 1e-4
    assert max_diff(theirs, plain) > 1e-2  # caching really happened


@needs_deepcache
def test_deepcache_refuses_a_dit(tiny_dit_dir):
    from exporter.errors import UsageError

    with pytest.raises(UsageError, match="Stable Diffusion UNets"):
        open_variant(Variant("deepcache-3", "deepcache", interval=3), str(tiny_dit_dir), {})


def test_memory_probe_reports_its_own_process(tiny_unet_dir, graphs):
    """The probe's peak is the child's: a parent holding 1 GiB does not show up in it."""
    from exporter.bench.probe import probe_peak_rss

    ballast = torch.ones(2**28)  # 1 GiB in this process
    peak = probe_peak_rss(Variant("ort-fp32", "runtime"), str(tiny_unet_dir), graphs,
                          SampleSettings(rows=(0,), per_row=1, steps=2))
    assert 50 < peak < 1024
    del ballast


def test_the_runtime_gets_as_many_threads_as_pytorch(graphs, tiny_unet_dir):
    # one race, one thread count: ONNX Runtime's default (physical cores) may differ from PyTorch's
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        generate = open_variant(Variant("fp32", "runtime", precision="fp32"), str(tiny_unet_dir), graphs)
    finally:
        torch.set_num_threads(before)
    assert generate.runtime.backend.threads == 1
    generate(SETTINGS)
    session = next(iter(generate.runtime.backend._sessions.values()))
    assert session.get_session_options().intra_op_num_threads == 1
