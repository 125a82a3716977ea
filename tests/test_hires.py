"""The hires fix: generate small, upscale the images, img2img at the large size."""

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ldm import load_pipeline
from test_stable_diffusion import SIZE, reference  # noqa: F401

pytest.importorskip("diffusers")
pytestmark = pytest.mark.reference


def test_hires_is_the_two_stages_and_not_plain_upscaling(reference):
    pipe = load_pipeline(reference[1])
    options = dict(num_inference_steps=4, sampler="euler_a", seeds=[2, 5], num_images_per_prompt=2, progress=False,
                   output="tensor")
    out = pipe.hires("a lighthouse", scale=2, strength=0.5, **options)
    assert out.shape == (2, 3, 2 * SIZE, 2 * SIZE)
    small = pipe("a lighthouse", **options)
    upscaled = F.interpolate(small, size=(2 * SIZE, 2 * SIZE), mode="bicubic").clamp(-1, 1)
    assert torch.equal(out, pipe.img2img(upscaled, "a lighthouse", strength=0.5, **options))
    assert (out - upscaled).abs().max() > 0.3  # the second stage redraws: more than an enlargement
    # sizes are rounded to multiples of the VAE's factor (2 for the tiny one)
    assert pipe.hires("a lighthouse", scale=1.3, strength=0.5, **options).shape[-2:] == (42, 42)


def test_cli_hires(reference, tmp_path):
    from ldm.cli import main

    main(["txt2img", "--checkpoint", str(reference[1]), "--prompt", "a cat", "--steps", "2", "--width", str(SIZE),
          "--height", str(SIZE), "--hires-scale", "2", "--hires-strength", "0.5", "--out", str(tmp_path / "big.png")])
    assert Image.open(tmp_path / "big.png").size == (2 * SIZE, 2 * SIZE)
