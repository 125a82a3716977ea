"""CLIP's text tokenizer: byte-level BPE written out by hand.

Text → cleaned text → words (CLIP's pre-tokenizer) → UTF-8 bytes shown as printable characters (GPT-2's byte
map) → BPE merges [Sennrich et al. 2016] → ids → `<|startoftext|> ids <|endoftext|>` padded to 77, the sequence
the CLIP text encoder reads [Radford et al. 2021]. Matches openai/CLIP `simple_tokenizer.py` without its
`regex` and `ftfy` dependencies.

Added tokens (textual inversion's new words [Gal et al. 2022], ``add_token``) are cut out of the cleaned text
before the pre-tokenizer sees it, as transformers' added tokens are, and read as ids past the vocabulary.
"""

from __future__ import annotations

import gzip
import html
import json
import re
import unicodedata
import warnings
from pathlib import Path
from typing import Literal

import torch

try:
    import ftfy
except ImportError:
    ftfy = None

BUNDLED_VOCAB = Path(__file__).parent / "assets" / "clip" / "bpe_simple_vocab_16e6.txt.gz"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_LITERALS = (BOS, EOS, "'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
# CLIP's regex sees `\s` as Unicode White_Space, which lacks the separators U+001C-001F that str.isspace() has.
# And `regex` with IGNORECASE matches U+0345 (it case-folds to ι) with none of the three classes, so skips it.
_SKIPPED = frozenset([*"\t\n\v\f\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000\u0345",
                      *map(chr, range(0x2000, 0x200B))])


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte map: each of the 256 bytes → one printable character, so merges never see spaces or controls.

    Printable Latin-1 bytes stand for themselves; the rest are shifted to U+0100 and up. The dict's order is the
    order of the first 256 vocabulary entries.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def clean_text(text: str) -> str:
    """ftfy (or just NFC, ftfy's last step, without it), HTML entities undone twice, whitespace collapsed, lower."""
    # Without NFC a decomposed "é" would split into a letter and a stray accent, unlike ftfy and the HF tokenizer.
    text = ftfy.fix_text(text) if ftfy is not None else unicodedata.normalize("NFC", text)
    # Scraped captions are often escaped twice ("&amp;amp;").
    text = html.unescape(html.unescape(text))
    return " ".join(text.split()).lower()


def _char_class(ch: str) -> str:
    if ch in _SKIPPED:
        return " "
    major = unicodedata.category(ch)[0]
    return major if major in "LN" else "P"


def pre_tokenize(text: str) -> list[str]:
    r"""Split text into words as CLIP's regex does, with `unicodedata` instead of `\p{…}` classes.

    The regex, case-insensitive, tried in this order at each position:
        <\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+
    Letters come in runs, digits one at a time, other symbols in runs; whitespace separates and is dropped.
    Characters unassigned in this Python's Unicode tables count as symbols (`regex` may know them as letters).
    """
    words, i = [], 0
    while i < len(text):
        # casefold, not lower: IGNORECASE also lets "'ſ" (long s) match "'s".
        literal = next((w for w in _LITERALS if text[i:i + len(w)].casefold() == w), None)
        kind, j = ("literal", i + len(literal)) if literal else (_char_class(text[i]), i + 1)
        if kind in ("L", "P"):  # digits stay single, so "1984" costs four tokens whatever the number
            while j < len(text) and _char_class(text[j]) == kind:
                j += 1
        if kind != " ":
            words.append(text[i:j])
        i = j
    return words


class CLIPTokenizer:
    """Prompt → (B, 77) token ids for a CLIP text encoder [Radford et al. 2021], by byte-level BPE
    [Sennrich et al. 2016].

    pad: "eos" pads with `<|endoftext|>` (49407), as Stable Diffusion 1.x does; "zero" pads with id 0 ("!"),
    as open_clip and Stable Diffusion 2.x do.
    """

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]],
                 pad: Literal["eos", "zero"] = "eos", max_length: int = 77) -> None:
        if pad not in ("eos", "zero"):
            raise ValueError(f"pad must be 'eos' or 'zero', got {pad!r}")
        self.vocab = vocab
        self.decoder = {i: token for token, i in vocab.items()}
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}  # lower rank = learned earlier = merged first
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.bos_id, self.eos_id = vocab[BOS], vocab[EOS]
        self.pad, self.pad_id = pad, vocab[EOS] if pad == "eos" else 0
        self.max_length, self.vocab_size = max_length, len(vocab)
        # The words of a model's training captions, for a model trained from scratch on a small language
        # (``ldm.mnist_text``); None for CLIP's, which has read the web.
        self.trained_words: frozenset[str] | None = None
        # Prompts repeat words endlessly; the special tokens are seeded so BPE never splits them.
        self._cache: dict[str, list[str]] = {BOS: [BOS], EOS: [EOS]}
        # add_token's units: cleaned text → the ids it stands for; id → the name it was added as
        self.added: dict[str, list[int]] = {}
        self.added_names: dict[int, str] = {}
        self._added_pattern: re.Pattern[str] | None = None

    def __len__(self) -> int:
        """The vocabulary and the added tokens: the next added token's id (transformers' ``len(tokenizer)``)."""
        return self.vocab_size + len(self.added_names)

    @classmethod
    def from_bundled(cls, pad: Literal["eos", "zero"] = "eos") -> CLIPTokenizer:
        """The vocabulary shipped with openai/CLIP (and in `ldm/assets/clip`)."""
        lines = gzip.decompress(_read_bytes(BUNDLED_VOCAB)).decode("utf-8").split("\n")
        # The file holds 262144 merges; CLIP keeps the first 48894, for 512 + 48894 + 2 = 49408 tokens.
        merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
        byte_chars = list(bytes_to_unicode().values())
        tokens = [*byte_chars, *(c + "</w>" for c in byte_chars), *("".join(m) for m in merges), BOS, EOS]
        return cls({t: i for i, t in enumerate(tokens)}, merges, pad=pad)

    @classmethod
    def from_files(cls, vocab_json: str | Path, merges_txt: str | Path,
                   pad: Literal["eos", "zero"] = "eos", max_length: int = 77) -> CLIPTokenizer:
        """A Hugging Face `vocab.json` + `merges.txt` pair (as in a diffusers `tokenizer/` folder)."""
        vocab = json.loads(_read_bytes(vocab_json))
        lines = _read_bytes(merges_txt).decode("utf-8").split("\n")
        if lines and lines[0].startswith("#version"):
            lines = lines[1:]
        return cls(vocab, [tuple(line.split()) for line in lines if line.strip()], pad=pad, max_length=max_length)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> CLIPTokenizer:
        """A diffusers `tokenizer/` folder (or the pipeline folder holding one); the pad token comes from
        `special_tokens_map.json` or `tokenizer_config.json` when present, else `<|endoftext|>`; the context length
        from `tokenizer_config.json`'s `model_max_length`, else 77; the trained words from `trained_words.json`."""
        folder = Path(folder)
        if not (folder / "vocab.json").exists() and (folder / "tokenizer" / "vocab.json").exists():
            folder = folder / "tokenizer"
        configs = {name: json.loads((folder / name).read_text("utf-8"))
                   for name in ("special_tokens_map.json", "tokenizer_config.json") if (folder / name).is_file()}
        pad_token = EOS
        for config in configs.values():  # transformers lets the map win
            if (value := config.get("pad_token")) is not None:
                pad_token = value["content"] if isinstance(value, dict) else value
                break
        pad = {EOS: "eos", "!": "zero"}.get(pad_token)
        if pad is None:
            raise ValueError(f"{folder}: pad token {pad_token!r} is neither {EOS!r} nor '!' (id 0)")
        value = configs.get("tokenizer_config.json", {}).get("model_max_length", 77)
        # transformers writes int(1e30) for "no limit"; CLIP's position table still stops at 77
        max_length = value if isinstance(value, int) and value < 10**6 else 77
        if max_length < 3:
            raise ValueError(f"{folder}: model_max_length {max_length} leaves no room for a word between "
                             "the start and end tokens")
        if not (folder / "vocab.json").exists() and (folder / "tokenizer.json").exists():
            # transformers 5 saves only the fast tokenizer's file: the same BPE vocabulary and merges, as JSON
            model = json.loads(_read_bytes(folder / "tokenizer.json"))["model"]
            merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]
            tokenizer = cls(model["vocab"], merges, pad=pad, max_length=max_length)
        else:
            tokenizer = cls.from_files(folder / "vocab.json", folder / "merges.txt", pad=pad, max_length=max_length)
        if (folder / "trained_words.json").is_file():
            tokenizer.trained_words = frozenset(json.loads((folder / "trained_words.json").read_text("utf-8")))
        return tokenizer

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write a `tokenizer/` folder that `from_pretrained` and transformers' `CLIPTokenizer` both read."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(self.vocab, ensure_ascii=False), "utf-8")
        merges = sorted(self.ranks, key=self.ranks.__getitem__)
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", "utf-8")
        pad_token = EOS if self.pad == "eos" else "!"
        special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
        (folder / "special_tokens_map.json").write_text(json.dumps(special), "utf-8")
        config = special | {"tokenizer_class": "CLIPTokenizer", "model_max_length": self.max_length}
        (folder / "tokenizer_config.json").write_text(json.dumps(config), "utf-8")
        if self.trained_words is not None:
            (folder / "trained_words.json").write_text(json.dumps(sorted(self.trained_words)), "utf-8")
        return folder

    @staticmethod
    def words(text: str) -> list[str]:
        """The words of a text as the pre-tokenizer cuts them, punctuation left out: what ``trained_words`` holds."""
        return [word for word in pre_tokenize(clean_text(text)) if any(c.isalnum() for c in word)]

    def check_prompts(self, prompts: list[str]) -> None:
        """Warn about what a model trained from scratch on short captions (``trained_words`` set) cannot read: words
        its captions never held (their rows of the token table are still random: noise to the model) and prompts
        longer than its context, which it has only ever seen as one chunk. SD's tokenizers check nothing."""
        if self.trained_words is None:
            return
        for prompt in prompts:
            words = self.words(prompt)
            if unknown := [w for w in dict.fromkeys(words) if w not in self.trained_words]:
                what = "none of its words" if len(unknown) == len(set(words)) else f"the words {', '.join(unknown)} never"
                warnings.warn(f"prompt {prompt!r}: {what} appeared in this model's training captions, so it reads "
                              f"them as noise (it knows: {', '.join(sorted(self.trained_words))})", stacklevel=3)
            if (count := len(self.encode(prompt))) > self.max_length - 2:
                warnings.warn(f"prompt {prompt!r} is {count} tokens; this model was trained on prompts of at most "
                              f"{self.max_length - 2}, and reads the rest as further chunks it never saw in "
                              "training", stacklevel=3)

    def bpe(self, word: str) -> list[str]:
        """Merge a byte-mapped word's symbols, best-ranked pair first, until no known pair is left."""
        if word in self._cache:
            return self._cache[word]
        # `</w>` marks the word's end, so "a" ending a word and "a" inside one are different tokens.
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            best = min(zip(symbols, symbols[1:]), key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        self._cache[word] = symbols
        return symbols

    def encode(self, text: str) -> list[int]:
        """Token ids of one prompt, without start/end tokens and without truncation."""
        if not isinstance(text, str):
            raise TypeError(f"a prompt must be str, got {type(text).__name__}")
        ids = []
        for piece, unit in self._split_added(clean_text(text)):
            for word in pre_tokenize(piece):
                mapped = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
                ids.extend(self.vocab[symbol] for symbol in self.bpe(mapped))
            ids.extend(unit)
        return ids

    def _split_added(self, text: str) -> list[tuple[str, list[int]]]:
        """(text before, the ids of the added token that follows it) pairs, the last with no ids: the text cut
        at each added token, leftmost match first and the longest at that place (as transformers' trie matches,
        so "<tok>_1" wins over "<tok>"), inside words too. Without added tokens: [(text, [])]."""
        if self._added_pattern is None:
            return [(text, [])]
        pieces, start = [], 0
        for match in self._added_pattern.finditer(text):
            pieces.append((text[start:match.start()], self.added[match.group()]))
            start = match.end()
        return [*pieces, (text[start:], [])]

    def add_token(self, token: str, vectors: int = 1) -> list[int]:
        """Make ``token`` one unit that reads as ``vectors`` new ids, ``len(self)`` onwards: a textual-inversion
        pseudo-word S*, whose rows in the text encoder's embedding table are learned  [Gal et al. 2022, §3].

        The n > 1 rows of a multi-vector token also get diffusers' names ``token_1`` … ``token_{n−1}``, each a
        unit alone; ``token`` in a prompt expands to all n ids, as diffusers' ``maybe_convert_prompt`` expands
        the prompt's text. Tokens match as transformers' added tokens do: in the cleaned (lower-case) text,
        inside words too, before the pre-tokenizer and BPE see the rest (``encode``).
        ValueError naming the token when it, or one of its row names, is already a vocabulary entry (it would
        hide that word) or already added (``check_new_token``). Returns the new ids.
        """
        names, keys = self.check_new_token(token, vectors)
        ids = list(range(len(self), len(self) + vectors))
        for name, key, i in zip(names, keys, ids):
            self.added[key], self.added_names[i] = [i], name
        self.added[keys[0]] = ids
        self._compile_added()
        return ids

    def check_new_token(self, token: str, vectors: int = 1) -> tuple[list[str], list[str]]:
        """ValueError unless ``add_token(token, vectors)`` can add the token; its names and their cleaned forms."""
        if isinstance(vectors, bool) or not isinstance(vectors, int) or vectors < 1:
            raise ValueError(f"a token stands for at least one vector; got vectors={vectors!r}")
        if not isinstance(token, str):
            raise TypeError(f"a token must be a str, got {type(token).__name__}")
        names = [token] + [f"{token}_{i}" for i in range(1, vectors)]
        keys = [clean_text(name) for name in names]
        for name, key in zip(names, keys):
            if not key:
                raise ValueError(f"cannot add the token {name!r}: it is empty once cleaned")
            if key in self.added or key in (BOS, EOS) or key in self.vocab or key + "</w>" in self.vocab:
                where = "already added" if key in self.added else "already in the vocabulary"
                raise ValueError(f"token {name!r} is {where}; choose another name for it")
        return names, keys

    def remove_added_tokens(self) -> None:
        """Forget every added token: the tokenizer reads text as it did before the first ``add_token``."""
        self.added, self.added_names = {}, {}
        self._compile_added()

    def _compile_added(self) -> None:
        # Python's regex alternation takes the first alternative that matches, so longest first = longest match.
        keys = sorted(self.added, key=len, reverse=True)
        self._added_pattern = re.compile("|".join(map(re.escape, keys))) if keys else None

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Text of token ids (special and added tokens included as text); word ends become spaces."""
        parts, chars = [], []
        for i in map(int, ids):
            if i in self.added_names:  # an added token is a whole word of its own
                parts += [self._decode_chars(chars), self.added_names[i]]
                chars = []
            else:
                chars.append(self.decoder[i])
        return " ".join(part for part in [*parts, self._decode_chars(chars)] if part)

    def _decode_chars(self, chars: list[str]) -> str:
        text = bytes(self.byte_decoder[c] for c in "".join(chars)).decode("utf-8", errors="replace")
        return text.replace("</w>", " ").strip()

    def frame(self, ids: list[int]) -> list[int]:
        """`<|startoftext|> ids <|endoftext|>` padded to max_length: the row the text encoder reads (≤ 75 ids)."""
        row = [self.bos_id, *ids, self.eos_id]
        return row + [self.pad_id] * (self.max_length - len(row))

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        """Prompts → ids, `<|startoftext|>` first and `<|endoftext|>` last, truncated and padded.

        Shapes: returns (B, L) int64 with L = max_length; a single str gives B = 1.
        """
        if isinstance(texts, str):
            texts = [texts]
        elif not isinstance(texts, (list, tuple)):
            raise TypeError(f"prompts must be a str or a list of str, got {type(texts).__name__}")
        keep, rows = self.max_length - 2, []
        for text in texts:
            ids = self.encode(text)
            if len(ids) > keep:
                # The encoder silently never sees the tail, so say what was lost.
                dropped = ids[keep:]
                warnings.warn(f"prompt is longer than {self.max_length} tokens; dropped {len(dropped)} tokens: "
                              f"{self.decode(dropped)!r}", stacklevel=2)
                ids = ids[:keep]
            rows.append(self.frame(ids))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.max_length)


def _read_bytes(path: str | Path) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CLIP tokenizer file not found: {path}")
    return path.read_bytes()
