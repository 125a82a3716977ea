"""Live previews: the linear latent → RGB map and its least-squares fit, lazily computed record previews, the preview
files the CLI keeps up to date, and the notebook display."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.pipeline import DiffusionPipeline
from ldm.preview import LATENT_RGB_FACTORS, LatentRGB, PreviewFiles, Previewer, fit_latent_rgb, live, psnr
from ldm.sampling import SamplingConfig
from ldm.schedule import ScheduleConfig
from ldm.unet import UNet, UNetConfig
from ldm.vae import AutoencoderKL, VAEConfig

from _fixtures import loud
from test_stable_diffusion import reference  # noqa: F401  (a fixture)


def test_fit_recovers_an_exactly_affine_decoder():
    """Images built as z · W + b per latent pixel (each covering 4×4 pixels) give back W and b."""
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(4, 3, generator=g) * 0.3, torch.randn(3, generator=g) * 0.1
    latents = torch.randn(6, 4, 8, 8, generator=g)
    images = F.interpolate(torch.einsum("bchw,cr->brhw", latents, weight) + bias[:, None, None], scale_factor=4)
    fitted = fit_latent_rgb(lambda x: latents, images)
    assert torch.allclose(fitted.weight, weight, atol=1e-5) and torch.allclose(fitted.bias, bias, atol=1e-5)
    assert psnr(fitted(latents), LatentRGB(weight, bias)(latents)) > 90


def test_fit_refuses_latents_that_do_not_tile_the_image():
    with pytest.raises(ValueError, match="whole block"):
        fit_latent_rgb(lambda x: torch.zeros(1, 4, 7, 7), torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_published_factors_keep_a_colour_images_dominant_colours(family):
    """Latents that the family's map sends closest to pure red, green, blue and yellow patches (its least-squares
    inverse) preview as those colours: the map's rows are latent channels, its columns R, G, B, bias added."""
    preview = LatentRGB.for_family(family)
    colours = torch.tensor([[0.8, -0.8, -0.8], [-0.8, 0.8, -0.8], [-0.8, -0.8, 0.8], [0.8, 0.8, -0.8]])
    z = torch.linalg.lstsq(preview.weight.T.double(), (colours - preview.bias).T.double()).solution.T.float()
    image = preview(z[:, :, None, None].expand(-1, -1, 2, 2))[:, :, 0, 0]
    for want, got in zip(colours, image):
        assert torch.equal(want > 0, got > 0), f"{family}: {want.tolist()} previews as {got.tolist()}"
    assert LATENT_RGB_FACTORS["sd"][0][0] == (0.3512, 0.2297, 0.3227)  # SD 2 shares SD 1's VAE and factors
    assert torch.equal(LatentRGB.for_family("sd2").weight, LatentRGB.for_family("sd1").weight)


def test_linear_preview_refuses_latents_of_another_width():
    with pytest.raises(ValueError, match="4 latent channels got latents of shape \\(1, 16, 8, 8\\)"):
        LatentRGB.for_family("sd1")(torch.zeros(1, 16, 8, 8))


def tiny_pipeline(vae: AutoencoderKL | None = None) -> DiffusionPipeline:
    channels = 1 if vae is None else vae.config.latent_channels
    unet = UNet(UNetConfig(in_channels=channels, out_channels=channels, sample_size=8 if vae else 16, channels=16,
                           channel_mult=(1, 2), attention=(False, False), mid_attention=False, norm_groups=8,
                           num_res_blocks=1))
    return DiffusionPipeline(loud(unet), SamplingConfig(schedule=ScheduleConfig(num_train_timesteps=100)), vae)


def test_records_compute_their_preview_only_when_read():
    pipe = tiny_pipeline()
    calls = []

    def counting(x0):
        calls.append(1)
        return x0

    records = list(pipe.loop(2, num_inference_steps=3, preview=counting))
    assert calls == []
    assert records[1].preview is records[1].preview and calls == [1]  # computed once, kept
    assert torch.equal(list(pipe.loop(2, num_inference_steps=3))[2].preview, records[2].x0_pred)  # pixels: x̂₀ itself
    with pytest.raises(ValueError, match="no previewer"):
        _ = list(pipe.loop(1, num_inference_steps=1, preview=None))[0].preview


