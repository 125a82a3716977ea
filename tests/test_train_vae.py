import json

import pytest
import torch

from ldm.checkpoint import safe_load
from ldm.data import ImageDataset
from ldm.train_vae import VAETrainConfig, VAETrainer, psnr
from ldm.vae import VAEConfig

TINY_VAE = VAEConfig(in_channels=1, out_channels=1, latent_channels=2, channels=16, channel_mult=(1, 2),
                     num_res_blocks=1, norm_groups=8, scaling_factor=1.0)


@pytest.fixture(scope="module")
def digits32(mnist_small) -> ImageDataset:
    x = torch.nn.functional.interpolate(mnist_small.images.float(), size=32, mode="bilinear")
    return ImageDataset(x.round().clamp(0, 255).to(torch.uint8), mnist_small.labels, 10, name="digits32")


def tiny(**changes) -> VAETrainConfig:
    return VAETrainConfig(vae=TINY_VAE, image_size=32, holdout=64, sample_n=4).with_(
        batch_size=32, lr=2e-3, warmup_steps=2, sample_every=0, checkpoint_every=1000, **changes)


def test_psnr_formula():
    x = torch.zeros(1, 1, 4, 4)
    assert psnr(x, x + 0.2).item() == pytest.approx(10 * torch.log10(torch.tensor(4 / 0.04)).item(), rel=1e-5)


def test_reconstruction_improves_and_scale_factor_normalises_latents(digits32, tmp_path):
    trainer = VAETrainer(tiny(steps=80), tmp_path, dataset=digits32, progress=False)
    before = trainer.held_out_psnr()
    trainer.train()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["held_out_psnr_db"] > before + 3, (before, metrics)
    assert metrics["held_out_images"] == 64
    s = trainer.config.vae.scaling_factor
    assert s == pytest.approx(metrics["scaling_factor"]) and s != 1.0
    assert s * trainer.latent_std() == pytest.approx(1.0, rel=1e-6)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["vae"]["scaling_factor"] == pytest.approx(s)
    assert (tmp_path / "samples.png").exists()


def test_resume_after_the_scale_was_measured(digits32, tmp_path):
    VAETrainer(tiny(steps=3), tmp_path, dataset=digits32, progress=False).train()
    again = VAETrainer(tiny(steps=5), tmp_path, dataset=digits32, progress=False)
    again.resume()
    assert again.step == 3
    again.train()
    assert safe_load(tmp_path / "checkpoint.pt")["step"] == 5


def test_patch_gan_term_trains_and_is_checkpointed(digits32, tmp_path):
    trainer = VAETrainer(tiny(steps=3, disc_start=1), tmp_path, dataset=digits32, progress=False)
    before = [p.detach().clone() for p in trainer.discriminator.parameters()]
    trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.discriminator.parameters()))
    assert "discriminator" in safe_load(tmp_path / "checkpoint.pt")


def test_bad_sizes_are_named(digits32, tmp_path):
    with pytest.raises(ValueError, match="not a multiple of the VAE's downsampling factor"):
        VAETrainConfig(vae=TINY_VAE, image_size=31)
    with pytest.raises(ValueError, match="expects 1×28"):
        VAETrainer(tiny().with_(image_size=28), tmp_path, dataset=digits32, progress=False)
