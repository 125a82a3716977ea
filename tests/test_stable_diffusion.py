"""Stable Diffusion end to end against diffusers' pipelines, with the same tiny random weights in every layout."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.checkpoint import CheckpointError
from ldm import load_pipeline
from ldm.sd_checkpoint import (UnsupportedCheckpoint, detect_config, inspect_checkpoint, save_diffusers_folder,
                               save_single_file)
from _fixtures import assert_parity, loud

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.reference

SIZE = 32  # pixels; the tiny VAE halves once → 16×16 latents
# max |Δ| between ldm's and diffusers' images in [−1, 1], in every end-to-end test here and in the SD 2 and SDXL
# files; measured 7e-6–4e-5 (float32 rounding over 5 steps), while a new prompt or guidance 1 moves the images by
# 0.7–2 (assert_parity asks for 20 × TOL)
TOL = 2e-3


def tiny_components(in_channels=4, unet_options=None, text_options=None):
    """Random-weight diffusers UNet and VAE and a transformers CLIP text model, SD 1-shaped unless told otherwise.

    ``loud`` weights (1/√fan_in, norm gains ~1, token embeddings ~1, peaky cross-attention): with N(0, 0.05)
    everywhere a new prompt moved the image by 8e-7 and guidance 1 instead of 7.5 by 1.1e-6, under the tests'
    2e-3 tolerance, so no parity test could see a prompt or guidance bug; now each moves it by 0.7–2."""
    torch.manual_seed(0)
    unet_options = dict(cross_attention_dim=32, attention_head_dim=4) | (unet_options or {})
    unet = diffusers.UNet2DConditionModel(
        sample_size=SIZE // 2, in_channels=in_channels, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8, **unet_options)
    vae = diffusers.AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    text_options = dict(hidden_size=32, intermediate_size=64, hidden_act="quick_gelu", pad_token_id=49407) | (text_options or {})
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406,
        eos_token_id=49407, **text_options))
    return loud_components(unet, vae, text)


def loud_components(unet, vae, *texts):
    """The UNet, VAE and text encoders with ``loud`` weights (a seed each), in eval mode."""
    # peaky=2: logits ×4. At ×3 (logits ×9) the UNet is ill-conditioned: float32 rounding alone (float64 agrees to
    # 1e-13) moved the SDXL eps by 6e-5 relative, and guidance grew that to 1.3e-2 on the image
    return (loud(unet, None, peaky=2.0, seed=0), loud(vae, None, seed=1),
            *(loud(text, None, seed=2 + i) for i, text in enumerate(texts)))


def write_vocab(folder):
    from ldm.tokenizer import CLIPTokenizer

    CLIPTokenizer.from_bundled().save_pretrained(folder)
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="<|endoftext|>",
                                      model_max_length=77)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A diffusers StableDiffusionPipeline (DDIM, SD 1.5 scheduler settings) saved as a folder."""
    folder = tmp_path_factory.mktemp("sd")
    unet, vae, text = tiny_components()
    tokenizer = write_vocab(folder / "vocab")
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                        set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                             safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder / "pipe")
    return pipe, folder / "pipe"


