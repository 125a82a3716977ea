"""The fast CPU convolutions (Winograd F(m×m, 3×3), im2col) against direct convolution, and the switch that
puts them into a model and takes them out again."""

import pytest
import torch
import torch.nn.functional as F

from ldm.perf import (WINOGRAD, FastConv2d, disable_fast_cpu, enable_fast_cpu, im2col_conv3x3, winograd_conv3x3,
                      winograd_filters)
from ldm.unet import UNet, UNetConfig


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
    out = winograd_conv3x3(x, w, b, m)
    assert out.shape == (B, 5, H, W)
    assert rel(out, ref) < tolerance
    assert rel(F.conv2d(x, w, b, padding=1), ref) < 2e-6
    blocks = winograd_conv3x3(x, w, b, m, block_bytes=1)  # the filters transformed one output channel at a time
    assert rel(blocks, ref) < tolerance


@pytest.mark.parametrize("shape", [(1, 3, 1, 1), (2, 8, 5, 7), (3, 40, 8, 8)])
@pytest.mark.parametrize("bias", [True, False])
def test_im2col_equals_direct_convolution(shape, bias):
    torch.manual_seed(0)
    x, w = torch.randn(shape), torch.randn(6, shape[1], 3, 3)
    b = torch.randn(6) if bias else None
    ref = F.conv2d(x.double(), w.double(), None if b is None else b.double(), padding=1)
    out = im2col_conv3x3(x, w, b)
    assert out.shape == ref.shape and rel(out, ref) < 1e-6


@pytest.mark.parametrize("m", [2, 4])
def test_winograd_bfloat16_stays_within_bfloat16_rounding(m):
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 64, 8, 8), torch.randn(32, 64, 3, 3) / 24, torch.randn(32)
    ref = F.conv2d(x.double(), w.double(), b.double(), padding=1)
    out = winograd_conv3x3(x.bfloat16(), w.bfloat16(), b.bfloat16(), m)
    assert out.dtype == torch.bfloat16
    assert rel(out, ref) < 2e-2 * (1 if m == 2 else 4)  # bf16: 4e-3 per rounding; a transform bug gives O(1)


@pytest.mark.parametrize("m", [2, 4])
def test_filter_transform_is_G_g_Gt(m):
    torch.manual_seed(0)
    g = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    G = WINOGRAD[m][1]
    expected = torch.einsum("ik,ockl,jl->ijoc", G, g, G).reshape(-1, 3, 2)  # (n², C_out, C_in)
    torch.testing.assert_close(winograd_filters(g, m), expected)


