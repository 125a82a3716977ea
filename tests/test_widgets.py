"""The notebook widgets, driven as a user would: set a control, read what the display shows."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("ipywidgets")

from ldm.diffusion import q_sample  # noqa: E402
from ldm.pipeline import DiffusionPipeline  # noqa: E402
from ldm.schedule import NoiseSchedule, ScheduleConfig  # noqa: E402
from ldm.unet import UNet, UNetConfig  # noqa: E402
from ldm.widgets import explore, forward  # noqa: E402

from test_sampling import loud, stable_diffusion  # noqa: E402


@pytest.fixture(scope="module")
def toy():
    config = UNetConfig(in_channels=1, out_channels=1, sample_size=16, channels=16, channel_mult=(1, 2),
                        num_res_blocks=1, attention=(False, False), mid_attention=False, norm_groups=8, num_classes=3)
    return DiffusionPipeline(loud(UNet(config)))


def changed(before: dict, after: dict, name: str) -> float:
    return (before[name] - after[name]).abs().max().item()


def test_the_step_slider_scrubs_the_recorded_run(toy):
    ex = explore(toy, steps=5)
    assert ex.step.max == 4 and ex.step.value == 4 and len(ex.records) == 5
    last = dict(ex.shown)
    ex.step.value = 0
    first = dict(ex.shown)
    assert changed(first, last, "x_t") > 0.1 and "step 1 of 5" in ex.caption.value and "σ_t" in ex.caption.value
    # ε̂ is what the schedule says x_t holds: x_t = √ᾱ x̂₀ + √(1 − ᾱ) ε̂ (DDIM's first t is on a training step)
    t, x_t, x0, eps = ex.records[0]
    alpha_bar = NoiseSchedule(toy.sampling.schedule).alpha_bar_f64[int(t)].item()
    torch.testing.assert_close(alpha_bar**0.5 * x0 + (1 - alpha_bar) ** 0.5 * eps, x_t, rtol=1e-4, atol=1e-4)
    assert ex.images["x_t"].value[:4] == b"\x89PNG"


def test_each_control_runs_it_again(toy):
    ex = explore(toy, steps=4)
    for name, value in (("seed", 3), ("label", 2), ("guidance", 5.0), ("sampler", "euler_a"), ("steps", 6)):
        before = dict(ex.shown)
        ex.controls[name].value = value
        assert changed(before, ex.shown, "x̂₀") > 1e-3, name
    assert len(ex.records) == 6 and ex.step.max == 5


def test_stable_diffusion_prompts_move_the_display():
    ex = explore(stable_diffusion(), prompt="a red cube", steps=2)
    assert set(ex.controls) >= {"prompt", "negative"} and "label" not in ex.controls
    before = dict(ex.shown)
    ex.controls["prompt"].value = "a blue sphere"
    assert changed(before, ex.shown, "x̂₀") > 1e-3


def test_forward_scrubs_q_of_x_t_given_x_0():
    schedule = NoiseSchedule(ScheduleConfig())
    image = torch.rand(1, 8, 8) * 2 - 1
    fw = forward(schedule, image, seed=1)
    fw.t.value = 10
    expected = q_sample(schedule, image[None], torch.tensor([10]), fw.eps[None])[0]
    torch.testing.assert_close(fw.shown["x_t"], expected, rtol=1e-5, atol=1e-5)
    fw.t.value = 900
    assert (fw.shown["x_t"] - expected).abs().max() > 0.5 and "t = 900" in fw.caption.value
    with pytest.raises(ValueError, match="expected one image"):
        forward(schedule, image[None])
