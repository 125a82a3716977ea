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


def test_posterior_with_skipped_steps_matches_composition():
    """The skip-step coefficients (used by respaced DDPM) equal the one-step ones when s = t − 1."""
    s = NoiseSchedule()
    t = torch.tensor([400])
    x = torch.zeros(1, 1, 1, 1)
    c0, ct, var = posterior_coefficients(gather(s.alpha_bar, t, x), gather(s.alpha_bar_prev, t, x))
    beta, ab, abp = s.betas[400], s.alpha_bar[400], s.alpha_bar_prev[400]
    assert c0.item() == pytest.approx((abp.sqrt() * beta / (1 - ab)).item(), rel=1e-5)
    assert ct.item() == pytest.approx((s.alphas[400].sqrt() * (1 - abp) / (1 - ab)).item(), rel=1e-5)


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
