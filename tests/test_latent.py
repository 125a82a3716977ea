import pytest
import torch

from ldm.checkpoint import CheckpointError
from ldm.data import ImageDataset
from ldm import load_pipeline
from ldm.latent import LatentDataset, encode_dataset
from ldm.runs import load_vae
from ldm.train import TrainConfig, Trainer
from ldm.train_vae import VAETrainConfig, VAETrainer
from ldm.unet import UNetConfig
from ldm.vae import VAEConfig

TINY_VAE = VAEConfig(in_channels=1, out_channels=1, latent_channels=2, channels=16, channel_mult=(1, 2),
                     num_res_blocks=1, norm_groups=8, scaling_factor=1.0)
LATENT_UNET = UNetConfig(in_channels=2, out_channels=2, sample_size=16, channels=16, channel_mult=(1, 2),
                         num_res_blocks=1, attention=(False, True), head_dim=16, norm_groups=8, context_dim=16,
                         label_context=True, num_classes=10)


@pytest.fixture(scope="module")
def digits32(mnist_small) -> ImageDataset:
    x = torch.nn.functional.interpolate(mnist_small.images[:256].float(), size=32, mode="bilinear")
    return ImageDataset(x.round().clamp(0, 255).to(torch.uint8), mnist_small.labels[:256], 10, name="digits32")


def vae_run(path, data, vae=TINY_VAE):
    config = VAETrainConfig(vae=vae, image_size=32, holdout=32, sample_n=2).with_(
        batch_size=32, steps=2, sample_every=0, warmup_steps=1)
    VAETrainer(config, path, dataset=data, progress=False).train()
    return path


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory, digits32):
    return vae_run(tmp_path_factory.mktemp("vae"), digits32)


def test_encode_dataset_and_latent_batches(vae_dir, digits32):
    vae, image_size = load_vae(vae_dir)
    assert image_size == 32 and vae.config.scaling_factor != 1.0  # measured at the end of training
    latents = encode_dataset(vae, digits32)
    assert latents.mean.shape == (256, 2, 16, 16) and (latents.std > 0).all()
    assert (latents.image_size, latents.channels, latents.num_classes) == (16, 2, 10)
    fixed = LatentDataset(latents.mean, torch.zeros_like(latents.std), latents.labels, 10, 2.0)
    z, labels = fixed.batch(torch.tensor([3, 5]))
    assert torch.equal(z, 2.0 * latents.mean[[3, 5]]) and labels.tolist() == digits32.labels[[3, 5]].tolist()


def test_latent_model_trains_and_samples_images(vae_dir, digits32, tmp_path):
    config = TrainConfig(unet=LATENT_UNET, vae=str(vae_dir), clip_sample=False, sample_n=4, sample_steps=2).with_(
        batch_size=16, steps=3, sample_every=0, warmup_steps=1)
    vae, _ = load_vae(vae_dir)  # encode the small digit set here, instead of the whole bundled one
    trainer = Trainer(config, tmp_path, dataset=encode_dataset(vae, digits32), progress=False)
    trainer.train()
    assert trainer.config.vae_config == vae.config
    pipe = load_pipeline(tmp_path)
    images = pipe(3, num_inference_steps=3, class_label=[1, 2, 3], guidance_scale=2.0, progress=False, output="tensor")
    assert images.shape == (3, 1, 32, 32)
    assert (tmp_path / "samples.png").exists()


def test_wrong_vae_pairing_is_named(vae_dir, digits32, tmp_path):
    vae, _ = load_vae(vae_dir)
    config = TrainConfig(unet=LATENT_UNET, vae=str(vae_dir), sample_n=0).with_(batch_size=16, steps=1, sample_every=0)
    Trainer(config, tmp_path / "run", dataset=encode_dataset(vae, digits32), progress=False).train()
    other = vae_run(tmp_path / "other", digits32, TINY_VAE.with_(latent_channels=3))
    with pytest.raises(ValueError, match="latent_channels 2, this VAE has 3"):
        load_pipeline(tmp_path / "run", vae=other)
    with pytest.raises(CheckpointError, match="not a run of `ldm train`"):
        load_pipeline(vae_dir)  # a VAE run where a diffusion run is expected
    with pytest.raises(CheckpointError, match="not a run of `ldm train-vae`"):
        load_vae(tmp_path / "run")
    with pytest.raises(ValueError, match="latent-space UNet"):
        Trainer(TrainConfig(unet=LATENT_UNET, dataset="mnist-bundled"), tmp_path / "x", dataset=digits32, progress=False)
