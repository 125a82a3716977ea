"""SDXL base 1.0's models, each proven against diffusers / transformers with the same random weights: the UNet's
added "text_time" conditioning (pooled text + size/crop numbers) in the diffusers and original layouts, the preset's
size, and the two text encoders (penultimate states without the final LayerNorm; bigG's projected pooled output)
in the transformers layout and the SDXL single-file layouts."""

import pytest
import torch

from ldm.convert import (export_state_dict, foreign_names, from_openclip, import_state_dict,
                         text_encoder_config_from_transformers, text_encoder_config_to_transformers,
                         text_encoder_layout, to_openclip, unet_config_from_diffusers, unet_config_to_diffusers,
                         unet_layout)
from ldm.text_encoder import TextEncoder, TextEncoderConfig
from ldm.unet import UNet, UNetConfig
from _fixtures import loud
from test_text_encoder import prompts, rel  # prompts: SDXL's second tokenizer pads with 0, as SD2's

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
single_file = pytest.importorskip("diffusers.loaders.single_file_utils")
pytestmark = pytest.mark.reference

EOS = 49407
SDXL_UNET = dict(  # stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (the fields that shape the model)
    sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, addition_embed_type_num_heads=64,
)
# text_encoder/config.json and text_encoder_2/config.json of the same repository
SDXL_TEXT_ENCODER = {
    "architectures": ["CLIPTextModel"], "hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 3072,
    "num_attention_heads": 12, "num_hidden_layers": 12, "projection_dim": 768, "bos_token_id": 0, "eos_token_id": 2,
    "pad_token_id": 1, "vocab_size": 49408, "max_position_embeddings": 77, "layer_norm_eps": 1e-5,
}
SDXL_TEXT_ENCODER_2 = SDXL_TEXT_ENCODER | {
    "architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu", "hidden_size": 1280,
    "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32, "projection_dim": 1280,
}


# ── UNet: added "text_time" conditioning ─────────────────────────────────────────────────────────────────────────

def tiny_sdxl_unet():
    """SDXL's shape at reduced width: no attention at level 0, per-level depth and heads, linear projections, and
    added conditioning on a 16-wide pooled vector + 6 numbers × 8 sinusoidal features."""
    kwargs = SDXL_UNET | dict(
        sample_size=16, block_out_channels=(32, 64, 64), attention_head_dim=(2, 4, 4),
        transformer_layers_per_block=(1, 2, 2), cross_attention_dim=48, norm_num_groups=8,
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8)
    return loud(diffusers.UNet2DConditionModel(**kwargs), std=0.05)


def sdxl_inputs(batch=2, pooled_dim=16, context_dim=48, size=16):
    torch.manual_seed(1)
    size_ids = torch.tensor([[512.0, 768.0, 0.0, 32.0, 1024.0, 1024.0], [1024.0, 1024.0, 16.0, 0.0, 896.0, 1152.0]])
    return dict(x=torch.randn(batch, 4, size, size), t=torch.tensor([10, 980][:batch]),
                context=torch.randn(batch, 7, context_dim), pooled=torch.randn(batch, pooled_dim),
                size_ids=size_ids[:batch])


def ours_out(model, i):
    with torch.no_grad():
        return model(i["x"], i["t"], i["context"], pooled=i["pooled"], size_ids=i["size_ids"])


def diffusers_out(model, i):
    with torch.no_grad():
        return model(i["x"], i["t"], encoder_hidden_states=i["context"],
                     added_cond_kwargs={"text_embeds": i["pooled"], "time_ids": i["size_ids"]}).sample


