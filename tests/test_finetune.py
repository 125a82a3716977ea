"""``ldm finetune`` on tiny models saved to disk: LoRA on Stable Diffusion and on toy runs learns its data and loads
back, a resume is exact, textual inversion trains only the new rows, full fine-tuning writes a model like its input,
and bad input is refused by name."""

import numpy as np
import pytest
import torch
from PIL import Image

from ldm import load_pipeline
from ldm.class_embedding import add_class_embedding, load_class_embedding
from ldm.cli import main
from ldm.conditioning import Conditioning
from ldm.config import to_dict
from ldm.convert.lora import read_lora
from ldm.data.captions import write_digit_folder
from ldm.embeddings import read_embedding
from ldm.finetune import FinetuneConfig, Finetuner, finetune
from ldm.latent import encode_dataset
from ldm.losses import diffusion_loss
from ldm.runs import load_vae
from ldm.sd_checkpoint import save_diffusers_folder
from ldm.sd_config import StableDiffusionConfig
from ldm.stable_diffusion import StableDiffusion
from ldm.text_encoder import TextEncoder, TextEncoderConfig
from ldm.tokenizer import CLIPTokenizer
from ldm.train import TrainConfig, Trainer
from ldm.train_vae import VAETrainConfig
from ldm.unet import UNet, UNetConfig
from ldm.vae import AutoencoderKL, VAEConfig
from _fixtures import loud

SIZE = 32  # pixels; the tiny VAE halves once → 16×16 latents
QUICK = dict(sample_n=0)  # no sample grids unless a test looks at them


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """A tiny SD 1-shaped pipeline (loud UNet and VAE, so a LoRA's change reaches the image) as a diffusers folder."""
    unet = UNetConfig.sd15().with_(channels=32, channel_mult=(1, 2), attention=(True, False), num_res_blocks=1,
                                   context_dim=32, num_heads=2, norm_groups=8)
    vae = VAEConfig.sd().with_(channels=32, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8)
    text = TextEncoderConfig(width=32, layers=2, heads=4, mlp_dim=64)
    torch.manual_seed(0)
    pipe = StableDiffusion(CLIPTokenizer.from_bundled(), TextEncoder(text), loud(UNet(unet), None, peaky=2.0),
                           loud(AutoencoderKL(vae), None, seed=1), StableDiffusionConfig(unet=unet, vae=vae, text=text,
                                                                                          size=SIZE))
    return save_diffusers_folder(pipe, tmp_path_factory.mktemp("sd") / "model")


def photo_folder(path, n=3, captions=None):
    """``n`` random non-square RGB images (cropped to squares when read), with .txt captions if given."""
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(path)))
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path / f"img{i}.png")
        if captions:
            (path / f"img{i}.txt").write_text(captions[i])
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return photo_folder(tmp_path_factory.mktemp("photos"))


TOY_UNET = UNetConfig(in_channels=1, out_channels=1, sample_size=28, channels=16, channel_mult=(1, 2),
                      num_res_blocks=1, attention=(False, True), mid_attention=False, head_dim=16, norm_groups=8)
LATENT_UNET = UNetConfig(in_channels=2, out_channels=2, sample_size=16, channels=16, channel_mult=(1, 2),
                         num_res_blocks=1, attention=(False, True), head_dim=16, norm_groups=8, context_dim=16,
                         label_context=True, num_classes=10)


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, mnist_small):
    """An unconditional pixel-space `ldm train` run, two steps old."""
    out = tmp_path_factory.mktemp("toy")
    config = TrainConfig(unet=TOY_UNET, sample_n=0).with_(batch_size=16, steps=2, warmup_steps=1, sample_every=0)
    Trainer(config, out, dataset=mnist_small, progress=False).train()
    return out


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory, mnist_small):
    """A class-conditional latent run (labels as a one-token context) on a tiny VAE, a few steps old."""
    from ldm.data import ImageDataset

    x = torch.nn.functional.interpolate(mnist_small.images[:128].float(), size=32, mode="bilinear")
    digits = ImageDataset(x.round().clamp(0, 255).to(torch.uint8), mnist_small.labels[:128], 10, name="digits32")
    vae_dir = tmp_path_factory.mktemp("vae")  # an untrained VAE written as a `ldm train-vae` run: no need to train it
    vae = VAEConfig(in_channels=1, out_channels=1, latent_channels=2, channels=16, channel_mult=(1, 2),
                    num_res_blocks=1, norm_groups=8, scaling_factor=1.0)
    weights = AutoencoderKL(vae).state_dict()
    torch.save({"config": to_dict(VAETrainConfig(vae=vae, image_size=32)), "model": weights,
                "ema": {"decay": 0.0, "num_updates": 0, "model": weights}}, vae_dir / "checkpoint.pt")
    out = tmp_path_factory.mktemp("latent")
    config = TrainConfig(unet=LATENT_UNET, vae=str(vae_dir), clip_sample=False, sample_n=0).with_(
        batch_size=16, steps=3, sample_every=0, warmup_steps=1)
    Trainer(config, out, dataset=encode_dataset(load_vae(vae_dir)[0], digits), progress=False).train()
    return out


