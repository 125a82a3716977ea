"""2-D convolution that runs 3×3 "same" convolutions with Winograd's minimal filtering algorithm on the CPU.

Winograd F(2×2, 3×3)  [Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural Networks", Eq. 8]:
each 2×2 output tile Y of a 3×3 filter g over the 4×4 input tile d around it is

    Y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A

        Bᵀ = ⎡1  0 −1  0⎤     G = ⎡ 1    0    0 ⎤     Aᵀ = ⎡1 1  1  0⎤
             ⎢0  1  1  0⎥         ⎢ ½    ½    ½ ⎥          ⎣0 1 −1 −1⎦
             ⎢0 −1  1  0⎥         ⎢ ½   −½    ½ ⎥
             ⎣0  1  0 −1⎦         ⎣ 0    0    1 ⎦

Summed over input channels, the elementwise product becomes 16 independent matrix products
(one per position ξ of the 4×4 transformed tile):  M_ξ = V_ξ U_ξ, with V_ξ (tiles, C_in) the transformed
input and U_ξ (C_in, C_out) the transformed filters. That is 16 multiplies per 4 outputs instead of 36,
2.25× fewer than direct convolution, and one large GEMM per ξ keeps the BLAS busy even where oneDNN's direct
kernel is slow (few pixels, many channels: SD's 8×8 and 16×16 levels). The transforms only add and
subtract, so in fp32 the result is as accurate as the direct convolution. GPUs get Winograd from cuDNN already,
and training keeps the direct kernel (its backward is fused and needs no transformed copies saved).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import derived

_G = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]], dtype=torch.float64)


def winograd_filters(weight: torch.Tensor) -> torch.Tensor:
    """U = G g Gᵀ for every (output, input) channel pair, computed in float64 and rounded once.
    Shapes: weight (C_out, C_in, 3, 3) → (16, C_in, C_out), ξ = 4·row + column."""
    G = _G.to(weight.device)
    u = torch.einsum("ik,ockl,jl->ijco", G, weight.detach().double(), G)
    return u.reshape(16, weight.shape[1], weight.shape[0]).to(weight.dtype).contiguous()


def winograd_conv3x3(x: torch.Tensor, filters: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """3×3 convolution, stride 1, zero padding 1, via F(2×2, 3×3) (module docstring).

    Shapes: x (B, C_in, H, W) with H and W even, filters (16, C_in, C_out) from ``winograd_filters``,
    bias (C_out,) → (B, C_out, H, W), in channels-last memory (the layout the tiles are built in).
    """
    B, C, H, W = x.shape
    nh, nw = H // 2, W // 2
    padded = x.new_zeros(B, H + 2, W + 2, C)
    padded[:, 1:-1, 1:-1] = x.permute(0, 2, 3, 1)
    # Bᵀ d B, rows first: row r of the transformed tile combines input rows 2i … 2i+3 of tile i
    rows = [padded[:, k : k + 2 * nh : 2] for k in range(4)]
    V = x.new_empty(4, 4, B, nh, nw, C)
    for i, t in enumerate((rows[0] - rows[2], rows[1] + rows[2], rows[2] - rows[1], rows[1] - rows[3])):
        cols = [t[:, :, k : k + 2 * nw : 2] for k in range(4)]
        torch.sub(cols[0], cols[2], out=V[i, 0])
        torch.add(cols[1], cols[2], out=V[i, 1])
        torch.sub(cols[2], cols[1], out=V[i, 2])
        torch.sub(cols[1], cols[3], out=V[i, 3])
    M = torch.bmm(V.view(16, B * nh * nw, C), filters).view(4, 4, B, nh, nw, -1)
    if bias is not None:
        # M₁₁ enters all four outputs with coefficient +1 (row and column 1 of Aᵀ are both 1), so adding
        # the bias there once adds it to every output pixel
        M[1, 1] += bias
    out = x.new_empty(B, H, W, filters.shape[-1])
    for i, s in enumerate((M[0] + M[1] + M[2], M[1] - M[2] - M[3])):  # Aᵀ M, then · A per output column
        torch.add(s[0] + s[1], s[2], out=out[:, i::2, 0::2])
        torch.sub(s[1] - s[2], s[3], out=out[:, i::2, 1::2])
    return out.permute(0, 3, 1, 2)


class Conv2d(derived.CachesDerived, nn.Conv2d):
    """``nn.Conv2d`` (same parameters, same state-dict keys) with two faster CPU paths at inference
    (no gradients wanted); everything else goes to ``nn.Conv2d``.

    * 3×3, stride 1, padding 1: ``winograd_conv3x3``, in float32 or bfloat16, on even-sized inputs with
      at least ``MIN_CHANNELS`` input channels and at most ``MAX_PIXELS`` pixels in the batch (B·H·W). The
      transforms are memory-bound passes over 4× the input and output, so the 2.25× fewer multiplies only
      pay where there are few pixels for many channels — exactly where oneDNN's direct kernel is slow.
      Measured on a 2-core AVX-512 CPU, fp32, against the direct kernel: 2.7× at 8×8 (B = 2, 1280
      channels), 2.1× at 16×16, 1.6× at 32×32, 1.3× at 64×64 (B = 1, 512 channels); but 0.97× at 64×64
      with B = 2 and 320 channels and 0.5× at 512×512 with 128, with a peak of several GiB for the tiles.
      The transformed filters (16/9 the size of the weight) are cached (``ldm.derived``);
      ``set_winograd(model, False)`` turns this path off to save that memory. In bfloat16 the transformed
      tiles and filters are rounded to 8 bits too and the output sums cancel, so one Winograd convolution
      has ~3× the rounding error of the direct kernel (5e-3 against 1.7e-3 relative). bfloat16 therefore
      uses it only on images of at most ``BF16_MAX_PIXELS`` (H·W; 1.4–2.3× faster there): a whole SD 1.5 UNet
      step then stays within 2 % of the bfloat16 error diffusers shows against float32 (every level: +50 %).
    * 1×1, stride 1: one matrix product over the pixels in channels-last order, (B·H·W, C_in) · Wᵀ. oneDNN's
      pointwise kernel runs at about half the GEMM's speed here, and the channels-last output is the
      layout attention's tokens need, so ``b c h w → b (h w) c`` after it is a view, not a copy.
    """

    MIN_CHANNELS = 32  # below this the GEMMs are too thin and the transforms dominate
    MAX_PIXELS = 4096
    BF16_MAX_PIXELS = 16 * 16

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.winograd = True

    def fast_path(self, x: torch.Tensor) -> str | None:
        """"winograd", "pointwise", or None (``nn.Conv2d``) for this input."""
        if (x.device.type != "cpu" or x.dim() != 4 or x.dtype != self.weight.dtype or self.groups != 1
                or self.dilation != (1, 1) or self.stride != (1, 1) or self.padding_mode != "zeros"
                or derived.wants_grad(x, self)):
            return None
        if self.kernel_size == (1, 1) and self.padding == (0, 0):
            return "pointwise"
        if (self.winograd and self.kernel_size == (3, 3) and self.padding == (1, 1)
                and self.in_channels >= self.MIN_CHANNELS and x.dtype in (torch.float32, torch.bfloat16)
                and x.shape[-2] % 2 == 0 and x.shape[-1] % 2 == 0 and x.shape[0] * x.shape[-2] * x.shape[-1] <= self.MAX_PIXELS
                and (x.dtype == torch.float32 or x.shape[-2] * x.shape[-1] <= self.BF16_MAX_PIXELS)):
            return "winograd"
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = self.fast_path(x)
        if path == "winograd":
            return winograd_conv3x3(x, derived.derived(self, "winograd", [self.weight], winograd_filters), self.bias)
        if path == "pointwise":
            return F.linear(x.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias).permute(0, 3, 1, 2)
        return super().forward(x)


def set_winograd(model: nn.Module, enabled: bool) -> None:
    """Turn the Winograd path of every ``ldm.conv.Conv2d`` in ``model`` on or off (off frees the cached filters)."""
    for module in model.modules():
        if isinstance(module, Conv2d):
            module.winograd = enabled
            if not enabled:
                derived.clear(module)
