import pytest
import torch

from ldm.diffusion import (
    posterior_coefficients, q_posterior, q_sample, split_prediction, training_target, v_target, x0_eps_from_v,
)
from ldm.schedule import NoiseSchedule, ScheduleConfig, gather


def test_q_sample_moments_match_closed_form():
    s = NoiseSchedule()
    torch.manual_seed(0)
    n = 200_000
    x0 = torch.full((n, 1, 1, 1), 0.7)
    for t in (0, 100, 999):
        xt = q_sample(s, x0, torch.full((n,), t), torch.randn_like(x0))
        assert xt.mean().item() == pytest.approx(0.7 * s.sqrt_alpha_bar[t].item(), abs=5e-3)
        assert xt.var().item() == pytest.approx(1 - s.alpha_bar[t].item(), rel=2e-2, abs=1e-6)


def test_q_sample_composes_single_steps():
    """Noising step by step with q(x_t | x_{t−1}) = N(√α_t x_{t−1}, β_t) gives the one-shot marginal's variance."""
    s = NoiseSchedule()
    torch.manual_seed(0)
    x = torch.full((100_000,), 1.0)
    for t in range(50):
        x = s.alphas[t].sqrt() * x + s.betas[t].sqrt() * torch.randn_like(x)
    assert x.mean().item() == pytest.approx(s.sqrt_alpha_bar[49].item(), abs=5e-3)
    assert x.var().item() == pytest.approx(1 - s.alpha_bar[49].item(), rel=3e-2)


def test_posterior_is_bayes_rule_numerically():
    """q(x_{t−1} | x_t, x_0) ∝ q(x_t | x_{t−1}) q(x_{t−1} | x_0): compare with the normalised product on a grid."""
    s = NoiseSchedule(ScheduleConfig.cosine())
    for t in (1, 50, 700):
        x0, xt = torch.tensor(0.3, dtype=torch.float64), torch.tensor(-0.8, dtype=torch.float64)
        grid = torch.linspace(-6, 6, 200_001, dtype=torch.float64)
        ab_prev = s.alpha_bar_f64[t - 1]  # float64: 1 − ᾱ near t = 0 is not representable in float32
        a_t = s.alpha_bar_f64[t] / ab_prev
        b_t = 1 - a_t
        log_p = -((xt - a_t.sqrt() * grid) ** 2) / (2 * b_t) - (grid - ab_prev.sqrt() * x0) ** 2 / (2 * (1 - ab_prev))
        w = torch.softmax(log_p, 0)
        mean_num = (w * grid).sum()
        var_num = (w * (grid - mean_num) ** 2).sum()
        mean, var = q_posterior(s, x0.float().reshape(1, 1, 1, 1), xt.float().reshape(1, 1, 1, 1), torch.tensor([t]))
        assert mean.item() == pytest.approx(mean_num.item(), rel=1e-4, abs=1e-5)
        assert var.item() == pytest.approx(var_num.item(), rel=1e-3)
        assert var.item() == pytest.approx(s.posterior_variance[t].item(), rel=1e-5)


SKIPS = [(1, 0), (400, 399), (400, 0), (999, 0), (999, 998), (999, 500), (50, 10), (700, 100), (250, 249)]


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_posterior_with_skipped_steps_matches_composition(kind):
    """q(x_s | x_t, x_0) for any s < t (respaced DDPM) is Gaussian conditioning of the composed forward process.

    Given x_0: x_s = √ᾱ_s x_0 + √(1 − ᾱ_s) ε₁ and x_t = √α_{t|s} x_s + √β_{t|s} ε₂ (α_{t|s} = ᾱ_t/ᾱ_s, the t − s
    single steps from s to t composed). So (x_s, x_t) are jointly Gaussian with Var x_s = 1 − ᾱ_s,
    Cov(x_s, x_t) = √α_{t|s} (1 − ᾱ_s), Var x_t = 1 − ᾱ_t, and by the conditioning formula
        coef_xt = Cov / Var x_t,   coef_x0 = √ᾱ_s − coef_xt · √ᾱ_t,   var = Var x_s − Cov² / Var x_t.
    (Written differently from ``posterior_coefficients`` on purpose: an independent derivation.)
    """
    sched = NoiseSchedule(ScheduleConfig(kind=kind))
    ab = sched.alpha_bar_f64
    t, s = (torch.tensor(v) for v in zip(*SKIPS))
    ab_t, ab_s = ab[t], ab[s]
    cov = (ab_t / ab_s).sqrt() * (1 - ab_s)
    want_xt = cov / (1 - ab_t)
    want_x0 = ab_s.sqrt() - want_xt * ab_t.sqrt()
    want_var = (1 - ab_s) - cov**2 / (1 - ab_t)
    c0, ct, var = posterior_coefficients(ab_t, ab_s)
    assert torch.allclose(c0, want_x0, rtol=1e-9, atol=1e-12)
    assert torch.allclose(ct, want_xt, rtol=1e-9, atol=1e-12)
    assert torch.allclose(var, want_var, rtol=1e-7, atol=1e-12)
    # s = t − 1 is the one-step posterior: the schedule's β̃_t and Ho et al.'s Eq. 7 coefficients
    one = torch.tensor([s_ == t_ - 1 for t_, s_ in SKIPS])
    b = sched.betas.double()[t[one]]
    assert torch.allclose(var[one], sched.posterior_variance.double()[t[one]], rtol=1e-5)
    assert torch.allclose(c0[one], ab_s[one].sqrt() * b / (1 - ab_t[one]), rtol=1e-5)
    assert torch.allclose(ct[one], (1 - b).sqrt() * (1 - ab_s[one]) / (1 - ab_t[one]), rtol=1e-5)
    # a proper distribution, narrower than the prior q(x_s | x_0) it conditions (knowing x_t helps)
    assert (var > 0).all() and (var < 1 - ab_s).all()


