"""LoRA files against diffusers' ``load_lora_weights``. A random LoRA, made with peft on the tiny loud SD 1 and SDXL
pipelines of test_stable_diffusion(_xl).py and written in kohya and diffusers layouts, moves ldm's latents as it
moves diffusers' at strengths 1 and 0.5, text encoders included, and the files ldm writes give diffusers the same
latents again; a LoCon (ResBlock convolutions) too, fused and unfused, and unloading it leaves the base model
bit for bit."""

import copy
import functools

import pytest
import torch
from safetensors.torch import save_file

from ldm import load_pipeline
from ldm.convert.lora import save_lora
from _fixtures import assert_sensitive
from test_stable_diffusion import SIZE, reference  # noqa: F401  (the SD 1 fixture)
from test_stable_diffusion_xl import sdxl  # noqa: F401  (the SDXL fixture)

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.reference, pytest.mark.filterwarnings("ignore:Already found a `peft_config`")]

STEPS = 3
# rel error (‖Δ‖/‖expected‖) of the final latents: measured ~3e-6 (float32 rounding), the LoRA moves them by ~0.5–1
REL = 1e-3
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
TRANSFORMER = ATTENTION + ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
CONVS = ["conv1", "conv2", "conv_shortcut", "time_emb_proj"]
TEXT = ["q_proj", "k_proj", "v_proj", "out_proj"]
COMPONENTS = {"reference": ("unet", "text_encoder"), "sdxl": ("unet", "text_encoder", "text_encoder_2")}


@pytest.fixture(autouse=True)
def peft_for_transformers(monkeypatch):
    """diffusers loads a text encoder's LoRA through transformers' ``load_adapter``, and transformers 5.24 asks for a
    peft (≥ 0.22) that has not been released; 0.21 does the job, so its version check is waved through here."""
    import transformers.integrations.peft as transformers_peft

    try:
        transformers_peft.check_peft_version(min_version=transformers_peft.MIN_PEFT_VERSION)
    except ValueError:
        monkeypatch.setattr(transformers_peft, "check_peft_version", lambda **_: None)


