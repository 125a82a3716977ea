"""One contract for both pipelines: the same keywords, ``loop`` yields records, ``__call__`` returns images,
``img2img`` runs the same number of steps for the same strength; and the pieces they share."""

import pytest
import torch
from PIL import Image
from torch import nn

from ldm.conditioning import Conditioning, join
from ldm.pipeline import DiffusionPipeline
from ldm.samplers import StepRecord
from ldm.sampling import Pipeline, SamplingConfig, img2img_steps
from ldm.sd_config import StableDiffusionConfig
from ldm.stable_diffusion import StableDiffusion
from ldm.text_encoder import TextEncoder, TextEncoderConfig
from ldm.tokenizer import CLIPTokenizer
from ldm.unet import UNet, UNetConfig
from ldm.vae import AutoencoderKL, VAEConfig

SIZE = 32


def loud(model: nn.Module) -> nn.Module:
    """Random weights everywhere (zero-initialised output layers included), so that inputs move outputs."""
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and not module.weight.any():
            module.reset_parameters()
    return model.eval()


def toy() -> DiffusionPipeline:
    config = UNetConfig(in_channels=3, out_channels=3, sample_size=SIZE, channels=16, channel_mult=(1, 2), num_res_blocks=1,
                        attention=(False, False), mid_attention=False, norm_groups=8, num_classes=3)
    return DiffusionPipeline(loud(UNet(config)))


def stable_diffusion() -> StableDiffusion:
    text = TextEncoderConfig.clip_vit_l14().with_(width=32, layers=2, heads=4, mlp_dim=64)
    unet = UNetConfig.sd15().with_(channels=32, channel_mult=(1, 2), attention=(True, False), num_res_blocks=1,
                                   context_dim=text.width, norm_groups=8, num_heads=4)
    vae = VAEConfig.sd().with_(channels=16, channel_mult=(1, 2), norm_groups=8)
    config = StableDiffusionConfig(unet=unet, vae=vae, text=text, size=SIZE)
    return StableDiffusion(CLIPTokenizer.from_bundled(), loud(TextEncoder(text)), loud(UNet(unet)), loud(AutoencoderKL(vae)),
                           config)


@pytest.fixture(scope="module", params=["toy", "stable-diffusion"])
def case(request):
    """(pipeline, the positional arguments of a call: a number of samples or a prompt, an input image)."""
    if request.param == "toy":
        return toy(), (2,), torch.rand(2, 3, SIZE, SIZE) * 2 - 1
    return stable_diffusion(), ("a red cube",), Image.new("RGB", (SIZE, SIZE), (200, 30, 30))


class Counter:
    """Wraps the pipeline's UNet and counts its calls."""

    def __init__(self, pipe):
        self.pipe, self.unet, self.calls = pipe, pipe.unet, 0

    def __enter__(self):
        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        original = self.unet.forward
        self.unet.forward = counted
        return self

    def __exit__(self, *exc):
        del self.unet.forward


def test_loop_yields_records_and_call_returns_images(case):
    pipe, args, _ = case
    assert isinstance(pipe, Pipeline)
    records = list(pipe.loop(*args, sampler="ddim", num_inference_steps=3, seed=0, guidance_scale=1.0))
    assert len(records) == 3 and all(isinstance(r, StepRecord) for r in records)
    assert [r.index for r in records] == [0, 1, 2] and records[0].t > records[-1].t
    images = pipe(*args, sampler="ddim", num_inference_steps=3, seed=0, guidance_scale=1.0, progress=False)
    assert isinstance(images, list) and all(isinstance(i, Image.Image) and i.size == (SIZE, SIZE) for i in images)
    tensor = pipe(*args, sampler="ddim", num_inference_steps=3, seed=0, guidance_scale=1.0, progress=False, output="tensor")
    assert torch.equal(tensor, pipe.decode(records[-1].x_prev)) and tensor.shape[-2:] == (SIZE, SIZE)
    with pytest.raises(ValueError, match="unknown output"):
        pipe(*args, num_inference_steps=1, progress=False, output="numpy")


def test_seed_x_T_and_guidance_are_the_same_keywords(case):
    pipe, args, _ = case
    run = lambda **kw: pipe(*args, sampler="ddim", num_inference_steps=2, progress=False, output="tensor", **kw)
    first = run(seed=1)
    assert torch.equal(first, run(seed=1)) and (first - run(seed=2)).abs().max() > 1e-2
    x_T = torch.randn(len(first), *pipe.loop(*args, num_inference_steps=1).__next__().x_t.shape[1:])
    assert torch.equal(run(x_T=x_T, seed=1), run(x_T=x_T, seed=2))  # x_T given: the seed no longer matters
    labels = {"class_label": [0, 1]} if isinstance(pipe, DiffusionPipeline) else {}
    plain, guided = run(guidance_scale=1.0, **labels), run(guidance_scale=4.0, **labels)
    assert (plain - guided).abs().max() > 1e-2  # guidance is seen, and spelled the same for both


