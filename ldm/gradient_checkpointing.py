"""Gradient checkpointing: keep a stage's inputs, not its activations, and run the stage again in backward.

Training memory is mostly the activations autograd saves for backward: every GroupNorm, SiLU, convolution
and attention inside a stage keeps its input alive until the backward pass reaches it. With checkpointing
on, a stage keeps only the tensors passed into it, and backward recomputes the stage's forward to get the
rest back  [Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"]: one more forward pass of
compute per step for activation memory that grows with the number of stages instead of the number of layers.

It is a switch on a built model, like attention slicing, and not part of the architecture config: the
weights, the outputs and the gradients are the same with it on or off, so a run may turn it on or off on
resume. Models opt in by declaring a class attribute ``gradient_checkpointing = False`` and running their
stages through ``run_stage``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def set_gradient_checkpointing(model: nn.Module, on: bool = True) -> None:
    """Turn checkpointing on or off in every part of ``model`` that supports it (the UNet; the VAE's encoder
    and decoder), e.g. ``set_gradient_checkpointing(unet)`` or, for one part only, ``unet.gradient_checkpointing = True``."""
    owners = [m for m in model.modules() if isinstance(getattr(type(m), "gradient_checkpointing", None), bool)]
    if not owners:
        raise ValueError(f"{type(model).__name__} has no stages to checkpoint "
                         "(the UNet and the VAE's encoder and decoder have)")
    for module in owners:
        module.gradient_checkpointing = bool(on)


def run_stage(owner: nn.Module, stage: Callable[..., torch.Tensor], *args) -> torch.Tensor:
    """``stage(*args)``, checkpointed when ``owner.gradient_checkpointing`` is on and autograd is recording
    (under ``no_grad`` / ``inference_mode`` nothing is saved, so there is nothing to gain).

    ``use_reentrant=False``: the variant PyTorch recommends — it works when only the weights (not the
    inputs) need gradients, with DDP, and with non-tensor arguments such as a None context.
    The RNG state is restored for the recomputation, so dropout draws the same mask twice.
    """
    if owner.gradient_checkpointing and torch.is_grad_enabled():
        return checkpoint(stage, *args, use_reentrant=False)
    return stage(*args)