def fixed_loss(tuner: Finetuner) -> float:
    """The diffusion loss on all the run's images at 8 fixed timesteps and noises (cached text states)."""
    part = tuner.data
    n = len(part.data)
    index = torch.arange(n).repeat(8)
    x0, _ = part.data.batch(index, torch.Generator().manual_seed(1))
    t = torch.linspace(20, 980, len(index)).long()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return diffusion_loss(tuner.denoise, tuner.schedule, x0, prediction=tuner.prediction, t=t, noise=noise,
                              cond=Conditioning(context=part.context[index])).mean().item()


def test_lora_on_stable_diffusion_overfits_and_loads_back(sd_folder, tmp_path):
    data = photo_folder(tmp_path / "one", n=1)
    config = FinetuneConfig(str(sd_folder), str(data), caption="a photo of sks dog", diffusers_format=True,
                            targets="transformer", sample_n=2, sample_steps=2).with_(steps=20, lr=2e-2)
    tuner = finetune(config, tmp_path / "run", progress=False, device="cpu")
    loras = tuner.model["unet"]
    after = fixed_loss(tuner)
    loras.scale = 0.0
    before = fixed_loss(tuner)
    loras.scale = 1.0
    assert after < 0.8 * before, (before, after)
    assert (tmp_path / "run" / "samples.png").is_file()
    assert "ldm txt2img --checkpoint" in tuner.usage() and "--lora" in tuner.usage()
    # the kohya file holds exactly the trained layers, and a fresh pipeline's load_lora reads them back
    assert read_lora(tmp_path / "run" / "lora.safetensors").format == "kohya"
    assert read_lora(tmp_path / "run" / "pytorch_lora_weights.safetensors").format == "diffusers"
    pipe = load_pipeline(sd_folder, device="cpu")
    name = pipe.load_lora(tmp_path / "run" / "lora.safetensors")
    loaded = dict(pipe.loras[name]["unet"].items())
    assert loaded.keys() == dict(loras.items()).keys()
    assert all(torch.equal(loaded[k].up.weight, layer.up.weight) for k, layer in loras.items())
    images = {scale: (pipe.set_lora_scale(name, scale), pipe("a photo of sks dog", num_inference_steps=3,
                                                              progress=False, output="tensor"))[1] for scale in (0, 1)}
    assert (images[1] - images[0]).abs().max() > 0.05


def test_resume_is_exact(sd_folder, photos, tmp_path):
    """Two half-runs are one run, bit for bit — with prior preservation, a text-encoder LoRA and two micro-batches
    per step; the checkpoint holds only the LoRA."""
    classes = photo_folder(tmp_path / "class", n=2)
    config = FinetuneConfig(str(sd_folder), str(photos), caption="a photo of sks dog", class_data=str(classes),
                            class_caption="a photo of a dog", train_text_encoder=True, grad_accum=2,
                            **QUICK).with_(steps=2, lr=1e-2)
    whole = finetune(config, tmp_path / "whole", progress=False, device="cpu")
    finetune(config.with_(steps=1), tmp_path / "half", progress=False, device="cpu")
    halves = finetune(config, tmp_path / "half", resume=True, progress=False, device="cpu")
    assert halves.step == whole.step == 2 and halves.losses == whole.losses
    a, b = whole.model.state_dict(), halves.model.state_dict()
    assert {k.split(".")[0] for k in a} == {"unet", "text_encoder"}
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "whole" / "lora.safetensors").read_bytes() == (tmp_path / "half" / "lora.safetensors").read_bytes()
    state = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    assert state["model"].keys() == a.keys()


