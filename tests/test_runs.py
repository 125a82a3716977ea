"""Run directories read for inference: the checkpoint's own config is the one trusted, and a config.json beside it
that disagrees (copied from another run, edited, or half-written) is an error that names both files."""

import json

import pytest
import torch

from ldm.checkpoint import CheckpointError, atomic_save
from ldm.config import to_dict
from ldm.runs import load_diffusion_run, read_run
from ldm.train import TrainConfig
from ldm.unet import UNet, UNetConfig

UNET = UNetConfig(in_channels=1, out_channels=1, sample_size=16, channels=8, channel_mult=(1, 2), num_res_blocks=1,
                  attention=(False, False), mid_attention=False, norm_groups=4)


@pytest.fixture
def run(tmp_path):
    config = TrainConfig(unet=UNET, prediction="v")
    weights = UNet(UNET).state_dict()
    atomic_save({"config": to_dict(config), "model": weights, "ema": {"model": weights}}, tmp_path / "checkpoint.pt")
    (tmp_path / "config.json").write_text(json.dumps(to_dict(config), indent=2))
    return tmp_path


def test_the_checkpoints_config_is_read(run):
    unet, sampling, vae, _ = load_diffusion_run(run)
    assert unet.config == UNET and sampling.prediction == "v" and vae is None
    (run / "config.json").unlink()  # the copy is optional
    assert load_diffusion_run(run)[1].prediction == "v"


def test_a_config_json_from_another_preset_is_named(run):
    (run / "config.json").write_text(json.dumps(to_dict(TrainConfig.mnist())))
    with pytest.raises(CheckpointError) as e:
        read_run(run, "unet", "ldm train")
    message = str(e.value)
    assert message.startswith(f"{run / 'config.json'} disagrees with {run / 'checkpoint.pt'}")
    assert "(unet.sample_size: 28 in config.json, 16 in the checkpoint; unet.channels: 16 in config.json, 8" in message
    assert "delete config.json" in message and "\n" not in message


def test_a_half_written_config_json_is_named(run):
    (run / "config.json").write_text('{"unet": {"chan')
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON"):
        read_run(run, "unet", "ldm train")


def test_a_run_of_another_command_is_named(run, tmp_path):
    with pytest.raises(CheckpointError, match="not a run of `ldm train-vae`"):
        read_run(run, "kl_weight", "ldm train-vae")
    atomic_save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an ldm training checkpoint"):
        read_run(tmp_path / "other.pt", "unet", "ldm train")
