import pytest
import torch

from ldm.samplers import classifier_free_guidance, ddim, ddpm, get_sampler, sample
from ldm.schedule import NoiseSchedule, ScheduleConfig, gather


def toy_model(x, t, cond):
    """A smooth, t-dependent stand-in for a denoiser (bounded ε predictions)."""
    return torch.tanh(0.5 * x) * (1 + t.float()[:, None, None, None] / 1000)


def test_ddim_eta1_over_all_steps_equals_ddpm():
    s = NoiseSchedule(ScheduleConfig(num_train_timesteps=200))
    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    a = list(ddim(toy_model, s, x_T, num_inference_steps=200, eta=1.0, generator=torch.Generator().manual_seed(5)))
    b = list(ddpm(toy_model, s, x_T, clip_x0=False, generator=torch.Generator().manual_seed(5)))
    assert len(a) == len(b) == 200
    for ra, rb in zip(a[::20], b[::20]):
        assert ra.t == rb.t
        assert torch.allclose(ra.x_prev, rb.x_prev, rtol=1e-4, atol=1e-4)
    assert torch.allclose(a[-1].x_prev, b[-1].x_prev, rtol=1e-3, atol=1e-3)


def test_ddim_eta0_is_deterministic_and_inverts_a_perfect_model():
    """With the true ε of a single data point, DDIM(η=0) lands on that point from any x_T."""
    s = NoiseSchedule()
    target = torch.linspace(-0.9, 0.9, 16).reshape(1, 1, 4, 4)

    def oracle(x, t, c):  # ε implied by x_t if x_0 were `target`
        ab = gather(s.alpha_bar, t, x)
        return (x - ab.sqrt() * target) / (1 - ab).sqrt()

    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    out = sample(oracle, s, x_T.shape, x_T=x_T, sampler="ddim", num_inference_steps=10, progress=False)
    assert torch.allclose(out, target.expand_as(out), atol=1e-4)
    again = sample(oracle, s, x_T.shape, x_T=x_T, sampler="ddim", num_inference_steps=10, progress=False)
    assert torch.equal(out, again)


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_samplers_handle_each_parametrisation(prediction):
    s = NoiseSchedule(ScheduleConfig.cosine())
    target = torch.full((1, 1, 2, 2), 0.25)

    def oracle(x, t, c):
        ab = gather(s.alpha_bar, t, x)
        eps = (x - ab.sqrt() * target) / (1 - ab).sqrt()
        return target.expand_as(x) if prediction == "x0" else ab.sqrt() * eps - (1 - ab).sqrt() * target

    x_T = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    for name in ("ddim", "ddpm"):
        out = sample(oracle, s, x_T.shape, x_T=x_T, sampler=name, num_inference_steps=20, prediction=prediction,
                     generator=torch.Generator().manual_seed(0), progress=False)
        assert torch.allclose(out, target.expand_as(out), atol=1e-3), name


def test_same_seed_same_samples_different_seed_different():
    s = NoiseSchedule()
    run = lambda seed, name: sample(toy_model, s, (2, 1, 4, 4), sampler=name, num_inference_steps=20, eta=0.5,
                                    generator=torch.Generator().manual_seed(seed), progress=False) if name == "ddim" else \
        sample(toy_model, s, (2, 1, 4, 4), sampler=name, num_inference_steps=20,
               generator=torch.Generator().manual_seed(seed), progress=False)
    for name in ("ddim", "ddpm"):
        assert torch.equal(run(0, name), run(0, name))
        assert not torch.allclose(run(0, name), run(1, name))


def test_generator_yields_records_for_every_step():
    s = NoiseSchedule()
    x_T = torch.randn(1, 1, 4, 4)
    records = list(ddim(toy_model, s, x_T, num_inference_steps=7))
    assert [r.index for r in records] == list(range(7))
    assert [r.t for r in records] == s.timesteps(7).tolist()
    assert torch.equal(records[0].x_t, x_T)
    for prev, nxt in zip(records, records[1:]):
        assert torch.equal(prev.x_prev, nxt.x_t)
    assert torch.equal(records[-1].x_prev, records[-1].x0_pred)  # ᾱ = 1 after the last step


def test_ddpm_variances_differ_and_clip_bounds_x0():
    s = NoiseSchedule()
    x_T = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 3
    small = list(ddpm(toy_model, s, x_T, num_inference_steps=50, variance="fixed_small", generator=torch.Generator().manual_seed(0)))
    large = list(ddpm(toy_model, s, x_T, num_inference_steps=50, variance="fixed_large", generator=torch.Generator().manual_seed(0)))
    assert not torch.allclose(small[-1].x_prev, large[-1].x_prev)
    assert all(r.x0_pred.abs().max() <= 1 for r in small)


def test_classifier_free_guidance_arithmetic():
    def model(x, t, cond):
        return x * cond.float()[:, None, None, None]

    x, t = torch.ones(2, 1, 2, 2), torch.tensor([5, 5])
    cond, null = torch.tensor([3, 3]), torch.tensor([10])
    assert torch.equal(classifier_free_guidance(model, 1.0, null)(x, t, cond), model(x, t, cond))
    guided = classifier_free_guidance(model, 2.5, null)(x, t, cond)
    assert torch.allclose(guided, torch.full_like(x, 10 + 2.5 * (3 - 10)))
    with pytest.raises(ValueError, match="condition"):
        classifier_free_guidance(model, 2.0, null)(x, t, None)


def test_bad_options_are_named():
    s = NoiseSchedule()
    with pytest.raises(ValueError, match="unknown sampler 'euler_x'"):
        get_sampler("euler_x")
    with pytest.raises(ValueError, match="num_inference_steps"):
        sample(toy_model, s, (1, 1, 2, 2), sampler="ddim", num_inference_steps=2000, progress=False)
    with pytest.raises(ValueError, match="variance"):
        list(ddpm(toy_model, s, torch.zeros(1, 1, 2, 2), variance="learned"))
    with pytest.raises(ValueError, match="prediction"):
        sample(toy_model, s, (1, 1, 2, 2), num_inference_steps=3, prediction="score", progress=False)
