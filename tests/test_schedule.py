import math

import pytest
import torch

from ldm.schedule import BETA_KINDS, NoiseSchedule, ScheduleConfig, gather, make_betas


@pytest.mark.parametrize("kind", BETA_KINDS)
def test_alpha_bar_strictly_decreasing_in_unit_interval(kind):
    s = NoiseSchedule(ScheduleConfig(kind=kind))
    assert len(s) == 1000
    assert (s.alpha_bar[1:] < s.alpha_bar[:-1]).all()
    assert 0 < s.alpha_bar[-1] < s.alpha_bar[0] < 1
    assert torch.allclose(s.sqrt_alpha_bar**2 + s.sqrt_one_minus_alpha_bar**2, torch.ones(1000), atol=1e-6)


def test_linear_endpoints_and_alpha_bar_is_cumulative_product():
    s = NoiseSchedule(ScheduleConfig.ddpm())
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    assert s.alpha_bar[2].item() == pytest.approx((1 - 1e-4) * (1 - s.betas[1].item()) * (1 - s.betas[2].item()), rel=1e-6)
    # float64 computation: the DDPM schedule's ᾱ_{T−1} ≈ 4.04e-5 (float32 cumprod drifts in the 3rd digit)
    exact = math.prod(1 - (1e-4 + (0.02 - 1e-4) * i / 999) for i in range(1000))
    assert s.alpha_bar[-1].item() == pytest.approx(exact, rel=1e-5)


def test_scaled_linear_is_square_of_linear_sqrt():
    s = NoiseSchedule(ScheduleConfig.stable_diffusion())
    assert s.betas[0].item() == pytest.approx(0.00085) and s.betas[-1].item() == pytest.approx(0.012)
    sq = s.betas.double().sqrt()
    assert torch.allclose(sq[1:] - sq[:-1], (sq[1] - sq[0]).expand(999), atol=1e-7)


def test_cosine_matches_closed_form_alpha_bar():
    T, s_ = 1000, 0.008
    s = NoiseSchedule(ScheduleConfig.cosine())
    f = lambda t: math.cos((t / T + s_) / (1 + s_) * math.pi / 2) ** 2
    for t in (0, 10, 500, 900):  # ᾱ(t) = f(t+1)/f(0) with 0-indexed t (β clipping only bites at the very end)
        assert s.alpha_bar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-5)
    assert s.betas.max().item() == pytest.approx(0.999)  # the clip at the last step


@pytest.mark.parametrize("T,beta_start,beta_end", [(1000, 1e-4, 0.02), (10, 1e-7, 2e-3), (200, 0.001, 0.2)])
def test_sigmoid_is_symmetric_around_midpoint(T, beta_start, beta_end):
    """GeoDiff's sigmoid schedule [Xu et al. 2022]: β_t = β_start + (β_end − β_start)·σ(x_t), x_t = −6 + 12 t/(T − 1).

    Symmetric about the midpoint (σ(x) + σ(−x) = 1), strictly increasing, on exactly that range: it starts a hair above
    β_start and ends a hair below β_end (σ(±6) = 0.5 ± 0.4975), not at the endpoints themselves as "linear" does.
    """
    config = ScheduleConfig(kind="sigmoid", num_train_timesteps=T, beta_start=beta_start, beta_end=beta_end)
    b = make_betas(config)
    assert b.shape == (T,) and b.dtype == torch.float64
    mid = (beta_start + beta_end) / 2
    assert torch.allclose(b + b.flip(0), torch.full_like(b, 2 * mid), rtol=0, atol=1e-15)
    assert (b[1:] > b[:-1]).all()
    sig = lambda x: 1 / (1 + math.exp(-x))
    closed = lambda t: beta_start + (beta_end - beta_start) * sig(-6 + 12 * t / (T - 1))
    assert b[0].item() == pytest.approx(closed(0), rel=1e-12) and b[-1].item() == pytest.approx(closed(T - 1), rel=1e-12)
    assert b[0].item() == pytest.approx(beta_start + (beta_end - beta_start) * 0.0024726231566347743, rel=1e-12)
    assert b[-1].item() == pytest.approx(beta_end - (beta_end - beta_start) * 0.0024726231566347743, rel=1e-12)
    for t in (1, T // 3, T // 2, T - 2):
        assert b[t].item() == pytest.approx(closed(t), rel=1e-12), t
    # ᾱ is the running product of those β (float64 in, float32 stored)
    s = NoiseSchedule(config)
    assert s.alpha_bar[-1].item() == pytest.approx(math.prod(1 - closed(t) for t in range(T)), rel=1e-6)
    assert s.alpha_bar[0].item() == pytest.approx(1 - closed(0), rel=1e-7)


@pytest.mark.reference
def test_sigmoid_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="sigmoid")
    ours = NoiseSchedule(ScheduleConfig(kind="sigmoid", beta_start=1e-4, beta_end=0.02))
    assert torch.allclose(ours.betas, ref.betas, rtol=1e-6, atol=0)
    assert torch.allclose(ours.alpha_bar, ref.alphas_cumprod, rtol=1e-4, atol=0)  # diffusers: float32 cumprod


