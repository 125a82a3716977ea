"""Inpainting with an ordinary 4-channel UNet (the known region blended back after every step) against diffusers'
StableDiffusionInpaintPipeline given the same 4-channel UNet, on the loud SD fixture."""

import numpy as np
import pytest
import torch
from PIL import Image

from ldm import load_pipeline
from _fixtures import assert_parity
from test_stable_diffusion import SIZE, TOL, our_images, rel, reference  # noqa: F401

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.reference

RNG = np.random.default_rng(0)
IMAGE = Image.fromarray((RNG.random((SIZE, SIZE, 3)) * 255).astype(np.uint8))
LEFT = Image.fromarray(np.where(np.arange(SIZE)[None, :] < SIZE // 2, 255, 0).repeat(SIZE, 0).astype(np.uint8))
TOP = LEFT.transpose(Image.Transpose.TRANSPOSE)


def diffusers_inpaint(reference, scheduler, spacing, sigmas=None):
    ref, _ = reference
    flags = {"use_karras_sigmas": True} if sigmas == "karras" else {}
    swapped = getattr(diffusers, scheduler).from_config(ref.scheduler.config, timestep_spacing=spacing, **flags)
    pipe = diffusers.StableDiffusionInpaintPipeline(**(ref.components | {"scheduler": swapped}))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("sampler, scheduler, strength, spacing, sigmas", [
    ("ddim", "DDIMScheduler", 1.0, "leading", None),
    ("euler_a", "EulerAncestralDiscreteScheduler", 1.0, "leading", None),
    ("dpm++2m", "DPMSolverMultistepScheduler", 0.6, "leading", None),
    ("euler", "EulerDiscreteScheduler", 0.6, "linspace", None),  # fractional timesteps: x_0 noised to σ between steps
    # a σ schedule: the known region is noised to the plan's next σ (diffusers' add_noise at its step index)
    ("euler", "EulerDiscreteScheduler", 0.6, "leading", "karras"),
    ("dpm++2m", "DPMSolverMultistepScheduler", 1.0, "leading", "karras"),
    ("dpm++2m", "DPMSolverMultistepScheduler", 0.6, "leading", "karras"),
])
def test_four_channel_inpainting_matches_diffusers(reference, sampler, scheduler, strength, spacing, sigmas):
    ref = diffusers_inpaint(reference, scheduler, spacing, sigmas)
    ours = load_pipeline(reference[1])
    ours.sampling = ours.sampling.with_(spacing=spacing)
    assert not ours.config.inpainting
    expected = torch.from_numpy(ref("a cat", image=IMAGE, mask_image=LEFT, num_inference_steps=5, height=SIZE,
                                    width=SIZE, strength=strength, output_type="np",
                                    generator=torch.Generator().manual_seed(0)).images).permute(0, 3, 1, 2) * 2 - 1

    def run(**changes):
        return our_images(ours, **(dict(prompt="a cat", image=IMAGE, mask=LEFT, sampler=sampler, strength=strength,
                                        sigmas=sigmas) | changes))

    error, moved = assert_parity(run, expected, TOL, prompt="a dog", guidance=1.0, mask=TOP)
    assert rel(run(), expected) < 1e-3


def test_the_known_region_is_kept_and_the_masked_one_repainted(reference):
    """After the last step the latents outside the mask are the image's own (the VAE posterior sample), so the
    decoded image keeps the unmasked half; without the blend (img2img at strength 1) nothing is kept."""
    pipe = load_pipeline(reference[1])
    records = list(pipe.loop("a cat", image=IMAGE, mask=LEFT, num_inference_steps=3, sampler="euler_a", seed=4))
    z0 = pipe.encode(pipe.image_tensor(IMAGE, SIZE, SIZE), [torch.Generator().manual_seed(4)])
    known = slice(SIZE // 4, None)  # the right half of the 16×16 latents: mask 0
    assert torch.equal(records[-1].x_prev[..., known], z0[..., known])
    assert (records[-1].x_prev[..., :SIZE // 4] - z0[..., :SIZE // 4]).abs().max() > 0.5
    assert torch.equal(pipe.inpaint(IMAGE, LEFT, "a cat", num_inference_steps=3, sampler="euler_a", seed=4,
                                    progress=False, output="tensor"), pipe.decode(records[-1].x_prev))


# --- SDXL: image-to-image and 4-channel inpainting ------------------------------------------------------------------
from test_stable_diffusion_xl import sdxl  # noqa: E402,F401


@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_sdxl_img2img_and_inpainting_match_diffusers(sdxl, task):
    """SDXL's img2img and inpainting pipelines, with ``requires_aesthetics_score=False`` (the base model's
    convention: size ids are original size, crop corner and target size, as for text-to-image — the refiner's
    aesthetic score would replace the target size)."""
    ref, folder = sdxl
    ours = load_pipeline(folder)
    name = "StableDiffusionXLImg2ImgPipeline" if task == "img2img" else "StableDiffusionXLInpaintPipeline"
    pipe = getattr(diffusers, name)(**{k: v for k, v in ref.components.items() if v is not None},
                                    requires_aesthetics_score=False, force_zeros_for_empty_prompt=True,
                                    add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    # SDXL inpainting's strength defaults to 0.9999 (a start just below pure noise): both are given 0.7 here
    options = dict(image=IMAGE, strength=0.7) | (dict(mask=LEFT) if task == "inpaint" else {})
    theirs = {"mask_image" if k == "mask" else k: v for k, v in options.items()}
    expected = torch.from_numpy(pipe("a red cube", num_inference_steps=5, guidance_scale=7.5, output_type="np",
                                     height=SIZE, width=SIZE, generator=torch.Generator().manual_seed(0), **theirs).images)
    expected = expected.permute(0, 3, 1, 2) * 2 - 1

    def run(**changes):
        return our_images(ours, **(dict(prompt="a red cube", sampler="euler") | options | changes))

    changes = dict(prompt="a blue cube", guidance=1.0) | (dict(mask=TOP) if task == "inpaint" else {})
    assert_parity(run, expected, TOL, **changes)
    assert rel(run(), expected) < 1e-3
