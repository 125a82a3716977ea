"""Rule tables: ldm ↔ diffusers folders ↔ original (CompVis) single files, proven against diffusers' own models
and its own original-layout converter, with the same random weights."""

import pytest
import torch

from ldm.checkpoint import CheckpointError
from ldm.convert import (export_state_dict, foreign_names, import_state_dict, unet_config_from_diffusers, unet_layout,
                         vae_config_from_diffusers, vae_layout)
from ldm.unet import UNet, UNetConfig
from ldm.vae import AutoencoderKL

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.reference
single_file = pytest.importorskip("diffusers.loaders.single_file_utils")


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def tiny_cond_unet(**changes):
    """A 3-level UNet2DConditionModel shaped like SD's (attention at all but the lowest resolution)."""
    torch.manual_seed(0)
    kwargs = dict(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8,
    )
    model = diffusers.UNet2DConditionModel(**(kwargs | changes)).eval()
    for p in model.parameters():  # diffusers zero-initialises nothing, but make every path loud anyway
        torch.nn.init.normal_(p, std=0.05)
    return model


def unet_outputs(model, config, diffusers_model=False):
    torch.manual_seed(1)
    x, t, ctx = torch.randn(2, config.in_channels, 16, 16), torch.tensor([10, 980]), torch.randn(2, 7, config.context_dim)
    with torch.no_grad():
        return model(x, t, encoder_hidden_states=ctx).sample if diffusers_model else model(x, t, ctx)


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_unet_diffusers_layout_matches_diffusers(variant):
    changes = {} if variant == "sd1" else dict(use_linear_projection=True, attention_head_dim=(2, 4, 4),
                                              transformer_layers_per_block=(1, 2, 1))
    ref = tiny_cond_unet(**changes)
    config = unet_config_from_diffusers(dict(ref.config))
    if variant == "sd1":
        assert (config.num_heads, config.head_dim, config.linear_projection) == (4, None, False)
    else:
        assert (config.head_dim, config.linear_projection, config.transformer_depth) == (16, True, (1, 2, 1))
    ours = import_state_dict(UNet(config), ref.state_dict(), unet_layout(config, "diffusers"), "diffusers UNet").eval()
    assert rel(unet_outputs(ours, config), unet_outputs(ref, config, True)) < 1e-4
    assert export_state_dict(ours, unet_layout(config, "diffusers")).keys() == ref.state_dict().keys()


def test_unet_original_layout_round_trips_through_diffusers_converter():
    """ldm → original keys → diffusers' own convert_ldm_unet_checkpoint → a diffusers model that agrees with ldm,
    and original keys → ldm gives back identical weights (the import is the export inverted)."""
    ref = tiny_cond_unet(in_channels=9)
    config = unet_config_from_diffusers(dict(ref.config))
    ours = import_state_dict(UNet(config), ref.state_dict(), unet_layout(config, "diffusers")).eval()
    original = export_state_dict(ours, unet_layout(config, "original").with_prefix("model.diffusion_model."))
    assert "model.diffusion_model.input_blocks.3.0.op.weight" in original  # the first downsample, as in SD files
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in original
    back = single_file.convert_ldm_unet_checkpoint(original, dict(ref.config))
    rebuilt = diffusers.UNet2DConditionModel(**ref.config).eval()
    rebuilt.load_state_dict(back, strict=True)
    assert rel(unet_outputs(rebuilt, config, True), unet_outputs(ours, config)) < 1e-5
    again = import_state_dict(UNet(config), original, unet_layout(config, "original").with_prefix("model.diffusion_model."))
    assert all(torch.equal(again.state_dict()[k], v) for k, v in ours.state_dict().items())


def tiny_vae():
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    ).eval()


