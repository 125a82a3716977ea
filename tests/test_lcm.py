"""Latent consistency models: the ``lcm`` sampler against diffusers' LCMScheduler, the guidance-embedding UNet against
UNet2DConditionModel(time_cond_proj_dim=…), and a whole LCM folder against LatentConsistencyModelPipeline."""

import warnings

import pytest
import torch

import ldm

from ldm.blocks import guidance_scale_embedding
from ldm.conditioning import Conditioning, join
from ldm.convert import export_state_dict, sampling_from_diffusers, unet_layout
from ldm.samplers import SAMPLERS, resolve_sampler, run_to_end, sampler_timesteps
from ldm.samplers.lcm import boundary_scalings, lcm, lcm_timesteps
from ldm.schedule import NoiseSchedule, ScheduleConfig
from ldm.sd_checkpoint import (UNET_PREFIX, detect_config, load_diffusers_folder, load_single_file, save_diffusers_folder,
                               save_single_file)
from ldm.stable_diffusion import StableDiffusion
from ldm.unet import UNet, UNetConfig

from _fixtures import assert_parity
from test_stable_diffusion import SIZE, tiny_components, write_vocab

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.reference

PROMPTS = ["a red cube on a table", "a watercolour of a fox"]
# max |Δ| of the final latents (which the loud tiny UNet makes ~80 in size): measured 6e-5 (relative 7e-7) over 4
# steps, while a new prompt or another guidance scale moves them by ~11
TOL = 2e-3


def lcm_scheduler(**options):
    """LCMScheduler as SimianLuo/LCM_Dreamshaper_v7 ships it (SD's schedule, "leading", steps_offset 1)."""
    return diffusers.LCMScheduler(**dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         clip_sample=False, set_alpha_to_one=True, steps_offset=1,
                                         timestep_spacing="leading") | options)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# --- the sampler ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("original", [50, 25, 100, 7])
def test_timestep_plan_is_diffusers(original):
    """Every S (and img2img strengths) gives LCMScheduler.set_timesteps' plan, and the same refusals."""
    for strength in (1.0, 0.6, 0.25):
        for steps in range(1, original + 2):
            reference = lcm_scheduler(original_inference_steps=original)
            try:
                reference.set_timesteps(steps, strength=strength)
                expected = reference.timesteps
            except ValueError:
                with pytest.raises(ValueError, match="num_inference_steps"):
                    lcm_timesteps(1000, steps, original, strength)
                continue
            assert torch.equal(lcm_timesteps(1000, steps, original, strength), expected), (steps, strength)
    assert lcm_timesteps(1000, 4).tolist() == [999, 759, 499, 259]


def test_registered_with_its_plan():
    schedule = NoiseSchedule(ScheduleConfig.stable_diffusion())
    assert SAMPLERS["lcm"] is lcm and resolve_sampler("LCM") == ("lcm", None)
    for spacing in ("leading", "trailing", "linspace"):  # LCM plans on its distillation schedule, whatever the spacing
        assert torch.equal(sampler_timesteps("lcm", schedule, 6, spacing, 1), lcm_timesteps(1000, 6))


def test_boundary_scalings_are_diffusers():
    scheduler = lcm_scheduler()
    for t in (0, 1, 19, 259, 999):
        expected = scheduler.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
        assert boundary_scalings(t) == pytest.approx([float(e) for e in expected], rel=1e-6)
    assert boundary_scalings(0) == (1.0, 0.0)  # f(x, 0) = x: the consistency function's boundary condition