def test_unet_text_time_matches_diffusers_in_diffusers_layout():
    ref = tiny_sdxl_unet()
    config = unet_config_from_diffusers(dict(ref.config))
    assert (config.added_cond_dim, config.added_time_dim, config.attention) == (64, 8, (False, True, True))
    layout = unet_layout(config, "diffusers")
    ours = import_state_dict(UNet(config), ref.state_dict(), layout, "diffusers UNet").eval()
    i = sdxl_inputs()
    out = ours_out(ours, i)
    assert rel(out, diffusers_out(ref, i)) < 1e-4
    assert export_state_dict(ours, layout).keys() == ref.state_dict().keys()
    # the size/crop numbers, the pooled vector and the context reach the output (a dropped path would pass the
    # check above); measured: each moves it by 3–5 %, against the 1e-4 tolerance
    for name, value in (("size_ids", i["size_ids"].flip(0)), ("pooled", i["pooled"] + 1),
                        ("context", i["context"].flip(0))):
        assert rel(ours_out(ours, i | {name: value}), out) > 1e-3, name
    # and the writer gives diffusers the same config back
    written = unet_config_to_diffusers(config)
    assert {k: written[k] for k in ("addition_embed_type", "addition_time_embed_dim",
                                    "projection_class_embeddings_input_dim")} == {
        "addition_embed_type": "text_time", "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 64}
    assert unet_config_from_diffusers(written) == config


def test_unet_text_time_original_layout_round_trips_through_diffusers_converter():
    """ldm → original keys (label_emb.0.{0,2}) → diffusers' own convert_ldm_unet_checkpoint → a diffusers model that
    agrees with ldm; and original → ldm gives back identical weights."""
    ref = tiny_sdxl_unet()
    config = unet_config_from_diffusers(dict(ref.config))
    ours = import_state_dict(UNet(config), ref.state_dict(), unet_layout(config, "diffusers")).eval()
    layout = unet_layout(config, "original").with_prefix("model.diffusion_model.")
    original = export_state_dict(ours, layout)
    assert original["model.diffusion_model.label_emb.0.0.weight"].shape == (128, 64)
    assert "model.diffusion_model.label_emb.0.2.bias" in original
    assert "model.diffusion_model.input_blocks.1.1.norm.weight" not in original  # no attention at level 0
    assert original["model.diffusion_model.input_blocks.4.1.proj_in.weight"].dim() == 2  # linear projection
    back = single_file.convert_ldm_unet_checkpoint(original, dict(ref.config))
    rebuilt = diffusers.UNet2DConditionModel(**ref.config).eval()
    rebuilt.load_state_dict(back, strict=True)
    i = sdxl_inputs()
    assert rel(diffusers_out(rebuilt, i), ours_out(ours, i)) < 1e-5
    again = import_state_dict(UNet(config), original, layout)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in ours.state_dict().items())


def test_unet_added_conditioning_inputs_are_checked():
    config = UNetConfig.sdxl().with_(channels=32, norm_groups=8, head_dim=16, context_dim=48, transformer_depth=1,
                                     added_cond_dim=64, added_time_dim=8)
    model = UNet(config).eval()
    i = sdxl_inputs()
    x, t, ctx = i["x"], i["t"], i["context"]
    with pytest.raises(ValueError, match="added_cond_dim=64.*missing: pooled, size_ids"):
        model(x, t, ctx)
    with pytest.raises(ValueError, match="missing: size_ids"):
        model(x, t, ctx, pooled=i["pooled"])
    with pytest.raises(ValueError, match=r"size_ids must have shape \(2, …\).*\(6,\)"):
        model(x, t, ctx, pooled=i["pooled"], size_ids=i["size_ids"][0])
    with pytest.raises(ValueError, match=r"16 \+ 5·8 = 56 features; this UNet takes added_cond_dim = 64"):
        model(x, t, ctx, pooled=i["pooled"], size_ids=i["size_ids"][:, :5])
    assert model(x, t, ctx, pooled=i["pooled"], size_ids=i["size_ids"].long()).shape == x.shape  # integer ids are fine
    plain = UNet(config.with_(added_cond_dim=None)).eval()
    assert not any(k.startswith("add_embedding") for k in plain.state_dict())
    with pytest.raises(ValueError, match="takes no added conditioning"):
        plain(x, t, ctx, pooled=i["pooled"], size_ids=i["size_ids"])


def test_sdxl_preset_has_diffusers_size_config_and_names():
    with torch.device("meta"):  # sizes and names only: nothing is allocated or initialised
        ref = diffusers.UNet2DConditionModel(**SDXL_UNET)
        ours = UNet(UNetConfig.sdxl())
        from_writer = diffusers.UNet2DConditionModel(**unet_config_to_diffusers(UNetConfig.sdxl()))
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in ref.parameters()) == 2_567_463_684  # the published SDXL base UNet
    assert sum(p.numel() for p in from_writer.parameters()) == count
    assert unet_config_from_diffusers(dict(ref.config)) == UNetConfig.sdxl()
    assert set(foreign_names(ours, unet_layout(ours.config, "diffusers")).values()) == set(ref.state_dict())
    names = set(foreign_names(ours, unet_layout(ours.config, "original")).values())
    for key in ("label_emb.0.0.weight", "label_emb.0.2.bias", "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
                "input_blocks.7.1.transformer_blocks.9.ff.net.2.weight", "input_blocks.6.0.op.weight",
                "middle_block.1.transformer_blocks.9.norm3.bias", "output_blocks.2.2.conv.weight",
                "output_blocks.8.0.skip_connection.weight"):
        assert key in names, key
    assert not any(k.startswith("input_blocks.1.1.") for k in names)  # level 0 has no transformer


