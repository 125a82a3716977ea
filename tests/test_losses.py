import pytest
import torch

from ldm.diffusion import q_sample
from ldm.losses import diffusion_loss, min_snr_weight
from ldm.schedule import NoiseSchedule


def test_loss_is_mse_against_the_right_target():
    s = NoiseSchedule()
    x0 = torch.randn(3, 1, 4, 4)
    noise = torch.randn_like(x0)
    t = torch.tensor([5, 50, 500])
    perfect_eps = lambda xt, tt, c: noise
    assert torch.allclose(diffusion_loss(perfect_eps, s, x0, t=t, noise=noise), torch.zeros(3))
    perfect_x0 = lambda xt, tt, c: x0
    assert torch.allclose(diffusion_loss(perfect_x0, s, x0, prediction="x0", t=t, noise=noise), torch.zeros(3))
    zero = lambda xt, tt, c: torch.zeros_like(xt)
    loss = diffusion_loss(zero, s, x0, t=t, noise=noise)
    assert torch.allclose(loss, noise.pow(2).flatten(1).mean(1))


def test_model_sees_q_sample_and_cond():
    s = NoiseSchedule()
    x0, noise, t = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4), torch.tensor([3, 700])
    seen = {}

    def model(xt, tt, c):
        seen.update(xt=xt, t=tt, c=c)
        return torch.zeros_like(xt)

    diffusion_loss(model, s, x0, t=t, noise=noise, cond=torch.tensor([1, 2]))
    assert torch.allclose(seen["xt"], q_sample(s, x0, t, noise)) and seen["c"].tolist() == [1, 2]
    assert seen["t"].tolist() == [3, 700]


def test_random_t_and_noise_are_seeded():
    s = NoiseSchedule()
    x0 = torch.randn(8, 1, 4, 4)
    model = lambda xt, t, c: xt * 0.5
    a = diffusion_loss(model, s, x0, generator=torch.Generator().manual_seed(1))
    b = diffusion_loss(model, s, x0, generator=torch.Generator().manual_seed(1))
    c = diffusion_loss(model, s, x0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_min_snr_weights_are_equivalent_across_targets():
    """Weighted losses agree in x_0 units: w_ε·SNR = w_v·(SNR + 1) = w_x0 = min(SNR, γ)."""
    snr = torch.tensor([0.01, 1.0, 5.0, 100.0])
    gamma = 5.0
    w_x0 = min_snr_weight(snr, gamma, "x0")
    assert torch.allclose(w_x0, torch.tensor([0.01, 1.0, 5.0, 5.0]))
    assert torch.allclose(min_snr_weight(snr, gamma, "eps") * snr, w_x0)
    assert torch.allclose(min_snr_weight(snr, gamma, "v") * (snr + 1), w_x0)
    assert min_snr_weight(torch.tensor([0.0]), gamma, "eps").item() == 1.0


def test_shape_mismatch_is_named():
    with pytest.raises(ValueError, match="model output shape"):
        diffusion_loss(lambda xt, t, c: xt[:, :, :2], NoiseSchedule(), torch.zeros(2, 1, 4, 4))
