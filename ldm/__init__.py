"""ldm: readable denoising diffusion and latent diffusion in PyTorch.

The pieces most people start from; each lives in the module named after it.
"""

from .diffusion import q_posterior, q_sample
from .losses import diffusion_loss
from .conditioning import Conditioning
from .loading import load_pipeline
from .pipeline import DiffusionPipeline
from .samplers import classifier_free_guidance, ddim, ddpm, sample
from .sampling import Pipeline, SamplingConfig
from .schedule import NoiseSchedule, ScheduleConfig
from .sd_config import StableDiffusionConfig
from .stable_diffusion import StableDiffusion
from .text_encoder import TextEncoder, TextEncoderConfig
from .tokenizer import CLIPTokenizer
from .train import TrainConfig, Trainer, train_diffusion
from .unet import UNet, UNetConfig
from .vae import AutoencoderKL, VAEConfig

__version__ = "0.1.0"
__all__ = [
    "AutoencoderKL", "CLIPTokenizer", "Conditioning", "DiffusionPipeline", "NoiseSchedule", "Pipeline", "SamplingConfig",
    "ScheduleConfig", "StableDiffusion", "StableDiffusionConfig", "TextEncoder", "TextEncoderConfig", "TrainConfig",
    "Trainer", "UNet", "UNetConfig", "VAEConfig", "classifier_free_guidance", "ddim", "ddpm", "diffusion_loss",
    "load_pipeline", "q_posterior", "q_sample", "sample", "train_diffusion",
]
