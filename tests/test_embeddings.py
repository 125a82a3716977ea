"""Textual-inversion embeddings: every shared file format against diffusers' ``load_textual_inversion`` on the same
tiny loud pipelines (token ids, text-encoder context, a 3-step image), the tokenizer's added tokens against
transformers', the extra rows of the text encoder (state_dict, meta device, .to, gradients), and bad files."""

import copy
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm import load_pipeline
from ldm.checkpoint import CheckpointError
from ldm.embeddings import describe_embedding, read_embedding, save_embedding
from ldm.prompts import prompt_tokens
from ldm.text_encoder import TextEncoder, TextEncoderConfig
from ldm.tokenizer import CLIPTokenizer
from _fixtures import assert_parity
from test_stable_diffusion import TOL, our_images, ref_images, reference, write_vocab  # noqa: F401
from test_stable_diffusion_xl import sdxl  # noqa: F401

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.reference

# max |Δ| between ldm's and diffusers' text-encoder contexts: measured 0 (the same float32 operations); another
# embedding's vectors in the same place move the context by 1.4–8.6, far past assert_parity's 20 × CONTEXT_TOL.
# The 3-step images: 7e-6–3e-5 against TOL = 2e-3, moved 1.4–1.8 by the other embedding.
CONTEXT_TOL = 1e-4
WIDTH, WIDTH_L, WIDTH_G = 32, 32, 48  # the tiny SD 1 encoder's width; the tiny SDXL pair's


def vectors(n, width=WIDTH, seed=0):
    """n random rows at the scale of the loud fixtures' token embeddings (N(0, 1))."""
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


# --- files in each format, as their tools write them; (path, the token ldm reads by default) ---

def a1111_pt(folder, rows, stem="my-style"):
    path = folder / f"{stem}.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": rows.clone().requires_grad_()},
                "name": "trained-as", "step": 1500, "sd_checkpoint": "abc123", "sd_checkpoint_name": "v1-5"}, path)
    return path, stem


def kohya_safetensors(folder, rows):
    save_file({"emb_params": rows.contiguous()}, folder / "kohya-tok.safetensors")
    return folder / "kohya-tok.safetensors", "kohya-tok"


def diffusers_bin(folder, rows):
    torch.save({"<cat-toy>": rows[0] if len(rows) == 1 else rows}, folder / "learned_embeds.bin")
    return folder / "learned_embeds.bin", "<cat-toy>"


def diffusers_safetensors(folder, rows):
    save_file({"<cat-toy>": rows[0].contiguous()}, folder / "learned_embeds.safetensors")
    return folder / "learned_embeds.safetensors", "<cat-toy>"


FORMATS = {"a1111": a1111_pt, "kohya": kohya_safetensors, "diffusers-bin": diffusers_bin,
           "diffusers-safetensors": diffusers_safetensors}


def fresh(ref):
    """``ref`` with its own tokenizers and text encoders, for diffusers' embeddings to change (cheaper than its
    ``unload_textual_inversion``)."""
    own = {k: copy.deepcopy(v) for k, v in ref.components.items() if k.startswith(("tokenizer", "text_encoder"))}
    pipe = type(ref)(**(ref.components | own))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ldm_sd1(reference):  # noqa: F811
    return load_pipeline(reference[1])


@pytest.fixture
def pipes(reference, ldm_sd1):  # noqa: F811
    """diffusers' tiny SD 1 pipeline (a fresh copy) and ldm's from its folder (embeddings unloaded after)."""
    yield fresh(reference[0]), ldm_sd1
    ldm_sd1.unload_embeddings()
    ldm_sd1.prompt_syntax = True


