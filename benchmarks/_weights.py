"""The random weights every benchmark row runs, written once by diffusers and loaded by both libraries.

    <tmp>/ldm-bench-<quick|full>-<key>/
      sd/           a StableDiffusionPipeline folder (safetensors; tokenizer from ldm's bundled CLIP vocabulary;
                    DPM-Solver++(2M) scheduler with SD 1.5's settings)
      cifar-unet/   a UNet2DModel equal to UNetConfig.ddpm_cifar10()
      mnist-unet/   a UNet2DModel equal to UNetConfig.mnist()
      sd-turbo/     an SD-Turbo-shaped folder (SD 2.1-base UNet and OpenCLIP-H text encoder, Euler with trailing steps)
      taesd/        a TAESD (diffusers AutoencoderTiny) for SD latents

Going through files on disk is what users do, and it guarantees that both sides hold the same numbers:
ldm reads them with its loaders and ``ldm.convert`` rule tables, diffusers and transformers with their
``from_pretrained``. The weights are diffusers' default initialisation after ``torch.manual_seed(0)``
(ldm zero-initialises its output layers, which would make every output comparison vacuous).

The folder is keyed by mode, library versions and the configs below, and reused while the key holds
(the full-size one is 4.3 GB and takes minutes to write); delete it to rebuild.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path

import torch

from ldm.checkpoint import load_state_dict_file, read_json
from ldm.convert import (import_state_dict, text_encoder_config_from_transformers, text_encoder_layout,
                         unet_config_from_diffusers, unet_layout, vae_config_from_diffusers, vae_layout)
from ldm.text_encoder import TextEncoder
from ldm.tokenizer import CLIPTokenizer
from ldm.unet import UNet, UNetConfig
from ldm.vae import AutoencoderKL

# Stable Diffusion 1.5's component configs, and reduced ones of the same families for --quick.
SD_CONFIGS = {
    "full": dict(
        unet=dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280),
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, layers_per_block=2),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768),
    ),
    "quick": dict(  # UNet width 32 on 16×16 latents, a VAE that halves once (32×32 images), a 2-layer CLIP
        unet=dict(sample_size=16, cross_attention_dim=32, attention_head_dim=4, block_out_channels=(32, 64),
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                  layers_per_block=1, norm_num_groups=8),
        vae=dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32,
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32),
    ),
}
# SD-Turbo's components: SD 2.1-base's UNet (64-wide heads, a 1024-wide context, linear projections) and OpenCLIP
# ViT-H/14 as the 23 layers of it SD 2 uses (hidden_act gelu); the VAE above. --quick: the quick ones, SD 2 style.
TURBO_CONFIGS = {
    "full": dict(
        unet=SD_CONFIGS["full"]["unet"] | dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                                               use_linear_projection=True),
        text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                  projection_dim=512, hidden_act="gelu"),
        taesd=dict(),  # the released TAESD's shape: four stages, 8× up
    ),
    "quick": dict(
        unet=SD_CONFIGS["quick"]["unet"] | dict(attention_head_dim=(2, 4), use_linear_projection=True),
        text=SD_CONFIGS["quick"]["text"] | dict(hidden_act="gelu"),
        taesd=dict(encoder_block_out_channels=(64, 64), decoder_block_out_channels=(64, 64), num_encoder_blocks=(1, 1),
                   num_decoder_blocks=(1, 1)),  # 2× up, as the quick VAE
    ),
}
CLIP_COMMON = dict(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406,
                   eos_token_id=49407, pad_token_id=49407)
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
# stabilityai/sd-turbo's scheduler_config.json: Euler, trailing timesteps, SD's β schedule
TURBO_SCHEDULER = SD15_SCHEDULER | dict(timestep_spacing="trailing")


def cifar_config(quick: bool) -> UNetConfig:
    """The DDPM paper's CIFAR-10 UNet (35.7 M parameters); --quick: two levels of width 32 on 16×16 images."""
    full = UNetConfig.ddpm_cifar10()
    if not quick:
        return full
    return full.with_(sample_size=16, channels=32, channel_mult=(1, 2), num_res_blocks=1, attention=(False, True), norm_groups=8)


def unet2d_kwargs(config: UNetConfig) -> dict:
    """diffusers ``UNet2DModel`` arguments for an ldm self-attention ``UNetConfig`` (DDPM and MNIST styles).

    ldm's ``convert`` writes only cross-attention (``UNet2DConditionModel``) configs, and its reader refuses a
    scale-shift UNet2DModel with a normalised middle attention (``attn_norm_num_groups``), which is what
    ``UNetConfig.mnist()`` is; hence this mapping here."""
    if config.context_dim is not None or config.num_classes is not None:
        raise ValueError("only unconditional self-attention UNets map to a UNet2DModel here")
    widths = tuple(config.channels * m for m in config.channel_mult)
    kwargs = dict(
        sample_size=config.sample_size, in_channels=config.in_channels, out_channels=config.out_channels,
        block_out_channels=widths, layers_per_block=config.num_res_blocks,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in config.attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.attention)),
        add_attention=config.mid_attention, attention_head_dim=config.head_dim, norm_num_groups=config.norm_groups,
        norm_eps=config.norm_eps, flip_sin_to_cos=config.flip_sin_to_cos, freq_shift=int(config.freq_shift),
        downsample_padding=0 if config.asymmetric_downsample else 1, dropout=config.dropout,
        resnet_time_scale_shift="scale_shift" if config.scale_shift else "default",
    )
    if config.scale_shift:  # diffusers drops the middle attention's GroupNorm with scale-shift unless told its groups
        kwargs["attn_norm_num_groups"] = config.norm_groups
    if config.head_dim is None and config.num_heads != 1:
        raise ValueError("UNet2DModel's heads are set by head size; give the config a head_dim")
    return kwargs


