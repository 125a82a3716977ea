"""Prompt syntax (A1111's weights, escapes, BREAK), long prompts in 75-token chunks with the weights' mean restored,
and clip skip: the parser case by case, contexts computed by hand from the written-out rules, the short-prompt
context bit for bit unchanged, clip skip against transformers' hidden states and diffusers' ``clip_skip``."""

import warnings

import pytest
import torch

from ldm import load_pipeline
from ldm.prompts import BREAK, emphasize, parse_prompt, prompt_chunks, prompt_tokens
from ldm.text_encoder import TextEncoder, clip_skip_layer
from ldm.tokenizer import CLIPTokenizer

try:  # the parser and chunking tests need no reference library; the pipeline tests use the tiny SD and SDXL fixtures
    from test_stable_diffusion import SIZE, TOL, our_images, reference  # noqa: F401 (a fixture)
    from test_stable_diffusion_xl import sdxl  # noqa: F401 (a fixture)
except pytest.skip.Exception:  # diffusers or transformers missing
    @pytest.fixture(scope="module")
    def reference():
        pytest.skip("needs diffusers and transformers")

    sdxl = reference

R, S = 1.1, 1 / 1.1


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer.from_bundled()


@pytest.fixture(scope="module")
def pipe(reference):
    return load_pipeline(reference[1])


def same_fragments(got, want):
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [w for _, w in got] == pytest.approx([w for _, w in want], rel=1e-12)


@pytest.mark.parametrize("prompt, want", [
    ("a cat", [("a cat", 1.0)]),
    ("(a cat)", [("a cat", R)]),
    ("((a cat))", [("a cat", R * R)]),
    ("[a cat]", [("a cat", S)]),
    ("[[a cat]]", [("a cat", S * S)]),
    ("(a cat:1.3)", [("a cat", 1.3)]),
    ("(a cat: 0.5 )", [("a cat", 0.5)]),
    ("(a cat:1)", [("a cat", 1.0)]),
    ("(a cat:-.5)", [("a cat", -0.5)]),
    ("a (red:1.5) car, [blurry]", [("a ", 1.0), ("red", 1.5), (" car, ", 1.0), ("blurry", S)]),
    ("a ((b) c)", [("a ", 1.0), ("b", R * R), (" c", R)]),
    ("(a (b:2) c:0.5)", [("a ", 0.5), ("b", 1.0), (" c", 0.5)]),  # nesting multiplies: 2 × 0.5
    ("[(a)]", [("a", R * S)]),
    ("((a:1.2) b)", [("a", 1.2 * R), (" b", R)]),
    ("(a) (b)", [("a", R), (" ", 1.0), ("b", R)]),
    ("(a)(b)", [("ab", R)]),  # neighbours of equal weight merge
    (r"\(literal\) and \[x\]", [("(literal) and [x]", 1.0)]),
    (r"(a\)b)", [("a)b", R)]),
    (r"a \\ b \ c", [("a \\ b \\ c", 1.0)]),  # an escaped backslash is one; a lone one stays
    (r"(a\(:1.2)", [("a(", 1.2)]),
    ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
    ("(a BREAK b)", [("a", R), BREAK, ("b", R)]),  # no weight touches BREAK
    ("BREAK a", [BREAK, ("a", 1.0)]),
    ("a BREAK BREAK b", [("a", 1.0), BREAK, BREAK, ("b", 1.0)]),
    ("BREAKfast, a break", [("BREAKfast, a break", 1.0)]),  # a word of its own, upper case
    ("a:1 ()", [("a:1 ", 1.0)]),  # an empty group weighs nothing, and its colon check sees no text
    ("", [("", 1.0)]),
    ("()", [("", 1.0)]),
])
def test_parser(prompt, want):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same_fragments(parse_prompt(prompt), want)


