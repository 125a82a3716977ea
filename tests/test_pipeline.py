import pytest
import torch

from ldm import load_pipeline
from ldm.pipeline import DiffusionPipeline, slerp
from ldm.sampling import SamplingConfig
from ldm.schedule import ScheduleConfig
from ldm.unet import UNet, UNetConfig

UNET = UNetConfig(in_channels=1, out_channels=1, sample_size=16, channels=16, channel_mult=(1, 2), num_res_blocks=1,
                  attention=(False, False), mid_attention=False, norm_groups=8, num_classes=3)


@pytest.fixture
def pipe() -> DiffusionPipeline:
    torch.manual_seed(0)
    unet = UNet(UNET).eval()
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return DiffusionPipeline(unet, SamplingConfig())


class Spy(torch.nn.Module):
    """Wraps a UNet and records the timesteps it is called at."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.config, self.seen = unet, unet.config, []

    def forward(self, x, t, cond=None, **added):
        self.seen.append(int(t[0]))
        return self.unet(x, t, cond, **added)


def test_sampling_is_seeded_and_batched_consistently(pipe):
    a = pipe(5, num_inference_steps=4, seed=1, batch_size=2, progress=False, output="tensor")
    assert a.shape == (5, 1, 16, 16) and a.abs().max() <= 1
    assert torch.equal(a, pipe(5, num_inference_steps=4, seed=1, batch_size=2, progress=False, output="tensor"))
    first = pipe(2, num_inference_steps=4, seed=1, batch_size=2, progress=False, output="tensor")
    assert torch.allclose(a[:2], first, atol=1e-6)  # the first batch does not depend on n


def test_img2img_runs_the_last_steps_only(pipe):
    spy = Spy(pipe.unet)
    pipe.unet = spy
    images = torch.rand(2, 1, 16, 16) * 2 - 1
    out = pipe.img2img(images, strength=0.3, sampler="ddim", num_inference_steps=10, seed=0, output="tensor",
                       progress=False)
    assert spy.seen == [200, 100, 0] and out.shape == images.shape
    with pytest.raises(ValueError, match="runs no step at all"):
        pipe.img2img(images, strength=0.05, sampler="ddim", num_inference_steps=10)
    spy.seen.clear()
    pipe.img2img(images, strength=1.0, num_inference_steps=10, progress=False)
    assert len(spy.seen) == 10
    with pytest.raises(ValueError, match="strength"):
        pipe.img2img(images, strength=1.5)


def test_interpolation_endpoints_are_the_seeds_samples(pipe):
    frames = pipe.interpolate(3, 4, frames=4, num_inference_steps=5, class_label=1, output="tensor")
    assert frames.shape == (4, 1, 16, 16)
    for frame, seed in ((frames[0], 3), (frames[-1], 4)):
        alone = pipe(1, num_inference_steps=5, seed=seed, class_label=1, progress=False, sampler="ddim", eta=0.0,
                     output="tensor")
        assert torch.allclose(frame, alone[0], atol=1e-5)


def test_slerp_keeps_the_norm_of_orthogonal_vectors():
    a, b = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 3.0])
    assert torch.allclose(slerp(a, b, 0.0), a) and torch.allclose(slerp(a, b, 1.0), b)
    mid = slerp(a, b, 0.5)
    assert mid.norm().item() == pytest.approx(3.0) and torch.allclose(mid, torch.tensor([1.0, 1.0]) * 3 / 2**0.5)


def test_conditioning_errors_are_named(pipe):
    with pytest.raises(ValueError, match="out of range"):
        pipe(2, class_label=3, num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="guidance needs class labels"):
        pipe(2, guidance_scale=3.0, num_inference_steps=2, progress=False)
    unconditional = DiffusionPipeline(UNet(UNET.with_(num_classes=None)))
    with pytest.raises(ValueError, match="guidance needs a class-conditional model"):
        unconditional(2, guidance_scale=3.0, num_inference_steps=2, progress=False)
    with pytest.raises(ValueError, match="unconditional"):
        unconditional(2, class_label=1, num_inference_steps=2, progress=False)


def test_sampling_config_defaults_are_the_ddpm_papers(pipe):
    assert pipe.sampling == SamplingConfig(schedule=ScheduleConfig(), prediction="eps", clip_x0=True, spacing="leading")
    with pytest.raises(ValueError, match="unknown variance"):
        SamplingConfig(variance="learned")


def test_sampler_options_follow_the_config(pipe):
    """Spacing, steps_offset, DDPM variance and DDIM's final ᾱ come from the config; call options override it."""
    spy = Spy(pipe.unet)
    config = SamplingConfig(steps_offset=1, variance="fixed_large", set_alpha_to_one=False, clip_x0=False)
    shifted = DiffusionPipeline(spy, config)
    shifted(1, sampler="ddpm", num_inference_steps=5, class_label=0, progress=False)
    assert spy.seen == [801, 601, 401, 201, 1]
    options = shifted.sampler_options("ddim", 5)
    assert options["final_alpha_bar"] == pytest.approx(1 - 1e-4) and not options["clip_x0"]
    assert shifted.sampler_options("ddpm", 5)["variance"] == "fixed_large"
    spy.seen.clear()
    shifted(1, sampler="ddim", num_inference_steps=4, class_label=0, progress=False, spacing="trailing")
    assert spy.seen == [999, 749, 499, 249]
    unspaced = DiffusionPipeline(pipe.unet, SamplingConfig(spacing=None))  # diffusers' defaults
    assert unspaced.timesteps("ddim", 4).tolist() == [750, 500, 250, 0]
    assert unspaced.timesteps("euler", 4).tolist() == [999, 666, 333, 0]


