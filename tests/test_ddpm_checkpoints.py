"""The original DDPM models in diffusers' layout (google/ddpm-cifar10-32, -celebahq-256, -church-256, -bedroom-256,
-cat-256  [Ho et al. 2020]): the two presets, folder loading, and sampling that equals diffusers' pipelines.

Real weights cannot be downloaded here, so the folders are written by diffusers itself from tiny random-weight
``UNet2DModel``s with the Google block structure; ``-m slow`` checks the presets at full size.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.checkpoint import CheckpointError
from ldm.cli import main
from ldm import load_pipeline
from ldm.convert import import_state_dict, sampling_from_diffusers, unet_config_from_diffusers, unet_layout
from ldm.loading import checkpoint_kind
from ldm.unet import UNet, UNetConfig

GOOGLE = dict(layers_per_block=2, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6,
              attention_head_dim=None)  # null in the Google configs: one head as wide as the level
CIFAR_BLOCKS = dict(down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
HQ_BLOCKS = dict(down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),  # attention at 16×16 of 256
                 up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4)


def google_unet(diffusers, kind: str, **changes):
    """A UNet2DModel with the block structure of google/ddpm-cifar10-32 ("cifar") or the 256×256 models ("256")."""
    if kind == "cifar":
        args = dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), **CIFAR_BLOCKS)
    else:
        args = dict(sample_size=256, in_channels=3, out_channels=3, block_out_channels=(128, 128, 256, 256, 512, 512),
                    **HQ_BLOCKS)
    return diffusers.UNet2DModel(**(GOOGLE | args | changes))


@pytest.mark.reference
def test_presets_equal_the_google_architectures():
    """Parameter counts as diffusers builds them (on the meta device, so it takes no time), and the configs read back."""
    diffusers = pytest.importorskip("diffusers")
    for kind, preset, count in (("cifar", UNetConfig.ddpm_cifar10(), 35_746_307), ("256", UNetConfig.ddpm_256(), 113_673_219)):
        with torch.device("meta"):
            ref, ours = google_unet(diffusers, kind), UNet(preset)
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == count
        read = unet_config_from_diffusers(dict(ref.config))
        assert read.with_(sample_size=preset.sample_size, dropout=preset.dropout) == preset


def test_ddpm_scheduler_settings():
    defaults = sampling_from_diffusers({})  # DDPMScheduler's defaults
    assert (defaults.clip_x0, defaults.variance, defaults.spacing) == (True, "fixed_small", None)
    cifar = sampling_from_diffusers({"variance_type": "fixed_large", "clip_sample": False})
    assert (cifar.clip_x0, cifar.variance) == (False, "fixed_large")
    assert sampling_from_diffusers({"variance_type": "fixed_small_log"}).variance == "fixed_small"
    for bad, match in (({"variance_type": "learned_range"}, "learned_range"), ({"thresholding": True}, "thresholding"),
                       ({"clip_sample_range": 2.0}, "clip_sample_range")):
        with pytest.raises(ValueError, match=match):
            sampling_from_diffusers(bad)


def test_unsupported_unet_options_are_named():
    cfg = dict(block_out_channels=[32, 64], down_block_types=["DownBlock2D", "AttnDownBlock2D"],
               up_block_types=["AttnUpBlock2D", "UpBlock2D"])
    unet_config_from_diffusers(cfg)
    for change, match in (({"time_embedding_type": "fourier"}, "time_embedding_type"),
                          ({"center_input_sample": True}, "center_input"),
                          ({"up_block_types": ["UpBlock2D", "AttnUpBlock2D"]}, "do not mirror"),
                          ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift")):
        with pytest.raises(ValueError, match=match):
            unet_config_from_diffusers(cfg | change)


# --- tiny folders written by diffusers -------------------------------------------------------------------------
FOLDERS = {  # name: (block structure, widths, channels, size, pipeline, scheduler settings)
    "cifar": ("cifar", (32, 64, 64, 64), 3, 16, "DDPMPipeline", dict(variance_type="fixed_large", clip_sample=True)),
    "256": ("256", (16, 16, 32, 32, 64, 64), 1, 32, "DDPMPipeline", dict(variance_type="fixed_small", clip_sample=True)),
    # x̂_0 predicted directly or through v: unclipped ε-prediction from random weights saturates every pixel
    "ddim-offset": ("cifar", (32, 64, 64, 64), 3, 16, "DDIMPipeline",
                    dict(steps_offset=1, set_alpha_to_one=False, clip_sample=False, prediction_type="sample")),
    "ddim-trailing": ("cifar", (32, 64, 64, 64), 3, 16, "DDIMPipeline",
                      dict(timestep_spacing="trailing", prediction_type="v_prediction")),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """name → (folder, diffusers UNet, diffusers scheduler)."""
    diffusers = pytest.importorskip("diffusers")
    out = {}
    for name, (kind, widths, channels, size, pipeline, settings) in FOLDERS.items():
        torch.manual_seed(0)
        unet = google_unet(diffusers, kind, block_out_channels=widths, in_channels=channels, out_channels=channels,
                           sample_size=size, norm_num_groups=8).eval()
        if pipeline == "DDPMPipeline":
            scheduler = diffusers.DDPMScheduler(**settings)
            pipe = diffusers.DDPMPipeline(unet, scheduler)
        else:
            scheduler = diffusers.DDIMScheduler(**settings)
            pipe = diffusers.DDIMPipeline(unet, scheduler)
        folder = tmp_path_factory.mktemp(name)
        pipe.save_pretrained(folder)
        out[name] = (folder, unet, scheduler)
    return out


def as_diffusers_np(x: torch.Tensor) -> np.ndarray:
    """ldm's samples in [−1, 1] (B, C, H, W) as diffusers' output_type="np": [0, 1], (B, H, W, C)."""
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@pytest.mark.reference
@pytest.mark.parametrize("name", list(FOLDERS))
def test_ddim_equals_diffusers_ddim_pipeline(folders, name):
    """DDIM with η = 0, 5 steps: the folder's clipping, spacing, steps_offset and final ᾱ are honoured, and x_T is
    drawn as diffusers draws it (CPU generator, (B, C, H, W) float32), so a seed gives diffusers' images."""
    diffusers = pytest.importorskip("diffusers")
    folder, unet, scheduler = folders[name]
    pipe = load_pipeline(folder)
    # DDIMPipeline turns any scheduler into a DDIMScheduler with the same config, as ldm reads it
    ref = diffusers.DDIMPipeline(unet, diffusers.DDIMScheduler.from_config(scheduler.config))
    ref.set_progress_bar_config(disable=True)
    for seed in (0, 3):
        # one generator per image, seed + k: how ldm seeds a batch
        expected = ref(batch_size=2, generator=[torch.Generator().manual_seed(seed + k) for k in range(2)],
                       num_inference_steps=5, eta=0.0, output_type="np").images
        got = as_diffusers_np(pipe(2, sampler="ddim", num_inference_steps=5, eta=0.0, seed=seed, progress=False,
                                   output="tensor"))
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() < 1e-4


