"""TAESD (ldm.taesd, ldm.convert.taesd): parity with diffusers' AutoencoderTiny for weights in both published layouts,
and a loader that refuses the wrong latent space, other latent widths and damaged files by name."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from torch import nn

from _fixtures import assert_parity, assert_sensitive, loud
from ldm.checkpoint import CheckpointError
from ldm.convert.taesd import check_latent_space, family_from_name, load_taesd
from ldm.taesd import latent_space

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.reference

TOLERANCE = 1e-4


# The original networks, as madebyollin/taesd's taesd.py builds them (nn.Sequential, so the file keys are positions):
# written out here independently of ldm's rule table, to make files in the original layout.
def conv(n_in, n_out, **kwargs):
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)


class Clamp(nn.Module):
    def forward(self, x):
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.conv = nn.Sequential(conv(n_in, n_out), nn.ReLU(), conv(n_out, n_out), nn.ReLU(), conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x):
        return self.fuse(self.conv(x) + self.skip(x))


def original_encoder(latent_channels=4):
    return nn.Sequential(
        conv(3, 64), Block(64, 64),
        conv(64, 64, stride=2, bias=False), Block(64, 64), Block(64, 64), Block(64, 64),
        conv(64, 64, stride=2, bias=False), Block(64, 64), Block(64, 64), Block(64, 64),
        conv(64, 64, stride=2, bias=False), Block(64, 64), Block(64, 64), Block(64, 64),
        conv(64, latent_channels),
    )


def original_decoder(latent_channels=4):
    return nn.Sequential(
        Clamp(), conv(latent_channels, 64), nn.ReLU(),
        Block(64, 64), Block(64, 64), Block(64, 64), nn.Upsample(scale_factor=2), conv(64, 64, bias=False),
        Block(64, 64), Block(64, 64), Block(64, 64), nn.Upsample(scale_factor=2), conv(64, 64, bias=False),
        Block(64, 64), Block(64, 64), Block(64, 64), nn.Upsample(scale_factor=2), conv(64, 64, bias=False),
        Block(64, 64), conv(64, 3),
    )


def adopt(original: nn.Sequential, reference: nn.Module) -> nn.Sequential:
    """The reference half's weights in the original Sequential: both register their layers in the same order."""
    names, values = list(original.state_dict()), list(reference.state_dict().values())
    assert len(names) == len(values)
    assert all(original.state_dict()[n].shape == v.shape for n, v in zip(names, values))
    original.load_state_dict(dict(zip(names, values)))
    return original.eval()


@pytest.fixture(scope="module")
def reference():
    return loud(diffusers.AutoencoderTiny(), std=None)  # unit-sized activations through all 20 layers of each half


@pytest.fixture(scope="module")
def latents():
    return torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def images():
    return torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1


@pytest.fixture(scope="module")
def original(reference, latents, images):
    """(encoder, decoder) state dicts in the original layout, from the reference's weights; the original networks
    compute what diffusers' do (diffusers: images in [−1, 1]; the original: [0, 1])."""
    encoder, decoder = adopt(original_encoder(), reference.encoder), adopt(original_decoder(), reference.decoder)
    with torch.no_grad():
        assert torch.allclose(encoder((images + 1) / 2), reference.encode(images).latents, atol=1e-6)
        assert torch.allclose(decoder(latents) * 2 - 1, reference.decode(latents).sample, atol=1e-6)
    return encoder.state_dict(), decoder.state_dict()


def check_decode(model, reference, latents):
    with torch.no_grad():
        expected = reference.decode(latents).sample
        run = lambda latents=latents: model.decode(latents)  # noqa: E731
        assert_parity(run, expected, TOLERANCE, latents=-latents)
        assert_sensitive(run, expected, TOLERANCE, latents=latents + 0.05)  # a small shift is seen too


def check_encode(model, reference, images):
    with torch.no_grad():
        expected = reference.encode(images).latents
        assert_parity(lambda images=images: model.encode(images), expected, TOLERANCE, images=images.flip(-1))


def save(state, path):
    if path.suffix == ".safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


# ---------------------------------------------------------------------------------------------- parity


def test_diffusers_folder_matches_diffusers(tmp_path, reference, latents, images):
    folder = tmp_path / "taesd"
    reference.save_pretrained(folder)
    model = load_taesd(folder)
    assert model.family == "sd" and not model.training
    check_decode(model, reference, latents)
    check_encode(model, reference, images)
    assert model.decode(latents).shape == (1, 3, 128, 128) and model.encode(images).shape == (1, 4, 8, 8)


