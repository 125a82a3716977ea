"""SDXL base: two text encoders, pooled-text and size conditioning, zero unconditional context — against diffusers'
StableDiffusionXLPipeline with the same tiny random weights, as a folder and as a single file."""

import pytest
import torch
from safetensors.torch import load_file

from ldm import load_pipeline
from ldm.sd_checkpoint import detect_config, inspect_checkpoint, save_diffusers_folder, save_single_file
from _fixtures import assert_parity
from test_stable_diffusion import SIZE, TOL, loud_components, our_images, ours_with, ref_images, write_vocab

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.reference


def clip_config(**changes):
    return transformers.CLIPTextConfig(**(dict(vocab_size=49408, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                                intermediate_size=64, max_position_embeddings=77, hidden_act="quick_gelu",
                                                bos_token_id=49406, eos_token_id=49407, pad_token_id=1) | changes))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=SIZE // 2, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2), norm_num_groups=8,
        cross_attention_dim=32 + 48, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8)
    vae = diffusers.AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  scaling_factor=0.13025)
    text = transformers.CLIPTextModel(clip_config())
    # the two encoders' widths differ, as in SDXL (768, 1280): diffusers' from_single_file tells them apart by
    # width alone, and reads the first encoder's weights into the second when they are the same
    text_2 = transformers.CLIPTextModelWithProjection(clip_config(hidden_act="gelu", hidden_size=48, intermediate_size=96,
                                                                  projection_dim=32))
    unet, vae, text, text_2 = loud_components(unet, vae, text, text_2)
    tokenizer = write_vocab(folder / "vocab")
    tokenizer_2 = write_vocab(folder / "vocab")
    tokenizer_2.pad_token = "!"
    scheduler = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 steps_offset=1, timestep_spacing="leading")
    pipe = diffusers.StableDiffusionXLPipeline(vae=vae.eval(), text_encoder=text.eval(), text_encoder_2=text_2.eval(),
                                               tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet.eval(),
                                               scheduler=scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder / "pipe")
    return pipe, folder / "pipe"


@pytest.mark.parametrize("sampler, scheduler", [("euler", "EulerDiscreteScheduler"), ("dpm++2m", "DPMSolverMultistepScheduler")])
@pytest.mark.parametrize("negative", [None, "blurry"])
def test_folder_matches_diffusers(sdxl, sampler, scheduler, negative):
    ref, folder = sdxl
    ours = load_pipeline(folder)
    assert (ours.config.family, ours.config.size, ours.config.zero_uncond) == ("sdxl", SIZE, True)
    assert ours.vae.config.scaling_factor == 0.13025
    swapped = getattr(diffusers, scheduler).from_config(ref.scheduler.config)
    ref = diffusers.StableDiffusionXLPipeline(**(ref.components | {"scheduler": swapped}), add_watermarker=False)
    ref.set_progress_bar_config(disable=True)
    expected = ref_images(ref, "a red cube", negative_prompt=negative)
    # None: the all-zero unconditional context (force_zeros_for_empty_prompt); "" would encode the empty prompt
    assert_parity(ours_with(ours, "a red cube", negative_prompt=negative, sampler=sampler), expected, TOL,
                  prompt="a blue cube", guidance=1.0, negative_prompt="" if negative is None else None)


def test_single_file_round_trip(sdxl, tmp_path):
    ref, folder = sdxl
    pipe = load_pipeline(folder)
    single = save_single_file(pipe, tmp_path / "sdxl.safetensors")
    keys = load_file(single)
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in keys
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    assert detect_config(keys).family == "sdxl"  # from the key prefixes, whatever the widths
    loaded = load_pipeline(single, config=pipe.config)
    assert inspect_checkpoint(single, config=pipe.config)["unrecognised"] == []
    expected = our_images(pipe, "a lighthouse", sampler="euler")
    # the same weights; only memory layouts differ (a transposed projection), hence float rounding
    assert torch.allclose(our_images(loaded, "a lighthouse", sampler="euler"), expected, atol=1e-5)
    again = load_pipeline(save_diffusers_folder(loaded, tmp_path / "folder"))
    assert torch.allclose(our_images(again, "a lighthouse", sampler="euler"), expected, atol=1e-5)


def test_diffusers_from_single_file_reads_what_ldm_writes(sdxl, tmp_path):
    """diffusers' StableDiffusionXLPipeline.from_single_file, offline (component configs from the reference's
    folder), reads ldm's SDXL file — both encoders, OpenCLIP's fused q/k/v and [D, P] projection included — as the
    reference's weights, and its images match ldm's from the same file."""
    ref, folder = sdxl
    pipe = load_pipeline(folder)
    single = save_single_file(pipe, tmp_path / "sdxl.safetensors")
    theirs = diffusers.StableDiffusionXLPipeline.from_single_file(str(single), config=str(folder), local_files_only=True,
                                                                   add_watermarker=False)
    theirs.set_progress_bar_config(disable=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        got, want = getattr(theirs, name).state_dict(), getattr(ref, name).state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name
    expected = ref_images(theirs, "a lighthouse")
    assert_parity(ours_with(load_pipeline(single, config=pipe.config), "a lighthouse", sampler="euler"), expected, TOL,
                  prompt="a windmill", guidance=1.0, negative_prompt="")


def test_unknown_conditioners_are_named():
    from ldm.sd_checkpoint import UnsupportedCheckpoint

    unknown = {"conditioner.embedders.0.model.ln_final.weight": torch.zeros(1),
               "conditioner.embedders.1.transformer.final_layer_norm.weight": torch.zeros(1),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(384, 4, 3, 3)}
    with pytest.raises(UnsupportedCheckpoint, match="conditioner.embedders.0.model., conditioner.embedders.1.transformer.; "
                                                    "known: SDXL base"):
        detect_config(unknown)