@pytest.mark.reference
@pytest.mark.parametrize("name", ["cifar", "256"])
def test_respaced_ddpm_equals_diffusers_ddpm_pipeline(folders, name):
    """Ancestral sampling over 10 of the 1,000 steps with the folder's variance (fixed_large for CIFAR-10,
    fixed_small for the 256 models): the same noise draws in the same order give the same images."""
    diffusers = pytest.importorskip("diffusers")
    folder, unet, scheduler = folders[name]
    ref = diffusers.DDPMPipeline(unet, diffusers.DDPMScheduler.from_config(scheduler.config))
    ref.set_progress_bar_config(disable=True)
    expected = ref(batch_size=2, generator=[torch.Generator().manual_seed(1 + k) for k in range(2)], num_inference_steps=10,
                   output_type="np").images
    pipe = load_pipeline(folder)
    assert pipe.sampling.variance == scheduler.config.variance_type
    got = as_diffusers_np(pipe(2, sampler="ddpm", num_inference_steps=10, seed=1, progress=False, output="tensor"))
    assert np.abs(got - expected).max() < 1e-4
    other = "fixed_small" if name == "cifar" else "fixed_large"  # the variance matters: the other gives other images
    got = as_diffusers_np(pipe(2, sampler="ddpm", num_inference_steps=10, seed=1, progress=False, variance=other,
                               output="tensor"))
    assert np.abs(got - expected).max() > 1e-3


