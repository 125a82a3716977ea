import math

import pytest
import torch
import torch.nn.functional as F

from ldm.checkpoint import load_weights
from ldm.convert import import_state_dict, vae_config_from_diffusers, vae_layout
from ldm.vae import AutoencoderKL, DiagonalGaussian, VAEConfig, _tile_starts

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


def waves(channels: int, h: int, w: int, period: float = 6.0) -> torch.Tensor:
    """A smooth texture (sinusoids a few pixels long, a different direction per channel) that is the same
    in every window: a window's GroupNorm statistics are then those of the whole image, so what remains
    of a tiled/whole difference is what a window cannot see (its edges' zero padding, far attention)."""
    y, x = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    return torch.stack([torch.sin(2 * math.pi / period * (y + (k + 1) * x) / 1.5 + k) for k in range(channels)])[None] / 2


def ramp(channels: int, h: int, w: int) -> torch.Tensor:
    """A smooth image whose windows differ: each window's mean is its own."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    return torch.stack([torch.sin(1.5 * y + 2 * x + k) for k in range(channels)])[None]


class StandIn(torch.nn.Module):
    """A VAE half without spatial context (pooling or nearest upsampling), optionally minus each input's mean:
    the mean is GroupNorm's failure mode in its purest form (a window's statistics are not the image's)."""

    def __init__(self, fn, subtract_mean: bool = False):
        super().__init__()
        self.fn, self.subtract_mean = fn, subtract_mean

    def forward(self, h):
        h = self.fn(h)
        return h - h.mean((-2, -1), keepdim=True) if self.subtract_mean else h


def stand_in_vae(subtract_mean: bool = False) -> AutoencoderKL:
    vae, f, z = AutoencoderKL(SMALL_SD), SMALL_SD.downsample_factor, SMALL_SD.latent_channels
    vae.encoder = StandIn(lambda x: F.avg_pool2d(x, f).repeat(1, 3, 1, 1)[:, : 2 * z], subtract_mean)
    vae.decoder = StandIn(lambda h: F.interpolate(h[:, :3], scale_factor=f), subtract_mean)
    vae.quant_conv = vae.post_quant_conv = torch.nn.Identity()
    return vae


def encode_mean(vae, x, tile=None):
    return vae.encode(x, tile=tile).mean


@pytest.mark.parametrize("h, w", [(20, 28), (6, 40), (32, 32)], ids=["uneven", "one-row-of-tiles", "multiple"])
def test_tiles_blend_back_into_the_whole_for_a_model_without_spatial_context(h, w):
    # each window of a context-free model is exact, so any offset or weighting error in the blending
    # shows up as a difference from the whole; sizes need not be multiples of the tile
    vae, f = stand_in_vae(), SMALL_SD.downsample_factor
    z, x = torch.randn(2, 4, h, w), torch.randn(2, 3, h * f, w * f)
    tiled_z, tiled_x = vae.decode(z, tile=8), encode_mean(vae, x, tile=8)
    assert tiled_z.shape == (2, 3, h * f, w * f) and tiled_x.shape == (2, 4, h, w)
    assert torch.allclose(tiled_z, vae.decode(z), atol=1e-6)
    assert torch.allclose(tiled_x, encode_mean(vae, x), atol=1e-6)


@torch.no_grad()
def test_tiled_encode_and_decode_are_close_to_the_whole_on_a_smooth_texture():
    # Tiles cannot be exact with a real VAE: each window's GroupNorm statistics and mid attention see only
    # the window, and its convolutions pad its edges with zeros where the whole image has neighbours. On a
    # texture that is the same everywhere (so the statistics agree) the rest stays under 12 % (L2, relative;
    # measured 3–9 % with 32-pixel tiles and this random VAE, whose every layer passes such errors on).
    torch.manual_seed(0)
    vae, f = AutoencoderKL(SMALL_SD).eval(), SMALL_SD.downsample_factor
    for attention in (vae.encoder.mid[1], vae.decoder.mid[1]):  # zero-initialised: it would attend to nothing
        torch.nn.init.normal_(attention.to_out.weight, std=0.2)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    z, x = waves(4, 40, 48, period=3), waves(3, 40 * f, 48 * f)
    assert rel(vae.decode(z, tile=32), vae.decode(z)) < 0.12
    tiled, whole = vae.encode(x, tile=32), vae.encode(x)
    assert rel(tiled.mean, whole.mean) < 0.12 and rel(tiled.logvar, whole.logvar) < 0.12
    small = z[..., :24, :32]  # fits in one tile: the plain computation
    assert torch.equal(vae.decode(small, tile=32), vae.decode(small))
    assert torch.equal(encode_mean(vae, x[..., :48, :64], tile=32), encode_mean(vae, x[..., :48, :64]))


def seam_ratio(image: torch.Tensor, latent_hw: tuple[int, int], tile: int, scale: int) -> float:
    """The largest step between neighbouring pixels across a tile boundary, over the largest step elsewhere
    (rows and columns; 1 = boundaries are no different)."""
    ratios = []
    for dim, n in ((-1, latent_hw[1]), (-2, latent_hw[0])):
        steps = image.diff(dim=dim).abs().amax(dim=tuple(d for d in range(4) if d != dim % 4))
        starts = _tile_starts(n, tile, tile - tile // 4)
        boundary = torch.zeros_like(steps, dtype=torch.bool)
        boundary[[s * scale - 1 for s in starts if s > 0] + [(s + tile) * scale - 1 for s in starts if s + tile < n]] = True
        ratios.append((steps[boundary].max() / steps[~boundary].max()).item())
    return max(ratios)


def test_tiles_are_cross_faded_without_seams(monkeypatch):
    # a model whose windows disagree by construction (each minus its own mean, as a GroupNorm would be)
    # on a smooth image: the linear ramps spread each disagreement over the overlap, so no step at a tile
    # boundary stands out; plain averaging of the overlaps (flat weights) leaves steps 3× the largest elsewhere
    vae, f, tile = stand_in_vae(subtract_mean=True), SMALL_SD.downsample_factor, 12
    z, x = ramp(4, 30, 44), ramp(3, 30 * f, 44 * f)
    ratios = lambda: (seam_ratio(vae.decode(z, tile=tile), (30, 44), tile, f),
                      seam_ratio(encode_mean(vae, x, tile=tile), (30, 44), tile, 1))
    assert max(ratios()) < 1.5
    monkeypatch.setattr("ldm.vae._ramp", lambda length, overlap, fade_in, fade_out: torch.ones(length))
    assert min(ratios()) > 2.5  # the check sees seams when there are some


@pytest.mark.parametrize("tile", [3, 0, 8.0, True])
def test_a_tile_too_small_or_not_an_integer_is_refused(tile):
    vae = AutoencoderKL(SMALL_SD)
    with pytest.raises(ValueError, match="VAE tile must be an integer of at least 4 latent pixels"):
        vae.decode(torch.randn(1, 4, 16, 16), tile=tile)
    with pytest.raises(ValueError, match="VAE tile must be an integer of at least 4 latent pixels"):
        vae.encode(torch.randn(1, 3, 32, 32), tile=tile)
