"""Experiments, kept because their results are recorded in RESULTS.md: GEGLU's projection and gate in one Triton
kernel, so the (tokens x 8C) projection never reaches device memory.

geglu_linear(x, weight, bias) = a * gelu(g) with (a, g) = (x @ weight.T + bias).chunk(2, -1). One kernel computes
both halves' tiles from one read of x and applies the gate in registers (fp32, rounded once).
- geglu_linear (run 10): one program per tile, pointer loads. Slower than cuBLAS's GEMM followed by Inductor's
  fused gate at SVD-XT's shapes on an H200; the UNet call with it took 0.434 s against 0.429 s.
- geglu_linear_tma (run 13): persistent, TMA loads and stores, the tile loop flattened so that the next tile's
  loads overlap this tile's gate. Still 7-9% slower than cuBLAS + gate per layer; the UNet call took 0.4138 s
  against 0.4172 s (-0.8%) and 0.54 GiB less peak memory.
img2vid uses neither: under 1% is not worth a custom kernel. A winner needs the gate overlapped with the next
tile's matrix products (warp specialisation, Blackwell-only in Triton 3.6) as cuBLAS's epilogues are.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

TensorDescriptor = None  # Triton's host-side TMA descriptor, where this Triton has it (3.4+)
try:  # Triton ships with the CUDA builds of PyTorch; the CPU build has none.
    import triton
    import triton.language as tl

    _HAVE_TRITON = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")
except ImportError:  # pragma: no cover - depends on the install
    _HAVE_TRITON = False


def geglu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    a, g = F.linear(x, weight, bias).chunk(2, dim=-1)
    return a * F.gelu(g)


def fused_available(x: torch.Tensor) -> bool:
    """Whether geglu_linear runs the fused kernel for this input (CUDA, fp16/bf16, Triton present)."""
    return _HAVE_TRITON and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)


if _HAVE_TRITON:

    def _configs(shapes, pre_hook=None) -> list:
        """Autotuning candidates from (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps)."""
        return [
            triton.Config(
                {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                num_stages=s,
                num_warps=w,
                pre_hook=pre_hook,
            )
            for bm, bn, bk, s, w in shapes
        ]

    @triton.jit
    def _tile_position(tile, num_m, num_n, GROUP_M: tl.constexpr):
        """Grouped order: GROUP_M row blocks in turn share the weight tiles while they are in L2."""
        per_group = GROUP_M * num_n
        first_m = (tile // per_group) * GROUP_M
        group_m = min(num_m - first_m, GROUP_M)
        return first_m + (tile % per_group) % group_m, (tile % per_group) // group_m

    _CONFIGS = _configs(
        [
            (128, 128, 64, 3, 8),
            (128, 128, 64, 4, 8),
            (128, 64, 64, 4, 4),
            (128, 64, 64, 3, 8),
            (64, 128, 64, 4, 4),
            (128, 128, 32, 4, 8),
        ]
    )

    @triton.autotune(configs=_CONFIGS, key=["M", "N", "K"])
    @triton.jit
    def _geglu_kernel(
        x_ptr,
        w_ptr,
        b_ptr,
        out_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_wn,
        stride_om,
        HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        pid_m, pid_n = _tile_position(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < M
        n_ok = rn < N
        x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
        wa_ptrs = w_ptr + rn[None, :] * stride_wn + rk[:, None]  # (BLOCK_K, BLOCK_N) tile of weight[:N].T
        wg_ptrs = wa_ptrs + N * stride_wn  # the gate half: weight[N:2N]
        acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k_ok = rk < K - k * BLOCK_K
            xt = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            wa = tl.load(wa_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            wg = tl.load(wg_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc_a = tl.dot(xt, wa, acc_a)
            acc_g = tl.dot(xt, wg, acc_g)
            x_ptrs += BLOCK_K
            wa_ptrs += BLOCK_K
            wg_ptrs += BLOCK_K
        if HAS_BIAS:
            acc_a += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            acc_g += tl.load(b_ptr + N + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        # Exact (erf) GELU, as F.gelu's default.
        gelu = 0.5 * acc_g * (1.0 + tl.math.erf(acc_g * 0.7071067811865476))
        out = acc_a * gelu
        o_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    @torch.library.triton_op("img2vid::geglu_linear", mutates_args=())
    def _geglu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        K = x.shape[-1]
        x2 = x.reshape(-1, K).contiguous()
        w = weight.contiguous()
        M, N = x2.shape[0], w.shape[0] // 2
        out = torch.empty((M, N), device=x.device, dtype=x.dtype)

        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

        torch.library.wrap_triton(_geglu_kernel)[grid](
            x2, w, bias, out, M, N, K, x2.stride(0), w.stride(0), out.stride(0), HAS_BIAS=True
        )
        return out.reshape(*x.shape[:-1], N)


if _HAVE_TRITON:
    with contextlib.suppress(ImportError):  # Triton before 3.4 has none
        from triton.tools.tensor_descriptor import TensorDescriptor

    def _tma_block_hook(nargs):
        """Autotuning changes the tile shape; the TMA descriptors must describe the same tiles."""
        bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
        nargs["x_desc"].block_shape = [bm, bk]
        nargs["w_desc"].block_shape = [bn, bk]
        nargs["o_desc"].block_shape = [bm, bn]

    _TMA_CONFIGS = _configs(
        [
            (128, 128, 64, 3, 8),
            (128, 128, 64, 4, 8),
            (128, 64, 64, 4, 4),
            (128, 64, 64, 4, 8),
            (128, 128, 32, 5, 8),
            (64, 128, 64, 4, 4),
            (128, 64, 128, 3, 8),
        ],
        pre_hook=_tma_block_hook,
    )

    @triton.autotune(configs=_TMA_CONFIGS, key=["M", "N", "K"])
    @triton.jit
    def _geglu_tma_kernel(
        x_desc,
        w_desc,
        b_ptr,
        o_desc,
        M,
        N,
        K,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        NUM_SMS: tl.constexpr,
    ):
        """Persistent: NUM_SMS programs walk the output tiles; `flatten` lets the software pipeliner issue the
        next tile's TMA loads while this tile's gate is computed and stored (the K loop is only 5-20 steps)."""
        start = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        k_tiles = tl.cdiv(K, BLOCK_K)
        num_tiles = num_m * num_n
        tile_c = start - NUM_SMS  # the epilogue's own tile counter (the pipeliner wants it separate)
        for tile in tl.range(start, num_tiles, NUM_SMS, flatten=True):
            pid_m, pid_n = _tile_position(tile, num_m, num_n, GROUP_M)
            om = pid_m * BLOCK_M
            on = pid_n * BLOCK_N
            acc_a = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for ki in range(k_tiles):
                ok = ki * BLOCK_K
                xt = x_desc.load([om, ok])
                wa = w_desc.load([on, ok])
                wg = w_desc.load([N + on, ok])
                acc_a = tl.dot(xt, wa.T, acc_a)
                acc_g = tl.dot(xt, wg.T, acc_g)
            tile_c += NUM_SMS
            pid_m, pid_n = _tile_position(tile_c, num_m, num_n, GROUP_M)
            rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            acc_a += tl.load(b_ptr + rn).to(tl.float32)[None, :]
            acc_g += tl.load(b_ptr + N + rn).to(tl.float32)[None, :]
            out = acc_a * (0.5 * acc_g * (1.0 + tl.math.erf(acc_g * 0.7071067811865476)))  # exact-erf GELU
            o_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], out.to(o_desc.dtype))

    _NUM_SMS: dict = {}

    def geglu_linear_tma(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """The same function as geglu_linear, as a persistent kernel with TMA (Hopper) loads and stores."""
        K = x.shape[-1]
        x2 = x.reshape(-1, K).contiguous()
        w = weight.contiguous()
        M, N = x2.shape[0], w.shape[0] // 2
        out = torch.empty((M, N), device=x.device, dtype=x.dtype)
        dev = x.device.index or 0
        if dev not in _NUM_SMS:
            _NUM_SMS[dev] = torch.cuda.get_device_properties(dev).multi_processor_count if x.is_cuda else 4
        sms = _NUM_SMS[dev]
        dummy = [8, 8]  # the autotuner's pre_hook sets each config's tile shape
        x_desc = TensorDescriptor(x2, list(x2.shape), list(x2.stride()), dummy)
        w_desc = TensorDescriptor(w, list(w.shape), list(w.stride()), dummy)
        o_desc = TensorDescriptor(out, list(out.shape), list(out.stride()), dummy)

        def grid(meta):
            return (min(sms, triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])),)

        _geglu_tma_kernel[grid](x_desc, w_desc, bias, o_desc, M, N, K, NUM_SMS=sms)
        return out.reshape(*x.shape[:-1], N)

    @torch.library.custom_op("img2vid::geglu_linear_tma", mutates_args=())
    def _geglu_tma_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return geglu_linear_tma(x, weight, bias)

    @_geglu_tma_op.register_fake
    def _(x, weight, bias):
        return x.new_empty(*x.shape[:-1], weight.shape[0] // 2)


def tma_available(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The TMA kernel: Hopper or newer, half precision, inner width a multiple of the widest tile (128)."""
    return (
        fused_available(x)
        and TensorDescriptor is not None
        and torch.cuda.get_device_capability(x.device)[0] >= 9
        and weight.shape[0] % 256 == 0
        and x.shape[-1] % 8 == 0
    )


def geglu_linear_tma_or_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    if bias is not None and weight.dtype == x.dtype and tma_available(x, weight):
        return torch.ops.img2vid.geglu_linear_tma(x, weight, bias)
    return geglu_reference(x, weight, bias)


def geglu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """a * gelu(g) for (a, g) = linear(x, weight, bias).chunk(2, -1); fused on CUDA in half precision."""
    if bias is not None and fused_available(x) and weight.dtype == x.dtype:
        return torch.ops.img2vid.geglu_linear(x, weight, bias)
    return geglu_reference(x, weight, bias)