def ref_images(pipe, prompt, steps=5, **kw):
    """diffusers' images in [−1, 1], image k from its own generator seeded seed + k (or seed[k] for a list of
    seeds), as ldm seeds a batch."""
    n = (1 if isinstance(prompt, str) else len(prompt)) * kw.get("num_images_per_prompt", 1)
    seed = kw.pop("seed", 0)
    seeds = seed if isinstance(seed, list) else range(seed, seed + n)
    out = pipe(prompt, num_inference_steps=steps, guidance_scale=kw.pop("guidance", 7.5), height=SIZE, width=SIZE,
               generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np", **kw).images
    return torch.from_numpy(out).permute(0, 3, 1, 2) * 2 - 1


def our_images(pipe, prompt, steps=5, **kw):
    kw.setdefault("sampler", "ddim")
    records = list(pipe.loop(prompt, num_inference_steps=steps, guidance_scale=kw.pop("guidance", 7.5), width=SIZE,
                             height=SIZE, **kw))
    return pipe.decode(records[-1].x_prev)


def ours_with(pipe, prompt, **options):
    """``our_images(pipe, prompt, **options)`` as a function of changes to them: what ``assert_parity`` varies."""
    return lambda **changes: our_images(pipe, **({"prompt": prompt} | options | changes))


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_components_match_diffusers(reference):
    ref, folder = reference
    ours = load_pipeline(folder)
    prompts = ["a photo of an astronaut riding a horse", ""]
    ids = ref.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ours.tokenizer(prompts), ids)
    with torch.no_grad():
        context = ref.text_encoder(ids)[0]
        assert rel(ours.text_encoder(ids), context) < 1e-4
        x, t = torch.randn(2, 4, 16, 16), torch.tensor([1, 999])
        assert rel(ours.unet(x, t, context), ref.unet(x, t, encoder_hidden_states=context).sample) < 1e-4
        assert rel(ours.vae.decode(x), ref.vae.decode(x).sample) < 1e-4
    assert ours.sampling.spacing == "leading" and ours.sampling.steps_offset == 1 and not ours.sampling.set_alpha_to_one
    assert ours.config.size == SIZE  # unet sample_size × the VAE's factor: the default width and height


@pytest.mark.parametrize("sampler, scheduler", [("ddim", "DDIMScheduler"), ("dpm++2m", "DPMSolverMultistepScheduler"),
                                                ("euler_a", "EulerAncestralDiscreteScheduler")])
def test_text_to_image_matches_diffusers(reference, sampler, scheduler):
    ref, folder = reference
    ours = load_pipeline(folder)
    swapped = getattr(diffusers, scheduler).from_config(ref.scheduler.config)
    ref = diffusers.StableDiffusionPipeline(**(ref.components | {"scheduler": swapped}))
    ref.set_progress_bar_config(disable=True)
    prompts = ["a red cube on a table", "a watercolour of a fox"]
    expected = ref_images(ref, prompts, negative_prompt=["blurry", ""])
    run = ours_with(ours, prompts, negative_prompt=["blurry", ""], sampler=sampler)
    assert_parity(run, expected, TOL, prompt=["a red cube on a chair", "a fox"], guidance=1.0,
                  negative_prompt=["", "blurry"])


def test_single_files_safetensors_ckpt_and_ema(reference, tmp_path):
    _, folder = reference
    pipe = load_pipeline(folder)
    single = save_single_file(pipe, tmp_path / "model.safetensors")
    # tiny models are no real family, so their single files load with the folder's config
    loaded = load_pipeline(single, config=pipe.config)
    expected = our_images(pipe, "a lighthouse")
    assert torch.equal(our_images(loaded, "a lighthouse"), expected)
    # the .ckpt layout: a pickle of {"state_dict": ..., plus metadata}, with EMA copies of the UNet under model_ema.*
    from safetensors.torch import load_file

    state = load_file(single)
    ema = {"model_ema." + "".join(k.split(".")[1:]): v + 0.01 for k, v in state.items() if k.startswith("model.diffusion_model.")}
    torch.save({"state_dict": state | ema | {"model_ema.decay": torch.tensor(0.9999)}, "global_step": 3}, tmp_path / "m.ckpt")
    raw = load_pipeline(tmp_path / "m.ckpt", config=pipe.config, ema=False)
    assert torch.equal(our_images(raw, "a lighthouse"), expected)
    averaged = load_pipeline(tmp_path / "m.ckpt", config=pipe.config)
    key = next(iter(averaged.unet.state_dict()))
    assert torch.allclose(averaged.unet.state_dict()[key], pipe.unet.state_dict()[key] + 0.01)


def test_diffusers_from_single_file_reads_what_ldm_writes(reference, tmp_path):
    """diffusers' own single-file converter, offline (the component configs from the reference's folder), reads
    ldm's file as the reference's weights exactly, and its pipeline's images match ldm's from the same file."""
    ref, folder = reference
    pipe = load_pipeline(folder)
    single = save_single_file(pipe, tmp_path / "model.safetensors")
    theirs = diffusers.StableDiffusionPipeline.from_single_file(str(single), config=str(folder), local_files_only=True,
                                                                 safety_checker=None)
    theirs.set_progress_bar_config(disable=True)
    for name in ("unet", "vae", "text_encoder"):
        got, want = getattr(theirs, name).state_dict(), getattr(ref, name).state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name
    expected = ref_images(theirs, "a lighthouse", negative_prompt="fog")
    assert_parity(ours_with(load_pipeline(single, config=pipe.config), "a lighthouse", negative_prompt="fog"), expected,
                  TOL, prompt="a windmill", guidance=1.0, negative_prompt="rain")