def ref_ids(ref, prompt):
    converted = ref.maybe_convert_prompt(prompt, ref.tokenizer)
    return ref.tokenizer(converted, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def ref_context(ref, prompt):
    with torch.no_grad():
        return ref.encode_prompt(prompt, "cpu", 1, False)[0]


@pytest.mark.parametrize("fmt, n", [("a1111", 1), ("kohya", 1), ("diffusers-bin", 1), ("diffusers-safetensors", 1),
                                    ("a1111", 3), ("diffusers-bin", 2)])
def test_each_format_gives_diffusers_context(pipes, tmp_path, fmt, n):
    ref, ours = pipes
    path, token = FORMATS[fmt](tmp_path, vectors(n))
    # diffusers files are read from their folder, as a downloaded diffusers concept comes
    names = ours.load_embedding(path.parent if fmt.startswith("diffusers") else path)
    assert names == [token] + [f"{token}_{i}" for i in range(1, n)]
    assert read_embedding(path).format == fmt.split("-")[0]
    ref.load_textual_inversion(str(path), token=token)  # diffusers names an A1111 file by its "name", kohya "emb_params"
    ours.load_embedding(save_embedding(tmp_path / "alt.safetensors", vectors(n, seed=1)), token="<alt>")
    prompt = f"a photo of {token} on a table"
    assert torch.equal(ours.tokenizer(prompt), ref_ids(ref, prompt))
    # the vectors themselves reach the context: another embedding in the same place moves it ≥ 20 × CONTEXT_TOL
    assert_parity(lambda prompt=prompt: ours.encode_prompt(prompt), ref_context(ref, prompt), CONTEXT_TOL,
                  prompt="a photo of <alt> on a table")


def test_multi_vector_image_matches_diffusers(pipes, tmp_path):
    ref, ours = pipes
    path, token = a1111_pt(tmp_path, vectors(3))
    ours.load_embedding(path)
    ref.load_textual_inversion(str(path), token=token)
    ours.load_embedding(a1111_pt(tmp_path, vectors(3, seed=1), stem="other")[0], token="<other>")
    prompt = f"a {token} cube, ({token}:1.2)"
    ours.prompt_syntax = False  # brackets as plain text, as diffusers reads them
    run = lambda prompt=prompt: our_images(ours, prompt, steps=3)  # noqa: E731
    assert_parity(run, ref_images(ref, prompt, steps=3), TOL, prompt=prompt.replace(token, "<other>"))
    ids, weights = prompt_tokens([prompt], ours.tokenizer)  # A1111's syntax: 1.2 on each of the three vectors
    extra = [(i, w) for i, w in zip(ids[0, 0].tolist(), weights[0, 0].tolist()) if i >= 49408]
    assert extra == [(49408, 1.0), (49409, 1.0), (49410, 1.0)] + [(i, pytest.approx(1.2)) for i in (49408, 49409, 49410)]


def test_sdxl_embedding_goes_to_both_encoders(sdxl, tmp_path):  # noqa: F811
    ref, folder = sdxl
    ref, ours = fresh(ref), load_pipeline(folder)
    l, g = vectors(2, WIDTH_L), vectors(2, WIDTH_G, seed=1)
    path = save_embedding(tmp_path / "xl-style.safetensors", {"clip_l": l, "clip_g": g})
    assert ours.load_embedding(path) == ["xl-style", "xl-style_1"]
    alt = {"clip_l": vectors(2, WIDTH_L, seed=2), "clip_g": vectors(2, WIDTH_G, seed=3)}
    ours.load_embedding(save_embedding(tmp_path / "alt.safetensors", alt), token="<alt>")
    state = load_file(path)  # diffusers reads SDXL files one encoder at a time
    ref.load_textual_inversion(state["clip_l"], token="xl-style", text_encoder=ref.text_encoder, tokenizer=ref.tokenizer)
    ref.load_textual_inversion(state["clip_g"], token="xl-style", text_encoder=ref.text_encoder_2,
                               tokenizer=ref.tokenizer_2)
    prompt = "a xl-style red cube"
    with torch.no_grad():
        context, _, pooled, _ = ref.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    assert_parity(lambda prompt=prompt: torch.cat([t.flatten() for t in ours.embed_prompts(prompt)]),
                  torch.cat([context.flatten(), pooled.flatten()]), CONTEXT_TOL, prompt="a <alt> red cube")
    run = lambda prompt=prompt: our_images(ours, prompt, steps=3, sampler="euler")  # noqa: E731
    assert_parity(run, ref_images(ref, prompt, steps=3), TOL, prompt="a <alt> red cube")
    with pytest.raises(ValueError, match=r"kohya-tok\.safetensors is an SD 1 / SD 2 embedding.*sdxl pipeline needs an SDXL"):
        ours.load_embedding(kohya_safetensors(tmp_path, vectors(1))[0])


def test_added_tokens_split_the_text_as_transformers_does(tmp_path):
    theirs, ours = write_vocab(tmp_path), CLIPTokenizer.from_bundled()
    for token in ("<cat-toy>", "MyTok", "cattoy", "cattoy_1", "a b"):
        theirs.add_tokens(token)
        ours.add_token(token)
    assert len(ours) == len(theirs) == 49413
    for prompt in ("a <cat-toy> backpack", "a<cat-toy>backpack", "A <CAT-TOY>!", "mytok MyTok", "supercattoys cattoy_12",
                   "x a  b y", "the cattoy,dog", "<cat-toy>ing", "no added tokens here"):
        assert ours.encode(prompt) == theirs(prompt).input_ids[1:-1], prompt
    assert ours.decode(ours.encode("a<cat-toy>backpack")) == "a <cat-toy> backpack"
    assert ours.add_token("<x>", 3) == [49413, 49414, 49415]
    assert ours.encode("<x> and <x>_2") == [49413, 49414, 49415, 537, 49415]  # the name alone: all its vectors
    for taken, why in (("cat", "already in the vocabulary"), ("Cat", "already in the vocabulary"),
                       ("<|endoftext|>", "already in the vocabulary"), ("mytok", "already added"),
                       ("<x>_1", "already added")):
        with pytest.raises(ValueError, match=f"'{taken}' is {why}"):
            ours.add_token(taken)
    ours.add_token("<y>_1")
    with pytest.raises(ValueError, match="'<y>_1' is already added"):  # a row's name counts too; nothing is added
        ours.add_token("<y>", 2)
    assert len(ours) == 49417 and ours.encode("<y>") != ours.encode("<y>_1")
    ours.remove_added_tokens()
    assert len(ours) == 49408 and ours.encode("a <cat-toy>") == CLIPTokenizer.from_bundled().encode("a <cat-toy>")


def test_extra_rows_stay_out_of_the_state_dict_and_learn(tmp_path):
    config = TextEncoderConfig(width=WIDTH, layers=2, heads=4, mlp_dim=64)
    model = TextEncoder(config).eval()
    keys = list(model.state_dict())
    with torch.device("meta"):  # full-size models are built on meta and adopt the file's tensors
        adopted = TextEncoder(config)
    adopted.load_state_dict(model.state_dict(), assign=True)
    ids = torch.tensor([[49406, 320, 49408, 49409, 49407]])
    with pytest.raises(ValueError, match=r"must lie in \[0, 49408\)"):
        model(ids)
    rows = torch.nn.Parameter(vectors(2))
    model.requires_grad_(False)  # textual inversion: everything frozen but the new rows
    model.set_extra_embeddings(rows)
    adopted.set_extra_embeddings(rows.detach().clone())
    assert list(model.state_dict()) == keys and model.extra_embeddings is rows
    out = model(ids)
    assert torch.equal(out, adopted(ids))
    out.square().sum().backward()
    assert rows.grad is not None and rows.grad.abs().min() > 0
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match=r"must lie in \[0, 49410\)"):
        model(ids + 2)
    with pytest.raises(ValueError, match=r"\(n, 32\) for this 32-wide encoder; got \(1, 768\)"):
        model.set_extra_embeddings(vectors(1, 768))
    adopted.to(torch.float64)
    assert adopted.extra_embeddings.dtype == torch.float64 and torch.allclose(adopted(ids).float(), out, atol=1e-5)
    adopted.set_extra_embeddings(None)
    assert adopted.num_tokens == 49408


