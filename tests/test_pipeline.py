import pytest
import torch

from ldm.loop import LoopConfig
from ldm.pipeline import DiffusionPipeline, slerp
from ldm.schedule import NoiseSchedule
from ldm.train import TrainConfig
from ldm.unet import UNet, UNetConfig

UNET = UNetConfig(in_channels=1, out_channels=1, sample_size=16, channels=16, channel_mult=(1, 2), num_res_blocks=1,
                  attention=(False, False), mid_attention=False, norm_groups=8, num_classes=3)


@pytest.fixture
def pipe() -> DiffusionPipeline:
    torch.manual_seed(0)
    unet = UNet(UNET).eval()
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return DiffusionPipeline(unet, NoiseSchedule(), TrainConfig(unet=UNET, loop=LoopConfig()))


class Spy(torch.nn.Module):
    """Wraps a UNet and records the timesteps it is called at."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.config, self.seen = unet, unet.config, []

    def forward(self, x, t, cond=None):
        self.seen.append(int(t[0]))
        return self.unet(x, t, cond)


def test_sampling_is_seeded_and_batched_consistently(pipe):
    a = pipe(5, num_inference_steps=4, seed=1, batch_size=2, progress=False)
    assert a.shape == (5, 1, 16, 16) and a.abs().max() <= 1
    assert torch.equal(a, pipe(5, num_inference_steps=4, seed=1, batch_size=2, progress=False))
    first = pipe(2, num_inference_steps=4, seed=1, batch_size=2, progress=False)
    assert torch.allclose(a[:2], first, atol=1e-6)  # the first batch does not depend on n


def test_img2img_runs_the_last_steps_only(pipe):
    spy = Spy(pipe.unet)
    pipe.unet = spy
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    out = pipe.img2img(images, 0.3, num_inference_steps=10, seed=0)
    assert spy.seen == [200, 100, 0] and out.shape == images.shape
    assert torch.equal(pipe.img2img(images, 0.0, num_inference_steps=10), images)
    spy.seen.clear()
    pipe.img2img(images, 1.0, num_inference_steps=10)
    assert len(spy.seen) == 10
    with pytest.raises(ValueError, match="strength"):
        pipe.img2img(images, 1.5)


def test_interpolation_endpoints_are_the_seeds_samples(pipe):
    frames = pipe.interpolate(3, 4, frames=4, num_inference_steps=5, class_label=1)
    assert frames.shape == (4, 1, 16, 16)
    for frame, seed in ((frames[0], 3), (frames[-1], 4)):
        alone = pipe(1, num_inference_steps=5, seed=seed, class_label=1, progress=False, sampler="ddim", eta=0.0)
        assert torch.allclose(frame, alone[0], atol=1e-5)


def test_slerp_keeps_the_norm_of_orthogonal_vectors():
    a, b = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 3.0])
    assert torch.allclose(slerp(a, b, 0.0), a) and torch.allclose(slerp(a, b, 1.0), b)
    mid = slerp(a, b, 0.5)
    assert mid.norm().item() == pytest.approx(3.0) and torch.allclose(mid, torch.tensor([1.0, 1.0]) * 3 / 2**0.5)


def test_conditioning_errors_are_named(pipe):
    with pytest.raises(ValueError, match="out of range"):
        pipe(2, class_label=3, num_inference_steps=2, progress=False)
    unconditional = DiffusionPipeline(UNet(UNET.with_(num_classes=None)), NoiseSchedule(),
                                      TrainConfig(unet=UNET.with_(num_classes=None)))
    with pytest.raises(ValueError, match="guidance needs a class-conditional model"):
        unconditional(2, guidance=3.0, num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="unconditional"):
        unconditional(2, class_label=1, num_inference_steps=2, progress=False)