@pytest.mark.parametrize("m", [2, 4])
def test_winograd_matrices_give_the_1d_correlation(m):
    """F(m, 3) in one dimension: Aᵀ[(G g) ⊙ (Bᵀ d)] = the m outputs of correlating d (length m + 2) with g."""
    BT, G, AT = WINOGRAD[m]
    d, g = torch.randn(m + 2, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    expected = torch.stack([d[i : i + 3] @ g for i in range(m)])
    torch.testing.assert_close(AT @ ((G @ g) * (BT @ d)), expected)


def fast_conv(cin=256, cout=16, **kwargs) -> tuple[torch.nn.Conv2d, FastConv2d]:
    torch.manual_seed(0)
    plain = torch.nn.Conv2d(cin, cout, 3, padding=1, **kwargs)
    return plain, enable_fast_cpu(plain)


def test_fast_conv_takes_each_path_only_where_it_applies():
    _, conv = fast_conv()
    with torch.no_grad():
        assert conv.fast_path(torch.randn(1, 256, 8, 8)) == "im2col"  # few pixels for a large weight
        assert conv.fast_path(torch.randn(2, 256, 8, 8)) == "winograd2"
        assert conv.fast_path(torch.randn(2, 256, 16, 16)) == "winograd2"
        assert conv.fast_path(torch.randn(2, 256, 64, 64)) == "winograd4"
        assert conv.fast_path(torch.randn(2, 256, 30, 30)) == "winograd2"  # not a multiple of 4
        assert conv.fast_path(torch.randn(2, 256, 17, 17)) is None  # odd: no tiling, too many pixels for im2col
        assert conv.fast_path(torch.randn(1, 256, 256, 256)) is None  # tiles would take 2.25× the image
        assert conv.fast_path(torch.randn(2, 256, 8, 8).bfloat16()) is None
        assert conv.fast_path(torch.randn(2, 256, 8, 8).double()) is None
    assert conv.fast_path(torch.randn(2, 256, 8, 8)) is None  # gradients wanted: the direct kernel's backward


@pytest.mark.parametrize("size, path", [((6, 4), "im2col"), ((12, 14), "winograd2"), ((32, 24), "winograd4")])
def test_fast_conv_matches_nn_conv2d_on_each_path(size, path):
    plain, conv = fast_conv()
    x = torch.randn(2, 256, *size)
    with torch.no_grad():
        assert conv.fast_path(x) == path
        ref = plain(x)
        assert rel(conv(x), ref) < 2e-5
        odd = torch.randn(2, 256, 17, 15)  # the fallback
        assert conv.fast_path(odd) is None and rel(conv(odd), plain(odd)) < 1e-6
    y = conv(x.requires_grad_())  # with gradients: nn.Conv2d and its backward
    y.sum().backward()
    assert conv.weight.grad is not None and rel(y.detach(), ref) < 2e-5


def test_fast_conv_follows_weight_updates():
    plain, conv = fast_conv()
    x = torch.randn(1, 256, 12, 12)
    with torch.no_grad():
        before = conv(x)
        plain.weight.mul_(2)  # the shared parameter, in place, as an optimizer or load_state_dict does
        after = conv(x)
        assert rel(after, F.conv2d(x, plain.weight, plain.bias, padding=1)) < 2e-5 and rel(after, before) > 0.1


def test_enable_and_disable_swap_modules_in_place_keeping_the_parameters():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(256, 256, 3, padding=1), torch.nn.Conv2d(256, 8, 1),
                                torch.nn.Sequential(torch.nn.Conv2d(256, 256, 3, padding=1, bias=False)),
                                torch.nn.Conv2d(256, 256, 3, padding=1, stride=2), torch.nn.Conv2d(8, 8, 3, padding=1))
    params = dict(model.named_parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert enable_fast_cpu(model) is model
    fast = [type(m) is FastConv2d for m in (model[0], model[1], model[2][0], model[3], model[4])]
    assert fast == [True, False, True, False, False]  # 1×1, strided, and too thin: left alone
    assert all(model.get_parameter(name) is p for name, p in params.items())  # the same objects, not copies
    assert all(p is q for p, q in zip(optimizer.param_groups[0]["params"], model.parameters()))
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    swapped = model[0]
    enable_fast_cpu(model)
    assert model[0] is swapped  # idempotent
    disable_fast_cpu(model)
    assert not any(isinstance(m, FastConv2d) for m in model.modules())
    assert type(model[0]) is torch.nn.Conv2d and model[2][0].bias is None
    assert all(model.get_parameter(name) is p for name, p in params.items())


def test_models_are_built_from_plain_convolutions():
    unet = UNet(UNetConfig.mnist().with_(channels=32, channel_mult=(1, 8, 8)))  # 256 channels at two levels
    assert not any(isinstance(m, FastConv2d) for m in unet.modules())
    enable_fast_cpu(unet.train())
    assert sum(isinstance(m, FastConv2d) for m in unet.modules()) > 0
    assert all(m.training for m in unet.modules())  # the training flag carries over


def test_unet_output_is_unchanged_by_enable_and_bit_equal_after_disable():
    torch.manual_seed(0)
    # 256 channels at 32×32, 16×16 and 8×8: one level for each fast path
    config = UNetConfig(channels=256, channel_mult=(1, 1, 1), num_res_blocks=1, attention=(False, False, False),
                        mid_attention=False, sample_size=32)
    unet = UNet(config).eval()
    for p in unet.parameters():  # zero-initialised output layers would hide the convolutions behind them
        if not p.any():
            torch.nn.init.normal_(p, std=0.02)
    x, t = torch.randn(1, 1, 32, 32), torch.tensor([700])
    paths = []
    with torch.no_grad():
        ref = unet(x, t)
        enable_fast_cpu(unet)
        for m in unet.modules():
            if isinstance(m, FastConv2d):
                m.register_forward_pre_hook(lambda m, args: paths.append(m.fast_path(args[0])))
        fast = unet(x, t)
        assert set(paths) == {"im2col", "winograd2", "winograd4"}
        disable_fast_cpu(unet)
        again = unet(x, t)
        unet.up[0][0].conv1.weight.mul_(1.001)  # the sensitivity: one 8×8 layer's weight changed by 0.1 %
        nudged = unet(x, t)
    tolerance = 1e-5
    assert 0 < rel(fast, ref) < tolerance < rel(nudged, ref) / 2  # the sums in another order, not another convolution
    assert torch.equal(again, ref)


def test_models_run_channels_last_inside_and_return_the_default_layout():
    from ldm.blocks import cpu_channels_last

    x = torch.randn(2, 3, 8, 8)
    assert cpu_channels_last(x).is_contiguous(memory_format=torch.channels_last)
    assert cpu_channels_last(torch.randn(2, 5, 3)).is_contiguous()  # not an image batch: untouched
    torch.manual_seed(0)
    unet = UNet(UNetConfig.mnist().with_(in_channels=3, out_channels=3, sample_size=8))
    out = unet(x, torch.tensor([1, 2]))
    assert out.is_contiguous()  # callers may .view() it
    out.view(2, -1)