def test_a_diffusers_config_of_another_shape_is_read(tmp_path, latents, images):
    reference = loud(diffusers.AutoencoderTiny(encoder_block_out_channels=(32,) * 4,
                                               decoder_block_out_channels=(32,) * 4, num_encoder_blocks=(1, 2, 1, 2),
                                               num_decoder_blocks=(2, 1, 2, 1)), std=None)
    reference.save_pretrained(tmp_path / "taesdxl")
    model = load_taesd(tmp_path / "taesdxl")
    assert model.family == "sdxl" and model.config.width == 32 and model.config.decoder_blocks == (2, 1, 2, 1)
    check_decode(model, reference, latents)
    check_encode(model, reference, images)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_original_files_match_diffusers(tmp_path, suffix, reference, original, latents, images):
    encoder_file = save(original[0], tmp_path / f"taesd_encoder{suffix}")
    decoder_file = save(original[1], tmp_path / f"taesd_decoder{suffix}")

    decoder_only = load_taesd(decoder_file)
    assert decoder_only.encoder is None and decoder_only.family == "sd"
    check_decode(decoder_only, reference, latents)
    with pytest.raises(RuntimeError, match="taesd_decoder.* holds only TAESD's decoder, so it cannot encode"):
        decoder_only.encode(images)

    encoder_only = load_taesd(encoder_file)
    assert encoder_only.decoder is None
    check_encode(encoder_only, reference, images)
    with pytest.raises(RuntimeError, match="cannot decode"):
        encoder_only.decode(latents)

    both = load_taesd(tmp_path)  # the folder holding taesd_encoder.* and taesd_decoder.*
    assert both.family == "sd"
    check_decode(both, reference, latents)
    check_encode(both, reference, images)


def test_a_bare_diffusers_weight_file_loads(tmp_path, reference, latents):
    reference.save_pretrained(tmp_path / "taesd")
    model = load_taesd(tmp_path / "taesd" / "diffusion_pytorch_model.safetensors", family="sd1")
    assert model.family == "sd"
    check_decode(model, reference, latents)


def test_scale_latents_round_trips_and_matches_diffusers(reference):
    from ldm.taesd import AutoencoderTiny

    model = AutoencoderTiny(decoder=False)
    z = torch.linspace(-2.99, 2.99, 101)
    assert torch.allclose(model.scale_latents(z), reference.scale_latents(z))
    assert torch.allclose(model.unscale_latents(model.scale_latents(z)), z, atol=1e-6)
    assert model.scale_latents(torch.tensor([-4.0, 0.0, 4.0])).tolist() == [0.0, 0.5, 1.0]  # clamped, centred


# ---------------------------------------------------------------------------------------------- latent spaces


@pytest.fixture(scope="module")
def decoder_files(tmp_path_factory, original):
    """The same decoder under three names: taesd (SD 1/2), taesdxl (SDXL), and a name that says neither."""
    folder = tmp_path_factory.mktemp("weights")
    return {name: save(original[1], folder / f"{name}.safetensors")
            for name in ("taesd_decoder", "taesdxl_decoder", "preview_decoder")}


def test_the_latent_space_comes_from_the_name_or_the_caller(decoder_files):
    assert load_taesd(decoder_files["taesd_decoder"]).family == "sd"
    assert load_taesd(decoder_files["taesdxl_decoder"]).family == "sdxl"
    assert load_taesd(decoder_files["preview_decoder"]).family == "unknown"
    assert load_taesd(decoder_files["preview_decoder"], family="sdxl").family == "sdxl"
    with pytest.raises(ValueError, match="family='sd1' was asked for, but taesdxl_decoder.safetensors is named as a "
                                         "TAESD for SDXL latents"):
        load_taesd(decoder_files["taesdxl_decoder"], family="sd1")
    assert family_from_name("/cache/models--madebyollin--taesdxl/snapshots/0123abc") == "sdxl"
    assert family_from_name("/cache/models--madebyollin--taesd/snapshots/0123abc") == "sd"
    assert family_from_name("/weights/taesd3_decoder.pth") is None
    assert [latent_space(f) for f in ("sd1", "sd1-inpainting", "sd2", "sdxl", "sdxl-refiner")] == \
        ["sd", "sd", "sd", "sdxl", "sdxl"]


