"""The SDXL refiner: one text encoder (OpenCLIP bigG), aesthetic-score size ids, a second stage after the base —
against diffusers' StableDiffusionXLImg2ImgPipeline(text_encoder=None, requires_aesthetics_score=True) with the
same tiny loud weights, as a folder and as a single file."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ldm import load_pipeline
from ldm.convert import foreign_names, unet_config_from_diffusers, unet_layout
from ldm.sd_checkpoint import detect_config, inspect_checkpoint, save_diffusers_folder, save_single_file
from ldm.sd_config import StableDiffusionConfig
from ldm.unet import UNet
from _fixtures import assert_parity, loud
from test_stable_diffusion import SIZE, TOL, our_images, rel
from test_stable_diffusion_xl import sdxl  # noqa: F401

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.reference

IMAGE = Image.fromarray((np.random.default_rng(0).random((SIZE, SIZE, 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def refiner(sdxl, tmp_path_factory):
    """A refiner-shaped pipeline beside the ``sdxl`` base, sharing its VAE and second text encoder as the real pair
    does: four levels with cross-attention only in the middle two, an int transformer depth (the refiner's 4), the
    context only bigG's width, and 5 size ids (original size, crop corner, aesthetic score)."""
    base, _ = sdxl
    folder = tmp_path_factory.mktemp("refiner")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=SIZE // 2, in_channels=4, out_channels=4, block_out_channels=(16, 32, 32, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 4, 4), use_linear_projection=True, transformer_layers_per_block=2, norm_num_groups=8,
        cross_attention_dim=48, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 5 * 8)
    unet = loud(unet, None, peaky=2.0, seed=5)
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=base.vae, text_encoder=None, tokenizer=None, text_encoder_2=base.text_encoder_2,
        tokenizer_2=base.tokenizer_2, unet=unet, scheduler=base.scheduler, requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder / "pipe")
    return pipe, folder / "pipe"


def ref_refined(pipe, prompt="a red cube", guidance=7.5, **kw):
    out = pipe(prompt, num_inference_steps=5, guidance_scale=guidance, output_type="np",
               generator=torch.Generator().manual_seed(0), **kw).images
    return torch.from_numpy(out).permute(0, 3, 1, 2) * 2 - 1


REFINER_UNET = dict(  # stabilityai/stable-diffusion-xl-refiner-1.0, unet/config.json (the fields that shape the model)
    sample_size=128, in_channels=4, out_channels=4, block_out_channels=(384, 768, 1536, 1536), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(6, 12, 24, 24), transformer_layers_per_block=4, cross_attention_dim=1280,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2560, addition_embed_type_num_heads=64,
)


def test_preset_matches_the_released_refiner():
    """The preset is the released refiner: its UNet config read from diffusers', the same parameters under the same
    names (built on the meta device: sizes only), one 1280-wide encoder and 1280 + 5·256 added features."""
    c = StableDiffusionConfig.sdxl_refiner()
    assert (c.text, c.text_2.width, c.family, c.requires_aesthetics_score, c.zero_uncond) == \
        (None, 1280, "sdxl-refiner", True, False)
    assert c.unet.added_cond_dim == c.text_2.projection_dim + 5 * c.unet.added_time_dim == 2560
    with torch.device("meta"):
        ref, ours = diffusers.UNet2DConditionModel(**REFINER_UNET), UNet(c.unet)
    assert unet_config_from_diffusers(dict(ref.config)) == c.unet
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == 2_259_526_660
    assert set(foreign_names(ours, unet_layout(c.unet, "diffusers")).values()) == set(ref.state_dict())


