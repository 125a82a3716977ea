"""LoRA (``ldm.lora``, ``ldm.convert.lora``, ``ldm.adapters``): ΔW = (α/r)·B·A in closed form for linear and
convolutional layers, zero-initialised B, strength 0 as the base model bit for bit, fusing, unfusing and unloading
exactly, two LoRAs adding up, kohya and diffusers files written and read back, files that are not (loadable) LoRAs
refused by name, and training that reaches only the LoRA. diffusers' own loading: test_lora_parity.py."""

import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ldm.checkpoint import CheckpointError
from ldm.convert.lora import build_loras, describe_lora, read_lora, save_lora
from ldm.lora import LoRA, LoRALayer, attach, detach, fuse, unfuse
from ldm.sd_config import StableDiffusionConfig
from ldm.stable_diffusion import StableDiffusion
from ldm.text_encoder import TextEncoder, TextEncoderConfig
from ldm.tokenizer import CLIPTokenizer
from ldm.unet import UNet, UNetConfig
from ldm.vae import AutoencoderKL, VAEConfig
from _fixtures import loud

SIZE = 32  # pixels; the tiny VAE halves once → 16×16 latents


def randomize(lora: LoRA, std: float = 0.3, seed: int = 0) -> LoRA:
    """A trained-looking LoRA: B drawn at random (a new one is zero), so ΔW ≠ 0."""
    torch.manual_seed(seed)
    for _, layer in lora.items():
        nn.init.normal_(layer.up.weight, std=std)
    return lora


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert got.keys() == expected.keys()
    different = [k for k in got if not torch.equal(got[k], expected[k])]
    assert not different, different[:5]


def tiny_sd() -> StableDiffusion:
    """An SD 1-shaped pipeline at toy size with loud weights, so a LoRA's change reaches the latents."""
    text = TextEncoderConfig(width=32, layers=2, heads=4, mlp_dim=64)
    unet = UNetConfig.sd15().with_(channels=32, channel_mult=(1, 2), attention=(True, False), num_res_blocks=1,
                                   context_dim=32, num_heads=2, norm_groups=8)
    vae = VAEConfig.sd().with_(channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8)
    return StableDiffusion(CLIPTokenizer.from_bundled(), loud(TextEncoder(text), seed=2),
                           loud(UNet(unet), None, peaky=2.0), loud(AutoencoderKL(vae), None, seed=1),
                           StableDiffusionConfig(unet=unet, vae=vae, text=text, size=SIZE))


def tiny_sdxl() -> StableDiffusion:
    """An SDXL-shaped pipeline at toy size (two text encoders, added conditioning); built, never sampled."""
    text = TextEncoderConfig.clip_vit_l14_sdxl().with_(width=32, layers=2, heads=4, mlp_dim=64)
    text_2 = TextEncoderConfig.openclip_vit_bigg14().with_(width=48, layers=2, heads=4, mlp_dim=96, projection_dim=32)
    unet = UNetConfig.sdxl().with_(channels=32, channel_mult=(1, 2), attention=(False, True), num_res_blocks=1,
                                   transformer_depth=1, head_dim=16, context_dim=80, added_cond_dim=32 + 6 * 8,
                                   added_time_dim=8, norm_groups=8)
    vae = VAEConfig.sd().with_(channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8)
    config = StableDiffusionConfig.sdxl().with_(unet=unet, vae=vae, text=text, text_2=text_2, size=SIZE)
    return StableDiffusion(CLIPTokenizer.from_bundled(), TextEncoder(text), UNet(unet), AutoencoderKL(vae), config,
                           tokenizer_2=CLIPTokenizer.from_bundled(), text_encoder_2=TextEncoder(text_2))


@pytest.fixture(scope="module")
def sd():
    return tiny_sd()


@pytest.fixture
def pipe(sd):
    """The module's pipeline, every LoRA unloaded after the test (those tests check that unloading is exact)."""
    yield sd
    sd.unload_lora()


def latents(pipe, prompt="a red cube", steps=2):
    records = list(pipe.loop(prompt, num_inference_steps=steps, width=SIZE, height=SIZE, sampler="ddim"))
    return records[-1].x_prev