@pytest.mark.reference
def test_bare_unet_folder_with_bin_weights_and_default_scheduler(folders, tmp_path):
    """A folder that is just a UNet2DModel (``.bin`` weights, read by the weights-only unpickler): with its
    scheduler_config.json it samples as the pipeline folder; without one DDPMScheduler's defaults apply."""
    folder, unet, scheduler = folders["cifar"]
    unet.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").is_file() and checkpoint_kind(tmp_path) == "ddpm-folder"
    defaults = load_pipeline(tmp_path)
    assert (defaults.sampling.variance, defaults.sampling.clip_x0, defaults.sampling.spacing) == ("fixed_small", True, None)
    scheduler.save_pretrained(tmp_path)
    bare = load_pipeline(tmp_path)
    full = load_pipeline(folder)
    assert bare.sampling == full.sampling and bare.sampling.variance == "fixed_large"
    assert torch.equal(bare(2, num_inference_steps=3, progress=False, output="tensor"),
                       full(2, num_inference_steps=3, progress=False, output="tensor"))


@pytest.mark.reference
def test_sample_command_on_folders(folders, tmp_path, capsys):
    """``ldm sample FOLDER`` writes the grid, RGB for CIFAR-10-like folders and grayscale for one-channel ones."""
    for name, mode in (("cifar", "RGB"), ("256", "L")):
        folder = folders[name][0]
        for sampler in ("ddim", "ddpm"):
            out = tmp_path / f"{name}-{sampler}.png"
            main(["sample", str(folder), "--sampler", sampler, "--steps", "3", "--n", "4", "--seed", "0", "--out", str(out),
                  "--batch-size", "3"])
            image = Image.open(out)
            size = FOLDERS[name][3]
            assert image.mode == mode and image.size == (2 * (2 + 2 * (size + 2)),) * 2  # 2×2 grid, padding 2, scale 2
    assert "wrote" in capsys.readouterr().out
    npy = tmp_path / "s.npy"
    main(["sample", str(folders["256"][0]), "--steps", "5", "--n", "2", "--seed", "3", "--out", str(tmp_path / "g.png"),
          "--npy", str(npy)])
    expected = load_pipeline(folders["256"][0])(2, num_inference_steps=5, seed=3, progress=False, output="tensor")
    assert np.allclose(np.load(npy), ((expected.clamp(-1, 1) + 1) / 2).numpy(), atol=1e-6)


@pytest.mark.reference
def test_folder_errors_are_named(folders, tmp_path, capsys):
    folder = folders["cifar"][0]
    index = json.loads((folder / "model_index.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps(index | {"_class_name": "KarrasVePipeline"}))
    with pytest.raises(CheckpointError, match="KarrasVePipeline"):
        load_pipeline(other)
    with pytest.raises(SystemExit):
        main(["sample", str(other), "--out", str(tmp_path / "x.png")])
    assert "holds a diffusers KarrasVePipeline" in capsys.readouterr().err
    (other / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="missing .*unet/config.json"):
        load_pipeline(other)
    (other / "unet").mkdir()
    (other / "unet" / "config.json").write_text((folder / "unet" / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no UNet weights"):
        load_pipeline(other)
    (other / "scheduler").mkdir()
    (other / "scheduler" / "scheduler_config.json").write_text(json.dumps({"variance_type": "learned_range"}))
    with pytest.raises(ValueError, match="learned_range"):
        load_pipeline(other)
    with pytest.raises(ValueError, match=r"diffusers DDPM/DDIM folder: ema=False \(raw weights\) does not apply"):
        load_pipeline(folder, ema=False)


# --- full size ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.reference
@pytest.mark.parametrize("kind", ["cifar", "256"])
def test_full_size_presets_equal_diffusers(kind):
    """Each Google architecture at full size (35.7M and 114M parameters) with diffusers' random weights: one
    forward pass at the real resolution (32×32 batch 2, 256×256 batch 1) agrees within 1e-4 relative error."""
    diffusers = pytest.importorskip("diffusers")
    preset = UNetConfig.ddpm_cifar10() if kind == "cifar" else UNetConfig.ddpm_256()
    torch.manual_seed(0)
    ref = google_unet(diffusers, kind).eval()
    with torch.device("meta"):
        ours = UNet(preset)
    import_state_dict(ours, ref.state_dict(), unet_layout(preset, "diffusers"), f"diffusers {kind}", assign=True)
    ours.eval()
    batch, size = (2, 32) if kind == "cifar" else (1, 256)
    x, t = torch.randn(batch, 3, size, size), torch.tensor([999, 17][:batch])
    with torch.no_grad():
        expected, got = ref(x, t).sample, ours(x, t)
    assert ((got - expected).norm() / expected.norm()).item() < 1e-4