def test_img2img_matches_diffusers(refiner):
    ref, folder = refiner
    ours = load_pipeline(folder)
    assert (ours.config.family, ours.text_encoder, ours.tokenizer) == ("sdxl-refiner", None, None)
    assert ours.config.requires_aesthetics_score and not ours.config.zero_uncond
    expected = ref_refined(ref, image=IMAGE, strength=0.7)

    def run(**changes):
        return our_images(ours, **(dict(prompt="a red cube", sampler="euler", image=IMAGE, strength=0.7) | changes))

    error, moved = assert_parity(run, expected, TOL, prompt="a blue cube", guidance=1.0, aesthetic_score=2.0)
    assert rel(run(), expected) < 1e-3
    # the negative's score is its own input (uncond's size ids), seen only under guidance
    assert_parity(lambda **c: run(negative_aesthetic_score=9.0, **c),
                  ref_refined(ref, image=IMAGE, strength=0.7, negative_aesthetic_score=9.0), TOL, negative_prompt="blurry")
    assert (run(negative_aesthetic_score=9.0) - run()).abs().max() > 20 * TOL


@pytest.mark.parametrize("sampler, scheduler", [("euler", "EulerDiscreteScheduler"), ("dpm++2m", "DPMSolverMultistepScheduler")])
def test_base_then_refiner_matches_diffusers(sdxl, refiner, sampler, scheduler):
    """diffusers' base with denoising_end=0.5 hands its latents to the refiner with denoising_start=0.5; ldm's
    ``base(prompt, refiner=…, refine_from=0.5)`` splits the same 5 steps (leading: 801, 601 | 401, 201, 1).
    Half, not the usual 0.8: the refiner's one step at t = 1 barely moves a tiny model's image."""
    (base_ref, base_folder), (refiner_ref, refiner_folder) = sdxl, refiner
    base, ours = load_pipeline(base_folder), load_pipeline(refiner_folder)
    swapped = getattr(diffusers, scheduler).from_config(base_ref.scheduler.config)
    base_ref = diffusers.StableDiffusionXLPipeline(**(base_ref.components | {"scheduler": swapped}), add_watermarker=False)
    refiner_ref = diffusers.StableDiffusionXLImg2ImgPipeline(**(refiner_ref.components | {"scheduler": swapped}),
                                                             requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
                                                             add_watermarker=False)
    for pipe in (base_ref, refiner_ref):
        pipe.set_progress_bar_config(disable=True)
    latents = base_ref("a red cube", num_inference_steps=5, guidance_scale=7.5, height=SIZE, width=SIZE,
                       denoising_end=0.5, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    expected = ref_refined(refiner_ref, image=latents, denoising_start=0.5)
    assert base.handoff(0.5, dict(sampler=sampler, num_inference_steps=5))[1] == 2

    def run(**changes):
        options = dict(prompt="a red cube", refiner=ours, refine_from=0.5, sampler=sampler, num_inference_steps=5,
                       guidance_scale=7.5, width=SIZE, height=SIZE, progress=False, output="tensor") | changes
        return base(**options)

    # refiner=None: the base runs all 5 steps; the aesthetic score's reach is checked in img2img above
    assert_parity(run, expected, TOL, prompt="a blue cube", guidance_scale=1.0, refiner=None, refine_from=0.6)


def test_two_stage_errors(sdxl, refiner):
    base, ours = load_pipeline(sdxl[1]), load_pipeline(refiner[1])
    with pytest.raises(ValueError, match="sdxl model, not an SDXL refiner"):
        base("a cube", refiner=base, width=SIZE, height=SIZE)
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"refine_from must be in \(0, 1\)"):
            base("a cube", refiner=ours, refine_from=bad, width=SIZE, height=SIZE)
    with pytest.raises(ValueError, match="leaves one stage no step"):
        base("a cube", refiner=ours, refine_from=0.1, num_inference_steps=2, sampler="euler", width=SIZE, height=SIZE)
    with pytest.raises(ValueError, match="sigma schedule"):
        base("a cube", refiner=ours, sampler="DPM++ 2M Karras", width=SIZE, height=SIZE)
    with pytest.raises(ValueError, match="latents"):
        ours.refine(IMAGE, "a cube", refine_from=0.8)


