"""Every sampler honours the model's ``clip_sample``, as DDIM does; latent models stay unclipped."""

import json

import pytest
import torch

from exporter import reference
from exporter.errors import UsageError
from exporter.sampling.schedulers import SCHEDULERS, make_scheduler

PIXEL_CONFIG = json.loads((reference.path("digits-unet") / "scheduler" / "scheduler_config.json").read_text())
LATENT_CONFIG = {**PIXEL_CONFIG, "clip_sample": False}


def predicted_clean_image(name: str, config: dict) -> torch.Tensor:
    """The clean image a scheduler predicts at the first of 10 steps, from a noise prediction that
    puts it far outside [-1, 1]."""
    scheduler = make_scheduler(name, config)
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[0]
    sample = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * scheduler.init_noise_sigma
    eps = -20 * scheduler.scale_model_input(sample, t)
    if name == "dpm++":  # multistep: the clean-image prediction is its own public step
        scheduler._init_step_index(t)
        return scheduler.convert_model_output(eps, sample=sample)
    return scheduler.step(eps, t, sample).pred_original_sample


@pytest.mark.parametrize("name", SCHEDULERS)
def test_clip_sample_bounds_the_predicted_clean_image(name):
    assert PIXEL_CONFIG["clip_sample"] and PIXEL_CONFIG["clip_sample_range"] == 1.0
    # Euler works on the unscaled sample (|x| ~ 1e4 at the first step): float32 rounds its
    # sample - sigma * eps to a few 1e-3
    assert float(predicted_clean_image(name, PIXEL_CONFIG).abs().max()) <= 1.01


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("bound", [0.5, 2.0])
def test_every_sampler_clips_at_the_models_range_for_every_prediction_type(name, prediction, bound):
    # clipped at [-range, range], as DDIM's clip_sample does: not rescaled into [-1, 1] (diffusers'
    # dynamic thresholding), not left unclipped (v-prediction or sample models under Euler)
    config = {**PIXEL_CONFIG, "prediction_type": prediction, "clip_sample_range": bound}
    clean = predicted_clean_image(name, config)
    assert abs(float(clean.abs().max()) - bound) <= 0.01 * max(bound, 1.0), (name, prediction)


def test_dpm_solver_refuses_steps_that_repeat_timesteps():
    # DDPM's "leading" spacing at 1000 of 1000 steps gives DPM-Solver++ a repeated timestep: NaN images
    from exporter.sampling.schedulers import set_steps

    config = {**PIXEL_CONFIG, "timestep_spacing": "leading", "num_train_timesteps": 1000}
    with pytest.raises(UsageError, match=r"1000 denoising steps: .* gives 1 distinct timestep\(s\); ask for fewer"):
        set_steps(make_scheduler("dpm++", config), 1000)
    set_steps(make_scheduler("ddim", config), 1000)  # DDIM's timesteps stay distinct
    set_steps(make_scheduler("dpm++", config), 20)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_without_clip_sample_nothing_is_clipped(name):
    assert float(predicted_clean_image(name, LATENT_CONFIG).abs().max()) > 10.0


def test_clipped_euler_matches_euler_where_nothing_needs_clipping():
    plain = make_scheduler("euler", LATENT_CONFIG)
    clipped = make_scheduler("euler", PIXEL_CONFIG)
    for s in (plain, clipped):
        s.set_timesteps(10)
    t = plain.timesteps[-1]  # the last step: small sigma, the predicted image stays inside [-1, 1]
    sample = 0.5 * torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    eps = 0.01 * torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    for s in (plain, clipped):
        s._step_index = len(s.timesteps) - 1
    expected = plain.step(eps, t, sample).prev_sample
    assert torch.allclose(clipped.step(eps, t, sample).prev_sample, expected, atol=1e-6)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_each_scheduler_starts_fresh(name):
    """make_scheduler hands out copies of one built scheduler: a second run, after a first one
    stepped its own copy to the end, takes exactly the same steps (DPM-Solver++ keeps the previous
    model outputs, Euler its step index)."""

    def run() -> torch.Tensor:
        scheduler = make_scheduler(name, PIXEL_CONFIG)
        scheduler.set_timesteps(6)
        sample = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * scheduler.init_noise_sigma
        for i, t in enumerate(scheduler.timesteps):
            eps = torch.sin(scheduler.scale_model_input(sample, t) + i)
            sample = scheduler.step(eps, t, sample, return_dict=False)[0]
        return sample

    first = run()
    assert make_scheduler(name, PIXEL_CONFIG) is not make_scheduler(name, PIXEL_CONFIG)
    assert torch.equal(run(), first)


def test_unknown_scheduler_is_refused():
    with pytest.raises(UsageError, match="choose one of ddim, dpm"):
        make_scheduler("pndm", PIXEL_CONFIG)


def test_dynamic_thresholding_is_ddims_and_dpm_solvers_own_and_refused_for_euler():
    """A config with ``thresholding`` (dynamic thresholding: DDIM applies it instead of the clip):
    DPM-Solver++ applies the same thresholding, not the plain clip; diffusers' Euler has none."""
    config = {**PIXEL_CONFIG, "thresholding": True, "dynamic_thresholding_ratio": 0.95, "sample_max_value": 1.5}
    ddim, dpm = predicted_clean_image("ddim", config), predicted_clean_image("dpm++", config)
    assert float(ddim.abs().max()) <= 1.5 and torch.allclose(dpm, ddim, atol=1e-5)  # was a plain clip: 0.33 apart
    with pytest.raises(UsageError, match="dynamic thresholding .* use ddim or dpm\\+\\+"):
        make_scheduler("euler", config)
