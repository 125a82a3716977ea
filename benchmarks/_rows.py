"""The benchmark rows: name → a builder that returns both libraries' callables on the same weights.

Each builder loads its model(s) from the weights folder (``_weights.py``) the way a user would — ldm through
its loaders and ``ldm.convert``, diffusers/transformers through ``from_pretrained`` — in the settings a
pipeline runs them with, so the table shows what users get: ldm's UNet and VAE rows call
``ldm.perf.enable_fast_cpu`` on the bare models, as ldm's pipelines do on theirs (the models themselves are
plain PyTorch); no other speed-up is switched on for either library. A builder asked for ldm alone (a memory
process) never imports diffusers or transformers, whose modules would count in ldm's peak.
"""

from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from ldm.perf import enable_fast_cpu

from _measure import LIBRARIES, Case, Side
from _weights import cifar_config, ldm_sd_component, ldm_unet2d

PROMPTS = ["a lighthouse on a cliff at dawn, oil painting", ""]  # conditional and unconditional (empty) prompt


@dataclass(frozen=True)
class Setup:
    """Where and for what a row is built: ``libraries`` may be one of them alone (a memory process)."""

    quick: bool
    device: torch.device
    weights: Path
    libraries: tuple[str, ...] = LIBRARIES


@dataclass(frozen=True)
class Row:
    name: str
    what: str
    build: Callable[[Setup], Case]
    warmup: int  # calls per side before timing (quick mode: 1)
    repeats: int  # timed calls per side (quick mode: 1)


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _sd_json(setup: Setup, component: str) -> dict:
    from ldm.checkpoint import read_json

    return read_json(setup.weights / "sd" / component / "config.json")


# --- Stable Diffusion components ---------------------------------------------------------------------
def unet_step(dtype: torch.dtype) -> Callable[[Setup], Case]:
    """One guided UNet step: batch 2 (conditional + unconditional) of latents with a 77-token context."""

    def build(setup: Setup) -> Case:
        cfg = _sd_json(setup, "unet")
        size, width = cfg["sample_size"], cfg["cross_attention_dim"]
        x = _randn(2, 4, size, size).to(setup.device, dtype)
        context = _randn(2, 77, width, seed=1).to(setup.device, dtype)
        t = torch.tensor([500, 500], device=setup.device)
        sides = {}
        if "ldm" in setup.libraries:
            ours = enable_fast_cpu(ldm_sd_component(setup.weights / "sd", "unet").to(setup.device, dtype))
            sides["ldm"] = Side(lambda: ours(x, t, context))
        if "diffusers" in setup.libraries:
            import diffusers

            ref = diffusers.UNet2DConditionModel.from_pretrained(setup.weights / "sd" / "unet").eval().to(setup.device, dtype)
            sides["diffusers"] = Side(lambda: ref(x, t, encoder_hidden_states=context).sample)
        return Case(sides, unit="s/step")

    return build


def vae_decode(setup: Setup) -> Case:
    """One latent decoded to an image by the SD VAE."""
    cfg = _sd_json(setup, "vae")
    size = cfg["sample_size"] // 2 ** (len(cfg["block_out_channels"]) - 1)
    z = _randn(1, cfg["latent_channels"], size, size).to(setup.device)
    sides = {}
    if "ldm" in setup.libraries:
        ours = enable_fast_cpu(ldm_sd_component(setup.weights / "sd", "vae").to(setup.device))
        sides["ldm"] = Side(lambda: ours.decode(z))
    if "diffusers" in setup.libraries:
        import diffusers

        ref = diffusers.AutoencoderKL.from_pretrained(setup.weights / "sd" / "vae").eval().to(setup.device)
        sides["diffusers"] = Side(lambda: ref.decode(z).sample)
    return Case(sides, unit="s/image")


def text_encoder(setup: Setup) -> Case:
    """The CLIP text encoder on a prompt and the empty prompt (the batch a guided image needs)."""
    from ldm.tokenizer import CLIPTokenizer

    ids = CLIPTokenizer.from_pretrained(setup.weights / "sd" / "tokenizer")(PROMPTS).to(setup.device)
    sides = {}
    if "ldm" in setup.libraries:
        ours = ldm_sd_component(setup.weights / "sd", "text_encoder").to(setup.device)
        sides["ldm"] = Side(lambda: ours(ids))
    if "diffusers" in setup.libraries:
        import transformers

        ref = transformers.CLIPTextModel.from_pretrained(setup.weights / "sd" / "text_encoder").eval().to(setup.device)
        sides["diffusers"] = Side(lambda: ref(ids).last_hidden_state)
    return Case(sides, unit="s/batch")


