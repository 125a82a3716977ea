"""Prompt syntax as Stable Diffusion users write it: attention weights, BREAK and prompts longer than 77 tokens.

The rules are AUTOMATIC1111's web UI's (``modules/prompt_parser.py`` and ``modules/sd_hijack_clip.py``):

    "a (red:1.3) car, [blurry] BREAK night"
      ─parse_prompt─► [("a ", 1), ("red", 1.3), (" car, ", 1), ("blurry", 1/1.1), BREAK, ("night", 1)]
      ─prompt_chunks─► chunks of ≤ 75 (id, weight) pairs, a new chunk at BREAK and after every 75 tokens
      ─prompt_tokens─► ids and weights (B, K, 77): each chunk framed as a 77-token prompt of its own
      ─the text encoder, per chunk─► (B, K, 77, D) ─emphasize─► weighted, mean restored ─► context (B, K·77, D)

A prompt without brackets or BREAK and within 75 tokens is one chunk of weight 1: the plain tokenizer's ids, and
``emphasize`` leaves the context alone, so its context is bit for bit the one without this syntax.
"""

from __future__ import annotations

import re
import warnings
from typing import Callable, Sequence

import torch

from .tokenizer import CLIPTokenizer

CHUNK = 75  # tokens per chunk: 77 less the start and end tokens
ROUND, SQUARE = 1.1, 1 / 1.1  # A1111's multipliers for (…) and […]
BREAK = ("BREAK", -1.0)  # the fragment that ends a chunk (A1111 writes it so too); no weight touches it

_LEXEME = re.compile(r"\\[()\[\]\\]|[()\[\]]|[^\\()\[\]]+|\\")
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)")
_CLOSER = {"(": ")", "[": "]"}


def _lex(text: str) -> list[tuple[str, str]]:
    """(kind, text) lexemes: "open"/"close" for brackets, "text" for the rest, escapes (``\\(``) already undone."""
    out = []
    for lexeme in _LEXEME.findall(text):
        if len(lexeme) == 1 and lexeme in "()[]":
            out.append(("open" if lexeme in _CLOSER else "close", lexeme))
        else:  # "\(" is the character "(", "\\" one backslash; a lone backslash stays itself
            out.append(("text", lexeme[1:] if len(lexeme) == 2 and lexeme[0] == "\\" else lexeme))
    return out


def _balance(lexemes: list[tuple[str, str]], prompt: str) -> list[tuple[str, str]]:
    """Brackets without their partner (a ")" with no "(" open, a "(" never closed, "(]") become text, with a
    warning. A1111 instead lets an unclosed "(" weight the rest of the prompt; the warning names what changed."""
    lexemes, stack, lone = list(lexemes), [], []
    for i, (kind, char) in enumerate(lexemes):
        if kind == "open":
            stack.append(i)
        elif kind == "close" and stack and _CLOSER[lexemes[stack[-1]][1]] == char:
            stack.pop()
        elif kind == "close":
            lone.append(i)
    for i in sorted(lone + stack):
        lexemes[i] = ("text", lexemes[i][1])
    if lone or stack:
        chars = "".join(lexemes[i][1] for i in sorted(lone + stack))
        warnings.warn(f"unbalanced brackets {chars!r} in prompt {prompt!r} are read as text (escape a literal bracket "
                      "as \\( \\) \\[ \\])", stacklevel=3)
    return lexemes


def _explicit_weight(group: list[list], prompt: str) -> float | None:
    """The weight of "(text:w)", taken off the group's last fragment; None when no colon ends the group.
    A colon followed by no number ("(word:abc)") is kept as text, with a warning, and the group gets ×1.1."""
    if not group or tuple(group[-1]) == BREAK or ":" not in group[-1][0]:
        return None
    head, _, tail = group[-1][0].rpartition(":")
    if not _NUMBER.fullmatch(tail.strip()):
        warnings.warn(f"{tail.strip()!r} after ':' in prompt {prompt!r} is no weight; read as text", stacklevel=3)
        return None
    group[-1][0] = head
    return float(tail)