def test_latent_pipeline_previews_at_image_size_and_refuses_a_tiny_decoder():
    vae = AutoencoderKL(VAEConfig.mnist().with_(scaling_factor=0.6)).eval()
    pipe = tiny_pipeline(vae)
    record = list(pipe.loop(2, num_inference_steps=2))[-1]
    assert pipe.previewer().kind == "linear" and record.preview.shape == (2, 1, 32, 32)
    full = pipe.previewer("full")(record.x0_pred)
    assert torch.allclose(full, pipe.decode(record.x0_pred).clamp(-1, 1))
    with pytest.raises(ValueError, match="Stable Diffusion latents"):
        pipe.previewer("tiny:/nowhere/taesd_decoder.safetensors")
    with pytest.raises(ValueError, match="unknown preview 'sharp'"):
        pipe.previewer("sharp")


def test_preview_files_are_replaced_whole_and_animated(tmp_path):
    pipe = tiny_pipeline()
    out, gif = tmp_path / "out.preview.png", tmp_path / "out.preview.gif"
    files = PreviewFiles(out, gif, total=5, every=2)
    seen = []
    for record in files.watch(pipe.loop(3, num_inference_steps=5)):
        if out.exists():
            seen.append(Image.open(out).size)
    assert seen == [(2 * 16 + 3 * 2,) * 2] * 4  # from step 1 on: the 3 previews in a 2 × 2 grid
    assert files.due == {1, 3, 4} and len(files.frames) == 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left behind
    assert Image.open(gif).n_frames == 3
    with pytest.raises(ValueError, match="--preview-every must be at least 1"):
        PreviewFiles(out, gif, total=5, every=0)


def test_live_updates_one_display_in_place(monkeypatch):
    import IPython.display

    shown = []

    class Handle:
        def update(self, image):
            shown.append(("update", image.size))

    def display(image, display_id):
        shown.append(("display", image.size))
        return Handle()

    monkeypatch.setattr(IPython.display, "display", display)
    records = list(live(tiny_pipeline().loop(2, num_inference_steps=4), every=2, scale=2))
    assert len(records) == 4
    assert [kind for kind, _ in shown] == ["display", "update"]
    assert shown[0][1] == (2 * (2 * 16 + 3 * 2), 2 * (16 + 2 * 2))  # a 2-image grid (padding 2) at scale 2


def test_previewer_kinds_for_pixel_models_are_the_image_itself():
    previewer = Previewer("full", lambda x: x * 0, factor=1)
    x = torch.randn(1, 3, 4, 4).clamp(-1, 1)
    assert previewer.kind == "pixels" and torch.equal(previewer(x), x)


