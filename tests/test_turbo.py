"""SD-Turbo and SDXL-Turbo  [Sauer et al. 2023, "Adversarial Diffusion Distillation"]: the weights of SD 2.1 and SDXL,
sampled in 1–4 "trailing" steps without classifier-free guidance — against diffusers' pipelines with the schedulers
stabilityai/sd-turbo and stabilityai/sdxl-turbo ship, and the loader's presets, detection and refusals."""

import pytest
import torch

from ldm import load_pipeline
from ldm.sd_checkpoint import save_diffusers_folder, save_single_file
from ldm.sd_config import StableDiffusionConfig
from _fixtures import assert_parity
from test_stable_diffusion import SIZE, rel
from test_stable_diffusion_2 import sd2  # noqa: F401  (a fixture: the tiny loud SD 2 pipeline)
from test_stable_diffusion_xl import sdxl  # noqa: F401  (a fixture: the tiny loud SDXL pipeline)

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.reference

# The scheduler_config.json both models publish (the keys that matter; SD's scaled-linear schedule, ε, steps_offset 1)
# and "trailing" timesteps (the first step at t = 999, pure noise); read as diffusers reads a file, keys the class
# does not take (set_alpha_to_one, clip_sample for the Euler schedulers) ignored.
TURBO_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="epsilon",
                       steps_offset=1, set_alpha_to_one=False, clip_sample=False, timestep_spacing="trailing")
LATENT_REL = 1e-3  # ‖ldm − diffusers‖ / ‖diffusers‖ of the final latents


def turbo_folder(ref, pipeline_class, scheduler_class, folder, **extra):
    """The reference pipeline's components with a Turbo scheduler, saved as a diffusers folder (name without
    "turbo": the loader must recognise it from the scheduler it ships)."""
    scheduler = getattr(diffusers, scheduler_class).from_config(TURBO_SCHEDULER)
    pipe = getattr(diffusers, pipeline_class)(**(ref.components | {"scheduler": scheduler}), **extra)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    return pipe, folder


@pytest.fixture(scope="module")
def sd_turbo(sd2, tmp_path_factory):  # noqa: F811
    return turbo_folder(sd2[0], "StableDiffusionPipeline", "EulerDiscreteScheduler", tmp_path_factory.mktemp("t") / "tiny")


@pytest.fixture(scope="module")
def sdxl_turbo(sdxl, tmp_path_factory):  # noqa: F811
    return turbo_folder(sdxl[0], "StableDiffusionXLPipeline", "EulerAncestralDiscreteScheduler",
                        tmp_path_factory.mktemp("t") / "tiny-xl", add_watermarker=False)