@pytest.mark.slow
def test_sdxl_unet_at_full_size_matches_diffusers():
    """2.6B parameters in float32 (10.3 GB, shared by both models: ldm adopts diffusers' tensors), one step at a
    2×4×32×32 latent on the CPU. Measured on 2 shared cores: ~110 s, 10.7 GB peak; outputs bit-identical."""
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**SDXL_UNET).eval()
    config = unet_config_from_diffusers(dict(ref.config))
    with torch.device("meta"):
        ours = UNet(config)
    import_state_dict(ours, ref.state_dict(), unet_layout(config, "diffusers"), "diffusers UNet", assign=True)
    i = sdxl_inputs(pooled_dim=1280, context_dim=2048, size=32)
    assert rel(ours_out(ours, i), diffusers_out(ref, i)) < 1e-4


# ── text encoders ────────────────────────────────────────────────────────────────────────────────────────────────

def tiny_clip(with_projection=False, **changes):
    kwargs = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
                  max_position_embeddings=77, projection_dim=32)
    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    return loud(cls(transformers.CLIPTextConfig(**(kwargs | changes))), std=0.1)


def sdxl_reading(cfg: dict) -> TextEncoderConfig:
    """What a caller that knows it reads an SDXL folder does with a text encoder's config.json."""
    return text_encoder_config_from_transformers(cfg).with_(output_layer=-2, final_norm_on_hidden=False)


def check_against(ours: TextEncoder, ref, ids: torch.Tensor) -> None:
    """ours.encode / ours(ids) against the reference's raw penultimate state (hidden_states[-2], no final norm,
    as diffusers' SDXL pipeline reads it) and pooled output (text_embeds when projected)."""
    with torch.no_grad():
        out, hidden, expected = ours.encode(ids), ours(ids), ref(ids, output_hidden_states=True)
    assert rel(out.hidden, expected.hidden_states[-2]) < 1e-5 and torch.equal(hidden, out.hidden)
    pooled = expected.text_embeds if hasattr(expected, "text_embeds") else expected.pooler_output
    assert rel(out.pooled, pooled) < 1e-5


def test_vit_l_penultimate_unnormalised_matches_transformers_and_sdxl_file_prefix():
    ref = tiny_clip()
    config = sdxl_reading(ref.config.to_dict() | {"architectures": ["CLIPTextModel"]})
    assert config == TextEncoderConfig.clip_vit_l14_sdxl().with_(width=64, layers=3, heads=4, mlp_dim=128)
    layout = text_encoder_layout(config, "transformers")
    ours = import_state_dict(TextEncoder(config), ref.state_dict(), layout, "CLIPTextModel").eval()
    ids = prompts(pad=EOS)
    check_against(ours, ref, ids)
    with torch.no_grad():  # the final LayerNorm really is left out (it changes the states)
        assert rel(ours.final_norm(ours(ids)), ours(ids)) > 0.1
    # SDXL single file: conditioner.embedders.0.transformer.text_model.…, read by diffusers' own converter
    prefix = "conditioner.embedders.0.transformer."
    sdxl = export_state_dict(ours, layout.with_prefix(prefix))
    assert prefix + "text_model.encoder.layers.2.mlp.fc2.weight" in sdxl  # all blocks, the last one too
    rebuilt = tiny_clip()
    converted = single_file.convert_ldm_clip_checkpoint(sdxl)
    rebuilt.load_state_dict({k.removeprefix("text_model."): v for k, v in converted.items()}, strict=True)
    check_against(ours, rebuilt, ids)
    others = {"conditioner.embedders.1.model.ln_final.weight": torch.zeros(1),  # the other encoder is not looked at
              prefix + "text_model.embeddings.position_ids": torch.arange(77)[None]}
    back = import_state_dict(TextEncoder(config), sdxl | others, layout.with_prefix(prefix), "SDXL file")
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ours.state_dict().items())


