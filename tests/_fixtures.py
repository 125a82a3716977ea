"""Helpers shared by test modules: random weights that keep every path audible, and the check that a parity test's
compared output can see its inputs at all."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

NORMS = (nn.GroupNorm, nn.LayerNorm)


def loud(model: nn.Module, std: float | None = 0.1, *, peaky: float = 1.0, seed: int = 0) -> nn.Module:
    """Random weights everywhere (norm gains around 1), so that no path hides behind a zero or an identity.

    ``std``: every other weight's and bias's standard deviation — enough for one model against its reference.
    ``None`` (a whole pipeline, where the prompt must reach the image): each Linear/Conv weight N(0, 1/fan_in), so
    activations stay unit-sized through deep stacks as in a trained model; biases and norm shifts N(0, 0.1);
    embeddings (tokens, positions) N(0, 1), so different prompts give clearly different text-encoder states.
    ``peaky`` multiplies the query and key projections of cross-attention (diffusers' ``attn2.to_q`` /
    ``attn2.to_k``), the logits by peaky²: at 2 a query's largest weight over 77 tokens averages 0.40 (0.06 at 1,
    uniform 0.013), where near-uniform attention would average any prompt into much the same context. Much
    peakier is ill-conditioned: at 3 float32 rounding alone moves the outputs of two exact implementations apart.
    """
    torch.manual_seed(seed)
    if std is not None:
        for name, p in model.named_parameters():
            gain = "norm" in name and name.endswith("weight")
            nn.init.normal_(p, mean=1.0 if gain else 0.0, std=0.1 if gain else std)
        return model.eval()
    done = set()
    for name, module in model.named_modules():
        if isinstance(module, NORMS) and module.weight is not None:
            nn.init.normal_(module.weight, mean=1.0, std=0.1)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=1.0)
        elif isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            gain = peaky if name.endswith(("attn2.to_q", "attn2.to_k")) else 1.0
            nn.init.normal_(module.weight, std=gain / math.sqrt(module.weight[0].numel()))
        else:
            continue
        if getattr(module, "bias", None) is not None:
            nn.init.normal_(module.bias, std=0.1)
        done |= {id(p) for p in module.parameters(recurse=False)}
    missed = [name for name, p in model.named_parameters() if id(p) not in done]
    if missed:
        raise TypeError(f"loud(std=None) does not know how to scale {missed[:3]}")
    return model.eval()


def moved(run: Callable[..., torch.Tensor], base: torch.Tensor, **changes) -> dict[str, float]:
    """How far each single change of ``run``'s keyword arguments moves its output from ``base`` (max |Δ|)."""
    return {name: (run(**{name: value}) - base).abs().max().item() for name, value in changes.items()}


def assert_sensitive(run: Callable[..., torch.Tensor], base: torch.Tensor, tolerance: float, factor: float = 20,
                     **changes) -> dict[str, float]:
    """A parity test is only as good as its output's reach: each change (a different prompt, guidance 1 instead of
    7.5, …) must move the compared output ``run(**change)`` by at least ``factor`` × the test's ``tolerance``, or a
    bug that drops that input would pass unseen. Returns the distances."""
    distances = moved(run, base, **changes)
    quiet = {k: v for k, v in distances.items() if v < factor * tolerance}
    assert not quiet, f"the compared output hardly moves (max |Δ| < {factor} × {tolerance}): {quiet}"
    return distances


def assert_parity(run: Callable[..., torch.Tensor], expected: torch.Tensor, tolerance: float, factor: float = 20,
                  **changes) -> tuple[float, dict[str, float]]:
    """``run()`` matches ``expected`` (the reference library's output) within ``tolerance`` (max |Δ|), and each of
    ``changes`` moves ``run``'s output by ``factor`` × that at least (``assert_sensitive``). Returns the error and
    the distances."""
    got = run()
    error = (got - expected).abs().max().item()
    assert error < tolerance, f"max |Δ| = {error:.3g} against the reference (tolerance {tolerance})"
    return error, assert_sensitive(run, got, tolerance, factor, **changes)
