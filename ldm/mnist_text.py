"""A tiny text-to-image model a CPU can train: Stable Diffusion's whole stack at toy scale.

The same classes as Stable Diffusion — CLIP's BPE tokenizer (``CLIPTokenizer``), a causal text transformer
(``TextEncoder``), the cross-attention UNet, a KL autoencoder — with small widths: the text encoder is 4 blocks of
width 128 (its 49,408-row token table is most of its parameters), the UNet the latent recipe's on 2×8×8 latents (and its cosine
schedule) but reading a 24-token context instead of a class label, and the VAE an ``ldm train-vae --preset mnist`` run's. It is
trained from scratch on the bundled digits captioned from what they look like (``ldm.data.digits``: "a thick seven
slanted right", "the digit 1, thin, on the left"), text encoder and UNet together, with 10 % of the captions
dropped to the empty prompt so classifier-free guidance has an unconditional model to push away from. Training is
``ldm.finetune``'s full fine-tuning of a freshly initialised model, so the result is an ordinary Stable Diffusion
folder: ``ldm txt2img``, ``ldm studio``, ``ldm.widgets.explore`` and ``load_pipeline`` take it as they take SD.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .data.captions import captioned_mnist
from .finetune import FinetuneConfig, finetune
from .loop import LoopConfig
from .runs import load_vae
from .sampling import SamplingConfig
from .schedule import ScheduleConfig
from .sd_checkpoint import save_diffusers_folder
from .sd_config import StableDiffusionConfig
from .stable_diffusion import StableDiffusion
from .text_encoder import TextEncoder, TextEncoderConfig
from .tokenizer import CLIPTokenizer
from .unet import UNet, UNetConfig

# The captions are at most 17 tokens: a 24-token context (not CLIP's 77) makes the text encoder and every
# cross-attention ~3× cheaper to train; longer prompts are read in chunks, with a warning.
TEXT = TextEncoderConfig.clip_vit_l14().with_(width=128, layers=4, heads=4, mlp_dim=512, max_length=24)
# scale_shift off: the UNet is written as a diffusers UNet2DConditionModel config, which ldm writes without it
UNET = UNetConfig.mnist_latent().with_(context_dim=TEXT.width, label_context=False, num_classes=None, scale_shift=False)
# The latent recipe's schedule, not SD's scaled-linear: on 2×8×8 latents it leaves more of training on mid noise levels
SAMPLING = SamplingConfig(schedule=ScheduleConfig.cosine(), clip_x0=False)


def build(vae_run: str | Path, limit: int | None = None) -> StableDiffusion:
    """A new text-to-image model on a trained VAE: random text encoder and UNet (``TEXT``, ``UNET``), and CLIP's
    tokenizer framing ``TEXT.max_length`` tokens and knowing the words of the first ``limit`` digits' captions."""
    vae, size = load_vae(vae_run)
    if vae.config.latent_channels != UNET.in_channels:
        raise ValueError(f"{vae_run}: a VAE with {vae.config.latent_channels} latent channels; this model reads "
                         f"{UNET.in_channels} (train one with `ldm train-vae --preset mnist`)")
    unet = UNET.with_(sample_size=size // vae.config.downsample_factor)
    config = StableDiffusionConfig(unet=unet, vae=vae.config, text=TEXT, sampling=SAMPLING,
                                   family="mnist-text", size=size)
    tokenizer = CLIPTokenizer.from_bundled()
    tokenizer.max_length = TEXT.max_length
    tokenizer.trained_words = frozenset(w for text in captioned_mnist(limit=limit).captions for w in tokenizer.words(text))
    text_encoder = TextEncoder(TEXT)
    # CLIP starts its token table at std 0.02. Measured: after the 20-minute recipe with that table, "a seven" and
    # "a nine" gave contexts 1 % apart (25–38 % for a fresh encoder) and the model drew both alike (88.7 % of digit
    # prompts as named); with rows of std 1, the size of a LayerNorm'd feature, 99.6 % and every attribute pair
    # right. Why, as we read it: AdamW moves each element by up to ~lr a step whatever its size, so rows of 0.02 are
    # rewritten within tens of steps, before the UNet reads them, while rows of 1 change by a small fraction.
    nn.init.normal_(text_encoder.token_embedding.weight, std=1.0)
    return StableDiffusion(tokenizer, text_encoder, UNet(unet), vae, config)


def train(vae_run: str | Path, out: str | Path, *, steps: int | None = None, max_minutes: float | None = 20,
          batch_size: int = 128, lr: float = 1e-3, limit: int | None = None, resume: bool = False,
          overwrite: bool = False, progress: bool = True):
    """Build the model into OUT/base, then train it on ``mnist-text`` into OUT (the model: OUT/model)."""
    out = Path(out)
    base = out / "base"
    if overwrite or not (base / "model_index.json").is_file():  # a resumed run keeps the base it started from
        save_diffusers_folder(build(vae_run, limit), base)
    config = FinetuneConfig(checkpoint=str(base), data="mnist-text", method="full", train_text_encoder=True,
                            caption_dropout=0.1, limit=limit, sample_prompt="a thick seven", sample_n=8,
                            sample_steps=25,
                            loop=LoopConfig(steps=steps, max_minutes=max_minutes, batch_size=batch_size, lr=lr,
                                            warmup_steps=100, ema_decay=0.999, sample_every=0,
                                            mixed_precision="no"))  # bf16 autocast measured slower: 0.79 s/step vs 0.70
    return finetune(config, out, resume=resume, overwrite=overwrite, progress=progress)