def test_diffusers_loads_what_ldm_writes(reference, tmp_path):
    ref, folder = reference
    pipe = load_pipeline(folder)
    out = save_diffusers_folder(pipe, tmp_path / "written")
    again = diffusers.StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    again.set_progress_bar_config(disable=True)
    assert type(again.scheduler).__name__ == "DDIMScheduler"
    assert (ref_images(again, "a lighthouse") - ref_images(ref, "a lighthouse")).abs().max() < 1e-5
    assert torch.equal(load_pipeline(out).tokenizer(["a b c"]), pipe.tokenizer(["a b c"]))


def test_img2img_matches_diffusers(reference):
    ref, folder = reference
    ours = load_pipeline(folder)
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**ref.components)
    img2img.set_progress_bar_config(disable=True)
    image = Image.fromarray((np.random.default_rng(0).random((SIZE, SIZE, 3)) * 255).astype(np.uint8))
    expected = torch.from_numpy(img2img("a house", image=image, strength=0.6, num_inference_steps=5, output_type="np",
                                        generator=torch.Generator().manual_seed(0)).images).permute(0, 3, 1, 2) * 2 - 1
    assert_parity(ours_with(ours, "a house", image=image, strength=0.6), expected, TOL, prompt="a boat", guidance=1.0)


def test_inpainting_matches_diffusers(tmp_path):
    unet, vae, text = tiny_components(in_channels=9)
    tokenizer = write_vocab(tmp_path / "vocab")
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                        set_alpha_to_one=False, steps_offset=1)
    ref = diffusers.StableDiffusionInpaintPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    ref.save_pretrained(tmp_path / "pipe")
    ours = load_pipeline(tmp_path / "pipe")
    assert ours.config.inpainting
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8))
    mask = Image.fromarray(np.where(np.arange(SIZE)[None, :] < SIZE // 2, 255, 0).repeat(SIZE, 0).astype(np.uint8))
    expected = torch.from_numpy(ref("a cat", image=image, mask_image=mask, num_inference_steps=5, height=SIZE, width=SIZE,
                                    output_type="np", generator=torch.Generator().manual_seed(0)).images)
    assert_parity(ours_with(ours, "a cat", image=image, mask=mask), expected.permute(0, 3, 1, 2) * 2 - 1, TOL,
                  prompt="a dog", guidance=1.0)
    with pytest.raises(ValueError, match="inpainting model"):
        our_images(ours, "a cat")


def test_bad_input_is_named(reference, tmp_path):
    _, folder = reference
    pipe = load_pipeline(folder)
    with pytest.raises(ValueError, match="multiples of 2"):
        pipe("a cat", width=33, height=32, num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match="empty prompt"):
        pipe("  ", num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match=r"strength must be in \[0, 1\]"):
        pipe.img2img(Image.new("RGB", (SIZE, SIZE)), "a cat", strength=1.5)
    with pytest.raises(ValueError, match="unknown sampler 'plms'"):
        pipe("a cat", sampler="plms", width=SIZE, height=SIZE)
    with pytest.raises(ValueError, match="image is 16×16 but the output is 32×32"):
        our_images(pipe, "a cat", image=Image.new("RGB", (16, 16)), strength=0.5)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_pipeline(tmp_path / "nothing.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((folder / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        load_pipeline(tmp_path / "cut.safetensors")


def test_family_detection_names_what_it_found():
    four = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 768)}
    assert detect_config(four).family == "sd1"
    nine = four | {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 9, 3, 3)}
    assert detect_config(nine).inpainting
    sd2 = four | {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 1024)}
    assert (detect_config(sd2).family, detect_config(sd2).pad, detect_config(sd2).unet.head_dim) == ("sd2", "zero", 64)
    odd = four | {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 512)}
    with pytest.raises(UnsupportedCheckpoint, match="context width 512; 768 is SD 1.x, 1024 is SD 2.x"):
        detect_config(odd)
    with pytest.raises(UnsupportedCheckpoint, match="XL"):
        detect_config({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.zeros(1)})
    with pytest.raises(UnsupportedCheckpoint, match="top-level names found: encoder, features; known families"):
        detect_config({"encoder.weight": torch.zeros(1), "features.0.weight": torch.zeros(1)})