def test_the_wrong_latent_space_is_refused_by_name(decoder_files):
    xl, sd = load_taesd(decoder_files["taesdxl_decoder"]), load_taesd(decoder_files["taesd_decoder"])
    with pytest.raises(ValueError, match=r"taesdxl_decoder.safetensors is a TAESD for SDXL latents, but this is an "
                                         r"SD 1 model \(sd1\): use taesd$"):
        check_latent_space(xl, "sd1")
    with pytest.raises(ValueError, match=r"is a TAESD for SD 1/2 latents, but this is an SDXL model \(sdxl-refiner\): "
                                         r"use taesdxl$"):
        check_latent_space(sd, "sdxl-refiner")
    for taesd, family in ((sd, "sd1"), (sd, "sd2-inpainting"), (xl, "sdxl")):
        check_latent_space(taesd, family)  # the right pairs pass
    with pytest.raises(ValueError, match="no TAESD for the 'flux' family"):
        check_latent_space(sd, "flux")
    with pytest.warns(UserWarning, match="preview_decoder.safetensors: cannot tell"):
        check_latent_space(load_taesd(decoder_files["preview_decoder"]), "sd1")


def test_a_folder_with_two_latent_spaces_needs_a_choice(tmp_path, original):
    for name in ("taesd", "taesdxl"):
        save(original[1], tmp_path / f"{name}_decoder.pth")
    with pytest.raises(CheckpointError, match="holds several TAESDs \\(taesd, taesdxl\\)"):
        load_taesd(tmp_path)
    model = load_taesd(tmp_path, family="sdxl")
    assert model.family == "sdxl" and model.source == "taesdxl_decoder.pth"


# ---------------------------------------------------------------------------------------------- refusals


def test_other_latent_widths_are_refused_by_name(tmp_path):
    decoder = save(original_decoder(latent_channels=16).state_dict(), tmp_path / "taesd_decoder.safetensors")
    with pytest.raises(CheckpointError, match="16-channel latents \\(TAESD3 \\(SD 3\\) and TAEF1 \\(FLUX.1\\)"):
        load_taesd(decoder)
    encoder = save(original_encoder(latent_channels=16).state_dict(), tmp_path / "taesd_encoder.pth")
    with pytest.raises(CheckpointError, match="taesd_encoder.pth is a tiny autoencoder for 16-channel latents"):
        load_taesd(encoder)
    diffusers.AutoencoderTiny(latent_channels=16).save_pretrained(tmp_path / "taef1")
    with pytest.raises(CheckpointError, match="16-channel latents"):
        load_taesd(tmp_path / "taef1")


def test_damaged_and_foreign_files_are_named(tmp_path, original):
    state = dict(original[1])
    good = save(state, tmp_path / "taesd_decoder.safetensors")
    for suffix in (".safetensors", ".pth"):
        data = save(state, tmp_path / f"cut{suffix}").read_bytes()
        (tmp_path / f"cut{suffix}").write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match=f"cut{suffix} \\(truncated.* corrupt"):
            load_taesd(tmp_path / f"cut{suffix}")
    with pytest.raises(CheckpointError, match="weights that TinyDecoder does not know: 99.weight"):
        load_taesd(save({**state, "99.weight": torch.zeros(3)}, tmp_path / "extra_decoder.safetensors"))
    with pytest.raises(CheckpointError, match="missing: stages.0.blocks.0.conv2.bias"):
        load_taesd(save({k: v for k, v in state.items() if k != "3.conv.2.bias"}, tmp_path / "short_decoder.pth"))
    with pytest.raises(CheckpointError, match=r"shape mismatch: stages.1.up.weight: \(64, 64, 1, 1\)"):
        load_taesd(save({**state, "12.weight": torch.zeros(64, 64, 1, 1)}, tmp_path / "odd_decoder.pth"))
    with pytest.raises(CheckpointError, match="named as a TAESD encoder, but its weights are a decoder's"):
        load_taesd(save(state, tmp_path / "taesd_encoder.pth"))
    with pytest.raises(CheckpointError, match="neither a TAESD encoder \\(0.weight\\) nor decoder"):
        load_taesd(save({"weight": torch.zeros(3)}, tmp_path / "bias.pth"))
    with pytest.raises(CheckpointError, match="not found"):
        load_taesd(tmp_path / "nowhere" / "taesd_decoder.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no TAESD weights in"):
        load_taesd(tmp_path / "empty")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(CheckpointError, match="holds a diffusers AutoencoderKL, not an AutoencoderTiny"):
        load_taesd(tmp_path / "vae")
    assert load_taesd(good).decoder is not None  # the damage, not the loader, failed those