def test_vae_original_layout_round_trips_through_diffusers_converter():
    ref = tiny_vae()
    config = vae_config_from_diffusers(dict(ref.config))
    ours = import_state_dict(AutoencoderKL(config), ref.state_dict(), vae_layout(config, "diffusers"))
    original = export_state_dict(ours, vae_layout(config, "original").with_prefix("first_stage_model."))
    assert original["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert "first_stage_model.decoder.up.1.upsample.conv.weight" in original  # up.{level}: reversed order
    back = single_file.convert_ldm_vae_checkpoint(original, dict(ref.config))
    rebuilt = diffusers.AutoencoderKL(**ref.config).eval()
    rebuilt.load_state_dict(back, strict=True)
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert rel(ours.decode(z), rebuilt.decode(z).sample) < 1e-5
    again = import_state_dict(AutoencoderKL(config), original, vae_layout(config, "original").with_prefix("first_stage_model."))
    assert all(torch.equal(again.state_dict()[k], v) for k, v in ours.state_dict().items())


def test_old_diffusers_attention_names_load():
    ref = tiny_vae()
    config = vae_config_from_diffusers(dict(ref.config))
    old = {k.replace(".to_q.", ".query.").replace(".to_out.0.", ".proj_attn."): v for k, v in ref.state_dict().items()}
    assert any(".query." in k for k in old)
    import_state_dict(AutoencoderKL(config), old, vae_layout(config, "diffusers"))


def test_unknown_missing_and_mismatched_keys_are_named():
    config = UNetConfig.sd15().with_(channels=32, num_heads=2, norm_groups=8, context_dim=16)
    layout = unet_layout(config, "original")
    state = export_state_dict(UNet(config), layout)
    with pytest.raises(CheckpointError, match=r"does not know: input_blocks\.99\.0\.weight"):
        import_state_dict(UNet(config), state | {"input_blocks.99.0.weight": torch.zeros(1)}, layout)
    with pytest.raises(CheckpointError, match=r"missing: .*time_embedding\.linear_1\.bias"):
        import_state_dict(UNet(config), {k: v for k, v in state.items() if k != "time_embed.0.bias"}, layout)
    bad = dict(state, **{"out.2.weight": torch.zeros(4, 32, 1, 1)})
    with pytest.raises(CheckpointError, match=r"shape mismatch: conv_out\.weight: \(4, 32, 1, 1\)"):
        import_state_dict(UNet(config), bad, layout)


def test_sd15_preset_has_the_published_size_and_names():
    model = UNet(UNetConfig.sd15())
    assert sum(p.numel() for p in model.parameters()) == 859_520_964  # diffusers' SD 1.5 UNet
    names = set(foreign_names(model, unet_layout(model.config, "original")).values())
    for key in ("input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight", "output_blocks.11.0.skip_connection.weight",
                "middle_block.1.proj_in.weight", "input_blocks.9.0.op.weight", "output_blocks.8.2.conv.weight",
                "time_embed.2.bias", "out.2.weight", "input_blocks.4.0.emb_layers.1.weight"):
        assert key in names, key


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd15", "sd2"])
def test_sd_unet_at_full_size_matches_diffusers(family):
    torch.manual_seed(0)
    options = dict(cross_attention_dim=768, attention_head_dim=8) if family == "sd15" else \
        dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
    ref = diffusers.UNet2DConditionModel(
        sample_size=64, block_out_channels=(320, 640, 1280, 1280), down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, layers_per_block=2, **options).eval()
    config = unet_config_from_diffusers(dict(ref.config))
    assert config == getattr(UNetConfig, family)()
    with torch.device("meta"):
        ours = UNet(config)
    import_state_dict(ours, ref.state_dict(), unet_layout(config, "diffusers"), "diffusers UNet", assign=True)
    x, t, ctx = torch.randn(2, 4, 32, 40), torch.tensor([1, 999]), torch.randn(2, 77, config.context_dim)
    with torch.no_grad():
        assert rel(ours(x, t, ctx), ref(x, t, encoder_hidden_states=ctx).sample) < 1e-4