@pytest.mark.parametrize("prompt, want, message", [
    ("(unclosed", [("(unclosed", 1.0)], r"unbalanced brackets '\('"),
    ("closed)", [("closed)", 1.0)], r"unbalanced brackets '\)'"),
    ("((a) b", [("(", 1.0), ("a", R), (" b", 1.0)], "unbalanced"),  # the outer "(" never closes
    ("(a] b", [("(a] b", 1.0)], r"unbalanced brackets '\(\]'"),
    ("([)]", [("(", 1.0), (")", S)], "unbalanced"),  # crossed: the "[…]" pair stands, the rest is text
    ("(word:abc)", [("word:abc", R)], "'abc' after ':'.* no weight"),
    ("(style: water colour)", [("style: water colour", R)], "no weight"),
])
def test_unbalanced_brackets_and_bad_weights_are_text_with_a_warning(prompt, want, message):
    with pytest.warns(UserWarning, match=message):
        got = parse_prompt(prompt)
    same_fragments(got, want)


def test_chunks_of_75_tokens_break_and_fragments_tokenised_alone(tok):
    cat, dog = tok.encode("cat")[0], tok.encode("dog")[0]
    chunks = prompt_chunks(parse_prompt("cat " * 80), tok.encode)
    assert [len(ids) for ids, _ in chunks] == [75, 5] and {i for ids, _ in chunks for i in ids} == {cat}
    assert len(prompt_chunks(parse_prompt("cat " * 75), tok.encode)) == 1  # exactly full: no empty chunk after it
    assert prompt_chunks(parse_prompt("cat BREAK (dog:1.5)"), tok.encode) == [([cat], [1.0]), ([dog], [1.5])]
    assert prompt_chunks(parse_prompt("BREAK cat BREAK"), tok.encode) == [([], []), ([cat], [1.0])]
    assert prompt_chunks(parse_prompt(""), tok.encode) == [([], [])]
    # each fragment on its own: "(red)cube" is "red" + "cube", not the word "redcube"
    ids, weights = prompt_chunks(parse_prompt("(red)cube"), tok.encode)[0]
    assert ids == tok.encode("red") + tok.encode("cube") and weights == [R] * len(tok.encode("red")) + [1.0]


def test_tokens_frame_each_chunk_and_pad_rows_with_empty_chunks(tok):
    ids, weights = prompt_tokens(["cat " * 80, "(dog:2)"], tok, chunks=3)
    assert ids.shape == weights.shape == (2, 3, 77) and ids.dtype == torch.long
    assert torch.equal(ids[0, 0], tok(["cat " * 75])[0])
    assert torch.equal(ids[0, 1], torch.tensor(tok.frame(tok.encode("cat " * 5))))
    empty = torch.tensor(tok.frame([]))
    assert torch.equal(ids[0, 2], empty) and torch.equal(ids[1, 1], empty) and torch.equal(ids[1, 2], empty)
    assert weights[1, 0, 1] == 2 and (weights[1, 0, 2:] == 1).all() and weights[1, 0, 0] == 1  # framing weighs 1
    with pytest.warns(UserWarning, match="dropped 5 tokens"):  # the plain tokenizer, as before, cuts and says so
        assert torch.equal(ids[0, 0], tok(["cat " * 80])[0])


def test_emphasis_restores_each_chunks_mean():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 77, 8, generator=g) + 0.3
    w = 1 + torch.rand(2, 3, 77, generator=g)
    w[1, 2] = 1  # a chunk of weight 1 in a weighted batch: z · 1 · 1
    want = torch.empty_like(z)
    for b in range(2):
        for k in range(3):
            weighted = z[b, k] * w[b, k, :, None]
            want[b, k] = weighted * (z[b, k].mean() / weighted.mean())
    got = emphasize(z, w)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6) and torch.equal(got[1, 2], z[1, 2])
    assert emphasize(z, torch.ones(2, 3, 77)) is z


def encoded(pipe, rows):
    with torch.inference_mode():
        return pipe.text_encoder(torch.tensor(rows))


