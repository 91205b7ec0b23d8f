"""GEGLU as one Hopper GEMM with its gate in the epilogue, through quack's kernels, where the optional package is
installed (it comes with FlashAttention-4: `pip install -e ".[fa4]"`).

GEGLU(x) = a * gelu(g), [a, g] = x W^T + b. img2vid's CUTLASS path (gate_gemm.py) runs a = x W_a^T + b_a with
cuBLAS and a second GEMM whose epilogue reads a back. quack (`quack-kernels`, Tri Dao's CUTLASS-DSL GEMMs) has
`gemm_gated`: one GEMM over weights whose gate and up rows are interleaved ([g0, a0, g1, a1, ...]), the pair of
adjacent accumulator columns combined in an epilogue that overlaps the next tile's products. Only the (M, 4C)
result is written.

quack's own GEGLU uses GELU's tanh form, and its erf GELU calls the general erf, whose cost shows: the epilogue
runs once per output and the first level's GEMM has only K = 320 to overlap it with (1.96 ms against 1.41 for
the tanh form; RESULTS.md, run 68). SVD's GELU is the erf form, so this registers its own, built for the
epilogue: with s = |x| and the normal CDF Phi,
    Phi(-s) = 2 ** p(s),  p a polynomial of degree 7 (p(0) = -1),   gelu(x) = max(x, 0) - s Phi(-s)
one exp2 (the hardware's ex2.approx) and eight fused multiply-adds, no division, no branch (degree 9 took 1.88
ms, degree 7 1.66). It is an approximation, fitted by benchmarks/gelu_fit.py: within 6.7e-7 * max(1, |x|) of
float64 GELU, and within 5.2e-6 relative wherever |gelu(x)| > 1e-6 (torch's 0.5 x (1 + erf(x / sqrt 2)) in
float32 is within 1.0e-7 * max(1, |x|), but loses the negative tail's relative accuracy to cancellation); both
far below the fp16 output's rounding (2.4e-4 relative). Fitted on |x| <= 5.9; beyond, up to fp16's largest
value, s Phi(-s) stays below 1.1e-8, so gelu(x) is within that of x (x > 5.9) or of 0 (x < -5.9). NaN stays
NaN; an infinite input (which an fp16 GEMM of finite inputs cannot produce) gives NaN.

Used in fp16 on GPUs of compute capability 9.x (Hopper, measured) and 10.x (datacenter Blackwell; not measured
here), in fast-memory mode (the interleaved weights are a copy: 0.6 GB for SVD-XT), when the package imports
and `enable` has been called (Pipeline.setup does, on CUDA). Otherwise the CUTLASS or plain path runs.
IMG2VID_QUACK_GEGLU=0 turns it off. The first call per shape has quack's autotuner choose the tile configuration
(26 s at the first level, 8-9 s at the others, on an H100): timed alone in a loop its choice was no faster than the
default configuration (1.86 against 1.62 ms at the first level, run 69), but whole generations with it were 0.6%
faster (run 72). The kernels and the choices are kept under QUACK_CACHE_DIR (default ~/.cache/img2vid/quack), so
later processes skip both.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from . import runtime
from .gate_gemm import cache_dir, output_layout

log = logging.getLogger("img2vid")

SWITCH = "IMG2VID_QUACK_GEGLU"  # "0": never use quack's GEMM
PACKAGE = "quack-kernels"
# quack's autotuner, not its default tile configuration: generations 0.6% faster (RESULTS.md, run 72)
TUNED = True
# p(s) = -1 + c1 s + ... + c7 s^7 ~ log2(Phi(-s)) on [0, 5.9] (benchmarks/gelu_fit.py --degree 7)
COEFFS = (
    -1.1512140035629272, -0.4585431218147278, -0.0538887158036232, 0.008475412614643574,
    -0.0009227299597114325, 6.0656515415757895e-05, -1.7896981034937198e-06,
)  # fmt: skip

_enabled = False  # set by `enable`, read by `applies`; torch.compile guards on it
_gemm_gated = None  # quack.gemm_interface.gemm_gated, imported by `enable`
_activation: str | None = None  # the name registered with quack
_failed: set[tuple[int, int, int]] = set()  # (M, N, K) quack could not run: the plain path takes them


def gelu(x: torch.Tensor, coeffs: tuple[float, ...] = COEFFS) -> torch.Tensor:
    """The epilogue's GELU in float32 torch arithmetic (for tests and for the CPU to check the formula)."""
    x = x.float()
    s = x.abs()
    p = torch.full_like(s, coeffs[-1])
    for c in (*coeffs[-2::-1], -1.0):
        p = torch.addcmul(torch.full_like(s, c), p, s)
    return x.clamp(min=0) - s * torch.exp2(p)