def test_inspect_reports_components_and_unknown_keys(reference, tmp_path):
    _, folder = reference
    pipe = load_pipeline(folder)
    counts = {"unet": sum(p.numel() for p in pipe.unet.parameters()), "vae": sum(p.numel() for p in pipe.vae.parameters()),
              "text_encoder": sum(p.numel() for p in pipe.text_encoder.parameters())}
    report = inspect_checkpoint(folder)
    assert report["parameters"] == counts and report["unrecognised"] == []
    from safetensors.torch import load_file, save_file

    state = load_file(save_single_file(pipe, tmp_path / "m.safetensors"))
    assert inspect_checkpoint(tmp_path / "m.safetensors", config=pipe.config)["unrecognised"] == []
    # keys no component claims — a stray LoRA weight, a misspelt UNet key — are named, and exactly those;
    # the schedule's buffers and position_ids, which single files carry, are not
    unknown = {"lora_te_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(4.0),
               "model.diffusion_model.input_blocks.0.0.wieght": torch.zeros(1)}
    known_extras = {"alphas_cumprod": torch.ones(1000), "cond_stage_model.transformer.text_model.embeddings.position_ids":
                    torch.arange(77)[None]}
    save_file(state | unknown | known_extras, tmp_path / "extra.safetensors")
    report = inspect_checkpoint(tmp_path / "extra.safetensors", config=pipe.config)
    assert report["unrecognised"] == sorted(unknown) and report["parameters"] == counts
    from ldm.cli import main

    out = tmp_path / "img.png"
    main(["convert", str(folder), str(tmp_path / "single.safetensors")])
    assert (tmp_path / "single.safetensors").is_file()
    main(["txt2img", "--checkpoint", str(folder), "--prompt", "a cat", "--steps", "2", "--width", str(SIZE),
          "--height", str(SIZE), "--out", str(out)])
    assert Image.open(out).size == (SIZE, SIZE)
    assert json.loads(json.dumps(inspect_checkpoint(folder)))["format"] == "diffusers folder"


def test_spacing_absent_from_the_config_means_each_samplers_default(reference):
    _, folder = reference
    pipe = load_pipeline(folder)
    pipe.config = pipe.config.with_(spacing=None)  # as SD 1.5's scheduler_config.json, which has no timestep_spacing
    for sampler, spacing in (("ddim", "leading"), ("dpm++2m", "linspace"), ("euler_a", "linspace")):
        assert torch.equal(pipe.sampler_options(sampler, 4)["timesteps"], pipe.timesteps(sampler, 4, spacing))
    assert not torch.equal(pipe.timesteps("ddim", 4, "leading"), pipe.timesteps("ddim", 4, "linspace"))