def txt2img(setup: Setup) -> Case:
    """Prompt → image through each library's whole pipeline (tokenizer, text encoder, guided DPM-Solver++(2M)
    steps at guidance 7.5, VAE decode), bf16 weights, same seed; the outputs compared are the images' pixels."""
    import ldm

    folder = setup.weights / "sd"
    size = _sd_json(setup, "vae")["sample_size"]
    steps, short = (4, 1) if setup.quick else (20, 2)
    options = dict(num_inference_steps=steps, guidance_scale=7.5, width=size, height=size)
    sides = {}
    if "ldm" in setup.libraries:
        ours = ldm.load_pipeline(folder, device=setup.device, dtype=torch.bfloat16)

        def ldm_image(n: int = steps):
            return ours(PROMPTS[0], **options | dict(num_inference_steps=n), sampler="dpm++2m", seed=0, progress=False)[0]

        sides["ldm"] = Side(ldm_image, short=lambda: ldm_image(short))
    if "diffusers" in setup.libraries:
        import diffusers

        ref = diffusers.StableDiffusionPipeline.from_pretrained(folder).to(device=setup.device, dtype=torch.bfloat16)
        ref.set_progress_bar_config(disable=True)
        if type(ref.scheduler).__name__ != "DPMSolverMultistepScheduler":
            raise RuntimeError(f"the weights folder's scheduler is {type(ref.scheduler).__name__}, not DPM-Solver++")

        def diffusers_image(n: int = steps):
            return ref(PROMPTS[0], **options | dict(num_inference_steps=n), generator=torch.Generator().manual_seed(0)).images[0]

        sides["diffusers"] = Side(diffusers_image, short=lambda: diffusers_image(short))
    return Case(sides, unit="s/image",
                notes=[f"txt2img: {steps} steps at {size}×{size}; warm-up and peak memory over a {short}-step run "
                       "(the peak does not grow with the number of steps)"])


