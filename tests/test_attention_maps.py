"""Cross-attention maps: each recorded map is the layer's own softmax(QKᵀ/√d), read back through attention with
the identity as values, and the averaged maps stay distributions over the tokens."""

from __future__ import annotations

import pytest
import torch

from ldm.attention import multihead_attention
from ldm.attention_maps import CrossAttentionMaps
from ldm.tokenizer import CLIPTokenizer
from ldm.unet import UNet, UNetConfig

CONFIG = UNetConfig.mnist_latent().with_(channels=32, attention=(True, True), context_dim=16, label_context=False,
                                         num_classes=None, head_dim=8, norm_groups=8)


@pytest.fixture(scope="module")
def run():
    torch.manual_seed(0)
    unet = UNet(CONFIG).eval()
    with torch.no_grad():  # loud: peaky attention (default inits leave it near uniform), so maps differ
        for layer in CrossAttentionMaps(unet).layers:
            layer.to_q.weight.mul_(4)
            layer.to_k.weight.mul_(4)
    context = 3 * torch.randn(2, 6, 16)
    inputs = {}

    def keep(layer, args, output):
        inputs.setdefault(layer, []).append(args)

    hooks = [layer.register_forward_hook(keep) for layer in CrossAttentionMaps(unet).layers]
    with CrossAttentionMaps(unet) as maps, torch.no_grad():
        unet(torch.randn(2, 2, 8, 8), torch.tensor([10, 500]), context)
    for hook in hooks:
        hook.remove()
    return unet, maps, inputs


def test_each_map_is_the_layers_attention(run):
    unet, maps, inputs = run
    assert len(maps.maps) == len(maps.layers) == len(inputs) > 2
    for recorded, (layer, [(x, context, *_)]) in zip(maps.maps, inputs.items()):
        B, S = context.shape[:2]
        identity = torch.eye(S).repeat(1, layer.heads).expand(B, S, S * layer.heads)  # values = one-hot tokens
        attention = multihead_attention(layer.to_q(x), layer.to_k(context), identity, layer.heads)  # (B, L, h·S)
        expected = attention.unflatten(-1, (layer.heads, S)).mean(2).transpose(1, 2)
        torch.testing.assert_close(recorded.flatten(2), expected, rtol=1e-4, atol=1e-6)
    assert {m.shape[-1] for m in maps.maps} == {8, 4}  # two grids, both laid out


def test_the_mean_is_a_distribution_over_tokens_that_tells_tokens_apart(run):
    _, maps, _ = run
    mean = maps.mean()
    assert mean.shape == (2, 6, 8, 8)
    torch.testing.assert_close(mean.sum(1), torch.ones(2, 8, 8))
    assert (mean.amax((2, 3)) - mean.amin((2, 3))).max() > 0.1  # maps vary over the image
    assert (mean[:, 1:] - mean[:, :-1]).abs().amax() > 0.1        # and from token to token


def test_words_name_the_prompts_tokens(run):
    _, maps, _ = run
    tokenizer = CLIPTokenizer.from_bundled()
    words = maps.words(tokenizer, "a thick seven")
    assert [w for w, _ in words] == ["a", "thick", "seven"]
    torch.testing.assert_close(words[1][1], maps.mean()[0, 2])


def test_misuse_is_named():
    with pytest.raises(ValueError, match="no cross-attention layers"):
        CrossAttentionMaps(UNet(UNetConfig.mnist_latent().with_(channels=32, norm_groups=8, context_dim=None,
                                                                  label_context=False)))
    with pytest.raises(ValueError, match="no cross-attention was recorded"):
        CrossAttentionMaps(UNet(CONFIG)).mean()