def random_loras(pipe, seed=0, unet_targets="attention+conv") -> dict[str, LoRA]:
    """Random LoRAs (rank 4, α 2) on the UNet (attention and convolutions) and the text encoder (attention, MLP)."""
    torch.manual_seed(seed)
    return {"unet": randomize(LoRA.create(pipe.unet, rank=4, alpha=2.0, targets=unet_targets), seed=seed),
            "text_encoder": randomize(LoRA.create(pipe.text_encoder, rank=4, alpha=2.0, targets="transformer"),
                                      seed=seed + 1)}


# ── the update ───────────────────────────────────────────────────────────────────────────────────────────────────────

def test_linear_update_is_x_times_delta_w():
    torch.manual_seed(0)
    layer = LoRALayer(nn.Linear(6, 5), rank=3, alpha=6.0)
    nn.init.normal_(layer.up.weight)
    x = torch.randn(2, 7, 6)
    delta = 6.0 / 3 * layer.up.weight @ layer.down.weight  # (α/r)·B·A, (d_out, d_in)
    assert torch.allclose(layer.delta_weight(), delta)
    assert torch.allclose(layer(x), x @ delta.T, atol=1e-6)
    assert torch.linalg.matrix_rank(layer.delta_weight()) == 3


@pytest.mark.parametrize("kernel, stride, padding", [(3, 1, 1), (3, 2, 1), (1, 1, 0)])
def test_conv_update_is_conv_with_delta_w(kernel, stride, padding):
    torch.manual_seed(0)
    layer = LoRALayer(nn.Conv2d(4, 6, kernel, stride, padding), rank=2, alpha=None)  # no α: α = r
    nn.init.normal_(layer.up.weight)
    x = torch.randn(2, 4, 9, 9)
    delta = layer.delta_weight()
    assert delta.shape == (6, 4, kernel, kernel)
    expected = torch.einsum("or,rikl->oikl", layer.up.weight[:, :, 0, 0], layer.down.weight)
    assert torch.allclose(delta, expected)
    assert torch.allclose(layer(x), F.conv2d(x, delta, stride=stride, padding=padding), atol=1e-5)


def test_a_new_lora_changes_nothing_and_scale_zero_is_the_base_bit_for_bit():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Conv2d(1, 2, 3, padding=1))
    x = torch.randn(3, 1, 4, 8)
    base = model(x)
    lora = attach(model, LoRA.create(model, rank=2, targets=["0", "2"]))
    assert all(not layer.up.weight.any() for _, layer in lora.items())  # B = 0
    assert torch.equal(model(x), base)
    randomize(lora)
    assert not torch.allclose(model(x), base)
    lora.scale = 0.0
    assert torch.equal(model(x), base)