def test_single_file_round_trip(refiner, tmp_path):
    """The refiner's single file holds bigG as ``conditioner.embedders.0.model.*`` (OpenCLIP's names, fused q/k/v);
    detect_config knows it by that prefix alone, and folder → file → folder keeps the images."""
    ref, folder = refiner
    pipe = load_pipeline(folder)
    single = save_single_file(pipe, tmp_path / "refiner.safetensors")
    keys = load_file(single)
    assert "conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert "conditioner.embedders.0.model.text_projection" in keys
    assert not any(k.startswith("conditioner.embedders.1.") for k in keys)
    assert detect_config(keys).family == "sdxl-refiner"
    report = inspect_checkpoint(single, config=pipe.config)
    assert (report["family"], report["unrecognised"]) == ("sdxl-refiner", [])
    assert set(report["parameters"]) == {"unet", "vae", "text_encoder_2"}
    assert inspect_checkpoint(folder)["family"] == "sdxl-refiner"
    loaded = load_pipeline(single, config=pipe.config)
    assert loaded.text_encoder is None and loaded.config.requires_aesthetics_score
    # the same weights; only memory layouts differ (fused q/k/v, a transposed projection): float rounding, 2.5e-5
    expected = our_images(pipe, "a lighthouse", sampler="euler", image=IMAGE, strength=0.7)
    assert torch.allclose(our_images(loaded, "a lighthouse", sampler="euler", image=IMAGE, strength=0.7), expected, atol=1e-4)
    again = save_diffusers_folder(loaded, tmp_path / "folder")
    assert not (again / "text_encoder").exists()
    reread = load_pipeline(again)
    assert (reread.config.family, reread.config.requires_aesthetics_score) == ("sdxl-refiner", True)
    assert torch.allclose(our_images(reread, "a lighthouse", sampler="euler", image=IMAGE, strength=0.7), expected, atol=1e-4)
    # diffusers reads ldm's folder as the same refiner
    theirs = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(again)
    assert theirs.text_encoder is None and theirs.config.requires_aesthetics_score
    got, want = theirs.unet.state_dict(), ref.unet.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_diffusers_from_single_file_reads_what_ldm_writes(refiner, tmp_path):
    """diffusers' StableDiffusionXLImg2ImgPipeline.from_single_file (offline, configs from the reference's folder)
    reads ldm's refiner file as the reference's weights."""
    ref, folder = refiner
    single = save_single_file(load_pipeline(folder), tmp_path / "refiner.safetensors")
    theirs = diffusers.StableDiffusionXLImg2ImgPipeline.from_single_file(str(single), config=str(folder),
                                                                         local_files_only=True)
    for name in ("unet", "vae", "text_encoder_2"):
        got, want = getattr(theirs, name).state_dict(), getattr(ref, name).state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name


def test_cli_two_stage(sdxl, refiner, tmp_path, capsys):
    """``ldm txt2img BASE --refiner REFINER --refine-from F`` writes the image ``base(…, refiner=…)`` makes; a
    refiner that is none, and a fraction outside (0, 1), are refused by name."""
    from ldm.cli import main

    (_, base_folder), (_, refiner_folder) = sdxl, refiner
    common = [str(base_folder), "--prompt", "a red cube", "--sampler", "euler", "--steps", "5", "--width", str(SIZE),
              "--height", str(SIZE), "--device", "cpu", "--dtype", "fp32"]
    main(["txt2img", *common, "--refiner", str(refiner_folder), "--refine-from", "0.5", "--out", str(tmp_path / "a.png")])
    base, ours = load_pipeline(base_folder), load_pipeline(refiner_folder)
    expected = base("a red cube", refiner=ours, refine_from=0.5, sampler="euler", num_inference_steps=5, width=SIZE,
                    height=SIZE, progress=False)[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(expected))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["txt2img", *common, "--refiner", str(base_folder), "--out", str(tmp_path / "b.png")])
    assert f"--refiner {base_folder} is a sdxl model, not an SDXL refiner" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["txt2img", *common, "--refiner", str(refiner_folder), "--refine-from", "1.2", "--out", str(tmp_path / "b.png")])
    assert "refine_from must be in (0, 1)" in capsys.readouterr().err