def installed() -> bool:
    return importlib.util.find_spec("quack") is not None


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why quack's GEMM cannot be used on this device and dtype; None if it can (as far as can be told without
    importing it)."""
    return runtime.dsl_kernel_unavailable_reason(SWITCH, PACKAGE, installed(), device, dtype)


def register(coeffs: tuple[float, ...] = COEFFS) -> str:
    """Register the gated activation a * gelu(g) with quack; returns its name. The name and the function's
    qualified name carry a digest of the coefficients, as quack keys the compiled kernels of installed code by
    qualified name."""
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


def enable(device: torch.device, dtype: torch.dtype) -> str:
    """Use quack's GEMM for GEGLU from now on, in networks `prepare`d for it, if it can run on this device and
    dtype; returns what was decided, for logs and `img2vid doctor`. Once on, it stays on for the whole process,
    unless IMG2VID_QUACK_GEGLU=0 is set before a later call; `applies` still checks each input."""
    global _enabled, _gemm_gated, _activation
    reason = unavailable_reason(device, dtype)
    if os.environ.get(SWITCH, "1") == "0":
        _enabled = False
    elif reason is None and not _enabled:
        try:
            import quack.cache
            from quack.gemm_interface import gemm_gated

            # quack reads QUACK_CACHE_DIR for its compiled kernels when first imported (FlashAttention-4 may have
            # done that already) and for its tuning choices when it tunes: unless the user set it, both go here
            folder = os.environ.setdefault("QUACK_CACHE_DIR", str(cache_dir().parent / "quack"))
            if quack.cache.CACHE_DIR is None:
                quack.cache.CACHE_DIR = folder
            _activation = register()
            _gemm_gated = gemm_gated
            _enabled = True
        except Exception as e:  # a broken install: the other paths, not a failure
            reason = f"import failed: {type(e).__name__}: {e}"
            log.warning("quack's GEGLU GEMM not used: %s", reason)
    return "on" if reason is None else f"off: {reason}"


def interleave(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A GEGLU Linear's weight (2n, k) = [W_a; W_g] and bias as quack's layout: rows g0, a0, g1, a1, ..."""
    wa, wg = weight.chunk(2)
    ba, bg = bias.chunk(2)
    w = torch.stack([wg, wa], 1).flatten(0, 1).contiguous()
    return w, torch.stack([bg, ba], 1).flatten().contiguous()


def prepare(net: nn.Module, on: bool) -> None:
    """Give each GEGLU layer of `net` the interleaved copy of its weights (`on`), or drop the copies. Called by
    Pipeline.setup, after the weights are loaded and on their device."""
    from .models.layers import GEGLU

    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, GEGLU):
                w, b = interleave(m.proj.weight, m.proj.bias) if on else (None, None)
                m.register_buffer("gated_weight", w, persistent=False)
                m.register_buffer("gated_bias", b, persistent=False)


def applies(x: torch.Tensor, gated_weight: torch.Tensor | None) -> bool:
    """Whether GEGLU of x (fp16 on CUDA) takes quack's GEMM: enabled, and the layer was prepared."""
    return (
        _enabled
        and gated_weight is not None
        and x.is_cuda
        and x.dtype == torch.float16
        and gated_weight.dtype == torch.float16
        and x.shape[-1] % 8 == 0
    )


def _plain(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    g, a = F.linear(x2, weight, bias).unflatten(-1, (-1, 2)).unbind(-1)
    return a * F.gelu(g)


@torch.library.custom_op("img2vid::quack_geglu", mutates_args=())
def geglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GEGLU(x) from the interleaved weight (2n, k) and bias (2n,) of `interleave`. The output keeps x's memory
    order, so a permuted but dense x is not copied."""
    order, shape, inverse = output_layout(x, weight.shape[0] // 2)
    x2 = x.permute(order).contiguous().view(-1, x.shape[-1])
    if _gemm_gated is None:  # called directly, without `enable`
        enable(x.device, x.dtype)
    key = (x2.shape[0], weight.shape[0], x2.shape[1])
    out = None
    if _gemm_gated is not None and key not in _failed:
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