def test_two_loras_add_up():
    """W x + s₁ΔW₁ x + s₂ΔW₂ x: the updates of two LoRAs on one layer are summed, each at its strength."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 5))
    first = attach(model, randomize(LoRA.create(model, rank=2, targets=["0"], name="a"), seed=1))
    second = attach(model, randomize(LoRA.create(model, rank=3, alpha=1.0, targets=["0"], name="b"), seed=2))
    first.scale, second.scale = 0.7, -1.5
    x = torch.randn(4, 8)
    weight = model[0].weight + 0.7 * first.layers["0"].delta_weight() - 1.5 * second.layers["0"].delta_weight()
    assert torch.allclose(model(x), x @ weight.T + model[0].bias, atol=1e-5)


def test_fused_equals_unfused_and_unfusing_is_exact():
    pipe = tiny_sd()  # its own: LoRAs attached by hand are not the pipeline's to unload
    base_weights = {name: state(model) for name, model in pipe.lora_models.items()}
    base = latents(pipe)
    first, second = random_loras(pipe, seed=0), random_loras(pipe, seed=10, unet_targets="transformer")
    for component, model in pipe.lora_models.items():
        attach(model, first[component]), attach(model, second[component])
    unfused = latents(pipe)
    assert (unfused - base).abs().max() > 0.1
    for lora in (*first.values(), *second.values()):
        fuse(lora)
    assert all(lora.fused for lora in first.values())
    assert torch.allclose(latents(pipe), unfused, rtol=1e-4, atol=1e-4)
    # the first unfused under the second: the weights are as if only the second had been fused
    for lora in first.values():
        unfuse(lora)
    only_second = {name: state(model) for name, model in pipe.lora_models.items()}
    for lora in second.values():
        unfuse(lora)
    for name, model in pipe.lora_models.items():
        assert_same_state(model, base_weights[name])
    assert torch.equal(latents(pipe), unfused)  # attached again, unfused
    for lora in first.values():
        detach(lora)
    for component, lora in second.items():
        fuse(lora)
        assert_same_state(pipe.lora_models[component], only_second[component])
        detach(lora)  # unfuses first
        assert_same_state(pipe.lora_models[component], base_weights[component])
    assert torch.equal(latents(pipe), base)


def test_pipeline_load_scale_fuse_unfuse_unload(pipe, tmp_path):
    """``load_lora`` → scale 0 is the base, bit for bit; fusing keeps the images; two LoRAs fused, the first
    unloaded, then the second: the weights are the base weights bit for bit."""
    base_weights = {name: state(model) for name, model in pipe.lora_models.items()}
    base = latents(pipe)
    models = pipe.lora_models
    save_lora(tmp_path / "a.safetensors", random_loras(pipe, seed=0), models)
    save_lora(tmp_path / "b.safetensors", random_loras(pipe, seed=5, unet_targets="transformer"), models, "diffusers")
    assert pipe.load_lora(tmp_path / "a.safetensors", scale=0.8) == "a"
    one = latents(pipe)
    assert (one - base).abs().max() > 0.1
    pipe.set_lora_scale("a", 0.0)
    assert torch.equal(latents(pipe), base)
    pipe.set_lora_scale("a", 0.8)
    assert pipe.load_lora(tmp_path / "b.safetensors", name="second") == "second"
    assert set(pipe.loras) == {"a", "second"} and set(pipe.loras["a"]) == {"unet", "text_encoder"}
    both = latents(pipe)
    pipe.fuse_lora()
    with pytest.raises(ValueError, match="fused"):
        pipe.set_lora_scale("a", 1.0)
    assert torch.allclose(latents(pipe), both, rtol=1e-4, atol=1e-4)
    pipe.unfuse_lora()
    for name, model in models.items():
        assert_same_state(model, base_weights[name])
    assert torch.equal(latents(pipe), both)
    pipe.fuse_lora()
    pipe.unload_lora("a")  # fused first, under the second: the weights are the second's alone, fused on the base
    assert list(pipe.loras) == ["second"] and all(lora.fused for lora in pipe.loras["second"].values())
    second_fused = {name: state(model) for name, model in models.items()}
    pipe.unfuse_lora()
    pipe.fuse_lora()
    for name, model in models.items():
        assert_same_state(model, second_fused[name])
    pipe.unload_lora()
    assert not pipe.loras
    for name, model in models.items():
        assert_same_state(model, base_weights[name])
    assert torch.equal(latents(pipe), base)
    with pytest.raises(KeyError, match="no LoRA named 'a'"):
        pipe.set_lora_scale("a", 1.0)


# ── files ────────────────────────────────────────────────────────────────────────────────────────────────────────────

@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_save_read_build_round_trip(sd, tmp_path, fmt):
    loras = random_loras(sd)
    path = save_lora(tmp_path / "style.safetensors", loras, sd.lora_models, fmt)
    file = read_lora(path)
    assert file.format == fmt and file.ranks() == [4] and file.alphas() == [2.0]
    names = [k for part in file.modules.values() for k in part]
    if fmt == "kohya":  # A1111's names: diffusers' / transformers' module names with underscores
        assert "down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k" in names
        assert "down_blocks_0_resnets_0_conv1" in names and "text_model_encoder_layers_0_self_attn_q_proj" in names
    else:
        assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k" in names
        assert "text_model.encoder.layers.1.mlp.fc2" in names
    built = build_loras(file, sd.lora_models, "style")
    assert built.keys() == loras.keys()
    for component, lora in loras.items():
        got = dict(built[component].items())
        assert got.keys() == dict(lora.items()).keys()
        for key, layer in lora.items():
            assert torch.equal(got[key].down.weight, layer.down.weight), key
            assert torch.equal(got[key].up.weight, layer.up.weight), key
            assert got[key].scaling == layer.scaling == 0.5
    report = describe_lora(path)
    assert report["format"] == fmt and report["layers"] == {c: len(lora.targets) for c, lora in loras.items()}
    assert report["conv_layers"] > 0


def test_original_input_blocks_names_load_as_the_diffusers_names(sd, tmp_path):
    """Some kohya files (SGM / A1111 trained on original checkpoints) name UNet layers input_blocks_…, middle_block_…,
    output_blocks_…: the same layers, reached through the original-layout rule table."""
    from ldm.convert.lora import module_spellings

    loras = {"unet": random_loras(sd)["unet"]}
    path = save_lora(tmp_path / "diffusers_names.safetensors", loras, sd.lora_models, "kohya")
    diffusers_names, original_names = module_spellings(sd.unet, "unet")
    renamed = {}
    for key, value in load_file(path).items():
        stem, _, what = key.partition(".")
        module = next(m for m, name in diffusers_names.items() if stem == "lora_unet_" + name.replace(".", "_"))
        renamed[f"lora_unet_{original_names[module].replace('.', '_')}.{what}"] = value
    assert any(k.startswith(("lora_unet_input_blocks_", "lora_unet_output_blocks_")) for k in renamed)
    save_file(renamed, tmp_path / "original_names.safetensors")
    for name in ("diffusers_names", "original_names"):
        built = build_loras(read_lora(tmp_path / f"{name}.safetensors"), sd.lora_models, name)["unet"]
        assert set(built.targets) == set(loras["unet"].targets)
        for key, layer in built.items():
            assert torch.equal(layer.up.weight, dict(loras["unet"].items())[key].up.weight), (name, key)


def test_sdxl_kohya_names_and_family(tmp_path):
    pipe = tiny_sdxl()
    loras = {"unet": randomize(LoRA.create(pipe.unet)),
             "text_encoder": randomize(LoRA.create(pipe.text_encoder)),
             "text_encoder_2": randomize(LoRA.create(pipe.text_encoder_2))}
    path = save_lora(tmp_path / "xl.safetensors", loras, pipe.lora_models, sdxl=True)
    file = read_lora(path)
    assert file.family == "sdxl" and set(file.modules) == set(loras)
    assert pipe.load_lora(path) == "xl" and set(pipe.loras["xl"]) == set(loras)


def kohya_file(path, modules: dict[str, tuple[int, int]], rank=4, extra=None):
    """A kohya file holding, per module name, A (rank × d_in) and B (d_out × rank)."""
    tensors = {}
    for name, (d_in, d_out) in modules.items():
        tensors |= {f"{name}.lora_down.weight": torch.randn(rank, d_in),
                    f"{name}.lora_up.weight": torch.randn(d_out, rank), f"{name}.alpha": torch.tensor(float(rank))}
    save_file(tensors | (extra or {}), path)
    return path


def test_a_lora_for_another_family_is_refused_naming_both(sd, tmp_path):
    sd1 = kohya_file(tmp_path / "sd1.safetensors",
                     {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": (768, 320),
                      "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (768, 768)})
    with pytest.raises(ValueError, match=r"sd1\.safetensors is a LoRA for SD 1, and this pipeline is SDXL"):
        tiny_sdxl().load_lora(sd1)
    sdxl = kohya_file(tmp_path / "xl.safetensors",
                      {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (1280, 1280)})
    with pytest.raises(ValueError, match=r"xl\.safetensors is a LoRA for SDXL, and this pipeline is SD 1"):
        sd.load_lora(sdxl)
    assert not sd.loras


def test_truncated_file_is_named(sd, tmp_path):
    path = save_lora(tmp_path / "cut.safetensors", random_loras(sd), sd.lora_models)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors.*(truncated|corrupt)"):
        sd.load_lora(path)
    assert not sd.loras


def test_modules_matching_no_layer_are_named(sd, tmp_path):
    path = kohya_file(tmp_path / "other.safetensors",
                      {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (32, 32),
                       "lora_unet_down_blocks_7_attentions_0_proj_in": (32, 32),
                       "lora_te_text_model_encoder_layers_9_mlp_fc1": (32, 64)})
    with pytest.raises(CheckpointError, match=r"other\.safetensors: LoRA modules that match no layer") as e:
        sd.load_lora(path)
    message = str(e.value)
    assert "down_blocks_7_attentions_0_proj_in" in message and "text_model_encoder_layers_9_mlp_fc1" in message
    assert "attn1_to_q" not in message
    wrong = kohya_file(tmp_path / "shape.safetensors",
                       {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (48, 32)})
    with pytest.raises(ValueError, match=r"shape\.safetensors.*attn1_to_q.*lora_down has shape \(4, 48\)"):
        sd.load_lora(wrong)
    assert not sd.loras


def test_loha_file_is_recognised_and_refused(sd, tmp_path):
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    path = tmp_path / "loha.safetensors"
    save_file({f"{stem}.hada_w1_a": torch.randn(32, 4), f"{stem}.hada_w1_b": torch.randn(4, 32),
               f"{stem}.hada_w2_a": torch.randn(32, 4), f"{stem}.hada_w2_b": torch.randn(4, 32),
               f"{stem}.alpha": torch.tensor(4.0)}, path)
    with pytest.raises(CheckpointError, match=r"loha\.safetensors is a LoHa adapter"):
        sd.load_lora(path)


def test_an_embedding_is_refused_as_a_lora(sd, tmp_path):
    kohya = tmp_path / "kohya_emb.safetensors"
    save_file({"emb_params": torch.randn(2, 32)}, kohya)
    sdxl = tmp_path / "sdxl_emb.safetensors"
    save_file({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, sdxl)
    a1111 = tmp_path / "a1111_emb.pt"  # A1111's own: the vectors nested under string_to_param
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.randn(2, 32)}, "name": "emb",
                "step": 100}, a1111)
    for path in (kohya, sdxl, a1111):
        with pytest.raises(CheckpointError, match=rf"{path.name} is a textual-inversion embedding, not a LoRA"):
            sd.load_lora(path)
    assert not sd.loras


class SystemCall:
    def __reduce__(self):
        return (os.system, ("touch SENTINEL",))


def test_a_pickle_that_runs_code_is_refused(sd, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    torch.save({f"{stem}.lora_down.weight": torch.zeros(4, 32), f"{stem}.lora_up.weight": torch.zeros(32, 4),
                "payload": SystemCall()}, path)
    with pytest.raises(CheckpointError, match=rf"evil\.pt.*{os.system.__module__}\.system.*may be malicious"):
        sd.load_lora(path)
    assert not (tmp_path / "SENTINEL").exists() and not sd.loras


# ── training ─────────────────────────────────────────────────────────────────────────────────────────────────────────

def test_gradients_reach_only_the_lora_when_the_base_is_frozen():
    torch.manual_seed(0)
    config = UNetConfig.sd15().with_(channels=16, channel_mult=(1, 2), attention=(True, False), num_res_blocks=1,
                                     context_dim=8, num_heads=2, norm_groups=8)
    unet = loud(UNet(config), None).requires_grad_(False)  # no zero-initialised layer to block the gradient
    lora = attach(unet, randomize(LoRA.create(unet, rank=2, targets="attention+conv"), std=0.01))
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([3, 500]), torch.randn(2, 5, 8)
    unet(x, t, context).square().mean().backward()
    assert all(p.grad is None for p in unet.parameters())
    grads = [p.grad for p in lora.parameters()]
    assert len(grads) == 2 * len(lora.targets) and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_a_class_conditional_pipeline_takes_loras_too(tmp_path):
    """``DiffusionPipeline`` (a DDPM-style UNet, self-attention, no text): a LoCon written in both layouts loads
    under diffusers' names, moves the samples, and strength 0 and unloading give the base samples bit for bit."""
    from ldm.pipeline import DiffusionPipeline

    config = UNetConfig(in_channels=3, out_channels=3, sample_size=16, channels=16, channel_mult=(1, 2),
                        num_res_blocks=1, attention=(False, True), norm_groups=8, num_classes=3)
    pipe = DiffusionPipeline(loud(UNet(config)))
    base_weights = state(pipe.unet)

    def samples():
        return pipe(2, num_inference_steps=2, class_label=[0, 2], output="tensor", progress=False)

    base = samples()
    lora = randomize(LoRA.create(pipe.unet, targets="attention+conv"), std=0.1)
    for fmt in ("kohya", "diffusers"):
        name = pipe.load_lora(save_lora(tmp_path / f"{fmt}.safetensors", {"unet": lora}, pipe.lora_models, fmt))
        assert sorted(pipe.loras[name]["unet"].targets) == sorted(lora.targets)
    assert (samples() - base).abs().max() > 0.1
    pipe.set_lora_scale("kohya", 0.0), pipe.set_lora_scale("diffusers", 0.0)
    assert torch.equal(samples(), base)
    pipe.unload_lora()
    assert_same_state(pipe.unet, base_weights)
    assert torch.equal(samples(), base)
