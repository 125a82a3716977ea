"""Stacked Q/K/V projections (one GEMM at inference) against the separate layers they stand for."""

import torch
from torch import nn

from ldm.attention import CrossAttention, SelfAttentionBlock, stacked_projection


def test_stacked_projection_equals_separate_layers_and_follows_weight_updates():
    torch.manual_seed(0)
    owner = CrossAttention(32, heads=4, head_dim=8)
    layers = (owner.to_q, owner.to_k, owner.to_v)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        stacked = stacked_projection(owner, "qkv", layers, x)
        for got, layer in zip(stacked, layers):
            torch.testing.assert_close(got, layer(x))
        owner.to_k.weight.mul_(-2)  # in place, as an optimizer step or load_state_dict does
        torch.testing.assert_close(stacked_projection(owner, "qkv", layers, x)[1], owner.to_k(x))


def test_stacked_projection_with_biases_and_under_autograd():
    torch.manual_seed(0)
    layers = (nn.Linear(16, 8), nn.Linear(16, 24))
    owner = nn.ModuleList(layers)
    x = torch.randn(3, 16)
    with torch.no_grad():
        a, b = stacked_projection(owner, "ab", layers, x)
    torch.testing.assert_close(b, layers[1](x).detach())
    a, b = stacked_projection(owner, "ab", layers, x)  # gradients wanted: stacked afresh, through autograd
    (a.square().sum() + b.sum()).backward()
    stacked_grads = [p.grad.clone() for p in owner.parameters()]
    owner.zero_grad()
    (layers[0](x).square().sum() + layers[1](x).sum()).backward()
    for got, want in zip(stacked_grads, (p.grad for p in owner.parameters())):
        torch.testing.assert_close(got, want)
    cached_weight, _ = owner._derived["ab"][1]
    assert not cached_weight.requires_grad  # the inference cache holds no autograd graph


def test_attention_modules_give_the_same_output_with_and_without_gradients():
    torch.manual_seed(0)
    self_attn, cross = CrossAttention(32, 4, 8), CrossAttention(32, 4, 8, context_dim=12)
    block = SelfAttentionBlock(32, head_dim=16)
    nn.init.normal_(block.to_out.weight)  # zero-initialised: the branch would be invisible
    x, c, img = torch.randn(2, 6, 32), torch.randn(2, 3, 12), torch.randn(2, 32, 4, 4)
    for module, args in ((self_attn, (x,)), (cross, (x, c)), (block, (img,))):
        with torch.no_grad():
            fast = module(*args)
        torch.testing.assert_close(fast, module(*args).detach())
    cross.to(torch.float64)  # casting drops the cached stacked weights with the old ones
    assert not getattr(cross, "_derived", None)
    with torch.no_grad():
        assert cross(x.double(), c.double()).dtype == torch.float64
