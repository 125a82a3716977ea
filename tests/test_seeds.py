"""Per-image seeds: image k of a batch seeded s is the image seed s + k gives alone, for every sampler (the
stochastic ones draw their per-step noise per image too), in both pipelines and on the command line."""

import numpy as np
import pytest
import torch
from PIL import Image

from ldm import load_pipeline
from ldm.pipeline import DiffusionPipeline
from ldm.samplers import SAMPLERS, randn
from ldm.sampling import SamplingConfig, generators
from ldm.unet import UNet
from test_pipeline import UNET

# batched and single-image model evaluations round differently (float32 matmuls over another batch size)
ATOL = 1e-4


@pytest.fixture(scope="module")
def toy() -> DiffusionPipeline:
    torch.manual_seed(0)
    unet = UNet(UNET).eval()
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return DiffusionPipeline(unet, SamplingConfig())


def test_randn_draws_each_item_from_its_own_generator():
    batch = randn((3, 2, 4, 4), [torch.Generator().manual_seed(s) for s in (5, 6, 7)], "cpu")
    for k, s in enumerate((5, 6, 7)):
        assert torch.equal(batch[k:k + 1], randn((1, 2, 4, 4), torch.Generator().manual_seed(s), "cpu"))
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        randn((3, 2), [torch.Generator(), torch.Generator()], "cpu")
    with pytest.raises(ValueError, match="2 seeds for 3 images"):
        generators(3, seeds=[1, 2])


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_toy_batch_is_the_single_images(toy, sampler):
    options = dict(sampler=sampler, num_inference_steps=4, class_label=1, guidance_scale=2.0, progress=False,
                   output="tensor") | (dict(eta=1.0) if sampler == "ddim" else {})  # η = 1: DDIM draws noise too
    batch = toy(3, seed=10, **options)
    for k in range(3):
        assert torch.allclose(batch[k:k + 1], toy(1, seed=10 + k, **options), atol=ATOL), k
    assert (batch[0] - batch[1]).abs().max() > 0.1  # different seeds, different images
    explicit = toy(seeds=[12, 10], batch_size=1, **options)  # n from the seeds; batch_size changes nothing
    assert torch.allclose(explicit, batch[[2, 0]], atol=ATOL)


def test_toy_img2img_batch_is_the_single_images(toy):
    image = torch.rand(1, 1, 16, 16) * 2 - 1
    options = dict(sampler="ddpm", num_inference_steps=6, strength=0.5, progress=False, output="tensor")
    batch = toy(image=image.expand(2, -1, -1, -1), seed=3, **options)
    assert torch.allclose(batch[1:], toy(image=image, seed=4, **options), atol=ATOL)


diffusers = pytest.importorskip("diffusers")
from test_stable_diffusion import SIZE, TOL, assert_parity, our_images, ref_images, reference  # noqa: E402,F401


@pytest.mark.reference
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_stable_diffusion_batch_is_the_single_images(reference, sampler):
    _, folder = reference
    pipe = load_pipeline(folder)
    batch = our_images(pipe, "a lighthouse", steps=3, sampler=sampler, seed=7, num_images_per_prompt=2)
    for k in range(2):
        alone = our_images(pipe, "a lighthouse", steps=3, sampler=sampler, seed=7 + k)
        assert torch.allclose(batch[k:k + 1], alone, atol=ATOL), k
    assert (batch[0] - batch[1]).abs().max() > 0.1


@pytest.mark.reference
def test_stable_diffusion_img2img_batch_is_the_single_images(reference):
    """The VAE posterior sample is drawn per image too (diffusers' order: posterior, then x_T)."""
    _, folder = reference
    pipe = load_pipeline(folder)
    image = Image.fromarray((np.random.default_rng(0).random((SIZE, SIZE, 3)) * 255).astype(np.uint8))
    options = dict(steps=4, sampler="euler_a", image=image, strength=0.6)
    batch = our_images(pipe, ["a house", "a boat"], seeds=[3, 9], **options)
    assert torch.allclose(batch[1:], our_images(pipe, "a boat", seed=9, **options), atol=ATOL)


@pytest.mark.reference
def test_stable_diffusion_batch_matches_diffusers_with_a_list_of_generators(reference):
    ref, folder = reference
    ours = load_pipeline(folder)
    swapped = diffusers.EulerAncestralDiscreteScheduler.from_config(ref.scheduler.config)
    ref = diffusers.StableDiffusionPipeline(**(ref.components | {"scheduler": swapped}))
    ref.set_progress_bar_config(disable=True)
    expected = ref_images(ref, "a red cube", seed=[4, 11], num_images_per_prompt=2)
    assert_parity(lambda **changes: our_images(ours, **(dict(prompt="a red cube", sampler="euler_a", seeds=[4, 11],
                                                             num_images_per_prompt=2) | changes)),
                  expected, TOL, seeds=[4, 12], guidance=1.0)


@pytest.mark.reference
def test_cli_seeds(reference, tmp_path):
    from ldm.cli import main

    _, folder = reference
    common = ["--checkpoint", str(folder), "--prompt", "a cat", "--steps", "2", "--sampler", "euler_a",
              "--width", str(SIZE), "--height", str(SIZE)]
    main(["txt2img", *common, "--seeds", "3,5", "--out", str(tmp_path / "b.png")])
    main(["txt2img", *common, "--seed", "5", "--out", str(tmp_path / "a.png")])
    one, two = (np.asarray(Image.open(tmp_path / f"b_{k}.png"), dtype=np.int16) for k in range(2))
    alone = np.asarray(Image.open(tmp_path / "a.png"), dtype=np.int16)
    assert np.abs(two - alone).max() <= 1 and np.abs(one - alone).max() > 10
    with pytest.raises(SystemExit):
        main(["txt2img", *common, "--seeds", "3,x", "--out", str(tmp_path / "c.png")])