@pytest.mark.parametrize("strength, runs", [(0.5, 5), (0.25, 2), (0.99, 9), (1.0, 10)])
def test_img2img_runs_the_same_steps_for_the_same_strength(case, strength, runs):
    pipe, args, image = case
    with Counter(pipe) as counter:
        out = pipe.img2img(image, *args[1:] if isinstance(pipe, DiffusionPipeline) else args, strength=strength,
                           num_inference_steps=10, sampler="ddim", guidance_scale=1.0, progress=False)
    assert counter.calls == runs
    assert len(out) == (2 if isinstance(pipe, DiffusionPipeline) else 1)
    assert pipe.steps_run(10, strength, image) == runs


def test_img2img_strength_rule_and_its_errors():
    assert [img2img_steps(10, s) for s in (0.1, 0.29, 0.3, 0.75, 1.0)] == [1, 2, 3, 7, 10]  # ⌊strength · S⌋
    with pytest.raises(ValueError, match="runs no step at all"):
        img2img_steps(10, 0.05)
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\]"):
        img2img_steps(10, 1.5)


def test_sampler_options_come_from_one_settings_type(case):
    pipe, _, _ = case
    pipe_settings = pipe.sampling
    try:
        pipe.sampling = SamplingConfig(steps_offset=1, set_alpha_to_one=False, clip_x0=False, variance="fixed_large")
        ddim = pipe.sampler_options("ddim", 4)
        assert ddim["timesteps"].tolist() == [751, 501, 251, 1] and not ddim["clip_x0"]
        assert ddim["final_alpha_bar"] == pytest.approx(float(pipe.schedule.alpha_bar_f64[0]))
        assert pipe.sampler_options("ddpm", 4)["variance"] == "fixed_large"
        assert pipe.schedule.config == pipe.sampling.schedule
    finally:
        pipe.sampling = pipe_settings


def test_join_doubles_every_field_and_broadcasts_a_single_null():
    cond = Conditioning(context=torch.randn(3, 5, 8), pooled=torch.randn(3, 4), size_ids=torch.ones(3, 6))
    uncond = Conditioning(context=torch.zeros(3, 5, 8), pooled=torch.zeros(3, 4), size_ids=torch.ones(3, 6))
    both = join(cond, uncond)
    assert len(both) == 6 and torch.equal(both.context[:3], cond.context) and not both.context[3:].any()
    assert both.labels is None and both.pooled.shape == (6, 4)
    labels = join(Conditioning(labels=torch.tensor([0, 2])), Conditioning(labels=torch.tensor([3])))
    assert labels.labels.tolist() == [0, 2, 3, 3]
    with pytest.raises(ValueError, match="set in only one"):
        join(cond, Conditioning(context=torch.zeros(3, 5, 8)))
    with pytest.raises(ValueError, match="disagree on the batch size"):
        Conditioning(context=torch.zeros(2, 5, 8), pooled=torch.zeros(3, 4))


def test_compile_runs_the_plain_unet_under_inductor_with_the_same_samples():
    """``compile`` swaps ldm's fast convolutions back to plain ones (inductor traces plain PyTorch) and compiles the
    UNet in place: the samples equal eager ones, the state dict keeps its keys, and the fast path is gone."""
    from ldm.perf import FastConv2d

    config = UNetConfig(in_channels=1, out_channels=1, sample_size=8, channels=FastConv2d.MIN_CHANNELS,
                        channel_mult=(1,), num_res_blocks=1, attention=(False,), mid_attention=False, norm_groups=8)
    pipe = DiffusionPipeline(loud(UNet(config)))
    eager = pipe(2, num_inference_steps=3, output="tensor", progress=False)
    keys = set(pipe.unet.state_dict())
    assert any(isinstance(m, FastConv2d) for m in pipe.unet.modules())
    assert pipe.compile() is pipe
    compiled = pipe(2, num_inference_steps=3, output="tensor", progress=False)
    assert not any(isinstance(m, FastConv2d) for m in pipe.unet.modules())
    assert set(pipe.unet.state_dict()) == keys and pipe.unet._compiled_call_impl is not None
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    assert (compiled - pipe(2, num_inference_steps=3, seed=1, output="tensor", progress=False)).abs().max() > 0.1
