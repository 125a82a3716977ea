"""Where ``ldm.text_encoder``'s weights live in transformers' CLIP text models and in OpenCLIP checkpoints.

ldm: ``token_embedding``, ``position_embedding``, ``layers.{i}.{norm1, attn.{q,k,v,out}, norm2, mlp.{fc1,fc2}}``,
``final_norm``, ``projection`` (only with projection_dim).

"transformers": ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` as stored on the Hub and in diffusers'
``text_encoder/`` folders (``text_model.embeddings…``, ``text_model.encoder.layers.N.self_attn.q_proj…``,
``text_projection``). The same names without ``text_model.`` are accepted: older SD1 single files
(under ``cond_stage_model.transformer.``) and transformers 5's own ``CLIPTextModel.state_dict()`` spell them so.

"openclip": the ``cond_stage_model.model.`` part of an SD2 single file (``transformer.resblocks.N.attn.in_proj_weight``,
``ln_final``, ``text_projection`` …). Two of its storage choices are not renames, so they are undone before the
rule table sees the file and redone after export: ``from_openclip`` / ``to_openclip`` (below).

Stable Diffusion 2 reads the penultimate block. Single files hold all 24 blocks, so the ``openclip_vit_h14`` preset
holds 24 and sets output_layer = −2. diffusers' SD2 ``text_encoder/`` instead stores a 23-block model whose *last*
state is that same penultimate state (its converter drops ``resblocks.23``); ``text_encoder_config_from_transformers``
therefore reads the block count from config.json and always sets output_layer = −1. Both give the UNet the same input.

SDXL holds its two encoders under ``conditioner.embedders.0.transformer.`` (ViT-L/14, "transformers" layout, 12 blocks)
and ``conditioner.embedders.1.model.`` (bigG/14, "openclip" layout with ``text_projection``, 32 blocks). It reads the
penultimate state of each *without* the final LayerNorm, so no cut model can stand in for it: diffusers' SDXL folders
store all 12 and all 32 blocks (the pooled output needs bigG's last one) and the pipeline picks ``hidden_states[-2]``.
config.json cannot say so; a caller that knows it reads an SDXL folder sets
``.with_(output_layer=-2, final_norm_on_hidden=False)`` (giving the ``clip_vit_l14_sdxl`` / ``openclip_vit_bigg14``
presets).
"""

from __future__ import annotations

import re
from typing import Literal

import torch

from ..text_encoder import TextEncoderConfig
from .core import Layout, Rule

TextFormat = Literal["transformers", "openclip"]


def text_encoder_layout(config: TextEncoderConfig, fmt: TextFormat) -> Layout:
    """The naming of ``TextEncoder(config)``'s weights in ``fmt`` (unprefixed; SD1 files keep them under
    ``cond_stage_model.transformer.``, SD2 files under ``cond_stage_model.model.``, after ``from_openclip``)."""
    if fmt == "transformers":
        rules: list[Rule] = [
            (r"^layers\.(\d+)\.norm(\d)\.", r"layers.\1.layer_norm\2."),
            (r"^layers\.(\d+)\.attn\.(q|k|v|out)\.", r"layers.\1.self_attn.\2_proj."),
            (r"^layers\.", "text_model.encoder.layers."),
            (r"^token_embedding\.", "text_model.embeddings.token_embedding."),
            (r"^position_embedding$", "text_model.embeddings.position_embedding.weight"),
            (r"^final_norm\.", "text_model.final_layer_norm."),
            (r"^projection\.", "text_projection."),
        ]
        aliases: list[Rule] = [(r"^(embeddings|encoder|final_layer_norm)\.", r"text_model.\1.")]
        return Layout(rules, aliases=aliases, ignore=[r"position_ids$"])
    if fmt == "openclip":
        rules = [
            (r"^layers\.(\d+)\.norm(\d)\.", r"layers.\1.ln_\2."),
            (r"^layers\.(\d+)\.attn\.(q|k|v|out)\.", r"layers.\1.attn.\2_proj."),  # q/k/v: as split by from_openclip
            (r"^layers\.(\d+)\.mlp\.fc1\.", r"layers.\1.mlp.c_fc."),
            (r"^layers\.(\d+)\.mlp\.fc2\.", r"layers.\1.mlp.c_proj."),
            (r"^layers\.", "transformer.resblocks."),
            (r"^position_embedding$", "positional_embedding"),
            (r"^final_norm\.", "ln_final."),
            (r"^projection\.", "text_projection."),
        ]
        # logit_scale belongs to the image–text contrastive loss; attn_mask is a buffer that some versions saved.
        ignore = [r"(^|\.)logit_scale$", r"(^|\.)attn_mask$"]
        if config.projection_dim is None:  # SD2 never uses the pooled output; SDXL's bigG does
            ignore.append(r"(^|\.)text_projection\.weight$")
        return Layout(rules, ignore=ignore)
    raise ValueError(f"unknown text encoder format {fmt!r}; known: 'transformers', 'openclip'")


