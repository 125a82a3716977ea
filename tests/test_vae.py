import math

import pytest
import torch

from ldm.checkpoint import load_weights
from ldm.convert import import_state_dict, vae_config_from_diffusers, vae_layout
from ldm.vae import AutoencoderKL, DiagonalGaussian, VAEConfig

SMALL_SD = VAEConfig(channels=32, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8)


def test_sd_preset_has_the_published_size():
    assert sum(p.numel() for p in AutoencoderKL(VAEConfig.sd()).parameters()) == 83_653_863


def test_shapes_and_downsampling_factor():
    vae = AutoencoderKL(VAEConfig.mnist())
    post = vae.encode(torch.randn(3, 1, 28, 28))
    assert post.mean.shape == post.logvar.shape == (3, 2, 7, 7)
    assert vae.decode(post.mode()).shape == (3, 1, 28, 28)
    with pytest.raises(ValueError, match="not a multiple of the VAE's downsampling factor 4"):
        vae.encode(torch.randn(1, 1, 30, 28))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        vae.encode(torch.randn(1, 3, 28, 28))
    with pytest.raises(ValueError, match=r"\(B, 2, h, w\)"):
        vae.decode(torch.randn(1, 4, 7, 7))


def test_kl_closed_form_matches_monte_carlo():
    torch.manual_seed(0)
    mean, logvar = torch.randn(1, 2, 3, 3) * 0.5, torch.randn(1, 2, 3, 3) * 0.3
    post = DiagonalGaussian(torch.cat([mean, logvar], 1))
    closed = post.kl()
    var = logvar.exp()
    assert closed.item() == pytest.approx(0.5 * (mean**2 + var - 1 - logvar).sum().item(), rel=1e-6)
    z = mean + var.sqrt() * torch.randn(200_000, 2, 3, 3)  # E_q[log q − log p]
    log_q = -0.5 * ((z - mean) ** 2 / var + logvar + math.log(2 * math.pi))
    log_p = -0.5 * (z**2 + math.log(2 * math.pi))
    assert (log_q - log_p).sum((1, 2, 3)).mean().item() == pytest.approx(closed.item(), rel=2e-2)
    assert DiagonalGaussian(torch.zeros(1, 4, 2, 2)).kl().item() == 0.0


def test_posterior_sampling_is_seeded_and_logvar_clamped():
    post = DiagonalGaussian(torch.cat([torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), -100.0)], 1))
    assert post.logvar.min().item() == -30.0
    post = DiagonalGaussian(torch.zeros(2, 8, 4, 4))
    a = post.sample(torch.Generator().manual_seed(0))
    assert torch.equal(a, post.sample(torch.Generator().manual_seed(0)))
    assert not torch.equal(a, post.sample(torch.Generator().manual_seed(1)))
    assert torch.equal(post.mode(), post.mean)


def check_parity_with_diffusers(block_out_channels, layers_per_block, norm_num_groups, size, expected=None):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    levels = len(block_out_channels)
    ref = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=block_out_channels,
        layers_per_block=layers_per_block, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, norm_num_groups=norm_num_groups,
    ).eval()
    config = vae_config_from_diffusers(dict(ref.config))
    if expected is not None:
        assert config == expected
    ours = import_state_dict(AutoencoderKL(config), ref.state_dict(), vae_layout(config, "diffusers"), "diffusers AutoencoderKL").eval()
    f = config.downsample_factor
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref_post = ref.encode(x).latent_dist
        post = ours.encode(x)
        z = torch.randn(2, 4, size // f, size // f)
        ref_x, x_hat = ref.decode(z).sample, ours.decode(z)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    assert rel(post.mean, ref_post.mean) < 1e-4
    assert rel(post.logvar, ref_post.logvar) < 1e-4
    assert rel(x_hat, ref_x) < 1e-4


@pytest.mark.reference
def test_parity_with_diffusers_autoencoder_kl():
    check_parity_with_diffusers((32, 64), 1, 8, 32, expected=SMALL_SD)


@pytest.mark.slow
@pytest.mark.reference
def test_parity_with_diffusers_at_stable_diffusion_size():
    check_parity_with_diffusers((128, 256, 512, 512), 2, 32, 64, expected=VAEConfig.sd())


def test_unknown_and_missing_keys_are_named():
    vae = AutoencoderKL(SMALL_SD)
    state = {("encoder.extra.weight" if k == "encoder.conv_in.weight" else k): v for k, v in vae.state_dict().items()}
    with pytest.raises(Exception, match=r"missing: encoder\.conv_in\.weight[\s\S]*unexpected: encoder\.extra\.weight"):
        load_weights(AutoencoderKL(SMALL_SD), state, "test")


def test_tiled_decoding_blends_tiles_back_into_the_whole_image():
    vae = AutoencoderKL(SMALL_SD)
    z = torch.randn(1, 4, 20, 28)
    with torch.no_grad():
        assert torch.equal(vae.decode(z, tile=32), vae.decode(z))  # fits in one tile: the plain decode
    # a decoder without spatial context (nearest upsampling) makes each tile exact, so any seam or
    # weighting error in the blending shows up as a difference from the whole decode
    f = SMALL_SD.downsample_factor

    class Nearest(torch.nn.Module):
        def forward(self, h):
            return torch.nn.functional.interpolate(h[:, :3], scale_factor=f)

    vae.decoder = Nearest()
    vae.post_quant_conv = torch.nn.Identity()
    whole = vae.decode(z)
    tiled = vae.decode(z, tile=8)
    assert tiled.shape == (1, 3, 20 * f, 28 * f)
    assert torch.allclose(tiled, whole, atol=1e-6)