def turbo(setup: Setup) -> Case:
    """Prompt → image with an SD-Turbo-shaped model run as its model card says: one Euler step on trailing timesteps,
    no classifier-free guidance (one UNet batch), decoded by TAESD; fp32; the outputs compared are the pixels.

    Both start from the same ε: diffusers' Euler starts trailing runs at σ_max·ε where ldm (and Stability's own
    sampler) takes √(1 + σ_max²)·ε, so ldm is given x_T = σ_max/√(1 + σ_max²)·ε, the same latents in its VP space."""
    import ldm

    folder = setup.weights / "sd-turbo"
    size = _sd_json(setup, "vae")["sample_size"]
    f = 2 ** (len(_sd_json(setup, "vae")["block_out_channels"]) - 1)
    eps = _randn(1, 4, size // f, size // f)
    options = dict(num_inference_steps=1, width=size, height=size)
    sides = {}
    if "ldm" in setup.libraries:
        ours = ldm.load_pipeline(folder, device=setup.device)
        ours.use_tiny_decoder(setup.weights / "taesd")
        sigma_max = ours.levels("euler", 1, ours.sampler_options("euler", 1))[0].item()
        x_T = eps * sigma_max / (1 + sigma_max**2) ** 0.5
        sides["ldm"] = Side(lambda: ours(PROMPTS[0], x_T=x_T, progress=False, output="tensor", **options))
    if "diffusers" in setup.libraries:
        import diffusers

        ref = diffusers.StableDiffusionPipeline.from_pretrained(folder).to(setup.device)
        ref.vae = diffusers.AutoencoderTiny.from_pretrained(setup.weights / "taesd").to(setup.device)
        ref.set_progress_bar_config(disable=True)
        sides["diffusers"] = Side(lambda: ref(PROMPTS[0], latents=eps, guidance_scale=0.0, output_type="pt",
                                              **options).images * 2 - 1)
    return Case(sides, unit="s/image", notes=[f"turbo: SD 2.1-base shapes, 1 step at {size}×{size}, TAESD decoder"])


def lcm(setup: Setup) -> Case:
    """Prompt → image in 4 LCM steps (the consistency sampler, ``LCMScheduler``) with the SD 1.5 UNet and no
    classifier-free guidance, decoded by the SD VAE, fp32: what an LCM-LoRA fused into SD 1.5 costs (an LCM-distilled
    UNet adds one 256 → 320 projection of the guidance embedding); same seed, so the pixels are compared."""
    import warnings

    import ldm

    folder = setup.weights / "sd"
    size = _sd_json(setup, "vae")["sample_size"]
    options = dict(num_inference_steps=4, guidance_scale=1.0, width=size, height=size)
    sides = {}
    if "ldm" in setup.libraries:
        ours = ldm.load_pipeline(folder, device=setup.device)

        def ldm_image():
            with warnings.catch_warnings():  # random weights are no LCM, which the sampler rightly warns of
                warnings.simplefilter("ignore")
                return ours(PROMPTS[0], sampler="lcm", seed=0, progress=False, output="tensor", **options)

        sides["ldm"] = Side(ldm_image)
    if "diffusers" in setup.libraries:
        import diffusers

        ref = diffusers.StableDiffusionPipeline.from_pretrained(folder).to(setup.device)
        ref.scheduler = diffusers.LCMScheduler.from_config(ref.scheduler.config)
        ref.set_progress_bar_config(disable=True)
        sides["diffusers"] = Side(lambda: ref(PROMPTS[0], generator=torch.Generator().manual_seed(0), output_type="pt",
                                              **options).images * 2 - 1)
    return Case(sides, unit="s/image", notes=[f"lcm: SD 1.5 shapes, 4 LCM steps at {size}×{size}, unguided, SD VAE"])


# --- training ----------------------------------------------------------------------------------------
def cifar_train_step(setup: Setup) -> Case:
    """One DDPM training step of the CIFAR-10 UNet: forward, ε-MSE loss, backward, AdamW step (fp32).
    Compared: the forward output at the step's x_t before any step, with dropout off (the two libraries
    draw their dropout masks in a different order)."""
    from ldm.diffusion import q_sample
    from ldm.losses import diffusion_loss
    from ldm.schedule import NoiseSchedule, ScheduleConfig

    config = cifar_config(setup.quick)
    folder = setup.weights / "cifar-unet"
    batch, size = (4 if setup.quick else 32), config.sample_size
    x0 = (torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(setup.device)
    noise = _randn(batch, 3, size, size, seed=1).to(setup.device)
    t = torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(2)).to(setup.device)
    sides = {}
    if "ldm" in setup.libraries:
        ours = ldm_unet2d(folder, config).to(setup.device).train()
        schedule = NoiseSchedule(ScheduleConfig.ddpm())
        ours_opt = torch.optim.AdamW(ours.parameters(), lr=2e-4, weight_decay=0.0)

        def ldm_step():
            loss = diffusion_loss(ours, schedule, x0, t=t, noise=noise).mean()
            ours_opt.zero_grad(set_to_none=True)
            loss.backward()
            ours_opt.step()
            return loss.detach()

        sides["ldm"] = Side(ldm_step, probe=lambda: _eval_forward(ours, lambda m: m(q_sample(schedule, x0, t, noise), t)))
    if "diffusers" in setup.libraries:
        import diffusers

        ref = diffusers.UNet2DModel.from_pretrained(folder).to(setup.device).train()
        scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
        ref_opt = torch.optim.AdamW(ref.parameters(), lr=2e-4, weight_decay=0.0)

        def diffusers_step():
            loss = F.mse_loss(ref(scheduler.add_noise(x0, noise, t), t).sample.float(), noise.float())
            ref_opt.zero_grad(set_to_none=True)
            loss.backward()
            ref_opt.step()
            return loss.detach()

        sides["diffusers"] = Side(diffusers_step,
                                  probe=lambda: _eval_forward(ref, lambda m: m(scheduler.add_noise(x0, noise, t), t).sample))
    return Case(sides, unit="s/step", inference=False, items=batch)


def _eval_forward(model: torch.nn.Module, forward: Callable, autocast=contextlib.nullcontext) -> torch.Tensor:
    """The model's output with dropout off and no gradients, leaving it in training mode."""
    model.eval()
    try:
        with torch.no_grad(), autocast():
            return forward(model).float()
    finally:
        model.train()


def mnist_train(setup: Setup) -> Case:
    """Training throughput of the MNIST recipe (``TrainConfig.mnist()``: batch 64, mixed_precision "auto" = bf16
    autocast where the CPU has native bf16, default memory format), ldm's own ``Trainer.train_step`` against the
    same step written with diffusers' training pieces (``UNet2DModel``, ``DDPMScheduler.add_noise``, AdamW with a
    constant-with-warm-up schedule, gradient clipping at 1, ``EMAModel`` at 0.999). Both draw batches of the
    bundled digits through ``ldm.data``, so only the model and the step differ. Compared: the forward output on a
    fixed batch under the recipe's autocast, before any step."""
    from ldm.data import load_dataset
    from ldm.loop import resolve_precision
    from ldm.train import TrainConfig, Trainer

    config = TrainConfig.mnist().with_(class_conditional=False)  # the label lookup left out: UNet2DModel has none here
    if setup.quick:
        config = config.with_(batch_size=16)
    steps, batch, u = (1 if setup.quick else 5), config.loop.batch_size, config.unet
    precision = resolve_precision(config.loop.mixed_precision, setup.device)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def autocast():
        return torch.autocast(setup.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()

    data = load_dataset("mnist-bundled")
    probe_x = _randn(batch, u.in_channels, u.sample_size, u.sample_size, seed=3).to(setup.device)
    probe_t = torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(4)).to(setup.device)
    folder = setup.weights / "mnist-unet"
    sides = {}
    if "ldm" in setup.libraries:
        trainer = Trainer(config, Path(tempfile.gettempdir()) / "ldm-bench-unused-run", dataset=data,
                          device=str(setup.device), progress=False)
        ldm_unet2d(folder, u, into=trainer.model)  # copied in place: the optimizer already holds these parameters

        def ldm_steps():
            return [trainer.train_step() for _ in range(steps)]

        sides["ldm"] = Side(ldm_steps, probe=lambda: _eval_forward(trainer.model, lambda m: m(probe_x, probe_t), autocast))
    if "diffusers" in setup.libraries:
        import diffusers
        from diffusers.optimization import get_constant_schedule_with_warmup
        from diffusers.training_utils import EMAModel

        ref = diffusers.UNet2DModel.from_pretrained(folder).to(setup.device).train()
        optimizer = torch.optim.AdamW(ref.parameters(), lr=config.loop.lr, weight_decay=config.loop.weight_decay)
        lr_schedule = get_constant_schedule_with_warmup(optimizer, num_warmup_steps=config.loop.warmup_steps)
        ema = EMAModel(ref.parameters(), decay=config.loop.ema_decay)
        noise_scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
        generator = torch.Generator().manual_seed(0)

        def diffusers_step():
            x0, _ = data.batch(torch.randint(0, len(data), (batch,), generator=generator), generator)
            x0 = x0.to(setup.device)
            noise = torch.randn(x0.shape, generator=generator).to(setup.device)
            t = torch.randint(0, 1000, (batch,), generator=generator).to(setup.device)
            with autocast():
                loss = F.mse_loss(ref(noise_scheduler.add_noise(x0, noise, t), t).sample.float(), noise.float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            value = loss.item()  # logged every step, as ldm's loop does (it checks for NaN)
            torch.nn.utils.clip_grad_norm_(ref.parameters(), config.loop.grad_clip)
            optimizer.step()
            lr_schedule.step()
            ema.step(ref.parameters())
            return value

        sides["diffusers"] = Side(lambda: [diffusers_step() for _ in range(steps)],
                                  probe=lambda: _eval_forward(ref, lambda m: m(probe_x, probe_t).sample, autocast))
    items = batch * steps
    return Case(sides, unit="ms/image", scale=1000 / items, items=items, inference=False,
                notes=[f"mnist-train: blocks of {steps} steps of batch {batch}, precision {precision!r} "
                       f"(mixed_precision={config.loop.mixed_precision!r}), channels_last={config.loop.channels_last}"])


ROWS = {row.name: row for row in (
    Row("unet-fp32", "SD 1.5 UNet, one guided step: batch 2 of 4×64×64 latents, 77×768 context, fp32", unet_step(torch.float32), 1, 3),
    Row("unet-bf16", "the same step with bf16 weights (.to(torch.bfloat16) on both sides)", unet_step(torch.bfloat16), 1, 3),
    Row("vae-decode", "SD VAE decode of one 4×64×64 latent to 512×512, fp32", vae_decode, 1, 3),
    Row("text-encoder", "CLIP ViT-L/14 text encoder, batch 2 × 77 tokens, fp32", text_encoder, 3, 25),  # 0.2 s: many repeats
    Row("txt2img-bf16", "20-step DPM-Solver++(2M) text-to-image at 512×512, guidance 7.5, bf16 weights", txt2img, 1, 1),
    Row("turbo-1step", "SD-Turbo-shaped text-to-image at 512×512: 1 Euler step, no guidance, TAESD decoder, fp32", turbo, 1, 3),
    Row("lcm-4step", "4 LCM steps (SD 1.5 UNet, unguided) text-to-image at 512×512, SD VAE, fp32", lcm, 1, 3),
    Row("cifar-train-step", "DDPM CIFAR-10 UNet (35.7 M), one training step at batch 32, fp32", cifar_train_step, 2, 5),
    Row("mnist-train", "MNIST recipe training throughput (UNetConfig.mnist(), batch 64, bf16 autocast where native)",
        mnist_train, 2, 7),
)}