def test_full_and_textual_inversion_on_stable_diffusion(sd_folder, photos, tmp_path):
    full = finetune(FinetuneConfig(str(sd_folder), str(photos), method="full", caption="a photo of sks dog", **QUICK)
                    .with_(steps=1, lr=1e-3), tmp_path / "full", progress=False, device="cpu")
    base = load_pipeline(sd_folder, device="cpu")
    tuned = load_pipeline(tmp_path / "full" / "model", device="cpu")  # a diffusers folder, like the input
    assert not all(torch.equal(a, b) for a, b in zip(base.unet.parameters(), tuned.unet.parameters()))
    assert f"ldm txt2img --checkpoint {tmp_path / 'full' / 'model'}" in full.usage()

    pipe = load_pipeline(sd_folder, device="cpu")
    weights = [(p, p.detach().clone()) for m in pipe.models for p in m.parameters()]
    config = FinetuneConfig(str(sd_folder), str(photos), method="textual-inversion", token="<cat-toy>",
                            init_word="cat", vectors=2, **QUICK).with_(steps=3)
    tuner = finetune(config, tmp_path / "ti", progress=False, device="cpu", pipe=pipe)
    assert all(torch.equal(p, w) for p, w in weights)  # the base, bit for bit
    embedding = read_embedding(tmp_path / "ti" / "embedding.safetensors")
    assert embedding.format == "kohya" and embedding.vectors["text"].shape == (2, 32)
    start = pipe.text_encoder.token_embedding.weight[pipe.tokenizer.encode("cat")[0]]
    assert not torch.equal(embedding.vectors["text"][0], start)  # learned, from the init word's row
    assert tuner.data.captions[0] == "a photo of <cat-toy>"  # uncaptioned images are "a photo of TOKEN"
    assert "--prompt 'a photo of embedding'" in tuner.usage()  # the word is the file's name, as A1111 reads it
    fresh = load_pipeline(sd_folder, device="cpu")
    assert fresh.load_embedding(tmp_path / "ti" / "embedding.safetensors", token="<cat-toy>")[0] == "<cat-toy>"


def test_lora_on_a_toy_run(toy_run, tmp_path):
    config = FinetuneConfig(str(toy_run), "mnist-bundled:3", limit=32, sample_n=4, sample_steps=2).with_(steps=4)
    tuner = finetune(config, tmp_path / "run", progress=False, device="cpu")
    assert tuner.config.targets == "attention+conv" and tuner.config.loop.lr == 3e-3
    assert tuner.config.loop.batch_size == 32
    assert (tmp_path / "run" / "samples.png").is_file()
    assert f"ldm sample {toy_run}" in tuner.usage()
    pipe = load_pipeline(toy_run, device="cpu")
    base = pipe(2, num_inference_steps=3, progress=False, output="tensor")
    pipe.load_lora(tmp_path / "run" / "lora.safetensors")
    assert not torch.equal(pipe(2, num_inference_steps=3, progress=False, output="tensor"), base)


def test_a_lora_on_one_digit_specialises_the_model_and_scale_zero_is_the_base(mnist_small, tmp_path):
    """The README's adaptation recipe in seconds: a base trained briefly on all digits, a LoRA on 64 threes. On
    threes the LoRA has not seen its loss falls well below the base's, by far more than on other digits; at
    scale 0 the pipeline samples the base model's images bit for bit."""
    from ldm.data import load_dataset

    config = TrainConfig(unet=TOY_UNET, sample_n=0).with_(batch_size=32, steps=150, lr=2e-3, warmup_steps=10,
                                                          sample_every=0)
    Trainer(config, tmp_path / "base", dataset=mnist_small, progress=False).train()
    tune = FinetuneConfig(str(tmp_path / "base"), "mnist-bundled:3", limit=64, rank=8, **QUICK).with_(steps=120)
    finetune(tune, tmp_path / "lora", progress=False, device="cpu")

    data = load_dataset("mnist-bundled")
    threes, others = (data.labels == 3).nonzero().flatten(), (data.labels != 3).nonzero().flatten()
    held_out = {"threes": threes[200:328], "others": others[-128:]}  # the LoRA saw threes[:64]
    pipe = load_pipeline(tmp_path / "base", device="cpu")

    def loss(indices) -> float:
        x0 = data.images[indices].float() / 127.5 - 1
        t = torch.linspace(50, 900, len(x0)).long()
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            return diffusion_loss(pipe.unet, pipe.schedule, x0, t=t, noise=noise).mean().item()

    before = {name: loss(i) for name, i in held_out.items()}
    base_images = pipe(4, num_inference_steps=5, seed=1, progress=False, output="tensor")
    pipe.load_lora(tmp_path / "lora" / "lora.safetensors", scale=0.0)
    assert torch.equal(pipe(4, num_inference_steps=5, seed=1, progress=False, output="tensor"), base_images)
    pipe.set_lora_scale("lora", 1.0)
    after = {name: loss(i) for name, i in held_out.items()}
    gain = {name: 1 - after[name] / before[name] for name in held_out}
    assert gain["threes"] > 0.05 and gain["threes"] > gain["others"] + 0.05, (before, after)


