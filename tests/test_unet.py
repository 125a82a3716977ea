import pytest
import torch
import torch.nn.functional as F

from ldm.attention import SelfAttentionBlock, multihead_attention
from ldm.blocks import Downsample, ResBlock, timestep_embedding
from ldm.unet import UNet, UNetConfig

TINY = UNetConfig(in_channels=1, out_channels=1, sample_size=16, channels=16, channel_mult=(1, 2), num_res_blocks=1,
                  attention=(False, True), head_dim=8, norm_groups=4)


def randomise(model):
    """Undo the zero-initialisation so every path carries signal."""
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model


def test_presets_build_with_expected_sizes():
    cifar = UNet(UNetConfig.ddpm_cifar10())
    assert sum(p.numel() for p in cifar.parameters()) == pytest.approx(35.7e6, rel=2e-3)  # Ho et al. 2020, App. B
    mnist = UNet(UNetConfig.mnist())
    assert 0.2e6 < sum(p.numel() for p in mnist.parameters()) < 10e6
    out = mnist(torch.randn(2, 1, 28, 28), torch.tensor([0, 999]))
    assert out.shape == (2, 1, 28, 28)


def test_output_shape_and_gradients_reach_every_parameter():
    model = randomise(UNet(TINY.with_(num_classes=3)))
    x = torch.randn(2, 1, 16, 16)
    out = model(x, torch.tensor([1, 500]), torch.tensor([0, 3]))
    assert out.shape == x.shape
    out.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    # the class embedding rows of unused labels get no gradient; everything else must
    assert all(n == "class_embedding.weight" for n in no_grad), no_grad


def test_zero_initialised_output_and_time_dependence():
    model = UNet(TINY)
    x = torch.randn(2, 1, 16, 16)
    assert model(x, torch.tensor([3, 3])).abs().max() == 0  # conv_out starts at zero
    randomise(model)
    a = model(x, torch.tensor([3, 3]))
    b = model(x, torch.tensor([800, 800]))
    assert not torch.allclose(a, b)
    assert torch.allclose(model(x, torch.tensor(3)), a, atol=1e-6)  # scalar t broadcasts


def test_class_label_changes_output_and_none_means_null_label():
    model = randomise(UNet(TINY.with_(num_classes=10)))
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 10])
    a = model(x, t, torch.tensor([1, 1]))
    b = model(x, t, torch.tensor([2, 2]))
    assert not torch.allclose(a, b)
    assert torch.allclose(model(x, t, None), model(x, t, torch.tensor([10, 10])))
    with pytest.raises(ValueError, match="class label out of range"):
        model(x, t, torch.tensor([11, 0]))


def test_bad_inputs_are_named():
    model = UNet(TINY)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        model(torch.randn(2, 3, 16, 16), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="16×16"):
        model(torch.randn(2, 1, 32, 32), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.randn(2, 1, 16, 16), torch.tensor([1, 1]), torch.tensor([1, 2]))
    free_size = UNet(TINY.with_(sample_size=None))  # odd sizes work: upsampling returns to each skip's size
    assert free_size(torch.randn(1, 1, 15, 13), torch.tensor([1])).shape == (1, 1, 15, 13)
    with pytest.raises(ValueError, match="one per level"):
        UNetConfig(channel_mult=(1, 2), attention=(True,))


def test_timestep_embedding_formula():
    t = torch.tensor([0.0, 7.0])
    emb = timestep_embedding(t, 8)
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(4) / 4)
    assert torch.allclose(emb[1], torch.cat([torch.cos(7 * freqs), torch.sin(7 * freqs)]), atol=1e-6)
    sin_first = timestep_embedding(t, 8, flip_sin_to_cos=False, freq_shift=1)
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(4) / 3)
    assert torch.allclose(sin_first[1], torch.cat([torch.sin(7 * freqs), torch.cos(7 * freqs)]), atol=1e-6)


def test_sdpa_attention_equals_hand_written_softmax():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 5, 12), torch.randn(2, 7, 12), torch.randn(2, 7, 12)
    out = multihead_attention(q, k, v, heads=3)
    qh, kh, vh = (x.reshape(2, -1, 3, 4).transpose(1, 2) for x in (q, k, v))
    ref = (torch.softmax(qh @ kh.transpose(-1, -2) / 2.0, -1) @ vh).transpose(1, 2).reshape(2, 5, 12)
    assert torch.allclose(out, ref, atol=1e-5)
    mask = torch.tensor([[True] * 4 + [False] * 3, [True] * 7])
    masked = multihead_attention(q, k, v, heads=3, mask=mask)
    assert torch.allclose(masked[0], multihead_attention(q[:1], k[:1, :4], v[:1, :4], heads=3)[0], atol=1e-5)