# --- the command line and Stable Diffusion ----------------------------------------------------------------------
def test_cli_sample_keeps_a_preview_and_animates_it(tmp_path, capsys):
    from ldm.cli import main
    from test_cli import TINY

    run = tmp_path / "run"
    main(["train", "--preset", "mnist", "--class-conditional", "false", "--out", str(run), "--steps", "1", *TINY])
    out = tmp_path / "digits.png"  # unconditional: one square grid, like the preview's
    main(["sample", str(run), "--n", "4", "--steps", "4", "--preview", "full", "--preview-every", "2", "--out", str(out)])
    assert Image.open(tmp_path / "digits.preview.png").size == (Image.open(out).size[0] // 2,) * 2  # --scale 2
    assert Image.open(tmp_path / "digits.preview.gif").format == "GIF"  # (frames: test_preview_files_…)
    with pytest.raises(SystemExit):
        main(["sample", str(run), "--preview", "linear", "--preview-every", "0", "--out", str(out)])
    assert "--preview-every: must be ≥ 1, got 0" in capsys.readouterr().err


@pytest.fixture(scope="module")
def sd(reference):
    """The tiny random SD 1 pipeline of the Stable Diffusion tests (a VAE that halves the image), loaded by ldm."""
    import ldm

    return ldm.load_pipeline(reference[1])


def tiny_taesd(family: str, factor: int = 2):
    """A small random TAESD (width 16) for ``family``'s latents that upsamples by ``factor``."""
    from ldm.taesd import AutoencoderTiny, TAESDConfig

    blocks = (1,) * factor.bit_length()
    return loud(AutoencoderTiny(TAESDConfig(width=16, encoder_blocks=blocks, decoder_blocks=blocks), family=family))


def test_stable_diffusion_previews_each_way_and_decodes_with_a_tiny_decoder(sd):
    from test_stable_diffusion import SIZE

    record = list(sd.loop("a red barn", num_inference_steps=2, width=SIZE, height=SIZE, sampler="ddim"))[-1]
    x0 = record.x0_pred
    linear = F.interpolate(LatentRGB.for_family("sd1")(x0), scale_factor=2, mode="bilinear").clamp(-1, 1)
    assert sd.previewer().kind == "linear" and torch.allclose(record.preview, linear)
    assert torch.allclose(sd.previewer("full")(x0), sd.vae_decode(x0))
    taesd = tiny_taesd("sd")
    expected = taesd.decode(x0).clamp(-1, 1)
    # a bf16 copy where the CPU has native bf16 (preview_copy), else this TAESD itself
    assert (sd.previewer(taesd)(x0) - expected).abs().max() < 0.1  # bf16: ~0.05 here
    assert (expected - sd.vae_decode(x0)).abs().max() > 0.3  # the two decoders differ, so the check above can fail
    assert next(taesd.parameters()).dtype == torch.float32  # the caller's TAESD is left as it was
    with pytest.raises(ValueError, match="SDXL latents, but this is an SD 1 model"):
        sd.previewer(tiny_taesd("sdxl"))
    sd.use_tiny_decoder(taesd)
    try:
        images = sd("a red barn", num_inference_steps=2, width=SIZE, height=SIZE, sampler="ddim", output="tensor",
                     progress=False)
        assert torch.allclose(images, taesd.decode(record.x_prev).clamp(-1, 1), atol=1e-6)
    finally:
        sd.use_tiny_decoder(None)
    with pytest.raises(ValueError, match="upsamples by 8, but this model's VAE by 2"):
        sd.use_tiny_decoder(tiny_taesd("sd", factor=8))


def test_a_fitted_linear_preview_reproduces_a_trained_toy_vae(mnist_small, tmp_path):
    """``fit_latent_rgb`` on a small VAE trained briefly on real digits, fitted on training digits: on held-out digits
    its preview matches the full decode at the latent's resolution (4 × 4 pixels per latent pixel) far better than
    the best constant picture does. (The README's recipe VAE: see its "Real-time" section.)"""
    from test_train_vae import tiny

    from ldm.data import ImageDataset
    from ldm.train_vae import VAETrainer

    x = F.interpolate(mnist_small.images.float(), size=32, mode="bilinear").round().clamp(0, 255).to(torch.uint8)
    trainer = VAETrainer(tiny(steps=80), tmp_path, dataset=ImageDataset(x, mnist_small.labels, 10), progress=False)
    trainer.train()
    vae, s = trainer.model.eval(), trainer.config.vae.scaling_factor
    images = x.float() / 127.5 - 1
    with torch.no_grad():
        linear = fit_latent_rgb(lambda v: vae.encode(v).mode() * s, images[:256])
        z = vae.encode(images[-64:]).mode() * s
        target = F.adaptive_avg_pool2d(vae.decode(z / s).clamp(-1, 1), z.shape[-2:])
    fitted, constant = psnr(linear(z), target), psnr(target.mean().expand_as(target), target)
    assert fitted > 18 and fitted > constant + 6, (fitted, constant)  # measured 20.0 and 11.0 dB


def test_cli_names_a_bad_decoder_or_preview(reference, tmp_path, capsys):
    from ldm.cli import main

    base = ["txt2img", str(reference[1]), "--prompt", "a cat", "--steps", "1", "--out", str(tmp_path / "x.png")]
    for extra, message in ((["--vae-decoder", "taesd.pth"], "expected tiny:PATH (a TAESD)"),
                           (["--vae-decoder", f"tiny:{tmp_path / 'none'}"], "none"),
                           (["--preview", "sharp"], "unknown preview 'sharp'"),
                           (["--preview", "tiny:x", "--hires-scale", "2"], "--hires-scale makes two")):
        with pytest.raises(SystemExit):
            main(base + extra)
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