def test_toy_runs_from_a_folder_of_digits(toy_run, latent_run, tmp_path):
    """A folder of PNGs (made from the bundled MNIST): full fine-tuning of a pixel run writes a run `ldm sample`
    reads; a LoRA on a class-conditional latent run learns the unlabelled images as the null class ∅."""
    folder = write_digit_folder(7, tmp_path / "sevens", limit=8)
    assert len(list(folder.glob("7_*.png"))) == 8
    finetune(FinetuneConfig(str(toy_run), str(folder), method="full", **QUICK).with_(steps=2, batch_size=8),
             tmp_path / "full",
             progress=False, device="cpu")
    tuned, base = load_pipeline(tmp_path / "full" / "model", device="cpu"), load_pipeline(toy_run, device="cpu")
    assert not all(torch.equal(a, b) for a, b in zip(tuned.unet.parameters(), base.unet.parameters()))
    tuner = finetune(FinetuneConfig(str(latent_run), str(folder), sample_n=2, sample_steps=2).with_(steps=2,
                                                                                                  batch_size=8),
                     tmp_path / "lora", progress=False, device="cpu")
    assert tuner.data.labels.tolist() == [10] * 8 and tuner.data.data.mean.shape == (8, 2, 16, 16)
    assert (tmp_path / "lora" / "samples.png").is_file()


def test_textual_inversion_on_a_toy_run_learns_only_a_new_class(latent_run, tmp_path):
    pipe = load_pipeline(latent_run, device="cpu")
    weights = [(p, p.detach().clone()) for p in pipe.unet.parameters()]
    config = FinetuneConfig(str(latent_run), "mnist-bundled:3", method="textual-inversion", init_word="8", limit=32,
                            sample_n=4, sample_steps=2).with_(steps=5)
    tuner = finetune(config, tmp_path / "run", progress=False, device="cpu", pipe=pipe)
    assert all(torch.equal(p, w) for p, w in weights)  # the base, bit for bit
    assert tuner.optimizer.param_groups[0]["params"] == [tuner.model["class_embedding"]]
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"].keys() == {"class_embedding"}
    rows = load_class_embedding(tmp_path / "run" / "embedding.safetensors")
    assert rows.shape == (1, 16)
    assert not torch.equal(rows[0], load_pipeline(latent_run, device="cpu").unet.class_embedding.weight[8])
    assert "label 10" in tuner.usage()
    fresh = load_pipeline(latent_run, device="cpu")
    assert add_class_embedding(fresh.unet, rows) == [10]
    images = fresh(2, class_label=10, guidance_scale=2.0, num_inference_steps=2, progress=False, output="tensor")
    assert images.shape == (2, 1, 32, 32)


def run_cli(capsys, *args) -> str:
    """``ldm finetune ARGS`` expected to fail: its error message."""
    with pytest.raises(SystemExit):
        main(["finetune", *map(str, args)])
    return capsys.readouterr().err