def test_bad_files_and_tokens_are_named(pipes, tmp_path):
    _, ours = pipes
    wide = save_embedding(tmp_path / "wide.safetensors", vectors(1, 768))
    with pytest.raises(ValueError, match=r"wide\.safetensors: its vectors are 768 wide \(SD 1 width\), but text_encoder"
                                         r" \(the sd1 pipeline's\) is 32 wide"):
        ours.load_embedding(wide)
    cat = save_embedding(tmp_path / "cat.safetensors", vectors(1))
    with pytest.raises(ValueError, match="'cat' is already in the vocabulary"):
        ours.load_embedding(cat)
    assert len(ours.tokenizer) == ours.text_encoder.num_tokens == 49408  # nothing half-added
    assert ours.load_embedding(cat, token="<cat>") == ["<cat>"]
    with pytest.raises(ValueError, match="'<cat>' is already added"):
        ours.load_embedding(cat, token="<cat>")
    xl = save_embedding(tmp_path / "xl.safetensors", {"clip_l": vectors(1, 768), "clip_g": vectors(1, 1280)})
    with pytest.raises(ValueError, match=r"xl\.safetensors is an SDXL embedding \(clip_l \+ clip_g\); the sd1 pipeline"):
        ours.load_embedding(xl)
    ours.unload_embeddings()
    assert len(ours.tokenizer) == ours.text_encoder.num_tokens == 49408
    path, _ = a1111_pt(tmp_path, vectors(1))
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match=r"my-style\.pt \(truncated"):
        read_embedding(path)
    kohya, _ = kohya_safetensors(tmp_path, vectors(1))
    kohya.write_bytes(kohya.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"kohya-tok\.safetensors \(truncated"):
        read_embedding(kohya)
    save_file({"a": vectors(1), "b": vectors(1)}, tmp_path / "two.safetensors")
    with pytest.raises(ValueError, match=r"two\.safetensors is not an embedding in a known layout.*\['a', 'b'\]"):
        read_embedding(tmp_path / "two.safetensors")


