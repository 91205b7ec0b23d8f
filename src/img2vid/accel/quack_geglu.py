"""quack_geglu: each GEGLU feed-forward of the UNet as one quack GEMM (`pip install -e ".[fa4]"`).

GEGLU(x) = a * gelu(g), [a, g] = x W^T + b. quack's `gemm_gated` (CUTLASS-DSL GEMMs) computes both halves in one
Hopper GEMM over weights whose gate and up rows are interleaved ([g0, a0, g1, a1, ...]), combines each pair in an
epilogue that overlaps the next tile's products, and writes only the (M, 4C) result.

quack's own GEGLU uses GELU's tanh form, and its erf GELU calls the general erf, too slow for an epilogue with
K = 320 to hide it. SVD's GELU is the erf form, so this registers its own: with s = |x| and the normal CDF Phi,
    Phi(-s) = 2 ** p(s),  p a polynomial of degree 7 (p(0) = -1),   gelu(x) = max(x, 0) - s Phi(-s)
one exp2 and eight fused multiply-adds. It is an approximation, fitted by tests/gelu_fit.py: within
6.7e-7 * max(1, |x|) of float64 GELU, and within 5.2e-6 relative wherever |gelu(x)| > 1e-6 (torch's float32 GELU
is within 1.0e-7 * max(1, |x|)); both far below fp16 rounding. Fitted on |x| <= 5.9; beyond, s Phi(-s) < 1.1e-8.

Fast memory mode only: the interleaved weights are a copy (0.55 GiB for SVD-XT). quack tunes each GEMM shape once
per machine and keeps its kernels and choices under QUACK_CACHE_DIR (default ~/.cache/img2vid/quack).
"""

from __future__ import annotations

import hashlib
import logging
import os

import torch
import torch.nn.functional as F

from ..models.layers import GEGLU
from . import dsl

log = logging.getLogger("img2vid")

NAME = "quack_geglu"
PACKAGE = "quack-kernels"
TUNED = True  # quack's autotuner rather than its default tile configuration
# p(s) = -1 + c1 s + ... + c7 s^7 ~ log2(Phi(-s)) on [0, 5.9] (tests/gelu_fit.py --degree 7)
COEFFS = (
    -1.1512140035629272, -0.4585431218147278, -0.0538887158036232, 0.008475412614643574,
    -0.0009227299597114325, 6.0656515415757895e-05, -1.7896981034937198e-06,
)  # fmt: skip

_gemm_gated = None  # quack.gemm_interface.gemm_gated, imported by `setup`
_activation: str | None = None  # the name registered with quack
_failed: set[tuple[int, int, int]] = set()  # (M, N, K) quack could not run: the plain path takes them


def unavailable(device: torch.device, dtype: torch.dtype, memory: str) -> str | None:
    if memory != "fast":
        return "fast memory mode only (its interleaved weights are a copy)"
    return dsl.unavailable(PACKAGE, "quack", device, dtype)


def apply(pipe, report) -> None:
    folder = setup()
    report.settings.append(f"QUACK_CACHE_DIR={folder}")
    for m in pipe.unet.modules():
        if isinstance(m, GEGLU):
            QuackGEGLU.from_module(m)


def setup() -> str:
    """Import quack, point its caches at img2vid's folder (unless the user chose one) and register the
    activation; returns the cache folder."""
    global _gemm_gated, _activation
    import quack.cache
    from quack.gemm_interface import gemm_gated

    from .compiled import cache_root

    # quack reads QUACK_CACHE_DIR when first imported (FlashAttention-4 may have done that already) and again
    # when it tunes: unless the user set it, both go to img2vid's folder
    folder = os.environ.setdefault("QUACK_CACHE_DIR", str(cache_root() / "quack"))
    if quack.cache.CACHE_DIR is None:
        quack.cache.CACHE_DIR = folder
    _activation = register()
    _gemm_gated = gemm_gated
    return folder


def gelu(x: torch.Tensor, coeffs: tuple[float, ...] = COEFFS) -> torch.Tensor:
    """The epilogue's GELU in float32 torch arithmetic (for tests and for the CPU to check the formula)."""
    x = x.float()
    s = x.abs()
    p = torch.full_like(s, coeffs[-1])
    for c in (*coeffs[-2::-1], -1.0):
        p = torch.addcmul(torch.full_like(s, c), p, s)
    return x.clamp(min=0) - s * torch.exp2(p)


