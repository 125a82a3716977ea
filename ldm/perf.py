"""Fast CPU inference beside the plain models: ``enable_fast_cpu(model)`` and ``disable_fast_cpu(model)``.

Models are built from plain ``nn.Conv2d``. ``enable_fast_cpu`` swaps each wide 3×3 "same" convolution for a
``FastConv2d`` that shares its parameters and, at inference on the CPU, runs it as one of two kinds of matrix
products instead of oneDNN's direct kernel.

Winograd F(m×m, 3×3)  [Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural Networks", Eq. 8]:
each m×m output tile Y of a 3×3 filter g over the n×n input tile d around it (n = m + 2) is

    Y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A

with fixed matrices B (n×n), G (n×3), A (n×m) (``WINOGRAD``). For F(2×2, 3×3):

        Bᵀ = ⎡1  0 −1  0⎤     G = ⎡ 1    0    0 ⎤     Aᵀ = ⎡1 1  1  0⎤
             ⎢0  1  1  0⎥         ⎢ ½    ½    ½ ⎥          ⎣0 1 −1 −1⎦
             ⎢0 −1  1  0⎥         ⎢ ½   −½    ½ ⎥
             ⎣0  1  0 −1⎦         ⎣ 0    0    1 ⎦

Summed over input channels, the elementwise product becomes n² independent matrix products (one per entry ξ
of the transformed tile): M_ξ = V_ξ U_ξᵀ, with V_ξ (tiles, C_in) the transformed input and U_ξ (C_out, C_in)
the transformed filters. F(2×2, 3×3) needs 16 multiplies per 4 outputs instead of 36 (2.25× fewer),
F(4×4, 3×3) 36 per 16 (4× fewer). Written with Kronecker products, vec(Bᵀ d B) = (Bᵀ ⊗ Bᵀ) vec(d) and
vec(G g Gᵀ) = (G ⊗ G) vec(g), every transform is a matrix product too, so the whole convolution is four GEMMs
around two copies (tiles out of the image, outputs back into it). The larger tile does fewer multiplies but
its transforms have entries up to 8 and 1/24, so its fp32 result is ~10× less exact (2e-6 relative, still far
below what a model notices).

im2col  [Chellapilla, Puri & Simard 2006, "High Performance Convolutional Neural Networks for Document
Processing"]: the convolution as one matrix product

    Y[p, o] = Σ_{c,i,j} x[p + (i − 1, j − 1), c] · W[o, c, i, j] = (X Wᵀ)[p, o]

where row p of X (B·H·W, C_in·9) holds pixel p's 3×3 neighbourhood in the weight's own (c, i, j) order, so
W is read in place as a (C_out, C_in·9) matrix.

Neither keeps anything between calls. Winograd transforms the filters afresh on each call, a block of output
channels at a time, which is cheap beside the convolution where a batch has many pixels; where it has very
few for a large weight (one 8×8 latent: 64) the transform costs more than the convolution, and im2col needs
none. GPUs get Winograd from cuDNN already, and training keeps the direct kernel (its backward is fused and
needs no transformed copies saved).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Callable

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


@lru_cache(maxsize=None)
def _transforms(m: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Bᵀ ⊗ Bᵀ, G ⊗ G and Aᵀ ⊗ Aᵀ for F(m×m, 3×3), built once per dtype and device (from float64, rounded once)."""
    return tuple(torch.kron(T, T).to(device, dtype) for T in WINOGRAD[m])


def winograd_filters(weight: torch.Tensor, m: int = 2) -> torch.Tensor:
    """U = G g Gᵀ for every (output, input) channel pair, as one GEMM: vec(U) = (G ⊗ G) vec(g).
    Shapes: weight (C_out, C_in, 3, 3) → (n², C_out, C_in), n = m + 2, ξ = n·row + column."""
    GG = _transforms(m, weight.dtype, weight.device)[1]
    return (GG @ weight.detach().reshape(-1, 9).T).view(-1, weight.shape[0], weight.shape[1])


# Filters are transformed this many bytes at a time and used at once. glibc serves larger allocations with fresh
# pages from the OS on every call (its mmap threshold tops out at 32 MiB), and faulting those in costs as much
# as the transform itself: a whole 1280 × 1280 F(2×2) transform takes 58 ms that way, in blocks 27 ms.
BLOCK_BYTES = 32 * 2**20


def winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, m: int = 2,
                     block_bytes: int = BLOCK_BYTES) -> torch.Tensor:
    """3×3 convolution, stride 1, zero padding 1, via F(m×m, 3×3) (module docstring), the filters transformed
    (``winograd_filters``) for a block of output channels at a time, at most ``block_bytes`` of them.

    Shapes: x (B, C_in, H, W) with H and W multiples of m, weight (C_out, C_in, 3, 3), bias (C_out,)
    → (B, C_out, H, W), in channels-last memory (the layout the tiles are built in). Inference only: the
    blocks are written into one output tensor, which autograd cannot follow.
    """
    n = m + 2
    BB, _, AA = _transforms(m, x.dtype, x.device)
    B, C, H, W = x.shape
    C_out, tiles = weight.shape[0], B * (H // m) * (W // m)
    padded = x.new_zeros(B, H + 2, W + 2, C)
    padded[:, 1:-1, 1:-1] = x.permute(0, 2, 3, 1)
    # the n×n input tiles, one every m pixels, as n² rows of (tiles · C_in) numbers
    d = padded.unfold(1, n, m).unfold(2, n, m).permute(4, 5, 0, 1, 2, 3).reshape(n * n, -1)
    Vt = (BB @ d).view(n * n, tiles, C).transpose(1, 2)  # vec(Bᵀ d B) = (Bᵀ ⊗ Bᵀ) vec(d), every tile at once
    Mt = x.new_empty(n * n, C_out, tiles)  # Mᵀ_ξ = U_ξ V_ξᵀ, a block of output channels (rows) at a time
    step = max(1, block_bytes // (n * n * C * x.element_size()))
    for o in range(0, C_out, step):
        torch.bmm(winograd_filters(weight[o : o + step], m), Vt, out=Mt[:, o : o + step])
    Y = (AA @ Mt.view(n * n, -1)).view(m, m, C_out, B, H // m, W // m)  # vec(Aᵀ M A)
    out = Y.permute(3, 4, 0, 5, 1, 2).reshape(B, H, W, C_out)  # (tile row, row in tile) → image row
    if bias is not None:
        out += bias
    return out.permute(0, 3, 1, 2)


def im2col_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """3×3 convolution, stride 1, zero padding 1, as one GEMM against the weight in place (module docstring).
    Shapes: x (B, C_in, H, W), weight (C_out, C_in, 3, 3), bias (C_out,) → (B, C_out, H, W), channels-last."""
    B, C, H, W = x.shape
    padded = x.new_zeros(B, H + 2, W + 2, C)
    padded[:, 1:-1, 1:-1] = x.permute(0, 2, 3, 1)
    X = padded.unfold(1, 3, 1).unfold(2, 3, 1).reshape(B * H * W, C * 9)  # (pixel; c, i, j)
    Wt = weight.detach().reshape(weight.shape[0], -1).T
    out = X @ Wt if bias is None else torch.addmm(bias, X, Wt)
    return out.view(B, H, W, -1).permute(0, 3, 1, 2)


class FastConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, same state-dict keys) whose 3×3, stride-1, padding-1 convolution runs
    on the CPU at inference (no gradients wanted, float32) as ``im2col_conv3x3`` or ``winograd_conv3x3``,
    whichever is fastest for the image's size; everything else goes to ``nn.Conv2d``. ``enable_fast_cpu``
    makes them, only for layers with at least ``MIN_CHANNELS`` input channels.

    Measured on a 2-core AMD EPYC (Zen 1: AVX2 and FMA, no AVX-512; a 4096² fp32 matmul at 65 GFLOP/s),
    torch 2.13, against oneDNN's direct kernel on channels-last input, in float32, filter transforms included;
    layers of an SD 1.5 UNet step (B = 2 with guidance) and of the SD VAE decoder (B = 1):

    | pixels B·H·W | layer: C_in → C_out @ H | direct | im2col | F(2×2) | F(4×4) |
    |---|---|---|---|---|---|
    | 32 | 1280 → 1280, 2560 → 1280 @ 4 | 64, 131 ms | **2.73, 2.72×** | 1.07, 1.24× | 0.62, 0.71× |
    | 64 | 1280 → 1280 @ 8 (B = 1) | 76 ms | **1.93×** | 1.11× | 0.70× |
    | 128 | 1280 → 1280, 2560 → 1280 @ 8 | 78, 190 ms | 1.06, 1.30× | **1.24, 1.39×** | 0.79, 0.90× |
    | 256 | 1280 → 1280 @ 16 (B = 1) | 147 ms | 0.99× | **1.53×** | 1.12× |
    | 512 | 640, 1280, 2560 → 1280 @ 16 | 111, 234, 474 ms | 0.88–0.91× | **1.51–1.61×** | 1.45–1.54× |
    | 2048 | 640 → 640, 1280 → 640, 1280 → 1280 @ 32 | 198, 406, 838 ms | 0.75–0.87× | 1.49–1.65× | **1.96–2.48×** |
    | 8192 | 320 → 320, 640 → 640 @ 64 | 204, 797 ms | — | 1.16, 1.44× | **2.23, 2.40×** |
    | 4096 | 512 → 512 @ 64 (VAE) | 262 ms | — | 1.52× | **2.30×** |
    | 16384 | 512 → 512 @ 128 (VAE) | 1068 ms | — | 1.36× | **1.95×** |
    | 16384 | 256 → 256, 128 → 128 @ 32 (B = 16) | 247, 61 ms | — | 0.97, 0.80× | **1.62**, 1.16× |
    | 65536 | 512 → 512 @ 256 (VAE) | 4474 ms | — | 0.85× | 1.77× |

    With few pixels for a large weight the filter transform costs as much as the convolution (27 ms for
    F(2×2) of a 1280 × 1280 layer, 58 ms for F(4×4)), so the smallest images take im2col; with more pixels
    F(4×4)'s 4× fewer multiplies pay the transform back. F(4×4) would still pay beyond ``MAX_PIXELS``, but
    its tiles take 2.25× the image's memory, so larger images keep the direct kernel. Below ``MIN_CHANNELS``
    (the MNIST and CIFAR-10 UNets) the gain is small or none. bfloat16 keeps the direct kernel: its earlier
    Winograd path paid only with the filters transformed once and kept, and this CPU, without native bf16,
    cannot measure a per-call one.
    """

    MIN_CHANNELS = 256
    IM2COL_PIXELS = 64  # at most this many pixels in the batch (B·H·W): im2col
    WINOGRAD4_PIXELS = 1024  # from here on F(4×4) where the size allows it, below (or where not) F(2×2)
    MAX_PIXELS = 16384

    def fast_path(self, x: torch.Tensor) -> str | None:
        """"im2col", "winograd2" (F(2×2, 3×3)), "winograd4" (F(4×4, 3×3)), or None (``nn.Conv2d``)."""
        if (x.device.type != "cpu" or x.dim() != 4 or x.dtype != torch.float32 or self.weight.dtype != torch.float32
                or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            return None
        B, _, H, W = x.shape
        pixels = B * H * W
        if pixels <= self.IM2COL_PIXELS:
            return "im2col"
        if pixels > self.MAX_PIXELS:
            return None
        if pixels >= self.WINOGRAD4_PIXELS and H % 4 == W % 4 == 0:
            return "winograd4"
        return "winograd2" if H % 2 == W % 2 == 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = self.fast_path(x)
        if path == "im2col":
            return im2col_conv3x3(x, self.weight, self.bias)
        if path in ("winograd2", "winograd4"):
            return winograd_conv3x3(x, self.weight, self.bias, int(path[-1]))
        return super().forward(x)


def _eligible(conv: nn.Module) -> bool:
    """A plain 3×3 "same" convolution, wide enough for ``FastConv2d`` to pay (its docstring)."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and conv.in_channels >= FastConv2d.MIN_CHANNELS)


def _rebuilt(conv: nn.Conv2d, cls: type[nn.Conv2d]) -> nn.Conv2d:
    """``conv`` as an instance of ``cls`` holding the very same Parameter objects (built on the meta device, so
    nothing is allocated or copied) and the same forward hooks (an attached LoRA keeps working)."""
    new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
              conv.groups, conv.bias is not None, conv.padding_mode, device="meta")
    new.weight, new.bias = conv.weight, conv.bias
    new._forward_hooks = conv._forward_hooks  # the same dict, so the hooks' handles still remove them
    return new.train(conv.training)


def _swap_convs(model: nn.Module, chosen: Callable[[nn.Module], bool], cls: type[nn.Conv2d]) -> nn.Module:
    """Every ``chosen`` module in ``model`` rebuilt as ``cls`` in its parent's slot; ``model`` itself when it is
    ``chosen`` (a bare convolution has no parent to hold its replacement)."""
    if chosen(model):
        return _rebuilt(model, cls)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if chosen(child):
                setattr(parent, name, _rebuilt(child, cls))
    return model


def enable_fast_cpu(model: nn.Module) -> nn.Module:
    """Swap every wide 3×3 "same" ``nn.Conv2d`` in ``model`` for a ``FastConv2d``, in place, and return ``model``
    (a bare convolution comes back as its replacement). The parameters are the same objects, so the state
    dict, an optimizer holding them and ``model.to(...)`` are unaffected, and nothing is kept beside the
    weights. The fast path runs only on the CPU without gradients, so training is unaffected too. Calling
    it again changes nothing."""
    return _swap_convs(model, _eligible, FastConv2d)


def disable_fast_cpu(model: nn.Module) -> nn.Module:
    """Undo ``enable_fast_cpu``: every ``FastConv2d`` in ``model`` back to a plain ``nn.Conv2d``, in place."""
    return _swap_convs(model, lambda module: type(module) is FastConv2d, nn.Conv2d)