def test_posterior_with_skipped_steps_monte_carlo():
    """Run the forward process for real — x_s from q(x_s | x_0), then t − s single noising steps — and regress x_s
    on x_t: the slope, intercept and residual variance are the skip-step posterior's coef_xt, coef_x0 · x_0, var."""
    sched = NoiseSchedule(ScheduleConfig(num_train_timesteps=200, beta_end=0.05))  # ᾱ_{T−1} ≈ 0.007 in 200 steps
    g = torch.Generator().manual_seed(0)
    n, x0 = 100_000, 0.7
    for t, s in ((20, 0), (90, 60), (199, 150)):
        noise = lambda: torch.randn(n, generator=g, dtype=torch.float64)
        x_s = sched.alpha_bar_f64[s].sqrt() * x0 + (1 - sched.alpha_bar_f64[s]).sqrt() * noise()
        x_t = x_s
        for k in range(s + 1, t + 1):  # q(x_k | x_{k−1}) = N(√α_k x_{k−1}, β_k)
            x_t = sched.alphas[k].double().sqrt() * x_t + sched.betas[k].double().sqrt() * noise()
        c0, ct, var = posterior_coefficients(sched.alpha_bar_f64[t], sched.alpha_bar_f64[s])
        slope = ((x_s - x_s.mean()) * (x_t - x_t.mean())).mean() / x_t.var(correction=0)
        intercept = x_s.mean() - slope * x_t.mean()
        resid = (x_s - intercept - slope * x_t).var()
        se = (var / (n * x_t.var())).sqrt().item()  # the slope's standard error; the intercept's is ≈ se · |E x_t|
        assert slope.item() == pytest.approx(ct.item(), abs=5 * se), (t, s)
        assert intercept.item() == pytest.approx((c0 * x0).item(), abs=5 * se * (1 + abs(x_t.mean().item()))), (t, s)
        assert resid.item() == pytest.approx(var.item(), rel=5 * (2 / n) ** 0.5), (t, s)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_prediction_round_trips(prediction):
    s = NoiseSchedule(ScheduleConfig.cosine())
    torch.manual_seed(0)
    x0, eps = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 10, 500, 990])
    xt = q_sample(s, x0, t, eps)
    ab = gather(s.alpha_bar, t, x0)
    target = training_target(prediction, x0, eps, ab)
    x0_hat, eps_hat = split_prediction(prediction, target, xt, ab)
    tol = 2e-3 if prediction == "eps" else 1e-4  # x̂_0 from ε divides by √ᾱ, small at t = 990
    assert torch.allclose(x0_hat, x0, atol=tol) and torch.allclose(eps_hat, eps, atol=1e-3)


def test_v_definition_and_inverse():
    ab = torch.tensor(0.36)
    x0, eps = torch.tensor(2.0), torch.tensor(-1.0)
    v = v_target(x0, eps, ab)
    assert v.item() == pytest.approx(0.6 * -1.0 - 0.8 * 2.0)
    xt = 0.6 * x0 + 0.8 * eps
    x0_hat, eps_hat = x0_eps_from_v(xt, v, ab)
    assert x0_hat.item() == pytest.approx(2.0) and eps_hat.item() == pytest.approx(-1.0)


def test_unknown_prediction_named():
    with pytest.raises(ValueError, match="unknown prediction type 'score'"):
        split_prediction("score", torch.zeros(1), torch.zeros(1), torch.tensor(0.5))
    with pytest.raises(ValueError, match="noise shape"):
        q_sample(NoiseSchedule(), torch.zeros(2, 1, 4, 4), torch.tensor([1, 2]), torch.zeros(2, 1, 4, 5))
