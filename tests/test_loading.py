"""``ldm.load_pipeline`` tells the kinds of checkpoint apart from their files and refuses options that do not apply."""

import json

import pytest

from ldm import load_pipeline
from ldm.checkpoint import CheckpointError
from ldm.loading import checkpoint_kind, finetuned_model


def folder_with_index(path, class_name):
    path.mkdir()
    (path / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    return path


def test_kinds_are_told_apart_from_the_files(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "model.ckpt").write_bytes(b"")
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    assert checkpoint_kind(tmp_path / "model.safetensors") == checkpoint_kind(tmp_path / "model.ckpt") == "sd-file"
    assert checkpoint_kind(tmp_path / "checkpoint.pt") == checkpoint_kind(tmp_path) == "run"
    assert checkpoint_kind(folder_with_index(tmp_path / "sd", "StableDiffusionXLPipeline")) == "sd-folder"
    assert checkpoint_kind(folder_with_index(tmp_path / "ddim", "DDIMPipeline")) == "ddpm-folder"
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    assert checkpoint_kind(tmp_path / "bare") == "ddpm-folder"
    # a full fine-tuning run (ldm finetune --method full, ldm train --preset mnist-text) is the model it wrote
    run = tmp_path / "tuned"
    run.mkdir()
    folder_with_index(run / "model", "StableDiffusionPipeline")
    (run / "checkpoint.pt").write_bytes(b"")
    (run / "config.json").write_text(json.dumps({"method": "full", "checkpoint": "base"}))
    assert checkpoint_kind(run) == "sd-folder" and finetuned_model(run) == run / "model"
    (run / "config.json").write_text(json.dumps({"method": "lora", "checkpoint": "base"}))
    assert finetuned_model(run) == run  # a LoRA run's product is no model: loading it as one would be wrong


def test_unknown_and_missing_checkpoints_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="holds a diffusers KandinskyPipeline; supported: DDPMPipeline"):
        checkpoint_kind(folder_with_index(tmp_path / "k", "KandinskyPipeline"))
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_pipeline(tmp_path / "absent.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither an `ldm train` run"):
        load_pipeline(tmp_path / "empty")


def test_options_that_do_not_apply_are_refused_before_loading(tmp_path):
    sd = folder_with_index(tmp_path / "sd", "StableDiffusionPipeline")  # no weights: refusing must come first
    with pytest.raises(ValueError, match="Stable Diffusion folder: vae does not apply to it"):
        load_pipeline(sd, vae="runs/vae")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="single file: variant does not apply"):
        load_pipeline(tmp_path / "model.safetensors", variant="fp16")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"`ldm train` run: prediction does not apply to it \(it takes ema, vae\)"):
        load_pipeline(tmp_path / "run", prediction="v")
