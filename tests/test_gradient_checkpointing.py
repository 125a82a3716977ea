import pytest
import torch

from ldm.gradient_checkpointing import set_gradient_checkpointing
from ldm.unet import UNet, UNetConfig
from ldm.vae import AutoencoderKL, VAEConfig

# cross-attention, self-attention-free levels, an upsampling stage, and dropout (recomputed with the same mask)
UNET = UNetConfig(in_channels=4, out_channels=4, sample_size=None, channels=16, channel_mult=(1, 2), num_res_blocks=1,
                  attention=(False, True), head_dim=8, norm_groups=4, context_dim=12, dropout=0.2)
VAE = VAEConfig(channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=4)


def unet_loss(model: UNet) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 12, 12, generator=g), torch.randn(2, 5, 12, generator=g)
    return model(x, torch.tensor([10, 700]), context).square().mean()


def vae_loss(model: AutoencoderKL) -> torch.Tensor:
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    x_hat, posterior = model(x, torch.Generator().manual_seed(2))
    return (x_hat - x).square().mean() + 1e-3 * posterior.kl().mean()


CASES = {"unet": (lambda: UNet(UNET), unet_loss), "vae": (lambda: AutoencoderKL(VAE), vae_loss)}


def build(name: str, checkpointing: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = CASES[name][0]().train()
    for p in model.parameters():  # undo zero-initialisation so every path carries gradient
        torch.nn.init.normal_(p, std=0.05)
    set_gradient_checkpointing(model, checkpointing)
    return model


def gradients(name: str, checkpointing: bool) -> dict[str, torch.Tensor]:
    model = build(name, checkpointing)
    torch.manual_seed(3)  # dropout's draws
    CASES[name][1](model).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def saved_for_backward_bytes(name: str, checkpointing: bool) -> int:
    """Bytes of the activations autograd keeps for backward (weights excluded: they are kept either way)."""
    model = build(name, checkpointing)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    # a checkpointed stage installs its own hooks inside, so what it would have saved never reaches ours
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        CASES[name][1](model)
    return sum(saved.values())


@pytest.mark.parametrize("name", CASES)
def test_checkpointing_gives_the_same_gradients(name):
    plain, checkpointed = gradients(name, False), gradients(name, True)
    assert plain.keys() == checkpointed.keys()
    for key in plain:
        assert torch.allclose(checkpointed[key], plain[key], rtol=0, atol=1e-6), key


@pytest.mark.parametrize("name", CASES)
def test_checkpointing_keeps_far_fewer_activations_for_backward(name):
    plain, checkpointed = saved_for_backward_bytes(name, False), saved_for_backward_bytes(name, True)
    assert checkpointed < 0.25 * plain, (plain, checkpointed)


def test_it_is_a_runtime_switch():
    model = build("vae", True)
    assert model.encoder.gradient_checkpointing and model.decoder.gradient_checkpointing
    set_gradient_checkpointing(model, False)
    assert not model.encoder.gradient_checkpointing
    assert not UNet.gradient_checkpointing  # the class default stays off for every other model
    with torch.no_grad():  # nothing is recorded, so nothing is recomputed: the plain forward
        set_gradient_checkpointing(model, True)
        model.decode(torch.randn(1, 4, 4, 4))
    with pytest.raises(ValueError, match="Linear has no stages to checkpoint"):
        set_gradient_checkpointing(torch.nn.Linear(2, 2))
