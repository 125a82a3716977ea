"""2-D convolution that runs 3×3 "same" convolutions with Winograd's minimal filtering algorithm on the CPU.

Winograd F(m×m, 3×3)  [Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural Networks", Eq. 8]:
each m×m output tile Y of a 3×3 filter g over the n×n input tile d around it (n = m + 2) is

    Y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A

with fixed matrices B (n×n), G (n×3), A (n×m) (``WINOGRAD``). For F(2×2, 3×3):

        Bᵀ = ⎡1  0 −1  0⎤     G = ⎡ 1    0    0 ⎤     Aᵀ = ⎡1 1  1  0⎤
             ⎢0  1  1  0⎥         ⎢ ½    ½    ½ ⎥          ⎣0 1 −1 −1⎦
             ⎢0 −1  1  0⎥         ⎢ ½   −½    ½ ⎥
             ⎣0  1  0 −1⎦         ⎣ 0    0    1 ⎦

Summed over input channels, the elementwise product becomes n² independent matrix products (one per entry ξ
of the transformed tile): M_ξ = V_ξ U_ξ, with V_ξ (tiles, C_in) the transformed input and U_ξ (C_in, C_out)
the transformed filters. F(2×2, 3×3) needs 16 multiplies per 4 outputs instead of 36 (2.25× fewer),
F(4×4, 3×3) 36 per 16 (4× fewer). Written with Kronecker products, vec(Bᵀ d B) = (Bᵀ ⊗ Bᵀ) vec(d), both
transforms are matrix products too, so the whole convolution is three GEMMs around two copies (tiles out of
the image, outputs back into it). The larger tile does fewer multiplies but its transforms have entries up
to 8 and 1/24, so its fp32 result is ~10× less exact (2e-6 relative, still far below what a model notices),
and its filters take 4× the weight's memory; ``Conv2d`` picks per layer. GPUs get Winograd from cuDNN
already, and training keeps the direct kernel (its backward is fused and needs no transformed copies saved).
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

_F = torch.float64
WINOGRAD = {  # m: (Bᵀ, G, Aᵀ)  [Lavin & Gray 2016, §4.1 and §4.2]
    2: (torch.tensor([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=_F),
        torch.tensor([[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]], dtype=_F),
        torch.tensor([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=_F)),
    4: (torch.tensor([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                      [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], dtype=_F),
        torch.tensor([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                      [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=_F),
        torch.tensor([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], dtype=_F)),
}


def winograd_filters(weight: torch.Tensor, m: int = 2) -> torch.Tensor:
    """U = G g Gᵀ for every (output, input) channel pair, computed in float64 and rounded once.
    Shapes: weight (C_out, C_in, 3, 3) → (n², C_in, C_out), n = m + 2, ξ = n·row + column."""
    G = WINOGRAD[m][1].to(weight.device)
    u = torch.einsum("ik,ockl,jl->ijco", G, weight.detach().double(), G)
    return u.reshape(-1, weight.shape[1], weight.shape[0]).to(weight.dtype).contiguous()


@lru_cache(maxsize=None)
def _tile_transforms(m: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Bᵀ ⊗ Bᵀ and Aᵀ ⊗ Aᵀ for F(m×m, 3×3), built once per dtype and device rather than in every convolution."""
    BT, _, AT = WINOGRAD[m]
    return torch.kron(BT, BT).to(device, dtype), torch.kron(AT, AT).to(device, dtype)


