"""The tiny text-to-image model: built from Stable Diffusion's own classes, trained by full fine-tuning with caption
dropout, written as an SD folder that the SD tools load."""

from __future__ import annotations

import pytest

from ldm.cli import main
from ldm.finetune import FinetuneConfig
from ldm.loading import load_pipeline
from ldm.mnist_text import TEXT, build, train
from ldm.stable_diffusion import StableDiffusion
from ldm.text_encoder import TextEncoder
from ldm.tokenizer import CLIPTokenizer
from ldm.unet import UNet


def vae(out, **changes):
    """A small VAE run trained for 3 steps on 64 digits at 32²."""
    from test_train_vae import TINY_VAE, tiny

    from ldm.data import load_dataset
    from ldm.train_vae import VAETrainer

    data = load_dataset("mnist-bundled", image_size=32)
    config = tiny(steps=3).with_(vae=TINY_VAE.with_(**changes), holdout=16)
    VAETrainer(config, out, dataset=type(data)(data.images[:64], data.labels[:64], 10), progress=False).train()
    return out


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    return vae(tmp_path_factory.mktemp("vae"))


@pytest.fixture(scope="module")
def trained(vae_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("text")
    tuner = train(vae_run, out, steps=3, max_minutes=None, batch_size=8, limit=64, progress=False)
    return tuner, out


def test_it_is_stable_diffusions_own_classes(vae_run):
    pipe = build(vae_run)
    assert isinstance(pipe, StableDiffusion)
    assert type(pipe.tokenizer) is CLIPTokenizer and type(pipe.text_encoder) is TextEncoder
    assert type(pipe.unet) is UNet and pipe.unet.config.context_dim == pipe.text_encoder.config.width
    assert pipe.unet.config.in_channels == pipe.vae.config.latent_channels == 2 and pipe.config.size == 32
    assert pipe.unet.config.sample_size == 32 // pipe.vae.config.downsample_factor


def test_training_writes_an_sd_folder_the_sd_tools_load(trained, tmp_path):
    tuner, out = trained
    assert tuner.step == 3 and tuner.config.caption_dropout == 0.1 and tuner.config.train_text_encoder
    pipe = load_pipeline(out / "model")
    assert isinstance(pipe, StableDiffusion) and pipe.unet.config.context_dim == 128
    records = list(pipe.loop("a thick seven", num_inference_steps=3))
    assert records[-1].preview.shape == (1, 1, 32, 32)  # a 2-channel latent space previews through its own VAE
    main(["txt2img", str(out / "model"), "--prompt", "a thin 1 on the left", "--steps", "2", "--out",
          str(tmp_path / "one.png")])
    assert (tmp_path / "one.png").is_file()


def test_caption_dropout_trains_that_share_as_the_empty_prompt(trained, monkeypatch):
    tuner, _ = trained
    seen = []
    original = tuner.encode_text
    monkeypatch.setattr(tuner, "encode_text", lambda captions: seen.extend(captions) or original(captions))
    for position in range(20):
        tuner.draw(tuner.data, position, 0)
    share = seen.count("") / len(seen)
    assert len(seen) == 160 and 0.03 < share < 0.2, share
    with pytest.raises(ValueError, match="--caption-dropout must be in"):
        FinetuneConfig(checkpoint="x", data="mnist-text", caption_dropout=1.0)


def test_a_vae_of_another_latent_shape_is_refused(tmp_path):
    with pytest.raises(ValueError, match="4 latent channels; this model reads 2"):
        build(vae(tmp_path / "vae4", latent_channels=4))


def test_the_train_command_names_what_the_preset_needs(vae_run, tmp_path, capsys):
    for extra, message in (([], "give --vae VAE_RUN"), (["--vae", str(vae_run), "--lr", "1e-3"], "--lr 1e-3 is not for it"),
                           (["--vae", str(vae_run)], "give a budget")):
        with pytest.raises(SystemExit):
            main(["train", "--preset", "mnist-text", "--out", str(tmp_path / "run"), *extra])
        assert message in capsys.readouterr().err


def test_the_run_samples_from_a_prompt_and_keeps_its_vocabulary(trained, tmp_path, capsys):
    _, out = trained
    pipe = load_pipeline(out)  # the run's directory: the model it wrote
    assert isinstance(pipe, StableDiffusion) and pipe.tokenizer.max_length == pipe.text_encoder.config.max_length == 24
    assert {"thick", "seven", "7", "left"} <= pipe.tokenizer.trained_words and "cat" not in pipe.tokenizer.trained_words
    main(["sample", str(out), "--prompt", "a thick 3", "--guidance", "3", "--n", "3", "--steps", "2", "--out",
          str(tmp_path / "grid.png")])
    from PIL import Image

    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.width > 3 * 32 and "a thick 3" in grid.text["parameters"]
    with pytest.raises(SystemExit):
        main(["sample", str(out), "--class", "3", "--steps", "2", "--out", str(tmp_path / "x.png")])
    assert "give --prompt, not --class" in capsys.readouterr().err


def test_unknown_words_and_long_prompts_are_warned_and_still_drawn(trained):
    pipe = load_pipeline(trained[1])
    with pytest.warns(UserWarning, match="none of its words appeared in this model's training captions"):
        x = pipe("purple cat", num_inference_steps=2, output="tensor", progress=False)
    assert x.shape == (1, 1, 32, 32)
    with pytest.warns(UserWarning, match=r"the words hat never appeared"):
        pipe("a seven hat", num_inference_steps=2, output="tensor", progress=False)
    long = " ".join(["a thick seven on the left"] * 4)
    with pytest.warns(UserWarning, match="is 24 tokens; this model was trained on prompts of at most 22"):
        pipe(long, num_inference_steps=2, output="tensor", progress=False)


def test_token_rows_start_large_enough_to_stay_apart(vae_run):
    """Token rows of std 1, not CLIP's 0.02: AdamW's steps of ~lr rewrite small rows before the UNet reads them, and
    after 20 minutes words had drifted together (README); rows the size of a LayerNorm'd feature keep them apart."""
    table = build(vae_run).text_encoder.token_embedding.weight
    assert 0.9 < table.std().item() < 1.1
    assert TextEncoder(TEXT).token_embedding.weight.std().item() < 0.05  # SD's own initialisation, kept there
