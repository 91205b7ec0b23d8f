"""How a loaded pipeline uses memory: the memory mode, offloading, the allocator.

fast -- everything resident on the GPU, both guidance halves in one batch.
low  -- for small GPUs: guidance halves one after the other, the image encoder and the VAE stay off the GPU
        except while they run, the UNet leaves it while decoding, decoding takes 7 frames at a time instead
        of the reference's 14 (LOW_MEMORY_DECODE_CHUNK), and the CUDA allocator's segments are expandable
        (use_expandable_segments). SVD-XT at its defaults then runs within a 7 GiB allocator cap with 6.2 GiB
        of the card in use (RESULTS.md, run 24). Sampling gives the same numbers as fast mode up to
        floating-point reassociation; the smaller decode chunk changes the video slightly (say
        decode_chunk_size=14 to keep the reference's, at about 10 GiB peak).
auto -- fast when the free memory allows it, else low.
"""

from __future__ import annotations

import os

import torch

from .params import MEMORY_MODES as MODES

# Free VRAM that fast mode needs for SVD-XT at 576x1024, 25 frames, with headroom: its measured peak is 14.2 GiB
# allocated, and it ran to the end under a 21.5 GiB allocator cap, a 24 GB card (benchmarks/RESULTS.md, runs
# 20-22). Below it, auto picks low.
FAST_MIN_FREE_GIB = 20.0
# In low mode, decoding 14 frames of 576x1024 at once peaks at 10.0 GiB allocated, 7 at a time at 5.2 GiB
# (RESULTS.md, run 20). Low mode decodes 7 at a time by default, which changes the video slightly (the temporal
# decoder mixes a chunk's frames).
LOW_MEMORY_DECODE_CHUNK = 7


def use_expandable_segments() -> bool:
    """Have PyTorch's CUDA allocator grow its memory segments in place instead of cutting fixed-size ones
    (`expandable_segments`), for the segments allocated from now on, in the whole process. Low mode calls it: on
    a 7 GiB budget (an 8 GB card, simulated) fixed segments fragmented so badly that decoding 7 frames at a time
    ran out of memory with 5.2 GiB allocated (benchmarks/RESULTS.md, runs 22-24). Left alone when the user has
    configured the allocator (PYTORCH_CUDA_ALLOC_CONF or PYTORCH_ALLOC_CONF). Returns whether it changed it."""
    configured = any(k in os.environ for k in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"))
    # A private function (torch >= 2.1), hence looked up with a default; the setting itself is documented.
    setter = getattr(torch.cuda.memory, "_set_allocator_settings", None)
    if configured or setter is None or not torch.cuda.is_available():
        return False
    setter("expandable_segments:True")
    return True


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


def offload(module: torch.nn.Module) -> None:
    """Free a module's GPU memory. Its weights keep one pinned CPU copy, made on the first offload and reused
    (weights are read-only at inference), so later offloads cost nothing and onloads are one fast copy."""
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device.type == "cpu":
            continue
        cpu = getattr(t, "_img2vid_cpu", None)
        if cpu is None:
            cpu = torch.empty_like(t, device="cpu", pin_memory=torch.cuda.is_available())  # keeps the layout
            cpu.copy_(t)
            t._img2vid_cpu = cpu
        t.data = cpu


def onload(module: torch.nn.Module, device: torch.device) -> None:
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device != device:
            t.data = t.data.to(device, non_blocking=True)