@pytest.mark.reference
def test_short_plain_prompt_context_is_unchanged_bit_for_bit(pipe):
    plain = ["a red cube on a table", "a watercolour of a fox"]
    with torch.inference_mode():
        before = pipe.text_encoder(pipe.tokenizer(plain))  # the path without prompt syntax, as before it
    assert torch.equal(pipe.encode_prompt(plain), before)
    assert torch.equal(pipe.encode_prompt(["(a red cube on a table:1.0)", "a watercolour of a fox"]), before)
    image = our_images(pipe, plain[0], steps=2, negative_prompt="blurry")
    try:
        pipe.prompt_syntax = False
        assert torch.equal(pipe.encode_prompt(plain), before)
        assert torch.equal(our_images(pipe, plain[0], steps=2, negative_prompt="blurry"), image)
        assert not torch.equal(pipe.encode_prompt("(a red cube)"), pipe.encode_prompt("a red cube"))  # text
    finally:
        pipe.prompt_syntax = True


LONG = [("a", 1.0), ("red", 1.4), ("cube on a table, ", 1.0)] + \
       [(f"a small wooden house number {i}, ", 1.0) for i in range(12)] + [("at night", S)]


def render(pieces):
    return "".join(text if w == 1 else f"({text}:{w})" if w > 1 else f"[{text}]" for text, w in pieces)


@pytest.mark.reference
def test_long_weighted_prompt_is_chunks_by_hand(pipe, tok):
    """The rules written out: each piece tokenised alone, 75 tokens a chunk, each framed and encoded, z·w then
    z·mean(z)/mean(z·w) per chunk, the chunks joined along the sequence."""
    ids, weights = [], []
    for text, w in LONG:
        ids += tok.encode(text)
        weights += [w] * len(tok.encode(text))
    assert 75 < len(ids) <= 150
    rows, row_weights = [], []
    for start in (0, 75):
        chunk = ids[start:start + 75]
        rows.append([tok.bos_id, *chunk, tok.eos_id] + [tok.pad_id] * (75 - len(chunk)))
        row_weights.append([1.0, *weights[start:start + 75], 1.0] + [1.0] * (75 - len(chunk)))
    z = encoded(pipe, rows)
    parts = []
    for k in range(2):
        weighted = z[k] * torch.tensor(row_weights[k])[:, None]
        parts.append(weighted * (z[k].mean() / weighted.mean()))
    want = torch.cat(parts)[None]
    got = pipe.encode_prompt(render(LONG))
    assert got.shape == (1, 154, 32) and torch.allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.reference
def test_negative_prompt_gets_as_many_chunks(pipe):
    long = render(LONG)
    for prompt, negative in ((long, "blurry"), ("a cube", long)):
        cond, uncond = pipe.condition([prompt], [negative], 7.5, SIZE, SIZE)
        assert cond.context.shape == uncond.context.shape == (1, 154, 32)
        short = cond if prompt == "a cube" else uncond
        assert torch.allclose(short.context[:, :77], pipe.encode_prompt(prompt if prompt == "a cube" else negative),
                              atol=1e-5)
        assert torch.allclose(short.context[:, 77:], pipe.encode_prompt(""), atol=1e-5)  # an empty chunk
    cond, uncond = pipe.condition([long], [long], 1.0, SIZE, SIZE)  # unguided: no negative to pad
    assert uncond is None and cond.context.shape == (1, 154, 32)


@pytest.mark.reference
def test_long_prompt_moves_the_image_beyond_its_truncation(pipe):
    long = "a red cube on a table, " * 12 + "and a bright green sphere floating above it in a starry night sky"
    chunked = our_images(pipe, long, steps=3, negative_prompt="blurry")
    try:
        pipe.prompt_syntax = False
        with pytest.warns(UserWarning, match="dropped"):
            truncated, cut = our_images(pipe, long, steps=3, negative_prompt="blurry"), pipe.encode_prompt(long)
    finally:
        pipe.prompt_syntax = True
    assert torch.allclose(pipe.encode_prompt(long)[:, :77], cut, atol=1e-5)  # the first chunk is the cut prompt
    assert (chunked - truncated).abs().max() > 20 * TOL  # the tail reaches the image