def test_self_attention_mixes_positions():
    torch.manual_seed(0)
    block = SelfAttentionBlock(8, head_dim=4, groups=4)
    torch.nn.init.normal_(block.to_out.weight, std=0.2)
    x = torch.randn(1, 8, 4, 4)
    y = x.clone()
    y[..., 0, 0] += 1.0  # change one position
    diff = (block(x) - block(y)).abs().sum(1)[0]
    diff[0, 0] = 0
    assert diff.max() > 1e-4  # other positions notice: attention is global


def test_resblock_scale_shift_and_downsample_shapes():
    block = ResBlock(8, 16, 32, groups=4, scale_shift=True)
    assert block.time_emb_proj.out_features == 32
    assert block(torch.randn(2, 8, 6, 6), torch.randn(2, 32)).shape == (2, 16, 6, 6)
    with pytest.raises(ValueError, match="embedding"):
        block(torch.randn(2, 8, 6, 6))
    x = torch.randn(1, 4, 8, 8)
    d = Downsample(4, asymmetric_padding=True)
    assert torch.allclose(d(x), d.conv(F.pad(x, (0, 1, 0, 1))))
    assert d(x).shape == Downsample(4)(x).shape == (1, 4, 4, 4)


def test_cross_attention_transformer_shapes_and_masking():
    from ldm.attention import SpatialTransformer

    torch.manual_seed(0)
    for linear in (False, True):
        block = SpatialTransformer(16, heads=2, head_dim=8, context_dim=12, groups=4, linear_projection=linear)
        torch.nn.init.normal_(block.proj_out.weight, std=0.2)
        x, context = torch.randn(2, 16, 5, 5), torch.randn(2, 7, 12)
        out = block(x, context)
        assert out.shape == x.shape
        mask = torch.tensor([[True] * 4 + [False] * 3] * 2)
        changed = context.clone()
        changed[:, 4:] = torch.randn(2, 3, 12)  # only masked-out tokens change
        assert torch.allclose(block(x, context, mask), block(x, changed, mask), atol=1e-6)
        assert not torch.allclose(block(x, context), block(x, changed), atol=1e-4)


def test_context_unet_and_label_context():
    cfg = TINY.with_(context_dim=12)
    model = randomise(UNet(cfg))
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([5, 5])
    a, b = model(x, t, torch.randn(2, 3, 12)), model(x, t, torch.randn(2, 3, 12))
    assert a.shape == x.shape and not torch.allclose(a, b)
    with pytest.raises(ValueError, match=r"context of shape \(2, S, 12\)"):
        model(x, t, torch.randn(2, 3, 10))
    labelled = randomise(UNet(cfg.with_(num_classes=4, label_context=True)))
    assert labelled.class_embedding.weight.shape == (5, 12)  # 4 classes + the null label, in context width
    assert not torch.allclose(labelled(x, t, torch.tensor([0, 0])), labelled(x, t, torch.tensor([1, 1])))
    with pytest.raises(ValueError, match="label_context needs"):
        UNetConfig(label_context=True)


@pytest.mark.reference
def test_parity_with_diffusers_unet2d_ddpm_layout():
    """The DDPM-style UNet (sin-first embedding, shift 1, asymmetric downsampling, eps 1e-6, one head)
    equals diffusers' UNet2DModel with the same random weights."""
    diffusers = pytest.importorskip("diffusers")
    from ldm.convert import import_state_dict, unet_config_from_diffusers, unet_layout

    torch.manual_seed(0)
    ref = diffusers.UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0,
        attention_head_dim=None,
    ).eval()
    config = UNetConfig.ddpm_cifar10().with_(sample_size=16, channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                             attention=(False, True), norm_groups=8, dropout=0.0)
    assert unet_config_from_diffusers(dict(ref.config)) == config.with_(sample_size=None, dropout=0.0)
    ours = import_state_dict(UNet(config), ref.state_dict(), unet_layout(config, "diffusers"), "diffusers UNet2DModel").eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 901])
    with torch.no_grad():
        expected, got = ref(x, t).sample, ours(x, t)
    assert ((got - expected).norm() / expected.norm()).item() < 1e-4


def test_attention_in_chunks_equals_attention_at_once():
    from ldm.attention import set_attention_chunk

    model = randomise(UNet(TINY.with_(context_dim=12)))
    x, t, ctx = torch.randn(2, 1, 16, 16), torch.tensor([5, 700]), torch.randn(2, 3, 12)
    whole = model(x, t, ctx)
    set_attention_chunk(model, 7)  # 64 positions at the attention level: uneven chunks on purpose
    assert torch.allclose(model(x, t, ctx), whole, atol=1e-6)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        set_attention_chunk(model, 0)
