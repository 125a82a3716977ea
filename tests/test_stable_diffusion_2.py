"""Stable Diffusion 2.x: v-prediction, OpenCLIP text encoder (penultimate layer, zero padding), linear projections
and 64-channel-style heads — against diffusers with the same tiny random weights, as a folder and as a single file."""

import pytest
from safetensors.torch import load_file

from ldm import load_pipeline
from ldm.sd_checkpoint import inspect_checkpoint, save_diffusers_folder, save_single_file
from ldm.text_encoder import TextEncoder
from _fixtures import assert_parity
from test_stable_diffusion import TOL, ours_with, ref_images, tiny_components, write_vocab

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.reference


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    """A diffusers SD 2-style pipeline: as diffusers stores SD 2, the text encoder holds only the blocks it runs."""
    folder = tmp_path_factory.mktemp("sd2")
    unet, vae, text = tiny_components(
        unet_options=dict(cross_attention_dim=48, attention_head_dim=(2, 4), use_linear_projection=True),
        text_options=dict(hidden_size=48, intermediate_size=96, hidden_act="gelu", pad_token_id=0))
    tokenizer = write_vocab(folder / "vocab")
    tokenizer.pad_token = "!"  # OpenCLIP pads with id 0
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                        set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction",
                                        timestep_spacing="leading")
    pipe = diffusers.StableDiffusionPipeline(vae=vae.eval(), text_encoder=text.eval(), tokenizer=tokenizer, unet=unet.eval(),
                                             scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder / "pipe")
    return pipe, folder / "pipe"


@pytest.mark.parametrize("sampler, scheduler", [("ddim", "DDIMScheduler"), ("dpm++2m", "DPMSolverMultistepScheduler"),
                                                ("euler_a", "EulerAncestralDiscreteScheduler")])
def test_v_prediction_folder_matches_diffusers(sd2, sampler, scheduler):
    ref, folder = sd2
    ours = load_pipeline(folder)
    assert (ours.config.family, ours.config.prediction, ours.config.pad) == ("sd2", "v", "zero")
    assert ours.notes == ["prediction: v (the folder's scheduler_config.json)"]
    assert ours.tokenizer(["a b"])[0, -1] == 0
    swapped = getattr(diffusers, scheduler).from_config(ref.scheduler.config)
    ref = diffusers.StableDiffusionPipeline(**(ref.components | {"scheduler": swapped}))
    ref.set_progress_bar_config(disable=True)
    expected = ref_images(ref, ["a red cube", "a fox"], negative_prompt=["blurry", "blurry"])
    assert_parity(ours_with(ours, ["a red cube", "a fox"], negative_prompt="blurry", sampler=sampler), expected, TOL,
                  prompt=["a red cube", "a cat"], guidance=1.0, negative_prompt="dark")


def test_openclip_single_file_with_penultimate_layer_matches_the_folder(sd2, tmp_path):
    """An SD 2 single file holds all OpenCLIP blocks (fused q/k/v) and reads the penultimate one; the diffusers
    folder holds one block less and reads the last. Both must give the same images."""
    ref, folder = sd2
    pipe = load_pipeline(folder)
    full_config = pipe.config.text.with_(layers=3, output_layer=-2)
    full = TextEncoder(full_config)
    missing = full.load_state_dict(pipe.text_encoder.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith("layers.2.") for k in missing)  # the extra last block stays random
    pipe.text_encoder, pipe.config = full, pipe.config.with_(text=full_config)
    single = save_single_file(pipe, tmp_path / "sd2.safetensors")
    keys = load_file(single)
    assert keys["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 48, 48)
    assert "cond_stage_model.model.positional_embedding" in keys
    loaded = load_pipeline(single, config=pipe.config.with_(prediction="eps"), prediction="v")
    assert loaded.notes == ["prediction: v (set by the caller)"]
    expected = ref_images(ref, "a lighthouse")
    assert_parity(ours_with(loaded, "a lighthouse"), expected, TOL, prompt="a windmill", guidance=1.0)
    assert inspect_checkpoint(single, config=pipe.config)["unrecognised"] == []
    # back to a folder: diffusers' layout keeps only the blocks that run
    again = save_diffusers_folder(loaded, tmp_path / "folder")
    assert load_pipeline(again).config.text.layers == 2
    assert_parity(ours_with(load_pipeline(again), "a lighthouse"), expected, TOL, prompt="a windmill", guidance=1.0)


def test_a_folder_encoder_cannot_become_an_original_single_file(sd2, tmp_path):
    _, folder = sd2
    with pytest.raises(ValueError, match="drops OpenCLIP's last block"):
        save_single_file(load_pipeline(folder), tmp_path / "x.safetensors")


def test_zero_terminal_snr_trailing_and_guidance_rescale_match_diffusers(sd2, tmp_path):
    """The recipe for v-models from Lin et al. 2024: ᾱ_T = 0, timesteps that start at T − 1, rescaled guidance."""
    ref, folder = sd2
    scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    ref = diffusers.StableDiffusionPipeline(**(ref.components | {"scheduler": scheduler}))
    ref.set_progress_bar_config(disable=True)
    ref.save_pretrained(tmp_path / "ztsnr")
    ours = load_pipeline(tmp_path / "ztsnr")
    assert ours.sampling.schedule.zero_terminal_snr and ours.sampling.spacing == "trailing"
    assert ours.schedule.alpha_bar_f64[-1] == 0
    expected = ref_images(ref, "a lighthouse", guidance_rescale=0.7)
    run = ours_with(ours, "a lighthouse", guidance_rescale=0.7)
    assert_parity(run, expected, TOL, prompt="a windmill", guidance=1.0, guidance_rescale=0.0)
    with pytest.raises(ValueError, match=r"rescale must be in \[0, 1\]"):
        run(guidance_rescale=1.5)
