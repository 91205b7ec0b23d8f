"""How a loaded pipeline runs on its device: the memory mode and compilation.

fast -- everything resident on the GPU, both guidance halves in one batch, torch.compile'd UNet.
low  -- for small GPUs: guidance halves one after the other, the image encoder and VAE encoder leave the GPU
        once the conditioning is computed, the UNet leaves it while decoding. Same numbers as fast mode
        up to floating-point reassociation: nothing is approximated.
auto -- fast when the free memory allows it, else low.
"""

from __future__ import annotations

import torch

MODES = ("auto", "fast", "low")
# Free VRAM that fast mode needs for SVD-XT at 576x1024, 25 frames, with headroom (measured peak: see
# benchmarks/RESULTS.md); below it, auto picks low.
FAST_MIN_FREE_GIB = 24.0


def free_vram_gib(device: torch.device) -> float | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return free / 2**30


def choose_memory_mode(device: torch.device, requested: str = "auto") -> tuple[str, str]:
    """(mode, reason). On the CPU the mode only decides the batching: fast (one batch) is used."""
    if requested not in MODES:
        raise ValueError(f"memory mode must be one of {', '.join(MODES)}, got {requested!r}")
    if requested != "auto":
        return requested, "as asked"
    free = free_vram_gib(device)
    if free is None:
        return "fast", f"{device.type}: no GPU memory limit"
    if free >= FAST_MIN_FREE_GIB:
        return "fast", f"{free:.1f} GiB free >= {FAST_MIN_FREE_GIB:.0f} GiB"
    return "low", f"{free:.1f} GiB free < {FAST_MIN_FREE_GIB:.0f} GiB"


def use_channels_last(module: torch.nn.Module) -> None:
    """NHWC (and NDHWC for the temporal 3-D convs) weights: cuDNN's tensor-core convolutions want them, and the
    (B*T, C, H, W) <-> (B, C, T, H, W) views of the temporal layers then need no transposes."""
    for m in module.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.to(memory_format=torch.channels_last)
        elif isinstance(m, torch.nn.Conv3d):
            m.to(memory_format=torch.channels_last_3d)


def enable_compile_cache() -> None:
    """Keep Inductor's compiled kernels and autotuning results under ~/.cache/img2vid so the compile is paid once
    per machine and reused by later processes (unless the user chose a cache directory)."""
    import os
    from pathlib import Path

    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "img2vid" / "inductor"
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(base)


def offload(module: torch.nn.Module) -> None:
    """Move a module to pinned CPU memory (fast to bring back with non-blocking copies)."""
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device.type != "cpu":
            cpu = torch.empty(t.shape, dtype=t.dtype, pin_memory=torch.cuda.is_available())
            cpu.copy_(t, non_blocking=False)
            t.data = cpu


def onload(module: torch.nn.Module, device: torch.device) -> None:
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device != device:
            t.data = t.data.to(device, non_blocking=True)