def winograd_conv3x3(x: torch.Tensor, filters: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """3×3 convolution, stride 1, zero padding 1, via F(m×m, 3×3) (module docstring); m follows from the filters.

    Shapes: x (B, C_in, H, W) with H and W multiples of m, filters (n², C_in, C_out) from
    ``winograd_filters(weight, m)``, bias (C_out,) → (B, C_out, H, W), in channels-last memory (the layout
    the tiles are built in).
    """
    n = round(filters.shape[0] ** 0.5)
    m = n - 2
    BB, AA = _tile_transforms(m, x.dtype, x.device)
    B, C, H, W = x.shape
    th, tw = H // m, W // m
    padded = x.new_zeros(B, H + 2, W + 2, C)
    padded[:, 1:-1, 1:-1] = x.permute(0, 2, 3, 1)
    # the n×n input tiles, one every m pixels, as n² rows of (tiles · C_in) numbers
    d = padded.unfold(1, n, m).unfold(2, n, m).permute(4, 5, 0, 1, 2, 3).reshape(n * n, -1)
    V = BB @ d  # vec(Bᵀ d B) = (Bᵀ ⊗ Bᵀ) vec(d), every tile and channel at once
    M = torch.bmm(V.view(n * n, B * th * tw, C), filters)
    Y = (AA @ M.view(n * n, -1)).view(m, m, B, th, tw, -1)  # vec(Aᵀ M A)
    out = Y.permute(2, 3, 0, 4, 1, 5).reshape(B, H, W, -1)  # (tile row, row in tile) → image row
    if bias is not None:
        out += bias
    return out.permute(0, 3, 1, 2)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, same state-dict keys) that runs 3×3, stride-1, padding-1 convolutions with
    at least ``MIN_CHANNELS`` input channels as ``winograd_conv3x3`` on the CPU at inference (no gradients
    wanted) where that is faster; everything else goes to ``nn.Conv2d``.

    The transforms are memory-bound passes over the tiles, so the fewer multiplies pay only where there are
    few pixels for many channels, which is where oneDNN's direct kernel is slowest. Measured on a 2-core
    AVX-512 CPU against the direct kernel (B = 2 unless noted), in float32:

    - at most ``SMALL_PIXELS`` pixels in the batch (B·H·W): F(2×2): 2.6× at 8×8 with 1280 channels,
      1.65–1.9× at 16×16. Its filters take 16/9 of the weight's memory.
    - up to ``MAX_PIXELS`` with at least ``WIDE_CHANNELS`` channels: F(4×4): 2.0× at 32×32 with 640
      channels, 1.7× at 64×64 with 320, 2.1× at 64×64 with B = 1 and 512, 1.35× at 128×128 with 512. Its
      filters take 4× the weight's memory, so it is kept to the levels where weights are small.
    - more pixels or fewer channels: the direct kernel (F(4×4) is 0.66× at 512×512 with 128 channels).

    In bfloat16 the transformed tiles are rounded to 8 bits too and the output sums cancel, so F(2×2) has
    ~1.7× the direct kernel's rounding error (4.4e-3 against 2.6e-3 relative) and F(4×4) ~8×. bfloat16
    therefore uses only F(2×2) and only on images of at most ``BF16_MAX_PIXELS`` (H·W; 1.4–2.3× faster):
    a whole SD 1.5 UNet step then stays within the bfloat16 error diffusers shows against float32.
    The filters are transformed once and cached (``winograd_filters``); ``set_winograd(model, False)``
    turns this path off and frees them.
    """

    MIN_CHANNELS = 32  # below this the GEMMs are too thin and the transforms dominate
    SMALL_PIXELS = 1024
    MAX_PIXELS = 16384
    WIDE_CHANNELS = 256
    BF16_MAX_PIXELS = 16 * 16

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.winograd = True
        self._filters: dict[int, tuple] = {}  # m → (weight, (its address, its version), filters)

    def fast_path(self, x: torch.Tensor) -> str | None:
        """"winograd2" (F(2×2, 3×3)), "winograd4" (F(4×4, 3×3)), or None (``nn.Conv2d``)."""
        if (x.device.type != "cpu" or x.dim() != 4 or x.dtype != self.weight.dtype or self.groups != 1
                or self.dilation != (1, 1) or self.stride != (1, 1) or self.padding_mode != "zeros"
                or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            return None
        if not (self.winograd and self.kernel_size == (3, 3) and self.padding == (1, 1)
                and self.in_channels >= self.MIN_CHANNELS):
            return None
        B, _, H, W = x.shape
        if x.dtype == torch.bfloat16:
            return "winograd2" if H % 2 == W % 2 == 0 and H * W <= self.BF16_MAX_PIXELS else None
        if x.dtype != torch.float32:
            return None
        if H % 2 == W % 2 == 0 and B * H * W <= self.SMALL_PIXELS:
            return "winograd2"
        if H % 4 == W % 4 == 0 and B * H * W <= self.MAX_PIXELS and self.in_channels >= self.WIDE_CHANNELS:
            return "winograd4"
        return None

    def winograd_filters(self, m: int) -> torch.Tensor:
        """``winograd_filters(self.weight, m)``, cached until the weight changes: a new tensor (``.to()``, an
        ``assign`` load), or an in-place write (optimizer step, ``load_state_dict``, EMA), which PyTorch's version
        counter records. Weights made under ``inference_mode`` have no version counter; for those only a new
        tensor and ``load_state_dict`` are seen. The cache holds the weight it was built from, so a new weight
        can never reuse the old one's memory address and pass for it."""
        w = self.weight
        version = None if w.is_inference() else w._version
        cached = self._filters.get(m)
        if cached is None or cached[0] is not w or cached[1] != (w.data_ptr(), version):
            cached = self._filters[m] = (w, (w.data_ptr(), version), winograd_filters(w, m))
        return cached[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = self.fast_path(x)
        if path in ("winograd2", "winograd4"):
            return winograd_conv3x3(x, self.winograd_filters(int(path[-1])), self.bias)
        return super().forward(x)

    def _apply(self, fn, recurse=True):
        self._filters = {}  # .to(dtype/device) makes new weights: free the old filters now, not at next use
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._filters = {}
        super()._load_from_state_dict(*args, **kwargs)


def cpu_channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels-last memory when it is an image batch on the CPU. Models convert their input once and
    every layer keeps the layout: whole steps run faster on it there (measured: a CIFAR-10 UNet training step
    5 %, the MNIST recipe's step 3 %, an SD 1.5 bf16 UNet step 1.5 %), the Winograd path produces it anyway,
    and it makes attention's ``b c h w → b (h w) c`` a view. Outputs go back to the default layout so
    callers can ``view`` them. On GPUs the layout is left to the caller."""
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" and x.dim() == 4 else x


def set_winograd(model: nn.Module, enabled: bool) -> None:
    """Turn the Winograd path of every ``ldm.conv.Conv2d`` in ``model`` on or off (off frees the cached filters)."""
    for module in model.modules():
        if isinstance(module, Conv2d):
            module.winograd = enabled
            if not enabled:
                module._filters = {}
