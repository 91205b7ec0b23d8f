"""GEGLU with its gate in a Hopper GEMM's epilogue (gate_gemm.cu), for fp16 on H100/H200.

GEGLU(x) = a * gelu(g), [a, g] = x W^T + b. The plain path is one GEMM writing the 8C-wide [a, g] and a pointwise
kernel reading it back. Here a = x W_a^T + b_a (cuBLAS) and one CUTLASS kernel computes a * gelu(x W_g^T + b_g),
reading a in its epilogue; W_a, W_g, b_a, b_g are row slices of the Linear's own weight and bias (no copies).
On an H100 this made the compiled SVD-XT UNet call 2.2-2.9% faster and a whole generation 2.6% faster
(benchmarks/RESULTS.md, runs 37-40); its results differ from the plain path's by rounding only (g is not
rounded to fp16 before the gelu). In fast-memory mode with quack installed, quack_geglu.py's one-GEMM GEGLU
takes precedence (0.959x a generation against this path, run 71); low-memory mode keeps this one.

The kernel is compiled once per machine with nvcc against CUTLASS's headers (the pip package `nvidia-cutlass`,
or $CUTLASS_DIR), into ~/.cache/img2vid/kernels, the first time a pipeline is set up on a Hopper GPU in fp16:
one nvcc process, 2-3 minutes on two cores (built and run here with nvcc 13.0 and CUTLASS 4.2). Without nvcc
or CUTLASS, or with IMG2VID_GATE_GEMM=0, the plain path runs; `img2vid doctor` says which and why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger("img2vid")

SOURCE = Path(__file__).with_name("gate_gemm.cu")
SWITCH = "IMG2VID_GATE_GEMM"  # "0": never use the kernel
WORKSPACE_BYTES = 8 << 20  # the tile scheduler's workspace; these kernels need none or a few bytes

_enabled = False  # read by GEGLU.forward (models/layers.py); torch.compile guards on it
_lib: ctypes.CDLL | None = None
_workspace: dict[int, torch.Tensor] = {}
_best: dict[tuple, int] = {}  # (device, M, N, K) -> the fastest tile configuration, timed on first use


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "img2vid" / "kernels"


def find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def find_cutlass() -> Path | None:
    """CUTLASS's source tree (include/ and tools/util/include/): $CUTLASS_DIR, else the copy inside the pip
    package nvidia-cutlass (cutlass_library/source), found without importing it."""
    candidates = [Path(os.environ["CUTLASS_DIR"])] if os.environ.get("CUTLASS_DIR") else []
    spec = importlib.util.find_spec("cutlass_library")
    if spec is not None and spec.submodule_search_locations:
        candidates.append(Path(next(iter(spec.submodule_search_locations))) / "source")
    for root in candidates:
        if (root / "include" / "cutlass" / "cutlass.h").is_file():
            return root
    return None


def compile_command(nvcc: str, cutlass: Path, out: Path) -> list[str]:
    """nvcc for sm_90a (wgmma and TMA need the 'a' target), the CUDA runtime linked statically (nvcc's default)."""
    return [
        nvcc, "-std=c++17", "-O3", "-DNDEBUG", "-gencode=arch=compute_90a,code=sm_90a",
        "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC", "-shared",
        f"-I{cutlass / 'include'}", f"-I{cutlass / 'tools' / 'util' / 'include'}", str(SOURCE), "-o", str(out),
    ]  # fmt: skip


NO_NVCC = "nvcc not found (install the CUDA toolkit, or set CUDA_HOME)"
NO_CUTLASS = "CUTLASS headers not found (pip install nvidia-cutlass, or set CUTLASS_DIR)"


def _digest(data: bytes, n: int) -> str:
    return hashlib.sha256(data).hexdigest()[:n]


@functools.lru_cache
def _compiler_digest(nvcc: str) -> str:
    """Hash of `nvcc --version`, asked once per process: every pipeline setup on CUDA looks the kernel up."""
    return _digest(subprocess.run([nvcc, "--version"], capture_output=True).stdout, 8)


def library_path(nvcc: str) -> Path:
    """Where the kernel built by this nvcc lives: named by hashes of the source and of `nvcc --version`, so an
    edited source or another compiler builds anew."""
    return cache_dir() / f"gate_gemm-{_digest(SOURCE.read_bytes(), 16)}-{_compiler_digest(nvcc)}.so"


def built_library() -> Path | None:
    """The kernel already built from this source: by this machine's nvcc, or, with no nvcc, by any compiler."""
    nvcc = find_nvcc()
    if nvcc is not None:
        path = library_path(nvcc)
        return path if path.is_file() else None
    return next(iter(sorted(cache_dir().glob(f"gate_gemm-{_digest(SOURCE.read_bytes(), 16)}-*.so"))), None)


def build() -> Path:
    """The built kernel, compiling gate_gemm.cu first if needed. Raises RuntimeError naming what is missing or
    what nvcc said. Safe against other processes building at the same time (the result is renamed into place)."""
    built = built_library()
    if built is not None:
        return built
    nvcc, cutlass = find_nvcc(), find_cutlass()
    if nvcc is None or cutlass is None:
        raise RuntimeError(NO_NVCC if nvcc is None else NO_CUTLASS)
    target = library_path(nvcc)
    target.parent.mkdir(parents=True, exist_ok=True)
    log.warning("building the fused GEGLU kernel for Hopper with %s (once per machine, a few minutes)", nvcc)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        run = subprocess.run(compile_command(nvcc, cutlass, out), capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"nvcc failed to build {SOURCE.name}:\n{run.stderr[-4000:]}")
        os.replace(out, target)
    return target


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the kernel cannot be used on this device and dtype, without building it; None if it can."""
    if os.environ.get(SWITCH, "1") == "0":
        return f"{SWITCH}=0"
    if device.type != "cuda" or not torch.cuda.is_available():
        return "needs a CUDA device"
    if torch.cuda.get_device_capability(device) != (9, 0):
        return "needs a Hopper GPU (compute capability 9.0)"
    if dtype != torch.float16:
        return "needs float16"
    if built_library() is None:
        if find_nvcc() is None:
            return NO_NVCC
        if find_cutlass() is None:
            return NO_CUTLASS
    return None


def enable(device: torch.device, dtype: torch.dtype) -> str:
    """Use the kernel in GEGLU from now on if it can run on this device and dtype (building it the first time).
    Returns what was decided, for logs and `img2vid doctor`. Once on, it stays on for the whole process, unless
    IMG2VID_GATE_GEMM=0 is set before a later call. GEGLU still checks each input (`applies`), so CPU, fp32 and
    bf16 pipelines beside it keep the plain path (the process's CUDA devices are taken to be alike)."""
    global _enabled, _lib
    reason = unavailable_reason(device, dtype)
    if os.environ.get(SWITCH, "1") == "0":
        _enabled = False  # the switch turns it off for the process, also after an earlier enable
    if reason is None and _lib is None:
        try:
            lib = ctypes.CDLL(str(build()))
            p, i, z = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
            lib.img2vid_geglu_gate_gemm.argtypes = [i, p, p, p, p, p, i, i, i, i, i, p, z, p]
            lib.img2vid_geglu_gate_gemm.restype = i
            _lib = lib
        except (RuntimeError, OSError) as e:
            reason = f"build failed: {e}"
            log.warning("fused GEGLU kernel not used: %s", reason)
    if reason is not None:
        return f"off: {reason}"
    _enabled = True
    return "on"


def status(device: torch.device, dtype: torch.dtype) -> str:
    """What `enable` would decide, without building: for `img2vid doctor`."""
    reason = unavailable_reason(device, dtype)
    if reason is not None:
        return f"off: {reason}"
    return "on (built)" if built_library() is not None else "on (built with nvcc on first use)"


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether GEGLU should take the fused path for this input: enabled, fp16 on CUDA, a row-major weight, and
    widths that keep every row and both weight halves 16-byte aligned."""
    return (
        _enabled
        and x.is_cuda
        and x.dtype == torch.float16
        and weight.dtype == torch.float16
        and weight.is_contiguous()
        and x.shape[-1] % 8 == 0
        and weight.shape[0] % 16 == 0
    )


def configs() -> int:
    return _lib.img2vid_cutlass_configs()


def launch(config: int, x, w, b, a, out, swizzle: int = 1, raster: int = 0) -> int:
    """out = a * gelu(x w^T + b) with one tile configuration (2-D contiguous fp16 tensors); the kernel's status."""
    M, K = x.shape
    ws = _workspace.get(x.device.index)
    if ws is None:
        ws = _workspace[x.device.index] = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=x.device)
    with torch.cuda.device(x.device):
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        ptrs = (x.data_ptr(), w.data_ptr(), b.data_ptr(), a.data_ptr(), out.data_ptr())
        return _lib.img2vid_geglu_gate_gemm(
            config, *ptrs, M, w.shape[0], K, swizzle, raster, ws.data_ptr(), WORKSPACE_BYTES, stream
        )


def time_ms(fn, n: int = 5, warmup: int = 1) -> float:
    """Mean milliseconds of `n` calls of fn on the current CUDA stream, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / n


def gate_gemm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """a * gelu(x @ w^T + b) for 2-D contiguous x (M, K), w (N, K), b (N,), a (M, N). The tile configuration is
    the fastest for the shape, timed on its first call."""
    out = torch.empty_like(a)
    key = (x.device.index, x.shape[0], w.shape[0], x.shape[1])
    if key not in _best:
        times = {}
        for c in range(configs()):
            if launch(c, x, w, b, a, out) == 0:
                times[c] = time_ms(lambda c=c: launch(c, x, w, b, a, out))
        if not times:
            raise RuntimeError(
                f"the fused GEGLU kernel has no configuration for x {tuple(x.shape)} w {tuple(w.shape)}"
            )
        _best[key] = min(times, key=times.get)
    status = launch(_best[key], x, w, b, a, out)
    if status != 0:
        raise RuntimeError(
            f"the fused GEGLU kernel failed (status {status}) for x {tuple(x.shape)} w {tuple(w.shape)}"
        )
    return out


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


@torch.library.custom_op("img2vid::geglu_gate_gemm", mutates_args=())
def geglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GEGLU(x) for the Linear (weight (2n, k), bias (2n,)) of a GEGLU layer. The output keeps x's memory order,
    so a permuted but dense x is not copied."""
    n = weight.shape[0] // 2
    order, shape, inverse = output_layout(x, n)
    x2 = x.permute(order).contiguous().view(-1, x.shape[-1])
    out = gate_gemm(x2, weight[n:], bias[n:], F.linear(x2, weight[:n], bias[:n]))
    return out.view(shape).permute(inverse)


@geglu.register_fake
def _(x, weight, bias):
    _order, shape, inverse = output_layout(x, weight.shape[0] // 2)
    return x.new_empty(shape).permute(inverse)