def parse_prompt(prompt: str) -> list[tuple[str, float]]:
    r"""Prompt → (text, weight) fragments, as A1111's ``parse_prompt_attention``:

        (text) ×1.1    ((text)) ×1.21    [text] ÷1.1    (text:1.3) ×1.3    nesting multiplies
        \( \) \[ \] a literal bracket, \\ a backslash    BREAK (upper case, a word of its own) → ``BREAK``
    Neighbours of equal weight merge and empty text is dropped; a prompt with no text is [("", 1.0)].
    Unbalanced brackets, and a weight that is no number, are read as text with a warning (see ``_balance``).
    """
    fragments: list[list] = []  # [text, weight], mutable: a group's weight is applied when it closes
    opened: list[int] = []  # where each open group's fragments begin
    previous = ""
    for kind, text in _balance(_lex(prompt), prompt):
        if kind == "open":
            opened.append(len(fragments))
        elif kind == "close":
            group = fragments[opened.pop():]
            # only text right before the ")" can carry ":w"; a nested group's text has had its chance
            weight = _explicit_weight(group, prompt) if text == ")" and previous == "text" else None
            for fragment in group:
                if tuple(fragment) != BREAK:
                    fragment[1] *= weight if weight is not None else ROUND if text == ")" else SQUARE
        else:
            for i, part in enumerate(_BREAK.split(text)):
                if i:
                    fragments.append(list(BREAK))
                fragments.append([part, 1.0])
        previous = kind
    merged: list[tuple[str, float]] = []
    for text, weight in map(tuple, fragments):
        if (text, weight) == BREAK:
            merged.append(BREAK)
        elif text and merged and merged[-1] != BREAK and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + text, weight)
        elif text:
            merged.append((text, weight))
    return merged or [("", 1.0)]


def prompt_chunks(fragments: Sequence[tuple[str, float]], encode: Callable[[str], list[int]],
                  size: int = CHUNK) -> list[tuple[list[int], list[float]]]:
    """Fragments → chunks of at most ``size`` (token id, weight) pairs, each fragment tokenised on its own.

    A chunk ends at BREAK (even an empty one: "BREAK x" is an empty chunk, then x) and when it is full; the last
    is kept if it holds tokens or is the only one, as A1111 does. A1111 also moves the words after a comma that
    lies within the last 20 tokens of a full chunk to the next; here a chunk is cut at exactly ``size`` tokens.
    """
    chunks, ids, weights = [], [], []
    for text, weight in fragments:
        if (text, weight) == BREAK:
            chunks.append((ids, weights))
            ids, weights = [], []
            continue
        for token in encode(text):
            if len(ids) == size:
                chunks.append((ids, weights))
                ids, weights = [], []
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        chunks.append((ids, weights))
    return chunks


def count_chunks(prompts: Sequence[str], tokenizer: CLIPTokenizer) -> int:
    """The most chunks any of the prompts takes."""
    return max(len(prompt_chunks(parse_prompt(p), tokenizer.encode, tokenizer.max_length - 2)) for p in prompts)


def prompt_tokens(prompts: Sequence[str], tokenizer: CLIPTokenizer,
                  chunks: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts → ids (B, K, 77) int64 and weights (B, K, 77) float32, K = the most chunks a prompt takes (at least
    ``chunks``). Each chunk is framed as the tokenizer frames one prompt (start, ids, end, its padding), with weight
    1 on the framing; rows with fewer chunks get empty ones (start, end, padding), as A1111 pads a batch."""
    rows = [prompt_chunks(parse_prompt(p), tokenizer.encode, tokenizer.max_length - 2) for p in prompts]
    k = max(chunks, *(len(row) for row in rows))
    ids = [[tokenizer.frame(i) for i, _ in row] + [tokenizer.frame([])] * (k - len(row)) for row in rows]
    weights = [[[1.0, *w, *[1.0] * (tokenizer.max_length - 1 - len(w))] for _, w in row]
               + [[1.0] * tokenizer.max_length] * (k - len(row)) for row in rows]
    return torch.tensor(ids, dtype=torch.long), torch.tensor(weights, dtype=torch.float32)


def emphasize(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each token's state × its weight, then the chunk rescaled to its old mean (A1111's ``process_tokens``):

        z' = z · w;   z'' = z' · mean(z) / mean(z')      (means over one chunk's 77 × D values)
    so weights shift attention between tokens without changing the context's overall level. A1111 takes the means
    over a chunk of the whole batch; here over each prompt's, so a prompt's context does not depend on its batch
    mates (the same for a batch of one prompt). All weights 1: ``hidden`` itself; a chunk of weight 1 in a batch
    that has others comes back as z · 1 · 1 = z exactly.
    Shapes: hidden (..., 77, D), weights (..., 77) → (..., 77, D), in hidden's dtype.
    """
    if bool((weights == 1).all()):
        return hidden
    z = hidden.float()
    weighted = z * weights.to(z.device)[..., None]
    ratio = z.mean(dim=(-2, -1), keepdim=True) / weighted.mean(dim=(-2, -1), keepdim=True)
    return (weighted * ratio).to(hidden.dtype)


__all__ = ["BREAK", "CHUNK", "count_chunks", "emphasize", "parse_prompt", "prompt_chunks", "prompt_tokens"]