def test_zero_terminal_snr_rescaling():
    base = NoiseSchedule(ScheduleConfig.stable_diffusion())
    z = NoiseSchedule(ScheduleConfig.stable_diffusion().with_(zero_terminal_snr=True))
    assert z.alpha_bar[-1].item() == 0.0
    assert z.snr()[-1].item() == 0.0 and z.log_snr()[-1].item() == -math.inf
    assert z.alpha_bar[0].item() == pytest.approx(base.alpha_bar[0].item(), rel=1e-6)
    # √ᾱ is an affine map of the original √ᾱ (Lin et al. Algorithm 1)
    a, b = base.sqrt_alpha_bar.double(), z.sqrt_alpha_bar.double()
    slope = (b[0] - b[500]) / (a[0] - a[500])
    assert torch.allclose(b, (a - a[-1]) * slope, atol=1e-6)


def test_posterior_variance_and_snr():
    s = NoiseSchedule()
    assert s.posterior_variance[0].item() == 0.0
    t = 10
    expected = (1 - s.alpha_bar[t - 1]) / (1 - s.alpha_bar[t]) * s.betas[t]
    assert s.posterior_variance[t].item() == pytest.approx(expected.item(), rel=1e-4)  # float32 inputs here
    assert (s.posterior_variance <= s.betas).all()
    assert torch.equal(s.variance("fixed_large"), s.betas)
    snr = s.snr(torch.tensor([t]))
    assert snr.item() == pytest.approx((s.alpha_bar[t] / (1 - s.alpha_bar[t])).item(), rel=1e-6)
    assert s.log_snr(torch.tensor([t])).item() == pytest.approx(math.log(snr.item()), rel=1e-5)
    with pytest.raises(ValueError, match="fixed_small"):
        s.variance("learned")


def test_timestep_spacings_match_diffusers_definitions():
    s = NoiseSchedule()
    assert s.timesteps(10, "leading").tolist() == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert s.timesteps(10, "leading", steps_offset=1).tolist()[0] == 901
    assert s.timesteps(10, "trailing").tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert s.timesteps(4, "linspace").tolist() == [999, 666, 333, 0]
    assert s.timesteps(1000).tolist() == list(range(999, -1, -1))
    for spacing in ("leading", "trailing", "linspace"):
        ts = s.timesteps(37, spacing)
        assert len(ts) == 37 and (ts[1:] < ts[:-1]).all()


def test_bad_input_is_named():
    s = NoiseSchedule()
    with pytest.raises(ValueError, match="num_inference_steps"):
        s.timesteps(1001)
    with pytest.raises(ValueError, match="spacing"):
        s.timesteps(10, "middle")
    with pytest.raises(ValueError, match="schedule kind"):
        NoiseSchedule(ScheduleConfig(kind="quadratic"))
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match="out of range"):
        gather(s.betas, torch.tensor([0, 1000]), x)
    with pytest.raises(ValueError, match="out of range"):
        gather(s.betas, torch.tensor([-1, 0]), x)
    with pytest.raises(TypeError, match="integers"):
        gather(s.betas, torch.tensor([0.5, 1.0]), x)


def test_gather_broadcasts_to_x():
    s = NoiseSchedule()
    x = torch.zeros(3, 2, 4, 4, dtype=torch.float64)
    out = gather(s.betas, torch.tensor([0, 5, 999]), x)
    assert out.shape == (3, 1, 1, 1) and out.dtype == torch.float64
    assert out[2, 0, 0, 0].item() == pytest.approx(0.02)
