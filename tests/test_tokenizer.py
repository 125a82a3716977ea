import gzip
import html
import json
import random
import re
import unicodedata
import warnings
from pathlib import Path

import pytest
import torch

from ldm.tokenizer import BUNDLED_VOCAB, CLIPTokenizer, clean_text, pre_tokenize

PROMPTS = [
    "a photo of a cat",
    "Hello, World!!! How's it going?? (really) -- #1 @home",
    "1984 and 3.14, 100%",
    "don't it's we're I've I'm you'll he'd",
    "café naïve Ångström façade",
    "cafe\u0301",  # decomposed é: NFC must compose it
    "東京の夜景、桜",
    "🐱🚀 emoji 👍🏽 👨‍👩‍👧",
    "Привет, мир",
    "  extra   \t whitespace\n between  ",
    "MiXeD CaSe PrOmPt",
    "",
    "a <|endoftext|> b",
    "an astronaut riding a horse on the moon, highly detailed, 8k, trending on artstation, " * 4,
]
HTML_PROMPTS = ["rock &amp; roll", "fish &amp;amp; chips &lt;3 &quot;quoted&quot; caf&eacute;"]


def openai_byte_map() -> dict[int, str]:
    """openai/CLIP's `bytes_to_unicode`, copied in its own form so a slip in ldm's version cannot hide."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@pytest.fixture(scope="module")
def tok() -> CLIPTokenizer:
    return CLIPTokenizer.from_bundled()


@pytest.fixture(scope="module")
def hf_files(tmp_path_factory) -> Path:
    """vocab.json + merges.txt built from the bundled .gz the way openai/CLIP builds its vocabulary."""
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    lines = gzip.open(BUNDLED_VOCAB).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    vocab = list(openai_byte_map().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def hf_tok(hf_files):
    transformers = pytest.importorskip("transformers")
    return transformers.CLIPTokenizer.from_pretrained(hf_files, pad_token="<|endoftext|>")


def hf_ids(hf_tok, prompts: list[str]) -> torch.Tensor:
    out = hf_tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    return out["input_ids"]


def test_known_ids(tok):
    """Stable Diffusion's well-known ids for this prompt, and the vocabulary's layout."""
    assert tok.vocab_size == 49408 and (tok.bos_id, tok.eos_id, tok.pad_id) == (49406, 49407, 49407)
    assert tok.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    row = tok("a photo of a cat")
    assert row.shape == (1, 77) and row.dtype == torch.long
    assert row[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 49407]
    assert tok(["a", "b c", ""]).shape == (3, 77) and tok([]).shape == (0, 77)


@pytest.mark.reference
def test_matches_transformers(tok, hf_tok):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the long prompt is truncated on purpose
        assert torch.equal(tok(PROMPTS), hf_ids(hf_tok, PROMPTS))
    # transformers never undoes HTML entities (openai/CLIP does, twice), so it gets them pre-unescaped.
    assert torch.equal(tok(HTML_PROMPTS), hf_ids(hf_tok, [html.unescape(html.unescape(p)) for p in HTML_PROMPTS]))
    assert tok.encode(HTML_PROMPTS[0]) != hf_tok(HTML_PROMPTS[0], add_special_tokens=False)["input_ids"]


@pytest.mark.reference
def test_where_transformers_differs(tok, hf_tok):
    """ldm follows openai/CLIP (Python lower() and str.split()); the Rust-backed transformers tokenizer
    lower-cases without Greek final sigma, keeps U+001C-001F, and matches special tokens before lower-casing.
    Each case matches once the prompt is given to transformers already cleaned the Python way."""
    cases = ["ΟΔΥΣΣΕΥΣ ΣΑΣ", "x\x1cy\x1fz", "<|STARTOFTEXT|>hi"]
    assert torch.equal(tok(cases), hf_ids(hf_tok, [" ".join(p.split()).lower() for p in cases]))
    assert tok.encode("ΣΑΣ") == tok.encode("σας")


def test_from_files_matches_bundled(tok, hf_files):
    from_files = CLIPTokenizer.from_files(hf_files / "vocab.json", hf_files / "merges.txt")
    assert from_files.vocab == tok.vocab and from_files.ranks == tok.ranks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(from_files(PROMPTS + HTML_PROMPTS), tok(PROMPTS + HTML_PROMPTS))


def test_from_pretrained_reads_pad_token(hf_files, tmp_path):
    pipeline = tmp_path / "sd2"
    folder = pipeline / "tokenizer"
    folder.mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        (folder / name).write_bytes((hf_files / name).read_bytes())
    assert CLIPTokenizer.from_pretrained(folder).pad_id == 49407  # no config: SD1's default
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": {"content": "<|endoftext|>"}}))
    assert CLIPTokenizer.from_pretrained(folder).pad == "eos"
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "!"}))  # SD2 / open_clip
    assert CLIPTokenizer.from_pretrained(pipeline).pad_id == 0  # the pipeline root finds tokenizer/
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>"}))
    with pytest.raises(ValueError, match="<pad>"):
        CLIPTokenizer.from_pretrained(folder)


def test_a_trained_tokenizer_round_trips_its_context_and_words(tok, tmp_path):
    tok = CLIPTokenizer.from_bundled()
    tok.max_length, tok.trained_words = 24, frozenset({"a", "thick", "seven", "7"})
    loaded = CLIPTokenizer.from_pretrained(tok.save_pretrained(tmp_path / "tokenizer"))
    assert loaded.max_length == 24 and loaded.trained_words == tok.trained_words
    assert loaded("a thick seven").shape == (1, 24)
    assert CLIPTokenizer.from_pretrained(CLIPTokenizer.from_bundled().save_pretrained(tmp_path / "sd")).trained_words is None
    config = json.loads((tmp_path / "sd" / "tokenizer_config.json").read_text())
    (tmp_path / "sd" / "tokenizer_config.json").write_text(json.dumps(config | {"model_max_length": int(1e30)}))
    assert CLIPTokenizer.from_pretrained(tmp_path / "sd").max_length == 77  # transformers' "no limit"


def test_prompt_checks_name_unknown_words_and_overlong_prompts():
    tok = CLIPTokenizer.from_bundled()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tok.check_prompts(["a purple elephant " * 30])  # CLIP's own tokenizer knows every word
        tok.max_length, tok.trained_words = 12, frozenset({"a", "thick", "seven", "7"})
        tok.check_prompts(["A thick, seven!", "thick-7", ""])  # case, punctuation: known
    assert tok.words("a Thick-7, ok") == ["a", "thick", "7", "ok"]
    with pytest.warns(UserWarning, match=r"'purple elephant': none of its words appeared .*\(it knows: 7, a, seven, thick\)"):
        tok.check_prompts(["purple elephant"])
    with pytest.warns(UserWarning, match=r"'purple purple': none of its words appeared"):  # a repeated word is one
        tok.check_prompts(["purple purple"])
    with pytest.warns(UserWarning, match=r"'a thick purple elephant': the words purple, elephant never appeared"):
        tok.check_prompts(["a thick purple elephant"])
    with pytest.warns(UserWarning, match=r"is 11 tokens; this model was trained on prompts of at most 10"):
        tok.check_prompts(["a thick seven " + "7 " * 8])


def test_zero_padding():
    tok = CLIPTokenizer.from_bundled(pad="zero")
    ids = tok.encode("a photo of a cat")
    row = tok("a photo of a cat")[0].tolist()
    assert row == [49406, *ids, 49407] + [0] * (77 - len(ids) - 2)


def test_truncation_keeps_eos_and_warns(tok):
    assert len(tok.encode("word " * 100)) == 100  # one token per word
    with pytest.warns(UserWarning, match=r"dropped 25 tokens: 'word word") as record:
        row = tok("word " * 100)[0]
    assert len(record) == 1
    assert row[0] == 49406 and row[76] == 49407 and (row[1:76] == tok.encode("word")[0]).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exactly 75 tokens fit: no warning, eos last
        assert tok("word " * 75)[0, 76] == 49407
    with pytest.warns(UserWarning, match=r"dropped 1 tokens"):
        tok("word " * 76)


def test_cleanup():
    assert clean_text("  Rock &amp;amp;\tRoll\n\u00a0 ") == "rock & roll"
    assert clean_text("cafe\u0301") == unicodedata.normalize("NFC", "café")


def test_decode_inverts_encode(tok):
    for prompt in PROMPTS + HTML_PROMPTS:
        ids = tok.encode(prompt)
        assert tok.encode(tok.decode(ids)) == ids
    assert tok.decode(tok("a cat")[0, :4]) == "<|startoftext|>a cat <|endoftext|>"


def test_errors(tok, tmp_path):
    with pytest.raises(TypeError, match="int"):
        tok(["a cat", 3])
    with pytest.raises(TypeError, match="NoneType"):
        tok(None)
    with pytest.raises(TypeError, match="bytes"):
        tok.encode(b"a cat")
    missing = tmp_path / "nowhere" / "vocab.json"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        CLIPTokenizer.from_files(missing, tmp_path / "merges.txt")
    with pytest.raises(ValueError, match="pad"):
        CLIPTokenizer.from_bundled(pad="left")


def random_strings(n: int, seed: int = 0) -> list[str]:
    """Mixes of random assigned code points and the pieces the CLIP regex treats specially."""
    rng = random.Random(seed)
    pieces = ["'s", "'S", "'ſ", "'ll", "'LL", "'re", "'d", "'", "''", "<|endoftext|>", "<|StartOfText|>", "<|",
              " ", "  ", "\t", "\n", "\u3000", "\x1c", "\u0345", "a", "Zz", "é", "1", "42", "!", "..", "-", "_"]

    def code_point() -> str:
        while True:
            ch = chr(rng.choice([rng.randrange(0x100), rng.randrange(0x10000), rng.randrange(0x110000)]))
            # Python's Unicode tables are older than `regex`'s: newly assigned letters would disagree.
            if unicodedata.category(ch) not in ("Cn", "Cs"):
                return ch

    return ["".join(rng.choice(pieces) if rng.random() < 0.4 else code_point() for _ in range(rng.randrange(30)))
            for _ in range(n)]


def test_pre_tokenizer_matches_regex():
    regex = pytest.importorskip("regex")
    pattern = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                            r"""[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
    for text in random_strings(400) + PROMPTS + [clean_text(p) for p in PROMPTS]:
        assert pre_tokenize(text) == pattern.findall(text), repr(text)