def toy_model(shape, seed=1):
    """A fixed random function of (x, t): a stand-in UNet, so the sampler alone is compared."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(shape[1:], generator=g), torch.randn(shape[1:], generator=g)
    return lambda x, t, cond=None: torch.tanh(a * x + b * (t.float() / 1000).view(-1, 1, 1, 1)) + 0.1 * x


def diffusers_run(model, shape, steps, original, prediction, seeds):
    scheduler = lcm_scheduler(prediction_type=prediction)
    scheduler.set_timesteps(steps, original_inference_steps=original)
    g = [torch.Generator().manual_seed(s) for s in seeds]
    x = torch.cat([torch.randn((1, *shape[1:]), generator=gk) for gk in g])
    for t in scheduler.timesteps:
        x, _ = scheduler.step(model(x, t.expand(shape[0])), t, x, generator=g, return_dict=False)
    return x


def ldm_run(model, shape, steps, original, prediction, seeds):
    g = [torch.Generator().manual_seed(s) for s in seeds]
    x_T = torch.cat([torch.randn((1, *shape[1:]), generator=gk) for gk in g])
    schedule = NoiseSchedule(ScheduleConfig.stable_diffusion())
    records = lcm(model, schedule, x_T, num_inference_steps=steps, original_inference_steps=original,
                  prediction=prediction, generator=g)
    return run_to_end(records, progress=False).x_prev


@pytest.mark.parametrize("prediction, ours", [("epsilon", "eps"), ("v_prediction", "v"), ("sample", "x0")])
@pytest.mark.parametrize("steps, original", [(4, 50), (1, 50), (8, 50), (3, 25)])
def test_sampler_matches_lcm_scheduler(prediction, ours, steps, original):
    shape = (2, 4, 8, 8)
    model = toy_model(shape)
    expected = diffusers_run(model, shape, steps, original, prediction, [0, 1])
    got = ldm_run(model, shape, steps, original, ours, [0, 1])
    assert rel(got, expected) <= 1e-5
    if steps > 1:  # the re-noising draws from the generators: another seed for image 1 is another image 1 only
        other = ldm_run(model, shape, steps, original, ours, [0, 7])
        assert torch.equal(other[0], got[0]) and rel(other[1], got[1]) > 1e-2


def test_plan_options_cannot_come_with_a_plan():
    schedule = NoiseSchedule(ScheduleConfig.stable_diffusion())
    x = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="timesteps were given"):
        next(lcm(toy_model(x.shape), schedule, x, timesteps=lcm_timesteps(1000, 4), original_inference_steps=25))


# --- the UNet -----------------------------------------------------------------------------------------------
def test_guidance_embedding_is_diffusers():
    w = torch.tensor([0.0, 1.0, 6.5, 7.5])
    for dim in (256, 32, 7):
        expected = diffusers.LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, dim)
        assert torch.equal(guidance_scale_embedding(w, dim), expected)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A diffusers LatentConsistencyModelPipeline (tiny, loud, time_cond_proj_dim 32) saved as a folder."""
    folder = tmp_path_factory.mktemp("lcm")
    unet, vae, text = tiny_components(unet_options=dict(time_cond_proj_dim=32))
    pipe = diffusers.LatentConsistencyModelPipeline(
        vae=vae, text_encoder=text, tokenizer=write_vocab(folder / "vocab"), unet=unet, scheduler=lcm_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder / "pipe")
    return pipe, folder / "pipe"


@pytest.fixture(scope="module")
def ours(reference):
    pipe = ldm.load_pipeline(reference[1])  # model_index.json names a LatentConsistencyModelPipeline
    assert isinstance(pipe, StableDiffusion)
    return pipe


def test_unet_with_guidance_embedding_matches_diffusers(reference, ours):
    ref = reference[0].unet
    # cond_proj maps the D = 32 w-embedding onto the C = 32 sinusoidal timestep features: weight (C, D)
    assert ours.unet.config.time_cond_proj_dim == 32 and ours.unet.time_embedding.cond_proj.weight.shape == (32, 32)
    x, t, context = torch.randn(2, 4, 16, 16), torch.tensor([999, 259]), torch.randn(2, 77, 32)

    def run(scale=8.0):
        w = guidance_scale_embedding(torch.full((2,), scale - 1.0), 32)
        with torch.no_grad():
            return ours.unet(x, t, context, timestep_cond=w)

    with torch.no_grad():
        w = guidance_scale_embedding(torch.full((2,), 7.0), 32)
        expected = ref(x, t, encoder_hidden_states=context, timestep_cond=w).sample
    tolerance = 1e-4 * expected.abs().max().item()
    assert_parity(run, expected, tolerance, scale=2.0)