class SystemCall:
    def __reduce__(self):
        return (os.system, ("touch SENTINEL",))


def test_a_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"string_to_param": {"*": SystemCall()}, "name": "evil"}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=rf"evil\.pt.*{os.system.__module__}\.system.*may be malicious"):
        read_embedding(tmp_path / "evil.pt")
    assert not (tmp_path / "SENTINEL").exists()


def test_saved_embeddings_read_back_and_are_described(pipes, tmp_path):
    ref, _ = pipes
    rows = vectors(2)
    path = save_embedding(tmp_path / "my-embed.safetensors", rows)
    assert load_file(path).keys() == {"emb_params"}
    back = read_embedding(path)
    assert (back.name, back.format, back.vectors_per_token) == ("my-embed", "kohya", 2)
    assert torch.equal(back.vectors["text"], rows)
    ref.load_textual_inversion(str(path), token="my-embed")  # diffusers reads what ldm writes, as the same rows
    table = ref.text_encoder.get_input_embeddings().weight
    assert torch.equal(table[ref.tokenizer.convert_tokens_to_ids(["my-embed", "my-embed_1"])], rows)
    described = {}
    for name, value in (("sd1", vectors(1, 768)), ("sd2", vectors(3, 1024)),
                        ("sdxl", {"clip_l": vectors(2, 768), "clip_g": vectors(2, 1280)}), ("tiny", rows)):
        described[name] = describe_embedding(save_embedding(tmp_path / f"{name}.safetensors", value))
    assert [d["family"] for d in described.values()] == ["sd1", "sd2", "sdxl", None]
    assert described["sdxl"] | {"path": None} == {
        "path": None, "format": "sdxl", "token": "sdxl", "vectors_per_token": 2, "widths": {"clip_l": 768, "clip_g": 1280},
        "family": "sdxl", "family_name": "SDXL", "step": None}
    a1111 = describe_embedding(a1111_pt(tmp_path, vectors(3))[0])
    assert (a1111["format"], a1111["token"], a1111["vectors_per_token"], a1111["step"]) == ("a1111", "my-style", 3, 1500)
    with pytest.raises(ValueError, match="clip_l and clip_g"):
        save_embedding(tmp_path / "x.safetensors", {"clip_l": rows})