def register(coeffs: tuple[float, ...] = COEFFS) -> str:
    """Register the gated activation a * gelu(g) with quack; returns its name. The name carries a digest of the
    coefficients, as quack keys the compiled kernels of installed code by qualified name."""
    import cutlass.cute as cute
    import quack.activation
    import quack.gemm_interface
    from cutlass import Float32, const_expr
    from cutlass.cutlass_dsl import dsl_user_op

    digest = hashlib.sha256(repr(coeffs).encode()).hexdigest()[:12]
    name = f"img2vid_geglu_erf_{digest}"
    if name in quack.activation.gate_fn_map:
        return name
    tail_first = tuple(reversed(coeffs))

    @dsl_user_op
    def geglu(g, a, *, loc=None, ip=None):
        """a * gelu(g) for one accumulator pair, or two (the packed form some epilogues use)."""
        if const_expr(isinstance(g, tuple)):
            return geglu(g[0], a[0], loc=loc, ip=ip), geglu(g[1], a[1], loc=loc, ip=ip)
        s = cute.math.abs(g, loc=loc, ip=ip)
        p = Float32(tail_first[0])
        for c in (*tail_first[1:], -1.0):
            p = cute.math.fma(p, s, Float32(c), loc=loc, ip=ip)
        tail = cute.math.exp2(p, approx=True, ftz=True, loc=loc, ip=ip)  # Phi(-s); 0 once p(s) < -126 (ftz)
        relu = cute.math.max(g, Float32(0.0), propagate_nan=True, loc=loc, ip=ip)  # NaN stays NaN
        return cute.math.fma(cute.math.neg(s, loc=loc, ip=ip), tail, relu, loc=loc, ip=ip) * a

    geglu.__name__ = geglu.__qualname__ = name
    quack.activation.gate_fn_map[name] = geglu
    # quack's interface decides "gated" by this map, which also gives its PyTorch reference
    quack.gemm_interface.gated_to_pytorch_fn_map[name] = lambda gate, up: F.gelu(gate) * up
    return name


def interleave(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A GEGLU Linear's weight (2n, k) = [W_a; W_g] and bias as quack's layout: rows g0, a0, g1, a1, ..."""
    wa, wg = weight.chunk(2)
    ba, bg = bias.chunk(2)
    w = torch.stack([wg, wa], 1).flatten(0, 1).contiguous()
    return w, torch.stack([bg, ba], 1).flatten().contiguous()


class QuackGEGLU(GEGLU):
    """GEGLU with an interleaved copy of its projection (non-persistent buffers: the state_dict is unchanged),
    computed by quack's gated GEMM for fp16 CUDA inputs."""

    @classmethod
    def from_module(cls, m: GEGLU) -> QuackGEGLU:
        with torch.no_grad():
            w, b = interleave(m.proj.weight, m.proj.bias)
        m.__class__ = cls
        m.register_buffer("gated_weight", w, persistent=False)
        m.register_buffer("gated_bias", b, persistent=False)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.gated_weight
        if x.is_cuda and x.dtype == torch.float16 and w.dtype == torch.float16 and x.shape[-1] % 8 == 0:
            return geglu(x, w, self.gated_bias)
        return super().forward(x)


def _dense_order(x: torch.Tensor) -> list[int]:
    """The order of x's dimensions, outermost first, in which its memory is contiguous, the last dimension kept
    last (the temporal layers pass permuted views); the plain order if there is none."""
    order = sorted(range(x.dim() - 1), key=lambda d: -x.stride(d)) + [x.dim() - 1]
    return order if x.permute(order).is_contiguous() else list(range(x.dim()))


def output_layout(x: torch.Tensor, n: int) -> tuple[list[int], list[int], list[int]]:
    """(order, shape in that order, inverse permutation) of the output: x's memory order, last dimension n."""
    order = _dense_order(x)
    shape = [x.shape[d] for d in order[:-1]] + [n]
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return order, shape, inverse


def _plain(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    g, a = F.linear(x2, weight, bias).unflatten(-1, (-1, 2)).unbind(-1)
    return a * F.gelu(g)


@torch.library.custom_op("img2vid::quack_geglu", mutates_args=())
def geglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GEGLU(x) from the interleaved weight (2n, k) and bias (2n,) of `interleave`. The output keeps x's memory
    order, so a permuted but dense x is not copied."""
    order, shape, inverse = output_layout(x, weight.shape[0] // 2)
    x2 = x.permute(order).contiguous().view(-1, x.shape[-1])
    if _gemm_gated is None:  # a compiled artifact loaded in a process that has not applied this path
        setup()
    key = (x2.shape[0], weight.shape[0], x2.shape[1])
    out = None
    if key not in _failed:
        try:
            gated = _gemm_gated(
                x2, weight.t(), bias=bias, activation=_activation, store_preact=False, tuned=TUNED
            )
            out = gated[1]  # (pre-activation: not stored, post-activation)
        except Exception as e:  # a shape or card quack cannot handle: the same result the plain way
            _failed.add(key)
            log.warning("quack's GEGLU GEMM failed for x %s, w %s (%s); using the plain path", tuple(x2.shape),
                        tuple(weight.shape), e)  # fmt: skip
    if out is None:
        out = _plain(x2, weight, bias)
    return out.view(shape).permute(inverse)


@geglu.register_fake
def _(x, weight, bias):
    _order, shape, inverse = output_layout(x, weight.shape[0] // 2)
    return x.new_empty(shape).permute(inverse)
