"""The EMA's warm-up against closed forms: γ = 8 is TensorFlow's (1 + n)/(10 + n); γ = 0 a running mean."""

import pytest
import torch
from torch import nn

from ldm.ema import EMA


def weights_sequence(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(3, generator=g) for _ in range(n + 1)]  # θ_0 (the initial weights), θ_1 … θ_n


def run(gamma: float, decay: float, thetas: list[torch.Tensor]) -> torch.Tensor:
    model = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(thetas[0])
    ema = EMA(model, decay, gamma)
    for theta in thetas[1:]:
        with torch.no_grad():
            model.weight.copy_(theta)
        ema.update(model)
    return ema.model.weight.detach()[0]


def test_gamma_8_is_tensorflows_warm_up():
    thetas = weights_sequence(30)
    expected = thetas[0].clone()
    for n, theta in enumerate(thetas[1:], start=1):
        d = min(0.999, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * theta
    torch.testing.assert_close(run(8.0, 0.999, thetas), expected)


def test_gamma_0_is_the_mean_of_all_weights_so_far():
    """d_n = 1 − 1/(n + 2) gives (2 θ_0 + θ_1 + … + θ_n)/(n + 2): every step counts alike (the start twice)."""
    thetas = weights_sequence(40)
    expected = (2 * thetas[0] + torch.stack(thetas[1:]).sum(0)) / (len(thetas) + 1)
    torch.testing.assert_close(run(0.0, 0.99999, thetas), expected)


def test_a_smaller_gamma_remembers_more_of_the_past():
    thetas = [torch.zeros(3)] * 50 + [torch.ones(3)] * 50  # the weights jump halfway
    assert run(3.0, 0.9999, thetas)[0] < run(8.0, 0.9999, thetas)[0] < 1


def test_gamma_is_saved_and_old_states_read_as_8():
    ema = EMA(nn.Linear(2, 2), 0.99, 3.0)
    state = ema.state_dict()
    other = EMA(nn.Linear(2, 2), 0.5)
    other.load_state_dict(state)
    assert (other.decay, other.gamma) == (0.99, 3.0)
    del state["gamma"]
    other.load_state_dict(state)
    assert other.gamma == 8.0
    with pytest.raises(ValueError, match="gamma"):
        EMA(nn.Linear(2, 2), 0.9, -1.0)