def test_bigg_penultimate_and_projected_pooled_output_match_transformers():
    ref = tiny_clip(with_projection=True, hidden_act="gelu", eos_token_id=2)  # eos 2: as SDXL's config.json has it
    config = sdxl_reading(ref.config.to_dict() | {"architectures": ["CLIPTextModelWithProjection"]})
    assert config == TextEncoderConfig.openclip_vit_bigg14().with_(width=64, layers=3, heads=4, mlp_dim=128,
                                                                    projection_dim=32)
    layout = text_encoder_layout(config, "transformers")
    ours = import_state_dict(TextEncoder(config), ref.state_dict(), layout, "CLIPTextModelWithProjection").eval()
    assert export_state_dict(ours, layout).keys() == ref.state_dict().keys()
    ids = prompts(pad=0)
    check_against(ours, ref, ids)
    assert ours.encode(ids).pooled.shape == (2, 32)


def test_bigg_sdxl_single_file_agrees_with_diffusers_converter():
    """Our export under conditioner.embedders.1.model. (fused in_proj, text_projection [D, P] as OpenCLIP stores it)
    → diffusers' own convert_open_clip_checkpoint → a CLIPTextModelWithProjection that agrees with ours in the
    penultimate state and the projected pooled output; and the file loads back into ours unchanged."""
    config = TextEncoderConfig.openclip_vit_bigg14().with_(width=64, layers=3, heads=4, mlp_dim=128, projection_dim=32)
    ours = loud(TextEncoder(config), std=0.1)
    prefix = "conditioner.embedders.1.model."
    layout = text_encoder_layout(config, "openclip").with_prefix(prefix)
    sdxl = to_openclip(export_state_dict(ours, layout))
    assert sdxl[prefix + "text_projection"].shape == (64, 32)
    assert sdxl[prefix + "transformer.resblocks.2.attn.in_proj_weight"].shape == (192, 64)  # the last block is kept
    sdxl[prefix + "logit_scale"] = torch.tensor(4.6)
    ref = tiny_clip(with_projection=True, hidden_act="gelu")
    converted = single_file.convert_open_clip_checkpoint(ref, sdxl, prefix=prefix)
    ref.load_state_dict(converted, strict=True)
    check_against(ours, ref, prompts(pad=0))
    back = import_state_dict(TextEncoder(config), from_openclip(sdxl), layout, "SDXL file")
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ours.state_dict().items())


def test_sdxl_folder_configs_read_and_write():
    """diffusers' SDXL folders keep every block of both encoders (12 and 32: unlike SD2's 23 of 24, since bigG's last
    block makes the pooled output and the penultimate state is taken unnormalised, which no cut model can give)."""
    assert sdxl_reading(SDXL_TEXT_ENCODER) == TextEncoderConfig.clip_vit_l14_sdxl()
    bigg = TextEncoderConfig.openclip_vit_bigg14()
    assert sdxl_reading(SDXL_TEXT_ENCODER_2) == bigg
    written = text_encoder_config_to_transformers(bigg)
    assert {k: written[k] for k in ("architectures", "num_hidden_layers", "projection_dim", "hidden_act")} == {
        "architectures": ["CLIPTextModelWithProjection"], "num_hidden_layers": 32, "projection_dim": 1280,
        "hidden_act": "gelu"}
    assert sdxl_reading(written) == bigg
    assert text_encoder_config_to_transformers(TextEncoderConfig.clip_vit_l14_sdxl())["num_hidden_layers"] == 12


def test_sdxl_text_encoder_presets_have_transformers_sizes_and_names():
    for config, cls in ((TextEncoderConfig.clip_vit_l14_sdxl(), transformers.CLIPTextModel),
                        (TextEncoderConfig.openclip_vit_bigg14(), transformers.CLIPTextModelWithProjection)):
        with torch.device("meta"):
            ours = TextEncoder(config)
            ref = cls(transformers.CLIPTextConfig(**text_encoder_config_to_transformers(config)))
        count = sum(p.numel() for p in ours.parameters())
        assert count == sum(p.numel() for p in ref.parameters()) == {768: 123_060_480, 1280: 694_659_840}[config.width]
        names = foreign_names(ours, text_encoder_layout(config, "transformers")).values()
        theirs = {n.removeprefix("text_model.") for n in ref.state_dict()}
        assert {n.removeprefix("text_model.") for n in names} == theirs