def mnist_config() -> UNetConfig:
    return UNetConfig.mnist()


def write_turbo(folder: Path, quick: bool, vae, vocab: Path) -> None:
    """``sd-turbo/``: an SD-Turbo-shaped StableDiffusionPipeline folder (SD 2.1-base components, the Euler trailing
    scheduler, the SD VAE); ``taesd/``: a TAESD (diffusers ``AutoencoderTiny``) for its latents."""
    import diffusers
    import transformers

    configs = TURBO_CONFIGS["quick" if quick else "full"]
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**configs["unet"])
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP_COMMON | configs["text"]))
    tokenizer = transformers.CLIPTokenizer.from_pretrained(vocab, pad_token="!")  # SD 2's tokenizer pads with "!"
    scheduler = diffusers.EulerDiscreteScheduler(**TURBO_SCHEDULER)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                             safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder / "sd-turbo", safe_serialization=True)
    diffusers.AutoencoderTiny(**configs["taesd"]).save_pretrained(folder / "taesd", safe_serialization=True)


def cache_folder(quick: bool) -> Path:
    """Where this mode's weights live: the key changes whenever what would be written changes."""
    mode = "quick" if quick else "full"
    what = dict(sd=SD_CONFIGS[mode], clip=CLIP_COMMON, scheduler=SD15_SCHEDULER, turbo=TURBO_CONFIGS[mode],
                turbo_scheduler=TURBO_SCHEDULER, cifar=repr(cifar_config(quick)),
                mnist=repr(mnist_config()), versions=[version(p) for p in ("torch", "diffusers", "transformers")])
    key = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"ldm-bench-{mode}-{key}"


def ensure_weights(quick: bool) -> Path:
    """The weights folder for this mode, written now unless a complete one is already there."""
    folder = cache_folder(quick)
    if (folder / "done").is_file():
        return folder
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        write_weights(staging, quick)
        (staging / "done").write_text("ok\n")
        try:
            staging.rename(folder)
        except OSError:  # another run finished first: its copy is as good as ours
            if not (folder / "done").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def write_weights(folder: Path, quick: bool) -> None:
    import diffusers
    import transformers

    configs = SD_CONFIGS["quick" if quick else "full"]
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**configs["unet"])
    vae = diffusers.AutoencoderKL(**configs["vae"])
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**CLIP_COMMON, **configs["text"]))
    vocab = CLIPTokenizer.from_bundled().save_pretrained(folder / "vocab")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(vocab)
    scheduler = diffusers.DPMSolverMultistepScheduler(**SD15_SCHEDULER)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                             safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder / "sd", safe_serialization=True)
    del pipe, unet, text
    write_turbo(folder, quick, vae, vocab)
    shutil.rmtree(folder / "vocab")
    del vae
    for name, config in (("cifar-unet", cifar_config(quick)), ("mnist-unet", mnist_config())):
        torch.manual_seed(0)
        diffusers.UNet2DModel(**unet2d_kwargs(config)).save_pretrained(folder / name, safe_serialization=True)


# --- loading each component on its own -------------------------------------------------------------
def ldm_sd_component(folder: Path, name: str) -> torch.nn.Module:
    """One component of a diffusers SD folder as an ldm model ("unet", "vae" or "text_encoder").

    ``ldm.load_pipeline`` loads all of them; a row that times one component loads only that one, so the
    memory it reports is that component's."""
    cfg = read_json(folder / name / "config.json")
    if name == "unet":
        config = unet_config_from_diffusers(cfg)
        model_class, layout, weights = UNet, unet_layout(config, "diffusers"), "diffusion_pytorch_model"
    elif name == "vae":
        config = vae_config_from_diffusers(cfg)
        model_class, layout, weights = AutoencoderKL, vae_layout(config, "diffusers"), "diffusion_pytorch_model"
    elif name == "text_encoder":
        config = text_encoder_config_from_transformers(cfg)
        model_class, layout, weights = TextEncoder, text_encoder_layout(config, "transformers"), "model"
    else:
        raise ValueError(f"unknown component {name!r}")
    with torch.device("meta"):  # no initialisation only to be overwritten: adopt the file's tensors
        model = model_class(config)
    path = folder / name / f"{weights}.safetensors"
    return import_state_dict(model, load_state_dict_file(path), layout, str(path), assign=True).eval()


def ldm_unet2d(folder: Path, config: UNetConfig, into: UNet | None = None) -> UNet:
    """A diffusers UNet2DModel folder's weights in an ldm ``UNet(config)``, copied into ``into`` if given
    (a model an optimizer already holds)."""
    path = folder / "diffusion_pytorch_model.safetensors"
    model = UNet(config) if into is None else into
    return import_state_dict(model, load_state_dict_file(path), unet_layout(config, "diffusers"), str(path))