def peft_lora(model, targets, seed, rank=4, alpha=8):
    """peft's LoRA on a copy of ``model`` with random A and B (``init_lora_weights=False``: B is not zero, and
    B·A·α/r is about as large as the layer's own loud weights): (state dict under ``model``'s names, config)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    torch.manual_seed(seed)
    adapted = inject_adapter_in_model(config, copy.deepcopy(model))
    return get_peft_model_state_dict(adapted), config


@functools.cache
def lora_parts(ref, unet_targets=tuple(TRANSFORMER)):
    """A random peft LoRA for ``ref``'s UNet and text encoder(s) (MLPs too in SDXL's second): component → (state
    dict, config). Made once per pipeline and target list, and written in each layout by ``make_lora``."""
    parts = {"unet": peft_lora(ref.unet, list(unet_targets), 0), "text_encoder": peft_lora(ref.text_encoder, TEXT, 1)}
    if isinstance(ref, diffusers.StableDiffusionXLPipeline):
        parts["text_encoder_2"] = peft_lora(ref.text_encoder_2, TEXT + ["fc1", "fc2"], 2)
    return parts


def make_lora(ref, family, fmt, path, unet_targets=TRANSFORMER):
    """``lora_parts`` written to ``path`` in ``fmt``: kohya as A1111 files are (``lora_te_text_model_…``, SDXL
    ``lora_te1_`` / ``lora_te2_``, α = 8 in ``.alpha`` keys), or diffusers' ``save_lora_weights`` (peft names, α in
    its metadata)."""
    parts = lora_parts(ref, tuple(unet_targets))
    if fmt == "diffusers":
        layers = {f"{c}_lora_layers": sd for c, (sd, _) in parts.items()}
        metadata = {f"{c}_lora_adapter_metadata": config.to_dict() for c, (_, config) in parts.items()}
        type(ref).save_lora_weights(path.parent, weight_name=path.name, **layers, **metadata)
        return path
    from diffusers.utils import convert_state_dict_to_kohya

    # transformers 5's CLIPTextModel has no text_model level (CLIPTextModelWithProjection still has); A1111's do
    prefixed = {f"{c}.{'text_model.' * (c.startswith('text') and not k.startswith('text_model.'))}{k}": v
                for c, (sd, _) in parts.items() for k, v in sd.items()}
    kohya = {k: torch.tensor(8.0) if k.endswith(".alpha") else v.contiguous()  # diffusers writes α = r
             for k, v in convert_state_dict_to_kohya(prefixed).items()}
    if family == "reference":  # SD 1 files have one text encoder, "lora_te_"
        kohya = {k.replace("lora_te1_", "lora_te_"): v for k, v in kohya.items()}
    save_file(kohya, path)
    return path


@pytest.fixture
def ours_of():
    """``ours_of(folder)``: ldm's pipeline of a reference folder, loaded once; the LoRAs a test loads into it are
    unloaded after the test (exactly: test_locon_… checks that)."""
    used = []

    def pipeline(folder):
        used.append(ldm_pipeline(folder))
        return used[-1]
    yield pipeline
    for pipe in used:
        pipe.unload_lora()


@functools.cache
def ldm_pipeline(folder):
    return load_pipeline(folder)


def fresh(ref):
    """A diffusers pipeline of copies of ``ref``'s components, for LoRA layers to be injected into."""
    extra = {"add_watermarker": False} if isinstance(ref, diffusers.StableDiffusionXLPipeline) else {}
    pipe = type(ref)(**copy.deepcopy(ref.components), **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sampler_of(ref):
    return "euler" if isinstance(ref, diffusers.StableDiffusionXLPipeline) else "ddim"


def ref_latents(pipe, prompt="a red cube"):
    return pipe(prompt, num_inference_steps=STEPS, guidance_scale=7.5, height=SIZE, width=SIZE,
                generator=[torch.Generator().manual_seed(0)], output_type="latent").images


def our_latents(pipe, sampler, prompt="a red cube"):
    records = list(pipe.loop(prompt, num_inference_steps=STEPS, guidance_scale=7.5, width=SIZE, height=SIZE,
                             sampler=sampler))
    return records[-1].x_prev


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def assert_close(got, expected):
    error = rel(got, expected)
    assert error < REL, f"‖Δ‖/‖expected‖ = {error:.3g} (tolerance {REL}); ‖expected‖ = {expected.norm():.3g}"


def ours_at(pipe, name, sampler):
    """Our latents as a function of the LoRA's strength and of switching off its text-encoder parts."""
    def run(scale=1.0, text=True):
        pipe.set_lora_scale(name, scale)
        for component, lora in pipe.loras[name].items():
            if component.startswith("text") and not text:
                lora.scale = 0.0
        try:
            return our_latents(pipe, sampler)
        finally:
            pipe.set_lora_scale(name, 1.0)
    return run


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
@pytest.mark.parametrize("family", ["reference", "sdxl"], ids=["sd1", "sdxl"])
def test_lora_matches_diffusers(request, tmp_path, ours_of, family, fmt):
    """diffusers' latents from the same file at strengths 1 and 0.5; then ldm writes the LoRA it loaded in the other
    layout, and diffusers reading that file gives ldm's latents again."""
    ref, folder = request.getfixturevalue(family)
    path = make_lora(ref, family, fmt, tmp_path / "style.safetensors")
    theirs, ours = fresh(ref), ours_of(folder)
    theirs.load_lora_weights(str(path), adapter_name="style")
    assert ours.load_lora(path) == "style"
    assert set(ours.loras["style"]) == set(COMPONENTS[family])
    run = ours_at(ours, "style", sampler_of(ref))
    at_one = run(1.0)
    assert_close(at_one, ref_latents(theirs))
    theirs.set_adapters(["style"], adapter_weights=[0.5])
    expected, got = ref_latents(theirs), run(0.5)
    assert_close(got, expected)
    # the LoRA, and its text-encoder part alone, move the latents by far more than the tolerance
    assert_sensitive(lambda **changes: run(**({"scale": 0.5} | changes)), got, REL * expected.abs().max().item(),
                     scale=0.0, text=False)
    other = {"kohya": "diffusers", "diffusers": "kohya"}[fmt]
    written = save_lora(tmp_path / "ours.safetensors", ours.loras["style"], ours.lora_models, other,
                        sdxl=family == "sdxl")
    theirs.load_lora_weights(str(written), adapter_name="ours")
    theirs.set_adapters(["ours"], adapter_weights=[1.0])
    assert_close(at_one, ref_latents(theirs))


def test_locon_matches_diffusers_fused_and_unloaded(reference, tmp_path, ours_of):  # noqa: F811
    """A LoCon in kohya layout (3×3 ResBlock convolutions, 1×1 shortcuts, time projections beside attention):
    diffusers' latents unfused and fused; unfusing and unloading give back the base weights and latents exactly."""
    ref, folder = reference
    path = make_lora(ref, "reference", "kohya", tmp_path / "locon.safetensors", unet_targets=ATTENTION + CONVS)
    theirs, ours = fresh(ref), ours_of(folder)
    base_weights = {k: v.clone() for k, v in ours.unet.state_dict().items()}
    base = our_latents(ours, "ddim")
    theirs.load_lora_weights(str(path), adapter_name="locon")
    expected = ref_latents(theirs)
    ours.load_lora(path)
    assert sum(layer.down.weight.shape[-2:] == (3, 3) for _, layer in ours.loras["locon"]["unet"].items()) >= 6
    unfused = our_latents(ours, "ddim")
    assert_close(unfused, expected)
    assert (unfused - base).abs().max() > 20 * REL * expected.abs().max()
    ours.fuse_lora()
    fused = ours.unet.state_dict()
    changed = {k for k in fused if not torch.equal(fused[k], base_weights[k])}
    assert changed == {f"{key}.weight" for key in ours.loras["locon"]["unet"].targets}
    assert rel(our_latents(ours, "ddim"), unfused) < 1e-5
    ours.unfuse_lora()
    assert torch.equal(our_latents(ours, "ddim"), unfused)
    ours.unload_lora()
    weights = ours.unet.state_dict()
    assert weights.keys() == base_weights.keys() and all(torch.equal(weights[k], base_weights[k]) for k in weights)
    assert torch.equal(our_latents(ours, "ddim"), base) and not ours.loras


def test_older_diffusers_names_read_as_the_same_lora(reference, tmp_path, ours_of):  # noqa: F811
    """``convert_state_dict_to_diffusers`` (diffusers' naming before peft: ``….lora.down.weight`` in the UNet,
    ``….lora_linear_layer.down.weight`` in the text encoder, no α) gives ldm the same matrices as peft's names."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from ldm.convert.lora import build_loras, read_lora

    ref, folder = reference
    parts = lora_parts(ref)
    old = {f"{c}.{k}": v.contiguous() for c, (sd, _) in parts.items()
           for k, v in convert_state_dict_to_diffusers(sd).items()}
    assert any(".lora_linear_layer.down." in k for k in old) and any(".lora.down." in k for k in old)
    save_file(old, tmp_path / "old.safetensors")
    models = ours_of(folder).lora_models
    older = build_loras(read_lora(tmp_path / "old.safetensors"), models, "old")
    new = make_lora(ref, "reference", "diffusers", tmp_path / "new.safetensors")
    newer = build_loras(read_lora(new), models, "new")
    assert older.keys() == newer.keys() == {"unet", "text_encoder"}
    for component, lora in newer.items():
        got = dict(older[component].items())
        assert got.keys() == dict(lora.items()).keys()
        for key, layer in lora.items():
            assert torch.equal(got[key].down.weight, layer.down.weight)
            assert torch.equal(got[key].up.weight, layer.up.weight)
            assert (got[key].alpha, layer.alpha) == (None, 8.0)