def test_unet_refuses_a_missing_or_unexpected_timestep_cond(ours):
    x, t, context = torch.randn(1, 4, 16, 16), torch.tensor([999]), torch.randn(1, 77, 32)
    with pytest.raises(ValueError, match="needs timestep_cond of shape \\(1, 32\\)"):
        ours.unet(x, t, context)
    with pytest.raises(ValueError, match="needs timestep_cond of shape \\(1, 32\\).*got \\(1, 16\\)"):
        ours.unet(x, t, context, timestep_cond=torch.zeros(1, 16))
    plain = UNet(UNetConfig.mnist())
    with pytest.raises(ValueError, match="takes no timestep_cond"):
        plain(torch.randn(1, 1, 28, 28), torch.tensor([5]), timestep_cond=torch.zeros(1, 32))


def test_single_file_carries_and_detects_the_guidance_projection(ours, tmp_path):
    """The original layout has no such key (CompVis never had one, and diffusers' single-file loader maps none):
    ldm writes ``time_embed.cond_proj.weight`` beside ``time_embed.0/2`` and detects an LCM from it."""
    original = export_state_dict(ours.unet, unet_layout(ours.unet.config, "original"))
    assert original["time_embed.cond_proj.weight"].shape == (32, 32)
    path = save_single_file(ours, tmp_path / "lcm.safetensors")
    again = load_single_file(path, config=ours.config)["unet"]
    assert all(torch.equal(again.state_dict()[k], v) for k, v in ours.unet.state_dict().items())
    # an SD 1-shaped file (by its conv_in and cross-attention widths) with the projection is an LCM
    keys = {UNET_PREFIX + "input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
            UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 768)}
    assert detect_config(keys).unet.time_cond_proj_dim is None and detect_config(keys).default_sampler is None
    lcm_config = detect_config(keys | {UNET_PREFIX + "time_embed.cond_proj.weight": torch.zeros(320, 256)})
    assert (lcm_config.family, lcm_config.unet.time_cond_proj_dim, lcm_config.distilled) == ("sd1", 256, "lcm")
    assert (lcm_config.default_sampler, lcm_config.default_steps, lcm_config.default_guidance) == ("lcm", 4, 8.5)


# --- the pipeline -------------------------------------------------------------------------------------------
def ref_latents(pipe, prompts=PROMPTS, guidance=8.0, steps=4):
    generators = [torch.Generator().manual_seed(s) for s in range(len(prompts))]
    return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=SIZE, width=SIZE,
                generator=generators, output_type="latent").images


def our_latents(pipe, prompt=PROMPTS, guidance=8.0, steps=4, **options):
    records = list(pipe.loop(prompt, num_inference_steps=steps, guidance_scale=guidance, width=SIZE, height=SIZE,
                             **options))
    return records[-1].x_prev


def test_folder_reads_as_an_lcm(ours):
    assert (ours.default_sampler, ours.default_steps, ours.default_guidance) == ("lcm", 4, 8.5)
    assert ours.config.distilled == "lcm"
    s = ours.sampling
    assert (s.spacing, s.steps_offset, s.clip_x0, s.set_alpha_to_one) == ("leading", 1, False, True)
    assert torch.equal(ours.timesteps("lcm", 4), torch.tensor([999, 759, 499, 259]))
    config = dict(lcm_scheduler(original_inference_steps=100).config)
    with pytest.raises(ValueError, match="original_inference_steps=100"):
        sampling_from_diffusers(config)


def test_text_to_image_matches_latent_consistency_pipeline(reference, ours):
    pipe = reference[0]
    expected = ref_latents(pipe)
    assert rel(our_latents(ours, sampler="LCM"), expected) <= 1e-3
    run = lambda **changes: our_latents(ours, **({"sampler": "lcm"} | changes))  # noqa: E731
    assert_parity(run, expected, TOL, prompt=["a red cube on a chair", "a fox"], guidance=2.0)
    # with nothing said, the folder's defaults: diffusers' (4 steps, 8.5), one UNet pass per step (no uncond batch)
    calls = []
    hook = ours.unet.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        defaults = list(ours.loop(PROMPTS, width=SIZE, height=SIZE))[-1].x_prev
    finally:
        hook.remove()
    assert calls == [2] * 4
    diffusers_defaults = pipe(PROMPTS, height=SIZE, width=SIZE, output_type="latent",
                              generator=[torch.Generator().manual_seed(s) for s in range(2)]).images
    assert (defaults - diffusers_defaults).abs().max().item() < TOL


