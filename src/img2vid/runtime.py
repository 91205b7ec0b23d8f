"""How a loaded pipeline runs on its device: the memory mode and compilation.

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
import threading

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


def dsl_kernel_unavailable_reason(
    switch: str, package: str, installed: bool, device: torch.device, dtype: torch.dtype
) -> str | None:
    """Why an optional package of CUTLASS-DSL kernels (FlashAttention-4, quack) cannot be used on this device
    and dtype; None if it can, as far as can be told without importing it. `switch` is its environment switch
    ("0": off), `installed` whether the package is there."""
    if os.environ.get(switch, "1") == "0":
        return f"{switch}=0"
    if device.type != "cuda" or not torch.cuda.is_available() or torch.version.hip is not None:
        return "needs a CUDA device"
    if torch.cuda.get_device_capability(device)[0] not in (9, 10):
        return "needs compute capability 9.x or 10.x (Hopper, datacenter Blackwell)"
    if dtype != torch.float16:
        return "needs float16"
    if not installed:
        return f"not installed (pip install {package})"
    return None


def use_channels_last(module: torch.nn.Module) -> None:
    """NHWC (and NDHWC for the temporal 3-D convs) weights: cuDNN's tensor-core convolutions want them, and the
    (B*T, C, H, W) <-> (B, C, T, H, W) views of the temporal layers then need no transposes."""
    with torch.no_grad():
        for p in module.parameters():
            if p.ndim == 4:
                p.data = p.data.contiguous(memory_format=torch.channels_last)
            elif p.ndim == 5:
                p.data = p.data.contiguous(memory_format=torch.channels_last_3d)


# How much of a network one torch.compile graph covers:
#   regions -- each block (UNet: VideoResBlock, SpatialVideoTransformer, Upsample and the output head; see
#              UNet.compile_regions) is compiled on its own, and blocks of the same class and shapes share one
#              compiled graph. The default for the UNet: on an H200 its call was 1.1% faster than one
#              whole-network graph and compiled in 98 s instead of 117 s (RESULTS.md, run 17), for 1.1 GiB more
#              peak (a block's input stays alive until the block returns).
#   whole   -- one graph per network. The pipeline always compiles the VAE decoder this way: block by block, a
#              14-frame decode of 576x1024 peaked 2 GiB higher (runs 18-19 against run 20).
COMPILE_SCOPES = ("regions", "whole")


def compile_network(net: torch.nn.Module, scope: str, **options):
    """Compile `net` for inference at fixed shapes; returns what to call instead of `net`. `options` go to
    torch.compile (the tests pass a backend)."""
    options = {"fullgraph": True, "dynamic": False, **options}
    if scope not in COMPILE_SCOPES:
        raise ValueError(f"compile scope must be one of {', '.join(COMPILE_SCOPES)}, got {scope!r}")
    # Each distinct input shape is a graph of its own (dynamic=False): block by block, SVD-XT at one resolution
    # is 25 graphs for the UNet's 42 regions; the decoder takes one graph per decode-chunk length (14 and 11 for
    # 25 frames). Each new resolution, frame count or memory mode adds more. Dynamo's defaults (8 graphs per
    # code object, 256 recompiles in all) are raised: past them it would quietly run the network eagerly.
    dynamo = torch._dynamo.config
    limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    setattr(dynamo, limit, max(getattr(dynamo, limit), 256))
    if hasattr(dynamo, "accumulated_recompile_limit"):
        dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 4096)
    if scope == "whole":
        return torch.compile(net, **options)
    for owner, name in net.compile_regions():
        # A method (a block's forward), not the module (nn.Module.compile): then each class has its own cache
        # of graphs, and a call looks through that class's entries only.
        setattr(owner, name, torch.compile(getattr(owner, name), **options))
        owner.__dict__.setdefault("_img2vid_compiled", []).append(name)
    return net


_heuristics = threading.local()


def use_inductor_heuristics() -> None:
    """Install img2vid's Inductor heuristics in this thread (once per thread; a no-op where PyTorch lacks the hook).

    One heuristic is changed: a reduction whose hint is DEFAULT (neither INNER nor OUTER, as Inductor reads the
    UNet's layer norms fused with broadcast residual adds) over at most PERSISTENT_ROWS (2048) elements is
    compiled as a persistent reduction (one pass, the row held in registers) instead of a looped one; Inductor's
    own threshold for those is 64. On an H100, up to 1024 elements (the 320- and 640-channel norms), the UNet's
    layer-norm kernels took 15.3 instead of 21.9 ms of a call and the call 1.0-1.2% less (benchmarks/RESULTS.md,
    run 53); up to 2048 (the 1280-channel ones too) they took 14.3 against 15.4 ms (run 57). Summation order
    only: same results up to float rounding.

    Inductor keeps its heuristics per thread and compiles in the thread that first calls a compiled function,
    so Pipeline.setup and the pipeline's entry points (generate, decode) call this. They change only how fast the
    generated kernels are, in any code this thread compiles. PyTorch 2.11's compile cache does not key on them,
    so a graph cached before they were installed is reused as it was; img2vid's own cache directory
    (enable_compile_cache) holds graphs compiled by its pipelines, which install them first."""
    if getattr(_heuristics, "installed", False):
        return
    try:
        from torch._inductor.choices import InductorChoices
        from torch._inductor.runtime.hints import ReductionHint
        from torch._inductor.virtualized import V
    except ImportError:  # an older or newer PyTorch without this hook: Inductor's defaults
        _heuristics.installed = True
        return

    V.set_choices_handler(inductor_choices(InductorChoices, ReductionHint)())
    _heuristics.installed = True


PERSISTENT_ROWS = 2048  # the longest DEFAULT-hint reduction made persistent (Inductor: 64)


def inductor_choices(base: type, hints) -> type:
    """The InductorChoices subclass of use_inductor_heuristics (base: InductorChoices; hints: ReductionHint)."""

    class Choices(base):
        @staticmethod
        def should_use_persistent_reduction(features, cooperative_reduction) -> bool:
            try:
                numel = features.reduction_numel
                if (
                    torch._inductor.config.triton.persistent_reductions
                    and not cooperative_reduction
                    and features.get_reduction_hint() == hints.DEFAULT
                    and numel.is_number
                    and int(numel) <= PERSISTENT_ROWS
                ):
                    return True
            except Exception:  # another PyTorch's features object: Inductor's own choice
                pass
            return base.should_use_persistent_reduction(features, cooperative_reduction)

        def uuid(self) -> str:  # for PyTorch versions that key their compile cache on the choices
            return f"img2vid-persistent-rows-{PERSISTENT_ROWS}"

    return Choices


def uncompile_network(net: torch.nn.Module) -> None:
    """Undo compile_network's "regions" in place (a "whole" compile leaves `net` itself untouched)."""
    for m in net.modules():
        for name in m.__dict__.pop("_img2vid_compiled", []):
            delattr(m, name)


def enable_compile_cache() -> None:
    """Keep Inductor's compiled kernels and autotuning results under ~/.cache/img2vid so the compile is paid once
    per machine and reused by later processes (unless the user chose a cache directory)."""
    from pathlib import Path

    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "img2vid" / "inductor"
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(base)


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