def test_attention_slicing_and_vae_tiles_keep_the_image(reference, monkeypatch):
    _, folder = reference
    pipe = load_pipeline(folder)
    records = list(pipe.loop("a lighthouse", num_inference_steps=2, width=SIZE, height=SIZE, sampler="ddim"))
    pipe.enable_attention_slicing(5)
    sliced = list(pipe.loop("a lighthouse", num_inference_steps=2, width=SIZE, height=SIZE, sampler="ddim"))
    # float32 rounding of the reordered sums only: the latents are ~3 (up to 13) after guided steps with loud
    # weights, and differ by ~4e-5 (1e-5 sufficed for the old whispering fixture); a new prompt moves them by ~10
    assert torch.allclose(sliced[-1].x_prev, records[-1].x_prev, atol=2e-4)
    latents = records[-1].x_prev
    assert pipe.decode(latents, tile=8).shape == (1, 3, SIZE, SIZE)

    # enable_vae_tiling: decode and the img2img/inpainting encode tile by default; an explicit tile= still wins
    whole = pipe.decode(latents)
    pipe.enable_vae_tiling(8)
    assert torch.equal(pipe.decode(latents), pipe.decode(latents, tile=8))
    assert not torch.equal(pipe.decode(latents), whole)
    assert torch.equal(pipe.decode(latents, tile=16), whole)  # 16×16 latents fit in one 16-tile
    tiles = []  # the tile each VAE encode gets (pipe.encode is what img2img and inpainting call)
    encode = pipe.vae.encode
    monkeypatch.setattr(pipe.vae, "encode", lambda x, tile=None: tiles.append(tile) or encode(x, tile=tile))
    pipe.encode(whole, torch.Generator().manual_seed(0))
    pipe.enable_vae_tiling(None)
    assert torch.equal(pipe.decode(latents), whole)
    pipe.encode(whole)
    assert tiles == [8, None]
    with pytest.raises(ValueError, match="VAE tile must be an integer of at least 4 latent pixels"):
        pipe.enable_vae_tiling(2)


def test_inspect_single_file_names_ema_and_unknown_keys(reference, tmp_path):
    _, folder = reference
    pipe = load_pipeline(folder)
    from safetensors.torch import load_file, save_file

    state = load_file(save_single_file(pipe, tmp_path / "m.safetensors"))
    ema = {"model_ema." + "".join(k.split(".")[1:]): v.clone() for k, v in state.items() if k.startswith("model.diffusion_model.")}
    extra = {"betas": torch.zeros(1000), "model_ema.decay": torch.tensor(0.9), "lora_unet_down.alpha": torch.tensor(1.0)}
    save_file(state | ema | extra, tmp_path / "ema.safetensors")
    report = inspect_checkpoint(tmp_path / "ema.safetensors", config=pipe.config)
    assert report["ema"] and report["unrecognised"] == ["lora_unet_down.alpha"]
    assert report["dtypes"]["unet"] == ["float32"]
    assert report["parameters"]["text_encoder"] == sum(p.numel() for p in pipe.text_encoder.parameters())


