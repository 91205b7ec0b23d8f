"""Experiment: GEGLU's gate fused into the feed-forward's down projection, as the prologue of one Triton GEMM.

    gated_down(hg, weight, bias) = (a * gelu(g)) @ weight.T + bias,  (a, g) = hg.chunk(2, -1)

hg is the GEGLU projection's output (tokens x 8C). Unfused (torch.compile's plan) the gate is a kernel of its own
that reads hg and writes the 4C-wide product, which the down projection then reads again. Here the product is
formed tile by tile in registers as the GEMM's A operand and never reaches device memory: per level-0 feed-forward
of SVD-XT that is 2.4 GB less traffic. Unlike runs 10 and 13's fused projection + gate (geglu_triton.py), whose
gate was an epilogue after a K loop of only 5-20 steps, this GEMM's K loop is the long one (1280-5120), so the
gate's loads are pipelined like any other operand's.

The gate is computed as Inductor computes it (fp32 from half-precision inputs, exact-erf GELU, rounded to the
input dtype once), so the GEMM's A operand is the same tensor the unfused path materialises; only the GEMM's
summation order differs.

Result (RESULTS.md, run 34, H100): 1.7-2.3x slower than the unfused path at every level (level 0: 3.12 ms against
1.86). Each output tile recomputes the gate for its slice of the output columns, and the time grew with the number
of such slices: 1.4-2.2 ms per pass over the gated elements, against 1.86 ms for the whole unfused path (the erf,
the conversions and the move into the matrix units' operand layout, as we read it; not profiled further).
img2vid does not use it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from geglu_triton import _HAVE_TRITON

if _HAVE_TRITON:
    import triton
    import triton.language as tl
    from geglu_triton import _configs, _tile_position


def gated_down_reference(hg: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    a, g = hg.chunk(2, dim=-1)
    return F.linear(a * F.gelu(g), weight, bias)


if _HAVE_TRITON:
    CONFIGS = [  # (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps)
        (128, 128, 64, 4, 8),
        (128, 128, 64, 3, 8),
        (128, 64, 64, 4, 4),
        (128, 64, 64, 5, 4),
        (64, 128, 64, 4, 4),
        (128, 256, 64, 3, 8),
        (256, 128, 64, 3, 8),
        (128, 128, 32, 5, 8),
        (128, 64, 128, 3, 8),
    ]

    @triton.jit
    def _gated_down_kernel(
        hg_ptr,
        w_ptr,
        b_ptr,
        out_ptr,
        M,
        N,
        H,
        stride_hm,
        stride_wn,
        stride_om,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        """One (BLOCK_M, BLOCK_N) output tile. H (the gated width) must be a multiple of BLOCK_K."""
        pid_m, pid_n = _tile_position(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < M
        n_ok = rn < N
        a_ptrs = hg_ptr + rm[:, None] * stride_hm + rk[None, :]
        g_ptrs = a_ptrs + H
        w_ptrs = w_ptr + rn[None, :] * stride_wn + rk[:, None]  # (BLOCK_K, BLOCK_N) tile of weight.T
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(0, H // BLOCK_K):
            a = tl.load(a_ptrs, mask=m_ok[:, None], other=0.0)
            g = tl.load(g_ptrs, mask=m_ok[:, None], other=0.0).to(tl.float32)
            gelu = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))  # exact-erf GELU, F.gelu's default
            p = (a.to(tl.float32) * gelu).to(hg_ptr.dtype.element_ty)
            w = tl.load(w_ptrs, mask=n_ok[None, :], other=0.0)
            acc = tl.dot(p, w, acc)
            a_ptrs += BLOCK_K
            g_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        o_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    _autotuned = triton.autotune(configs=_configs(CONFIGS), key=["M", "N", "H"])(_gated_down_kernel)

    def gated_down(
        hg: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, config: tuple | None = None
    ) -> torch.Tensor:
        """The fused kernel; `config` (one of CONFIGS) fixes the tile, else Triton autotunes on first use."""
        H = hg.shape[-1] // 2
        hg2 = hg.reshape(-1, 2 * H)
        if hg2.stride(-1) != 1:
            hg2 = hg2.contiguous()
        w = weight.contiguous()
        M, N = hg2.shape[0], w.shape[0]
        out = torch.empty((M, N), device=hg.device, dtype=hg.dtype)
        if config is None:

            def grid(meta):
                return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

            _autotuned[grid](hg2, w, bias, out, M, N, H, hg2.stride(0), w.stride(0), out.stride(0))
        else:
            bm, bn, bk, s, nw = config
            assert H % bk == 0
            grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
            _gated_down_kernel[grid](
                hg2, w, bias, out, M, N, H, hg2.stride(0), w.stride(0), out.stride(0),
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_stages=s, num_warps=nw,
            )  # fmt: skip
        return out.reshape(*hg.shape[:-1], N)