def split_fused_qkv(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``….in_proj_weight`` [3D, D] / ``….in_proj_bias`` [3D] (``nn.MultiheadAttention``'s fused projection) →
    ``….{q,k,v}_proj.weight`` [D, D] / ``.bias`` [D], in that order: rows [0, D) project queries, [D, 2D) keys,
    [2D, 3D) values. Other entries pass through. The tensors returned are views of the input."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        m = re.fullmatch(r"(.*)in_proj_(weight|bias)", key)
        if m is None:
            out[key] = value
            continue
        if value.shape[0] % 3:
            raise ValueError(f"{key} has {value.shape[0]} rows, not a multiple of 3 (q, k, v)")
        for name, part in zip("qkv", value.chunk(3, dim=0)):
            out[f"{m[1]}{name}_proj.{m[2]}"] = part
    return out


def fuse_qkv(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``split_fused_qkv``: each ``….{q,k,v}_proj.weight`` (``.bias``) triple → ``….in_proj_weight``
    (``in_proj_bias``), concatenated in q, k, v order."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        m = re.fullmatch(r"(.*)([qkv])_proj\.(weight|bias)", key)
        if m is None:
            out[key] = value
        elif m[2] == "q":
            parts = [state_dict[f"{m[1]}{name}_proj.{m[3]}"] for name in "qkv"]
            out[f"{m[1]}in_proj_{m[3]}"] = torch.cat(parts, dim=0)
    return out


def from_openclip(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo OpenCLIP's two non-rename storage choices, so that ``text_encoder_layout(config, "openclip")`` applies:
    fused q, k, v (``split_fused_qkv``), and ``text_projection`` [D, P] used as x · P, which becomes a linear
    layer's ``text_projection.weight`` [P, D] = Pᵀ. Keys of other models in the file pass through untouched."""
    out = {}
    for key, value in split_fused_qkv(state_dict).items():
        if key.endswith("text_projection"):
            key, value = f"{key}.weight", value.t()
        out[key] = value
    return out


def to_openclip(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``from_openclip``: export with the "openclip" layout, then pass the result through this."""
    out = {}
    for key, value in fuse_qkv(state_dict).items():
        if key.endswith("text_projection.weight"):
            key, value = key[: -len(".weight")], value.t().contiguous()  # contiguous: safetensors refuses views
        out[key] = value
    return out


def text_encoder_config_from_transformers(cfg: dict, *, with_projection: bool | None = None) -> TextEncoderConfig:
    """Read a transformers ``CLIPTextConfig`` dict (a ``text_encoder/config.json``) into a ``TextEncoderConfig``.

    output_layer is always −1 and the final LayerNorm applies: a diffusers SD2 folder already stores only the 23
    blocks SD2 uses. An SDXL folder's encoders hold every block and the pipeline, not the config, chooses the
    penultimate unnormalised state; the caller adds that with ``.with_`` (module docstring).
    with_projection: hold ``text_projection``; by default only for ``CLIPTextModelWithProjection``
    (``projection_dim`` is present in every CLIP config, also where the model has no projection).
    eos_token_id = 2 marks configs written before transformers' PR #24773, which pool at argmax(ids); that is
    the first occurrence of the largest id, CLIP's end token vocab_size − 1, which is what we pool at.
    """
    activation = cfg.get("hidden_act", "quick_gelu")
    if activation not in ("quick_gelu", "gelu"):
        raise ValueError(f"unsupported text encoder activation {activation!r} (supported: 'quick_gelu', 'gelu')")
    if with_projection is None:
        with_projection = "CLIPTextModelWithProjection" in (cfg.get("architectures") or [])
    vocab = cfg.get("vocab_size", 49408)
    eos = cfg.get("eos_token_id", 49407)
    if isinstance(eos, (list, tuple)):
        raise ValueError(f"several end tokens {eos} are not supported")
    return TextEncoderConfig(
        vocab_size=vocab, max_length=cfg.get("max_position_embeddings", 77), width=cfg["hidden_size"],
        layers=cfg["num_hidden_layers"], heads=cfg["num_attention_heads"], mlp_dim=cfg["intermediate_size"],
        activation=activation, layer_norm_eps=cfg.get("layer_norm_eps", 1e-5), output_layer=-1,
        projection_dim=cfg.get("projection_dim", 512) if with_projection else None,
        eos_token_id=vocab - 1 if eos == 2 else eos,
    )


def text_encoder_config_to_transformers(config: TextEncoderConfig) -> dict:
    """A transformers ``CLIPTextConfig`` dict (``text_encoder/config.json``) for ``config``, the inverse of
    ``text_encoder_config_from_transformers``.

    transformers has no output_layer, so a model that reads an earlier block *through the final LayerNorm* is
    written as diffusers writes SD2: num_hidden_layers counts only the blocks used, and the weights of later blocks
    must be left out of the file. That is impossible with a projection (the pooled output needs every block),
    which is refused. A model that reads an earlier block without the final LayerNorm is written whole, as
    diffusers writes SDXL's encoders: its pipeline takes ``hidden_states[output_layer]`` itself.
    """
    used = config.layers + 1 + config.output_layer if config.final_norm_on_hidden else config.layers
    if used != config.layers and config.projection_dim is not None:
        raise ValueError("a transformers CLIP model cannot read an earlier block for its hidden states and the last "
                         "for its pooled output; drop projection_dim or use output_layer = -1")
    with_projection = config.projection_dim is not None
    return {
        "architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
        "model_type": "clip_text_model", "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_length, "hidden_size": config.width, "num_hidden_layers": used,
        "num_attention_heads": config.heads, "intermediate_size": config.mlp_dim, "hidden_act": config.activation,
        "layer_norm_eps": config.layer_norm_eps, "projection_dim": config.projection_dim or config.width,
        "bos_token_id": 49406, "eos_token_id": config.eos_token_id, "pad_token_id": 1,
        "attention_dropout": 0.0, "dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02,
    }


__all__ = ["from_openclip", "fuse_qkv", "split_fused_qkv", "text_encoder_config_from_transformers",
           "text_encoder_config_to_transformers", "text_encoder_layout", "to_openclip"]