def test_folder_with_fp16_variant_and_bin_weights(reference, tmp_path):
    import shutil

    _, folder = reference
    copy = shutil.copytree(folder, tmp_path / "copy")
    from safetensors.torch import load_file, save_file

    unet = copy / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({k: v.half() for k, v in load_file(unet).items()}, copy / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    unet.unlink()  # only the variant is left: it is taken
    text = copy / "text_encoder" / "model.safetensors"
    torch.save(load_file(text), copy / "text_encoder" / "pytorch_model.bin")
    text.unlink()
    pipe = load_pipeline(copy, variant="fp16")
    assert pipe.dtype == torch.float32  # the requested dtype, whatever the file's
    original = load_pipeline(folder)
    key = "conv_in.weight"
    assert torch.equal(pipe.unet.state_dict()[key], original.unet.state_dict()[key].half().float())
    assert all(torch.equal(a, b) for a, b in zip(pipe.text_encoder.parameters(), original.text_encoder.parameters()))
    (copy / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no vae weights"):
        load_pipeline(copy)


def test_mask_of_the_wrong_size_is_named(tmp_path):
    unet, vae, text = tiny_components(in_channels=9)
    tokenizer = write_vocab(tmp_path / "vocab")
    ref = diffusers.StableDiffusionInpaintPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                                   scheduler=diffusers.DDIMScheduler(), safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False)
    ref.save_pretrained(tmp_path / "pipe")
    pipe = load_pipeline(tmp_path / "pipe")
    with pytest.raises(ValueError, match="mask is 16×16 but the output is 32×32"):
        pipe.inpaint(Image.new("RGB", (SIZE, SIZE)), Image.new("L", (16, 16)), "a cat", num_inference_steps=1)


def test_cli_img2img_with_trajectory_and_inspect_output(reference, tmp_path, capsys):
    _, folder = reference
    from ldm.cli import main

    Image.new("RGB", (SIZE, SIZE), (200, 30, 30)).save(tmp_path / "in.png")
    main(["img2img", "--checkpoint", str(folder), "--image", str(tmp_path / "in.png"), "--prompt", "a cat",
          "--strength", "0.5", "--steps", "4", "--sampler", "euler_a", "--trajectory", "--vae-tile", "8",
          "--out", str(tmp_path / "out.png")])
    assert Image.open(tmp_path / "out.png").size == (SIZE, SIZE)
    assert (tmp_path / "out_trajectory.png").is_file()
    main(["inspect", str(folder)])
    out = capsys.readouterr().out
    assert "diffusers folder" in out and "unet" in out and "float32" in out
    with pytest.raises(SystemExit):
        main(["txt2img", "--checkpoint", str(folder), "--prompt", "a cat", "--width", "31", "--steps", "1",
              "--out", str(tmp_path / "x.png")])
    assert "multiples of 2" in capsys.readouterr().err


@pytest.mark.slow
def test_full_size_sd15_single_file_is_detected_loaded_and_sampled(tmp_path):
    """A random-weight SD 1.5 at full size, written as an original-layout fp16 file the size of the public one,
    then read back the way a downloaded checkpoint is: family detection, EMA-less import on the meta device."""
    from ldm.sd_config import StableDiffusionConfig
    from ldm.stable_diffusion import StableDiffusion
    from ldm.text_encoder import TextEncoder
    from ldm.tokenizer import CLIPTokenizer
    from ldm.unet import UNet
    from ldm.vae import AutoencoderKL

    config = StableDiffusionConfig.sd15()
    torch.manual_seed(0)
    pipe = StableDiffusion(CLIPTokenizer.from_bundled(), TextEncoder(config.text), UNet(config.unet), AutoencoderKL(config.vae),
                           config).to(dtype=torch.float16)
    path = save_single_file(pipe, tmp_path / "sd15.safetensors")
    # fp16 text encoder and UNet, fp32 VAE (kept so by .to(float16)): 2 · 982.6 M + 4 · 83.7 M bytes
    assert path.stat().st_size == pytest.approx(2 * (123_060_480 + 859_520_964) + 4 * 83_653_863, rel=1e-3)
    report = inspect_checkpoint(path)
    assert report["family"] == "sd1" and report["unrecognised"] == [] and report["dtypes"]["unet"] == ["float16"]
    assert report["parameters"] == {"text_encoder": 123_060_480, "unet": 859_520_964, "vae": 83_653_863}
    loaded = load_pipeline(path)
    assert loaded.dtype == torch.float32
    assert torch.equal(loaded.unet.conv_in.weight, pipe.unet.conv_in.weight.float())
    images = loaded("a lighthouse", width=128, height=128, num_inference_steps=2, progress=False)
    assert images[0].size == (128, 128)


def test_sd2_prediction_is_chosen_from_what_the_file_says():
    from ldm.sd_checkpoint import choose_prediction
    from ldm.sd_config import StableDiffusionConfig

    sd2 = StableDiffusionConfig.sd2()
    assert choose_prediction(sd2, {}, {}, None)[0] == "v"  # the 768 models, as diffusers assumes
    assert choose_prediction(sd2, {}, {"global_step": 875000}, None) == ("eps", "global_step 875000, the 2-base release")
    assert choose_prediction(sd2, {}, {"modelspec.prediction_type": "epsilon"}, None)[0] == "eps"
    assert choose_prediction(sd2, {"v_pred": torch.zeros(())}, {}, None)[0] == "v"
    assert choose_prediction(sd2, {}, {"global_step": 875000}, "v") == ("v", "set by the caller")
    assert choose_prediction(StableDiffusionConfig.sd2(in_channels=9), {}, {}, None)[0] == "eps"
    assert choose_prediction(StableDiffusionConfig.sd15(), {}, {}, None)[0] == "eps"


def test_a_config_that_does_not_describe_the_modules_is_refused(reference):
    from ldm.stable_diffusion import StableDiffusion

    _, folder = reference
    pipe = load_pipeline(folder)
    wrong = pipe.config.with_(unet=pipe.config.unet.with_(num_heads=2))
    with pytest.raises(ValueError, match=r"config.unet does not describe the unet module passed in: num_heads=2 \(module: 4\)"):
        StableDiffusion(pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae, wrong)
