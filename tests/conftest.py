import os

import pytest
import torch

from ldm.data import ImageDataset, load_dataset
from ldm.train import TrainConfig
from ldm.unet import UNetConfig

# The suite runs in two pytest-xdist workers (pyproject's addopts): each gets its share of the cores, since two
# processes whose torch threads outnumber the cores spin-wait on each other's and run many times slower.
torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


@pytest.fixture(scope="session")
def mnist_small() -> ImageDataset:
    """512 real digits from the bundled MNIST test set."""
    data = load_dataset("mnist-bundled")
    return ImageDataset(data.images[:512].clone(), data.labels[:512].clone(), 10, name="mnist-small")


@pytest.fixture
def tiny_config() -> TrainConfig:
    unet = UNetConfig(in_channels=1, out_channels=1, sample_size=28, channels=16, channel_mult=(1, 2),
                      num_res_blocks=1, attention=(False, True), mid_attention=False, head_dim=16, norm_groups=8,
                      dropout=0.1)
    return TrainConfig(unet=unet, sample_n=4, sample_steps=3).with_(
        batch_size=16, lr=2e-3, warmup_steps=2, checkpoint_every=1000, sample_every=0, steps=6)