def test_bad_input_is_refused_by_name(sd_folder, toy_run, photos, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    common = ["--out", tmp_path / "run", "--steps", 1, "--sample-n", 0, "--device", "cpu"]
    assert "no images" in (err := run_cli(capsys, "--checkpoint", sd_folder, "--data", empty, *common)) and "empty" in err
    broken = photo_folder(tmp_path / "broken", n=2)
    (broken / "img1.png").write_bytes(b"not a png")
    err = run_cli(capsys, "--checkpoint", sd_folder, "--data", broken, *common)
    assert "cannot read 1 of 2 images" in err and "img1.png" in err
    err = run_cli(capsys, "--checkpoint", toy_run, "--data", "mnist-bundled:3", "--method", "textual-inversion", *common)
    assert "unconditional" in err and "--method lora" in err
    err = run_cli(capsys, "--checkpoint", sd_folder, "--data", photos, "--method", "textual-inversion",
                  "--caption", "a dog", *common)
    assert "<sks>" in err and "3 of 3" in err
    err = run_cli(capsys, "--checkpoint", sd_folder, "--data", photos, "--batch-size", 5, *common)
    assert "--batch-size 5" in err
    err = run_cli(capsys, "--checkpoint", sd_folder, "--data", photos, *common[:2])
    assert "budget" in err
    main(["finetune", "--checkpoint", str(sd_folder), "--data", str(photos), "--caption", "sks", *map(str, common)])
    assert "wrote" in capsys.readouterr().out
    assert "--resume" in run_cli(capsys, "--checkpoint", sd_folder, "--data", photos, *common)


def test_long_captions_are_counted_once(sd_folder, tmp_path):
    long = "a very " + "very " * 80 + "long caption"
    data = photo_folder(tmp_path / "data", n=3, captions=[long, "short", long])
    with pytest.warns(UserWarning, match="2 of 3 captions") as record:
        Finetuner(FinetuneConfig(str(sd_folder), str(data), **QUICK).with_(steps=1), tmp_path / "run",
                  progress=False, device="cpu")
    assert len([w for w in record if "captions" in str(w.message)]) == 1


@pytest.mark.reference
def test_diffusers_reads_the_trained_lora(sd_folder, photos, tmp_path):
    """The kohya file of a LoRA trained on the tiny SD folder: diffusers' ``load_lora_weights`` on the same folder
    gives ldm's latents, and the LoRA moves them far more than the tolerance."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from test_lora_parity import REL, our_latents, ref_latents, rel

    prompt = "a photo of sks dog"
    finetune(FinetuneConfig(str(sd_folder), str(photos), caption=prompt, **QUICK).with_(steps=3, lr=3e-2),
             tmp_path / "run", progress=False, device="cpu")
    path = tmp_path / "run" / "lora.safetensors"
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder, safety_checker=None)
    theirs.set_progress_bar_config(disable=True)
    theirs.load_lora_weights(str(path), adapter_name="sks")
    expected = ref_latents(theirs, prompt)
    ours = load_pipeline(sd_folder, device="cpu")
    name = ours.load_lora(path)
    assert rel(our_latents(ours, "ddim", prompt), expected) < REL
    ours.set_lora_scale(name, 0.0)
    assert rel(our_latents(ours, "ddim", prompt), expected) > 20 * REL


def test_the_loss_is_dreambooths_and_accumulates_exactly(sd_folder, photos, tmp_path):
    """L = L_instance + λ·L_class (Ruiz et al. 2023, Eq. 2): linear in λ at fixed draws; and the gradient of a step
    of K = 2 micro-batches (the first one's gradient carried as θ·g − sg(θ·g)) is the mean of the two batches'."""
    classes = photo_folder(tmp_path / "class", n=2)
    tuner = Finetuner(FinetuneConfig(str(sd_folder), str(photos), caption="a photo of sks dog", class_data=str(classes),
                                     class_caption="a photo of a dog", grad_accum=2, **QUICK).with_(steps=1),
                      tmp_path / "run", progress=False, device="cpu")
    for _, layer in tuner.model["unet"].items():  # a LoRA that does something, so that it has gradients
        torch.nn.init.normal_(layer.up.weight, std=0.1)
    state = tuner.generator.get_state()

    def at(weight):
        tuner.generator.set_state(state)
        tuner.config = tuner.config.with_(prior_weight=weight)
        with torch.no_grad():
            return tuner.micro_loss(0).item()

    losses = [at(w) for w in (0.0, 1.0, 2.0)]
    assert losses[2] - losses[1] == pytest.approx(losses[1] - losses[0], rel=1e-5) and losses[1] > losses[0]
    params = list(tuner.model.parameters())

    def grads(run):
        tuner.generator.set_state(state)
        for p in params:
            p.grad = None
        run().backward()
        return [p.grad.clone() for p in params]

    accumulated = grads(tuner.loss)
    tuner.generator.set_state(state)
    separate = [torch.autograd.grad(tuner.micro_loss(k) / 2, params) for k in (0, 1)]
    assert all(torch.allclose(a, g0 + g1, atol=1e-6) for a, g0, g1 in zip(accumulated, *separate))