@pytest.mark.reference
def test_clip_skip_is_transformers_hidden_states_and_final_norm():
    from ldm.convert import import_state_dict, text_encoder_config_from_transformers, text_encoder_layout
    from test_text_encoder import prompts, rel, transformers_model

    ref = transformers_model()
    config = text_encoder_config_from_transformers(ref.config.to_dict())
    ours = import_state_dict(TextEncoder(config), ref.state_dict(), text_encoder_layout(config, "transformers")).eval()
    ids = prompts()
    with torch.no_grad():
        expected = ref(ids, output_hidden_states=True)
        for k in (1, 2, 3):  # A1111's CLIP skip k: hidden_states[-k], then the final LayerNorm
            want = ref.final_layer_norm(expected.hidden_states[-k])
            layer = clip_skip_layer(config, k)
            assert layer == -k and rel(ours(ids, layer), want) < 1e-5
            out = ours.encode(ids, layer)
            assert rel(out.hidden, want) < 1e-5 and rel(out.pooled, expected.pooler_output) < 1e-5  # pooled: last block


@pytest.mark.reference
def test_clip_skip_is_diffusers_clip_skip_plus_one(reference, pipe, sdxl):
    ref = reference[0]
    with torch.no_grad():  # diffusers' SD 1 clip_skip=1, written out (its encode_prompt reaches for
        # text_encoder.text_model, which transformers 5 no longer has): hidden_states[-(1 + 1)], then the final norm
        states = ref.text_encoder(pipe.tokenizer("a red cube"), output_hidden_states=True).hidden_states
        want = ref.text_encoder.final_layer_norm(states[-2])
    assert ((pipe.encode_prompt("a red cube", clip_skip=2) - want).norm() / want.norm()) < 1e-5
    assert not torch.allclose(pipe.encode_prompt("a red cube"), want, atol=1e-2)
    ref_xl, folder = sdxl
    xl = load_pipeline(folder)
    with torch.no_grad():  # SDXL: hidden_states[-(clip_skip + 2)] of both encoders, no final norm; pooled unchanged
        context, _, pooled, _ = ref_xl.encode_prompt("a red cube", device="cpu", do_classifier_free_guidance=False,
                                                     clip_skip=1)
    ours, ours_pooled = xl.embed_prompts("a red cube", clip_skip=2)
    assert torch.allclose(ours, context, atol=1e-5) and torch.allclose(ours_pooled, pooled, atol=1e-5)


@pytest.mark.reference
def test_sdxl_chunks_both_encoders_and_pools_the_first_chunk(sdxl):
    xl = load_pipeline(sdxl[1])
    long = "a red cube on a table, " * 12 + "and a green sphere"
    context, pooled = xl.embed_prompts(long)
    xl.prompt_syntax = False
    with pytest.warns(UserWarning, match="dropped"):
        cut, cut_pooled = xl.embed_prompts(long)
    assert context.shape == (1, 154, 80) and torch.allclose(context[:, :77], cut, atol=1e-5)
    assert torch.allclose(pooled, cut_pooled, atol=1e-5)  # the first chunk's, as A1111 takes it


@pytest.mark.reference
def test_bad_clip_skip_is_refused(pipe, tmp_path, reference, capsys):
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="clip_skip must be an integer ≥ 1"):
            pipe.encode_prompt("a cat", clip_skip=bad)
    with pytest.raises(ValueError, match="clip_skip=3 is beyond the text encoder's 2 blocks"):
        pipe.encode_prompt("a cat", clip_skip=3)
    with pytest.raises(ValueError, match="output_layer must be in"):
        pipe.text_encoder(pipe.tokenizer("a cat"), -3)
    from ldm.cli import main

    main(["txt2img", str(reference[1]), "--prompt", "a (red:1.3) cat", "--clip-skip", "2", "--steps", "1",
          "--out", str(tmp_path / "a.png")])
    assert (tmp_path / "a.png").is_file()
    with pytest.raises(SystemExit):
        main(["txt2img", str(reference[1]), "--prompt", "a cat", "--clip-skip", "0", "--steps", "1",
              "--out", str(tmp_path / "b.png")])
    assert "clip_skip must be" in capsys.readouterr().err