def test_a_hand_written_diffusers_folder_loads_without_diffusers(pipe, tmp_path):
    """A UNet2DModel folder in the Google configs' form (written here by ldm's own export, so no diffusers is
    needed): the pipeline it loads samples exactly as the pipeline it was written from."""
    import json

    from safetensors.torch import save_file

    from ldm.convert import export_state_dict, unet_layout

    unet_config = UNET.with_(num_classes=None, in_channels=3, out_channels=3, flip_sin_to_cos=False, freq_shift=1.0,
                             asymmetric_downsample=True, norm_eps=1e-6, attention=(False, True), mid_attention=True)
    torch.manual_seed(0)
    unet = UNet(unet_config).eval()
    for p in unet.parameters():
        torch.nn.init.normal_(p, std=0.02)
    (tmp_path / "unet").mkdir()
    weights = export_state_dict(unet, unet_layout(unet_config, "diffusers"))
    save_file(weights, str(tmp_path / "unet" / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "unet" / "config.json").write_text(json.dumps({
        "_class_name": "UNet2DModel", "sample_size": 16, "in_channels": 3, "out_channels": 3, "block_out_channels": [16, 32],
        "layers_per_block": 1, "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "attention_head_dim": None, "norm_num_groups": 8, "norm_eps": 1e-6, "flip_sin_to_cos": False,
        "freq_shift": 1, "downsample_padding": 0, "act_fn": "silu", "center_input_sample": False,
        "time_embedding_type": "positional"}))
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "DDPMScheduler", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "clip_sample": True,
        "num_train_timesteps": 1000, "trained_betas": None, "variance_type": "fixed_large"}))
    loaded = load_pipeline(tmp_path, device="cpu")
    expected_config = SamplingConfig(variance="fixed_large", spacing=None)
    assert loaded.sampling == expected_config and loaded.unet.config == unet_config.with_(dropout=0.0)
    original = DiffusionPipeline(unet, expected_config)
    for sampler in ("ddim", "ddpm"):
        assert torch.equal(loaded(2, sampler=sampler, num_inference_steps=4, seed=5, progress=False, output="tensor"),
                           original(2, sampler=sampler, num_inference_steps=4, seed=5, progress=False, output="tensor"))
