"""The CLIP text encoder: parity with transformers' CLIPTextModel through the rule tables, the OpenCLIP (SD2)
layout and its fused q/k/v, the causal mask, input checks, and the presets' sizes."""

import pytest
import torch
from torch import nn

from ldm.convert import (export_state_dict, foreign_names, from_openclip, import_state_dict, split_fused_qkv,
                         text_encoder_config_from_transformers, text_encoder_config_to_transformers,
                         text_encoder_layout, to_openclip)
from ldm.text_encoder import CausalSelfAttention, TextEncoder, TextEncoderConfig
from _fixtures import loud

EOS = 49407


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def tiny(**changes) -> TextEncoderConfig:
    return TextEncoderConfig(width=64, layers=3, heads=4, mlp_dim=128, **changes)


def prompts(pad: int = EOS) -> torch.Tensor:
    """Two rows shaped like tokenizer output: start token, words, end token at different places, then padding."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49406, (2, 77), generator=g)
    ids[:, 0] = 49406
    for row, end in enumerate((9, 40)):
        ids[row, end], ids[row, end + 1:] = EOS, pad
    return ids


def transformers_model(with_projection=False, **changes):
    transformers = pytest.importorskip("transformers")
    kwargs = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
                  max_position_embeddings=77, projection_dim=32)
    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    return loud(cls(transformers.CLIPTextConfig(**(kwargs | changes))))


@pytest.mark.reference
@pytest.mark.parametrize("activation,output_layer,pad", [("quick_gelu", -1, EOS), ("gelu", -2, 0)])
def test_matches_transformers_clip_text_model(activation, output_layer, pad):
    """SD1 (quick-GELU, last layer, padded with the end token) and SD2 (GELU, penultimate layer + final norm,
    padded with 0)."""
    ref = transformers_model(hidden_act=activation)
    config = text_encoder_config_from_transformers(ref.config.to_dict()).with_(output_layer=output_layer)
    assert (config.activation, config.layers, config.projection_dim) == (activation, 3, None)
    layout = text_encoder_layout(config, "transformers")
    ours = import_state_dict(TextEncoder(config), ref.state_dict(), layout, "CLIPTextModel").eval()
    ids = prompts(pad)
    with torch.no_grad():
        out, expected = ours.encode(ids), ref(ids, output_hidden_states=True)
        hidden = ours(ids)
    want = expected.last_hidden_state if output_layer == -1 else ref.final_layer_norm(expected.hidden_states[-2])
    assert rel(out.hidden, want) < 1e-5 and torch.equal(hidden, out.hidden)
    assert rel(out.pooled, expected.pooler_output) < 1e-5
    # transformers 5 drops the text_model. level in CLIPTextModel; Hub files and diffusers folders keep it
    assert {k.removeprefix("text_model.") for k in export_state_dict(ours, layout)} == set(ref.state_dict())


@pytest.mark.reference
def test_projection_and_old_end_token_configs_match_transformers():
    """CLIPTextModelWithProjection (SDXL's second encoder), with a pre-2023 config that pools at argmax(ids)."""
    ref = transformers_model(with_projection=True, eos_token_id=2)
    config = text_encoder_config_from_transformers(ref.config.to_dict() | {"architectures": ["CLIPTextModelWithProjection"]})
    assert (config.projection_dim, config.eos_token_id) == (32, EOS)
    ours = import_state_dict(TextEncoder(config), ref.state_dict(), text_encoder_layout(config, "transformers")).eval()
    ids = prompts(pad=0)
    with torch.no_grad():
        out, expected = ours.encode(ids), ref(ids)
    assert out.pooled.shape == (2, 32) and rel(out.pooled, expected.text_embeds) < 1e-5
    assert rel(out.hidden, expected.last_hidden_state) < 1e-5


def test_sd1_single_file_prefixes_with_and_without_text_model_level():
    model = loud(TextEncoder(tiny()))
    layout = text_encoder_layout(model.config, "transformers").with_prefix("cond_stage_model.transformer.")
    new = export_state_dict(model, layout)
    assert "cond_stage_model.transformer.text_model.encoder.layers.2.self_attn.out_proj.weight" in new
    old = {k.replace(".text_model.", "."): v for k, v in new.items()}
    others = {"model.diffusion_model.out.2.weight": torch.zeros(1),  # other models in the file are not looked at
              "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}
    for state in (new, old):
        loaded = import_state_dict(TextEncoder(tiny()), state | others, layout, "SD1 file")
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_openclip_layout_round_trips_with_fused_in_proj():
    config = tiny(activation="gelu", output_layer=-2, projection_dim=32)
    model = loud(TextEncoder(config))
    layout = text_encoder_layout(config, "openclip").with_prefix("cond_stage_model.model.")
    sd2 = to_openclip(export_state_dict(model, layout))
    p = "cond_stage_model.model."
    assert sd2[p + "transformer.resblocks.2.attn.in_proj_weight"].shape == (192, 64)  # [3W, W], all 3 blocks kept
    assert sd2[p + "transformer.resblocks.0.attn.in_proj_bias"].shape == (192,)
    assert sd2[p + "text_projection"].shape == (64, 32) and sd2[p + "positional_embedding"].shape == (77, 64)
    assert {p + "ln_final.weight", p + "token_embedding.weight", p + "transformer.resblocks.1.mlp.c_fc.weight"} <= set(sd2)
    sd2[p + "logit_scale"] = torch.tensor(4.6)
    back = import_state_dict(TextEncoder(config), from_openclip(sd2), layout, "SD2 file")
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())
    # SD2 files carry text_projection, which the SD2 preset (no pooled output) leaves out on purpose
    plain = config.with_(projection_dim=None)
    import_state_dict(TextEncoder(plain), from_openclip(sd2), text_encoder_layout(plain, "openclip").with_prefix(p))


@pytest.mark.reference
def test_openclip_export_agrees_with_diffusers_sd2_converter():
    """Our SD2-style export → diffusers' own convert_open_clip_checkpoint → a CLIPTextModel whose penultimate
    hidden state (+ final norm) equals our output: the fused split and every rename agree with diffusers'."""
    single_file = pytest.importorskip("diffusers.loaders.single_file_utils")
    config = tiny(activation="gelu", output_layer=-2)
    model = loud(TextEncoder(config))
    layout = text_encoder_layout(config, "openclip").with_prefix("cond_stage_model.model.")
    sd2 = to_openclip(export_state_dict(model, layout))
    ref = transformers_model(hidden_act="gelu")
    converted = single_file.convert_open_clip_checkpoint(ref, sd2)
    ref.load_state_dict({k.removeprefix("text_model."): v for k, v in converted.items()}, strict=True)
    ids = prompts(pad=0)
    with torch.no_grad():
        want = ref.final_layer_norm(ref(ids, output_hidden_states=True).hidden_states[-2])
        assert rel(model(ids), want) < 1e-5


def test_fused_in_proj_splits_in_q_k_v_order():
    """OpenCLIP's blocks are nn.MultiheadAttention; its fused projection, split, gives our attention exactly."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(64, 4, batch_first=True)
    nn.init.normal_(mha.in_proj_bias, std=0.5)  # zero by default: the split of the bias would go untested
    split = split_fused_qkv(mha.state_dict())
    ours = CausalSelfAttention(64, 4)
    ours.load_state_dict({k.replace("_proj", ""): v for k, v in split.items()})
    x = torch.randn(2, 10, 64)
    causal = torch.ones(10, 10, dtype=torch.bool).triu(1)  # True = masked out, as nn.MultiheadAttention wants
    with torch.no_grad():
        assert torch.allclose(ours(x), mha(x, x, x, attn_mask=causal, need_weights=False)[0], atol=1e-6)


def test_penultimate_of_n_blocks_equals_last_of_n_minus_1():
    """Why a diffusers SD2 folder (23 blocks, last state) and an SD2 file (24 blocks, penultimate) agree."""
    full = loud(TextEncoder(tiny(output_layer=-2)))
    cut_config = text_encoder_config_from_transformers(
        {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128})
    layout = text_encoder_layout(full.config, "transformers")
    weights = {k: v for k, v in export_state_dict(full, layout).items() if ".layers.2." not in k}
    cut = import_state_dict(TextEncoder(cut_config), weights, layout).eval()
    ids = prompts()
    with torch.no_grad():
        assert torch.equal(full(ids), cut(ids))


def test_sd2_diffusers_config_reads_23_blocks_and_the_last_state():
    cfg = {"architectures": ["CLIPTextModel"], "hidden_act": "gelu", "hidden_size": 1024, "intermediate_size": 4096,
           "num_attention_heads": 16, "num_hidden_layers": 23, "projection_dim": 512, "eos_token_id": 2,
           "vocab_size": 49408, "max_position_embeddings": 77, "layer_norm_eps": 1e-5}
    config = text_encoder_config_from_transformers(cfg)
    assert config == TextEncoderConfig.openclip_vit_h14().with_(layers=23, output_layer=-1)
    with pytest.raises(ValueError, match="activation 'relu'"):
        text_encoder_config_from_transformers(cfg | {"hidden_act": "relu"})
    # and back: an SD2 model that holds 24 blocks is written as diffusers writes it, with the 23 it uses
    written = text_encoder_config_to_transformers(TextEncoderConfig.openclip_vit_h14())
    assert {k: written[k] for k in cfg} == cfg | {"eos_token_id": EOS, "projection_dim": 1024}
    assert text_encoder_config_from_transformers(written) == config
    with_projection = tiny(projection_dim=32)
    assert text_encoder_config_from_transformers(text_encoder_config_to_transformers(with_projection)) == with_projection


def test_causal_mask_hides_later_tokens():
    model = loud(TextEncoder(tiny()))
    ids = prompts()
    changed = ids.clone()
    changed[:, 5] = 123
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert torch.allclose(a[:, :5], b[:, :5], atol=1e-6)
    assert (a[:, 5:] - b[:, 5:]).abs().amax(dim=-1).min() > 1e-3  # every later position sees the change


def test_bad_token_ids_are_refused_with_the_reason():
    model = TextEncoder(tiny())
    ids = prompts()
    for bad, message in [(ids.float(), "integer tensor"), (ids[0], r"shape \(batch, length\)"),
                         (torch.cat([ids, ids], dim=1), "154 tokens.*at most 77"),
                         (ids.clone().fill_(49408), r"\[0, 49408\)"), (ids - 49407, r"\[0, 49408\)")]:
        with pytest.raises(ValueError, match=message):
            model(bad)
    with pytest.raises(ValueError, match="end token 49407"):
        model.encode(torch.zeros(1, 5, dtype=torch.long))
    assert model(ids[:, :7].int()).shape == (2, 7, 64)  # shorter and int32 are fine
    with pytest.raises(ValueError, match="output_layer"):
        tiny(output_layer=-4)


@pytest.mark.reference
def test_presets_have_transformers_sizes_and_names():
    transformers = pytest.importorskip("transformers")
    for config, act in ((TextEncoderConfig.clip_vit_l14(), "quick_gelu"), (TextEncoderConfig.openclip_vit_h14(), "gelu")):
        with torch.device("meta"):  # sizes and names only: nothing is allocated or initialised
            ours = TextEncoder(config)
            ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(
                hidden_size=config.width, num_hidden_layers=config.layers, num_attention_heads=config.heads,
                intermediate_size=config.mlp_dim, hidden_act=act))
        count = sum(p.numel() for p in ours.parameters())
        assert count == sum(p.numel() for p in ref.parameters()) == {768: 123_060_480, 1024: 352_984_064}[config.width]
        names = foreign_names(ours, text_encoder_layout(config, "transformers")).values()
        assert {n.removeprefix("text_model.") for n in names} == set(ref.state_dict())


@pytest.mark.slow
@pytest.mark.reference
def test_full_size_vit_l14_matches_transformers():
    transformers = pytest.importorskip("transformers")
    ref = loud(transformers.CLIPTextModel(transformers.CLIPTextConfig(  # std 0.02: CLIP's own initialisation scale
        hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)), std=0.02)
    config = text_encoder_config_from_transformers(ref.config.to_dict())
    assert config == TextEncoderConfig.clip_vit_l14()
    ours = import_state_dict(TextEncoder(config), ref.state_dict(), text_encoder_layout(config, "transformers")).eval()
    ids = prompts()
    with torch.no_grad():
        out, expected = ours.encode(ids), ref(ids)
    assert rel(out.hidden, expected.last_hidden_state) < 1e-4
    assert rel(out.pooled, expected.pooler_output) < 1e-4