def ref_latents(pipe, prompt, steps, seed=0):
    """diffusers' final latents, guidance_scale=0.0 as the model cards sample, from ldm's start.

    Under "trailing" (and "linspace") spacing diffusers' Euler schedulers start from x_σ = σ_max·ε
    (``init_noise_sigma``), ldm — like Stability's own sampler code (sgm's ``prepare_sampling_loop``) — from
    x_σ = √(1 + σ_max²)·ε, i.e. ε in model space (tests/test_samplers.py, the init_noise_sigma quirk): at SD's
    σ_max = 14.6 that is x_T 0.23 % quieter, and moved these final latents by rel 2.3e-3. So diffusers is handed
    ldm's x_σ as ``latents`` (which it multiplies by ``init_noise_sigma``), drawn from the seed's generator, which it
    then continues for Euler ancestral's per-step noise, as ldm does."""
    generator = torch.Generator().manual_seed(seed)
    eps = torch.randn((1, 4, SIZE // 2, SIZE // 2), generator=generator)
    pipe.scheduler.set_timesteps(steps)
    sigma_max = pipe.scheduler.sigmas.max()
    x_sigma = eps * (1 + sigma_max**2) ** 0.5
    return pipe(prompt, num_inference_steps=steps, guidance_scale=0.0, height=SIZE, width=SIZE, generator=[generator],
                latents=x_sigma / pipe.scheduler.init_noise_sigma, output_type="latent").images


def our_latents(pipe, steps):
    """ldm's final latents with the model's own defaults (sampler, guidance), as a function of prompt and seed."""
    def run(prompt="a red cube", seed=0):
        records = list(pipe.loop(prompt, num_inference_steps=steps, width=SIZE, height=SIZE, seed=seed))
        return records[-1].x_prev
    return run


def check_parity(ours, ref, steps, seed):
    expected = ref_latents(ref, "a red cube", steps, seed)
    run = our_latents(ours, steps)
    assert rel(run(seed=seed), expected) < LATENT_REL
    tolerance = LATENT_REL * expected.abs().max().item()  # max |Δ|, for the sensitivity check
    assert_parity(lambda **c: run(**({"seed": seed} | c)), expected, tolerance, prompt="a blue cube", seed=seed + 1)


@pytest.mark.parametrize("steps", [1, 4])
def test_sd_turbo_folder_matches_diffusers(sd_turbo, steps):
    ref, folder = sd_turbo
    ours = load_pipeline(folder)
    c = ours.config
    assert (c.family, c.distilled, c.prediction, c.sampling.spacing, c.sampling.steps_offset) == ("sd2", "turbo", "eps",
                                                                                                   "trailing", 1)
    assert (ours.default_sampler, ours.default_steps, ours.default_guidance) == ("euler", 1, 1.0)
    assert ours.notes[-1].startswith("preset: sd-turbo (the folder ships EulerDiscreteScheduler with trailing")
    check_parity(ours, ref, steps, seed=0)


@pytest.mark.parametrize("steps", [1, 4])
def test_sdxl_turbo_folder_matches_diffusers(sdxl_turbo, steps):
    """Euler ancestral draws fresh noise every step: the seed reaches the latents through x_T and each step."""
    ref, folder = sdxl_turbo
    ours = load_pipeline(folder)
    assert (ours.config.family, ours.config.distilled, ours.config.size) == ("sdxl", "turbo", SIZE)
    assert (ours.default_sampler, ours.default_steps, ours.default_guidance) == ("euler_a", 1, 1.0)
    check_parity(ours, ref, steps, seed=3)


def test_without_guidance_the_unet_sees_the_prompt_batch_only(sd_turbo, sd2):  # noqa: F811
    """diffusers guides only when guidance_scale > 1; so does ldm: at the Turbo default (1), at 0 and at 0.5 each
    step is one UNet call on the prompts alone, where 7.5 stacks the negatives beside them."""
    turbo, plain = load_pipeline(sd_turbo[1]), load_pipeline(sd2[1])
    batches = []
    hook = turbo.unet.register_forward_hook(lambda module, args, out: batches.append(args[0].shape[0]))
    try:
        for scale in (None, 0.0, 0.5, 7.5):
            batches.clear()
            list(turbo.loop(["a cat", "a dog"], num_inference_steps=2, guidance_scale=scale, width=SIZE, height=SIZE))
            assert batches == ([4, 4] if scale == 7.5 else [2, 2]), scale
    finally:
        hook.remove()
    # other models keep their defaults
    assert (plain.config.distilled, plain.default_sampler, plain.default_steps, plain.default_guidance) == \
        (None, "dpm++2m", 25, 7.5)
    assert (plain.guidance(None), turbo.guidance(None), turbo.guidance(0.0), turbo.guidance(3.0)) == (7.5, 1.0, 1.0, 3.0)


def test_single_file_named_turbo_takes_the_preset(sdxl, tmp_path):  # noqa: F811
    """A single file holds only weights, shaped as SDXL's: "turbo" in its name picks the preset (scheduler settings,
    512², Euler a, 1 step, no guidance); ``preset=`` says it for any name; one of another family is refused."""
    plain = load_pipeline(sdxl[1])
    turbo_file = save_single_file(plain, tmp_path / "tiny_sd_xl_turbo_1.0.safetensors")
    other = save_single_file(plain, tmp_path / "tiny_sdxl.safetensors")
    config = plain.config  # tiny weights are no real family: the folder's config stands in for detection
    turbo = load_pipeline(turbo_file, config=config)
    published = StableDiffusionConfig.sdxl_turbo()
    assert turbo.config.sampling == published.sampling and turbo.config.size == 512
    assert (turbo.default_sampler, turbo.default_steps, turbo.default_guidance) == ("euler_a", 1, 1.0)
    assert turbo.notes == ["prediction: eps (sdxl models predict ε)", "preset: sdxl-turbo (\"turbo\" in the name "
                           "'tiny_sd_xl_turbo_1.0.safetensors'): 1 step(s) of euler_a, no guidance by default"]
    named = load_pipeline(other, config=config, preset="sdxl-turbo")
    assert named.config == turbo.config and named.notes[-1].startswith("preset: sdxl-turbo (set by the caller)")
    untouched = load_pipeline(other, config=config)
    assert untouched.config.distilled is None and untouched.default_steps == 25 and len(untouched.notes) == 1
    assert load_pipeline(turbo_file, config=config, preset="none").config.distilled is None
    with pytest.raises(ValueError, match="preset 'sd-turbo' is for the sd2 family, but .* holds a sdxl model"):
        load_pipeline(turbo_file, config=config, preset="sd-turbo")


def test_presets_refused_where_they_do_not_apply(sd_turbo, tmp_path):
    with pytest.raises(ValueError, match="preset 'sdxl-turbo' is for the sdxl family, but .* holds a sd2 model"):
        load_pipeline(sd_turbo[1], preset="sdxl-turbo")
    with pytest.raises(ValueError, match="unknown preset 'sd3-turbo'; known: sd-turbo, sdxl-turbo, none"):
        load_pipeline(sd_turbo[1], preset="sd3-turbo")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="`ldm train` run: preset does not apply"):
        load_pipeline(tmp_path / "run", preset="sd-turbo")


def test_turbo_folder_round_trip_and_sd2_preset(sd_turbo, tmp_path):
    """ldm writes a Turbo model's folder with the scheduler class it defaults to, so it reads back as Turbo; the
    SD-Turbo preset is SD 2-base's model with the published scheduler settings."""
    again = load_pipeline(save_diffusers_folder(load_pipeline(sd_turbo[1]), tmp_path / "plain-name"))
    assert again.config.distilled == "turbo" and again.default_sampler == "euler"
    preset, base = StableDiffusionConfig.sd_turbo(), StableDiffusionConfig.sd2(prediction="eps")
    assert preset.with_(spacing=None, distilled=None, default_sampler=None, default_steps=None,
                        default_guidance=None) == base
    assert (preset.size, preset.prediction, preset.sampling.spacing) == (512, "eps", "trailing")


def test_full_size_files_named_turbo_read_as_the_published_models(tmp_path):
    """What the loader decides for the real files (configs only, no weights): sd_turbo.safetensors holds SD 2 weights,
    which alone would read as a 768² v-model; its name makes it SD-Turbo (ε, 512², trailing). sd_xl_turbo_1.0.safetensors
    is SDXL-Turbo at 512². SD 1 has no Turbo: its name changes nothing. A hub cache snapshot is named by its repository."""
    from ldm.sd_checkpoint import choose_prediction, folder_names
    from ldm.sd_config import choose_preset

    sd2, note = choose_preset(StableDiffusionConfig.sd2(), None, ["sd_turbo.safetensors"])
    assert sd2 == StableDiffusionConfig.sd_turbo() and note.startswith("preset: sd-turbo (\"turbo\" in the name")
    assert choose_prediction(sd2, {}, {}, None) == ("eps", "the turbo preset")
    assert choose_preset(StableDiffusionConfig.sdxl(), None, ["sd_xl_turbo_1.0_fp16.safetensors"])[0] == \
        StableDiffusionConfig.sdxl_turbo()
    assert choose_preset(StableDiffusionConfig.sd15(), None, ["sd15_turbo_merge.safetensors"]) == \
        (StableDiffusionConfig.sd15(), None)
    snapshot = tmp_path / "models--stabilityai--sd-turbo" / "snapshots" / "c6e32bc7"
    snapshot.mkdir(parents=True)
    assert folder_names(snapshot, {}) == ["c6e32bc7", "models--stabilityai--sd-turbo"]