def test_conditioning_joins_the_guidance_embedding():
    a, b = Conditioning(timestep_cond=torch.ones(2, 8)), Conditioning(timestep_cond=torch.zeros(1, 8))
    assert torch.equal(join(a, b).timestep_cond, torch.cat([torch.ones(2, 8), torch.zeros(2, 8)]))
    with pytest.raises(ValueError, match="timestep_cond"):
        join(a, Conditioning())


def plain_model(ours) -> StableDiffusion:
    """The LCM fixture without its guidance embedding or its LCM defaults: an ordinary SD 1.x-shaped model."""
    plain_unet = UNet(ours.unet.config.with_(time_cond_proj_dim=None))
    return StableDiffusion(ours.tokenizer, ours.text_encoder, plain_unet, ours.vae,
                           ours.config.with_(unet=plain_unet.config, distilled=None, default_sampler=None,
                                             default_steps=None, default_guidance=None))


def test_lcm_sampler_on_a_plain_model_warns(ours):
    """The LCM sampler needs an LCM-distilled UNet or an LCM-LoRA; on anything else it warns (once the loop starts)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        next(iter(ours.loop(PROMPTS[0], width=SIZE, height=SIZE, sampler="lcm")))  # an LCM: no warning
    plain = plain_model(ours)
    for name in ("lcm", "LCM"):
        with pytest.warns(UserWarning, match="LCM sampler expects an LCM-distilled model or an LCM-LoRA"):
            next(iter(plain.loop(PROMPTS[0], width=SIZE, height=SIZE, sampler=name, num_inference_steps=2)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        next(iter(plain.loop(PROMPTS[0], width=SIZE, height=SIZE, sampler="ddim", num_inference_steps=2)))


def test_an_lcm_lora_file_runs_the_lcm_sampler_without_a_warning(ours, tmp_path):
    """An LCM-LoRA (a kohya file on the UNet's attention and convolutions, as latent-consistency/lcm-lora-sdv1-5
    ships) loads onto the plain model; with it the LCM sampler is what the file is for, so it does not warn, and the
    LoRA moves the latents the sampler yields."""
    from ldm.convert.lora import save_lora
    from ldm.lora import LoRA

    plain = plain_model(ours)
    lora = LoRA.create(plain.unet, rank=2, targets="attention+conv")
    for layer in lora.layers.values():
        torch.nn.init.normal_(layer.up.weight, std=0.05)
    path = save_lora(tmp_path / "lcm-lora.safetensors", {"unet": lora}, {"unet": plain.unet})
    before = list(plain.loop(PROMPTS[0], width=SIZE, height=SIZE, sampler="ddim", num_inference_steps=2))[-1].x_prev
    plain.load_lora(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        records = list(plain.loop(PROMPTS[0], width=SIZE, height=SIZE, sampler="lcm", num_inference_steps=2))
    after = list(plain.loop(PROMPTS[0], width=SIZE, height=SIZE, sampler="ddim", num_inference_steps=2))[-1].x_prev
    assert len(records) == 2 and (after - before).abs().max() > 1e-2


def test_img2img_runs_the_end_of_the_plan(ours):
    """Image-to-image keeps the last ⌊strength·S⌋ steps of the LCM plan, as for every sampler (diffusers' LCM img2img
    pipeline instead plans S steps below strength·T: ``lcm_timesteps(…, strength=)``)."""
    image = torch.rand(1, 3, SIZE, SIZE) * 2 - 1
    records = list(ours.loop(PROMPTS[0], image=image, strength=0.5, num_inference_steps=4))
    assert [r.t for r in records] == [499, 259]


def test_diffusers_folder_written_by_ldm_keeps_the_lcm(ours, tmp_path):
    save_diffusers_folder(ours, tmp_path / "again")
    again = StableDiffusion(**load_diffusers_folder(tmp_path / "again"))
    assert again.unet.config == ours.unet.config and again.default_sampler == "lcm"
    assert all(torch.equal(again.unet.state_dict()[k], v) for k, v in ours.unet.state_dict().items())
