"""Winograd F(2×2, 3×3) convolution against float64 direct convolution, and when ``Conv2d`` uses it."""

import pytest
import torch
import torch.nn.functional as F

from ldm.conv import WINOGRAD, Conv2d, set_winograd, winograd_conv3x3, winograd_filters


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("m, shape, tolerance", [
    (2, (1, 3, 2, 2), 2e-6), (2, (2, 8, 6, 10), 2e-6), (2, (3, 40, 16, 8), 2e-6),  # as exact as the direct kernel
    (4, (1, 3, 4, 4), 2e-5), (4, (2, 40, 8, 12), 2e-5)])  # larger transform entries: ~10× the rounding
@pytest.mark.parametrize("bias", [True, False])
def test_winograd_equals_direct_convolution(m, shape, tolerance, bias):
    torch.manual_seed(0)
    B, C, H, W = shape
    x, w = torch.randn(shape), torch.randn(5, C, 3, 3)
    b = torch.randn(5) if bias else None
    ref = F.conv2d(x.double(), w.double(), None if b is None else b.double(), padding=1)
    out = winograd_conv3x3(x, winograd_filters(w, m), b)
    assert out.shape == (B, 5, H, W)
    assert rel(out, ref) < tolerance
    assert rel(F.conv2d(x, w, b, padding=1), ref) < 2e-6


def test_winograd_bfloat16_stays_within_bfloat16_rounding():
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 64, 8, 8), torch.randn(32, 64, 3, 3) / 24, torch.randn(32)
    ref = F.conv2d(x.double(), w.double(), b.double(), padding=1)
    out = winograd_conv3x3(x.bfloat16(), winograd_filters(w.bfloat16()), b.bfloat16())
    assert out.dtype == torch.bfloat16
    assert rel(out, ref) < 2e-2  # bf16 has 8 significant bits (4e-3 per rounding); a transform bug gives O(1)


def test_filter_transform_is_G_g_Gt():
    g = torch.arange(9.0).reshape(1, 1, 3, 3)
    G = torch.tensor([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])
    assert torch.allclose(winograd_filters(g).reshape(4, 4), G @ g[0, 0] @ G.T)


@pytest.mark.parametrize("m", [2, 4])
def test_winograd_matrices_give_the_1d_correlation(m):
    """F(m, 3) in one dimension: Aᵀ[(G g) ⊙ (Bᵀ d)] = the m outputs of correlating d (length m + 2) with g."""
    BT, G, AT = WINOGRAD[m]
    d, g = torch.randn(m + 2, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    expected = torch.stack([d[i : i + 3] @ g for i in range(m)])
    torch.testing.assert_close(AT @ ((G @ g) * (BT @ d)), expected)


def make_conv(cin=32, cout=16):
    torch.manual_seed(0)
    return Conv2d(cin, cout, 3, padding=1)


def test_conv2d_takes_fast_paths_only_where_they_apply():
    conv, x = make_conv(), torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        assert conv.fast_path(x) == "winograd2"
        assert conv.fast_path(torch.randn(2, 32, 7, 8)) is None  # odd size: no 2×2 tiling
        assert conv.fast_path(torch.randn(2, 32, 64, 64)) is None  # many pixels, few channels: direct is faster
        wide = make_conv(cin=256)
        assert wide.fast_path(torch.randn(2, 256, 32, 32)) == "winograd4"
        assert wide.fast_path(torch.randn(2, 256, 30, 30)) is None  # not a multiple of 4, too many pixels for 2×2
        assert wide.fast_path(torch.randn(4, 256, 128, 128)) is None
        assert conv.fast_path(x.half()) is None
        bf16 = make_conv(cin=256).bfloat16()
        assert bf16.fast_path(torch.randn(1, 256, 16, 16).bfloat16()) == "winograd2"
        assert bf16.fast_path(torch.randn(1, 256, 32, 16).bfloat16()) is None  # more pixels: keep bf16 precision
        assert make_conv(cin=8).fast_path(torch.randn(2, 8, 8, 8)) is None  # thin: direct is faster
        assert Conv2d(32, 16, 3, padding=1, stride=2).fast_path(x) is None
        assert Conv2d(32, 16, 1).fast_path(torch.randn(2, 32, 8, 8)) is None  # 1×1: oneDNN is as fast as a GEMM
    assert conv.fast_path(x) is None  # gradients wanted: the direct kernel and its fused backward


@pytest.mark.parametrize("cin, size", [(32, (8, 6)), (256, (32, 24))])
def test_conv2d_matches_nn_conv2d_both_paths_and_keeps_state_dict_keys(cin, size):
    conv, x = make_conv(cin), torch.randn(2, cin, *size)
    plain = torch.nn.Conv2d(cin, 16, 3, padding=1)
    plain.load_state_dict(conv.state_dict())
    assert set(conv.state_dict()) == {"weight", "bias"}
    with torch.no_grad():
        assert conv.fast_path(x) is not None
        ref = plain(x)
        assert rel(conv(x), ref) < 2e-5
        odd = torch.randn(2, cin, 7, 5)  # the fallback
        assert rel(conv(odd), plain(odd)) < 1e-6
    y = conv(x.requires_grad_())
    y.sum().backward()
    assert conv.weight.grad is not None and rel(y.detach(), ref) < 2e-5


def test_cached_filters_follow_weight_updates():
    conv, x = make_conv(), torch.randn(1, 32, 4, 4)
    with torch.no_grad():
        before = conv(x)
        conv.weight.mul_(2)  # in place, as an optimizer or load_state_dict does
        after = conv(x)
        expected = F.conv2d(x, conv.weight, conv.bias, padding=1)
    assert rel(after, expected) < 2e-6 and rel(after, before) > 0.1
    conv.weight = torch.nn.Parameter(-conv.weight.detach())  # a new tensor: its filters are new too
    with torch.no_grad():
        assert rel(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1)) < 2e-6
    conv = conv.to(torch.bfloat16)
    with torch.no_grad():
        assert conv(x.bfloat16()).dtype == torch.bfloat16


def test_set_winograd_off_drops_cache_and_falls_back():
    conv, x = make_conv(), torch.randn(1, 32, 4, 4)
    model = torch.nn.Sequential(conv)
    with torch.no_grad():
        conv(x)
        assert 2 in conv._filters
        set_winograd(model, False)
        assert not conv._filters and conv.fast_path(x) is None


def test_inference_mode_weights_use_winograd_and_load_state_dict_refreshes_them():
    with torch.inference_mode():
        conv, x = make_conv(), torch.randn(1, 32, 4, 4)
        assert conv.weight.is_inference() and conv.fast_path(x) == "winograd2"
        conv(x)
        new = {k: v * 3 for k, v in conv.state_dict().items()}
        conv.load_state_dict(new)
        assert rel(conv(x), F.conv2d(x, new["weight"], new["bias"], padding=1)) < 2e-6


def test_models_run_channels_last_inside_and_return_the_default_layout():
    from ldm.unet import UNet, UNetConfig
    from ldm.conv import cpu_channels_last

    x = torch.randn(2, 3, 8, 8)
    assert cpu_channels_last(x).is_contiguous(memory_format=torch.channels_last)
    assert cpu_channels_last(torch.randn(2, 5, 3)).is_contiguous()  # not an image batch: untouched
    torch.manual_seed(0)
    unet = UNet(UNetConfig.mnist().with_(in_channels=3, out_channels=3, sample_size=8))
    out = unet(x, torch.tensor([1, 2]))
    assert out.is_contiguous()  # callers may .view() it
    out.view(2, -1)
