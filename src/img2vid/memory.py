"""How a pipeline uses memory: the memory modes and offloading, and how much a generation needs.

Memory modes:
fast -- everything resident on the GPU, both guidance halves in one batch.
low  -- for small GPUs: guidance halves one after the other, the image encoder and the VAE stay off the GPU
        except while they run, the UNet leaves it while decoding, decoding takes 7 frames at a time instead
        of the reference's 14 (LOW_MEMORY_DECODE_CHUNK), and the CUDA allocator's segments are expandable
        (use_expandable_segments). SVD-XT at its defaults then runs on an 8 GB card (docs/memory.md).
        Sampling gives the same numbers as fast mode up to
        floating-point reassociation; the smaller decode chunk changes the video slightly (say
        decode_chunk_size=14 to keep the reference's, at about 10 GiB peak).
auto -- fast when the free memory allows it, else low.

The estimate.

`estimate` is a pure function of the config, the size, the frame count, the dtype, the memory mode and the
device type: the peak bytes a generation allocates beyond the loaded weights. The peak is the largest of
its stages, which do not overlap: the VAE encoder on the conditioning image, one UNet call, and the VAE
decoder on `decode_chunk` frames (plus the frames decoded before). Each stage counts its widest
activation times a number of live tensors, measured with PyTorch 2.13, so it is an approximation:
- CPU (eager, fp32): peak RSS of each stage run alone, for the tiny preset at 256 to 2048 pixels a side
  and 1 to 8 frames, and for SVD-XT's VAE (random weights) at 256 and 512 pixels a side. The estimate
  was above every one of those 28 stages: 1.2x to 2.1x their peak, more below ~100 MB, where OVERHEAD
  is most of it.
- CUDA (compiled, fp16): SVD-XT at 576x1024, the allocated peaks measured by benchmarks/bench.py:
  decoding 7 and 14 frames (within 10%) and low-memory mode's 25-frame UNet call (about 3 GiB beyond
  the weights, from the 6.2 GiB that run had in use). Fast mode's
  50-frame call peaked near twice what its factor gives: on a GPU an underestimate ends in PyTorch's
  out-of-memory error, which fails the job and not the process, so the lower factor is kept there.
  Nothing else was measured on a GPU.
The VAE's mid-block attention is the one term that grows with the square of the pixels: its q, k and v
are not contiguous, so PyTorch's fused kernels refuse them and the score matrix (frames x (HW/64)^2) is
built whole, 16 GiB per frame at 2048x2048 in fp32 (where the tiny model's 24 GB went). `fit` then
switches that attention to blocks of queries (`use_chunked_attention`), and when that is not enough
decodes fewer frames at a time.

`free_bytes` is what the device has free now: for the CPU the available RAM, or the room under the
container's memory limit when that is less; for CUDA the free VRAM plus what PyTorch holds cached.
"""

from __future__ import annotations

import os
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .errors import NotEnoughMemory
from .params import MEMORY_MODES as MODES
from .sampling import guidance_scales

# Free VRAM that fast mode needs for SVD-XT at 576x1024, 25 frames, with headroom (it runs on a 24 GB card).
# Below it, auto picks low.
FAST_MIN_FREE_GIB = 20.0
# Low mode decodes 7 frames at a time (about half the peak of the reference's 14), which changes the video
# slightly: the temporal decoder mixes a chunk's frames.
LOW_MEMORY_DECODE_CHUNK = 7


def use_expandable_segments() -> bool:
    """Have PyTorch's CUDA allocator grow its memory segments in place instead of cutting fixed-size ones
    (`expandable_segments`), for the segments allocated from now on, in the whole process. Low mode calls it: on
    a 7 GiB budget (an 8 GB card) fixed segments fragmented so badly that decoding ran out of memory with
    5.2 GiB allocated. Left alone when the user has
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


GIB = 2**30
ATTENTION_BLOCK_BYTES = 64 * 2**20  # the largest score block of the chunked VAE attention
SCORES_FACTOR = 2.5  # scores, their softmax, a boolean mask per element and slack: PyTorch's math attention
USABLE = 0.9  # of the free memory: the rest is left for what the estimate does not count
OVERHEAD = 128 * 2**20  # input image, latents, conditioning, allocator slack
# Live tensors of the stage's widest activation, per device type (eager CPU keeps more than Inductor).
DECODER_TENSORS = {"cpu": 6.0, "cuda": 2.5}  # of C_up channels at full resolution, per decoded frame
ENCODER_TENSORS = {"cpu": 5.0, "cuda": 2.5}  # of the encoder's full-resolution channels
UNET_TENSORS = {"cpu": 40.0, "cuda": 20.0}  # of model_channels at latent resolution, per UNet batch item


@dataclass(frozen=True)
class Fit:
    """How a generation will run: `decode_chunk` frames decoded at a time, the VAE attention chunked or
    not, with an estimated `peak` (bytes) against `free` (None: not checked)."""

    decode_chunk: int
    chunked_attention: bool
    peak: int
    free: int | None
    asked_chunk: int

    def note(self) -> str | None:
        """What was changed to fit, for the video's parameters; None when nothing was."""
        changes = []
        if self.chunked_attention:
            changes.append("the VAE attention computed for blocks of queries")
        if self.decode_chunk != self.asked_chunk:
            changes.append(f"{self.decode_chunk} frames decoded at a time instead of {self.asked_chunk}")
        if not changes:
            return None
        return f"{' and '.join(changes)}, so that an estimated {_gib(self.peak)} peak fits the {_gib(self.free)} free"


def estimate(
    cfg: ModelConfig,
    width: int,
    height: int,
    num_frames: int,
    *,
    dtype: torch.dtype = torch.float32,
    mode: str = "fast",
    device: str | torch.device = "cpu",
    decode_chunk: int | None = None,
    guided: bool = True,
    chunked_attention: bool = False,
) -> int:
    """Estimated peak bytes of one generation beyond the loaded weights (see the module's docstring for
    how it was made and how close it is)."""
    return max(
        stages(
            cfg, width, height, num_frames, dtype=dtype, mode=mode, device=device,
            decode_chunk=decode_chunk, guided=guided, chunked_attention=chunked_attention,
        ).values()
    )  # fmt: skip


def stages(
    cfg: ModelConfig,
    width: int,
    height: int,
    num_frames: int,
    *,
    dtype: torch.dtype = torch.float32,
    mode: str = "fast",
    device: str | torch.device = "cpu",
    decode_chunk: int | None = None,
    guided: bool = True,
    chunked_attention: bool = False,
) -> dict[str, int]:
    """`estimate`'s parts: the peak bytes of "encode", "unet" (one call) and "decode" (one chunk, plus the
    frames decoded before it), each beyond the loaded weights."""
    kind = "cuda" if torch.device(device).type == "cuda" else "cpu"
    elem = torch.finfo(dtype).bits // 8
    vae, pixels = cfg.vae, width * height
    tokens = pixels // vae.downscale**2
    chunk = min(num_frames, decode_chunk or cfg.defaults.decode_chunk_size)
    up_channels = vae.channels * vae.channel_mult[min(1, len(vae.channel_mult) - 1)]  # into full resolution
    unet_batch = num_frames * (2 if guided and mode == "fast" else 1)
    encode = max(
        pixels * elem * vae.channels * vae.channel_mult[0] * ENCODER_TENSORS[kind],
        attention_bytes(1, tokens, elem, chunked_attention),
    )
    unet = unet_batch * tokens * cfg.unet.model_channels * elem * UNET_TENSORS[kind]
    decode = num_frames * pixels * 3 * 4 * 2 + max(  # the float frames so far and their concatenation
        chunk * pixels * elem * up_channels * DECODER_TENSORS[kind],
        attention_bytes(chunk, tokens, elem, chunked_attention),
    )
    return {name: int(OVERHEAD + b) for name, b in (("encode", encode), ("unet", unet), ("decode", decode))}


def attention_bytes(batch: int, tokens: int, elem: int, chunked: bool) -> int:
    """The score matrices of the VAE's single-head attention over `tokens` pixels, for `batch` frames."""
    rows = min(tokens, _block_rows(batch, tokens, elem)) if chunked else tokens
    return int(batch * rows * tokens * elem * SCORES_FACTOR)


def _block_rows(batch: int, tokens: int, elem: int) -> int:
    return max(1, ATTENTION_BLOCK_BYTES // (batch * tokens * elem))


def free_bytes(device: str | torch.device) -> int | None:
    """Bytes free for a generation on `device` now: available host RAM for the CPU; for CUDA the driver's
    free memory plus what PyTorch holds cached but unused. None where it cannot be told (MPS, ...)."""
    device = torch.device(device)
    if device.type == "cpu":
        known = [n for n in (_available_ram(), _cgroup_room()) if n is not None]
        return min(known) if known else None
    if device.type == "cuda" and torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return None


def _available_ram() -> int | None:
    """The kernel's MemAvailable: free RAM plus the caches it can drop."""
    try:
        import psutil  # not a dependency of img2vid: /proc/meminfo says the same on Linux

        return psutil.virtual_memory().available
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


# (limit, usage) of the memory cgroup, v2 then v1: a container's limit, which the host's free RAM ignores.
_CGROUP_FILES = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
)


def _cgroup_room() -> int | None:
    """Bytes left under this process's container memory limit, when it has one."""
    for limit_file, usage_file in _CGROUP_FILES:
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:  # "max", or v1's huge number, means no limit
            return int(limit) - usage
    return None


def fit(
    cfg: ModelConfig,
    width: int,
    height: int,
    num_frames: int,
    *,
    free: int | None,
    decode_chunk: int,
    chunk_given: bool = False,
    moves: dict[str, int] | None = None,
    **options,
) -> Fit:
    """The first way to run that `free` bytes hold: as asked; with the VAE attention in blocks of queries;
    then (unless the caller chose the decode chunk) halving the decode chunk down to 1. `moves` adds to a
    stage the weights that come onto the device for it (negative: that leave it), as in low-memory mode;
    `options` are estimate()'s. Raises NotEnoughMemory, naming the parameters that set the size, when
    none fits. free=None: no check, as asked."""

    def need(chunk: int, chunked: bool) -> int:
        parts = stages(
            cfg, width, height, num_frames, decode_chunk=chunk, chunked_attention=chunked, **options
        )
        return max(b + (moves or {}).get(name, 0) for name, b in parts.items())

    ways = [(decode_chunk, False), (decode_chunk, True)]
    while not chunk_given and ways[-1][0] > 1:
        ways.append((max(1, ways[-1][0] // 2), True))
    for chunk, chunked in ways:
        peak = need(chunk, chunked)
        if free is None or peak <= free * USABLE:
            return Fit(chunk, chunked, peak, free, decode_chunk)
    fields, hint = ["width", "height", "num_frames"], "a smaller size or fewer frames"
    if chunk_given and decode_chunk > 1 and need(1, True) <= free * USABLE:
        fields.append("decode_chunk_size")
        hint = "a smaller decode_chunk_size, a smaller size or fewer frames"
    least = min(need(c, k) for c, k in ways)
    raise NotEnoughMemory(
        fields,
        f"{width}x{height} with {num_frames} frames needs about {_gib(least)} of memory (estimated), "
        f"and {_gib(free)} is free on the {torch.device(options.get('device', 'cpu')).type}: try {hint}",
    )


@dataclass(frozen=True)
class Profile:
    """What `check` reads of a loaded pipeline; picklable, so a worker process can hand it over."""

    config: ModelConfig
    dtype: torch.dtype
    mode: str
    device: str
    default_chunk: int
    moves: dict


def profile(pipe) -> Profile:
    return Profile(
        pipe.config,
        pipe.dtype,
        pipe.memory,
        str(pipe.device),
        pipe.default_decode_chunk(),
        _offload_moves(pipe),
    )


def check(pipe, width: int, height: int, params: dict, free: int | None = None) -> Fit:
    """`fit` for a loaded pipeline (or its Profile) and generate()'s `params` (num_frames, min_cfg, max_cfg,
    guidance, decode_chunk_size; missing or None: the pipeline's defaults). free=None: measured now.
    Raises NotEnoughMemory."""
    prof = pipe if isinstance(pipe, Profile) else profile(pipe)
    d = prof.config.defaults
    frames = params.get("num_frames") or d.num_frames
    low, high = params.get("min_cfg"), params.get("max_cfg")
    low, high = d.min_cfg if low is None else low, d.max_cfg if high is None else high
    scales = guidance_scales(params.get("guidance") or "linear", low, high, frames)
    chunk = params.get("decode_chunk_size")
    return fit(
        prof.config,
        width,
        height,
        frames,
        free=free_bytes(prof.device) if free is None else free,
        decode_chunk=prof.default_chunk if chunk is None else chunk,
        chunk_given=chunk is not None,
        moves=prof.moves,
        dtype=prof.dtype,
        mode=prof.mode,
        device=prof.device,
        guided=bool((scales != 1).any()),
    )


def _offload_moves(pipe) -> dict[str, int]:
    """In low-memory mode on a GPU the image encoder and VAE come on for their stage and the UNet leaves
    while decoding (see Pipeline.offloading): the bytes each stage adds to or frees on the device."""
    if not getattr(pipe, "offloading", False):
        return {}

    def size(*modules) -> int:
        return sum(t.numel() * t.element_size() for m in modules for t in m.parameters())

    vae = pipe.vae
    encoder = size(pipe.image_encoder, vae.encoder, vae.quant_conv)
    return {"encode": encoder, "decode": size(vae.decoder) - size(pipe.unet)}


def use_chunked_attention(vae: torch.nn.Module, on: bool) -> None:
    """Switch the VAE's mid-block attention (models.vae.AttnBlock) to blocks of queries, or back.

    The same attention up to float rounding, from contiguous q, k and v (which PyTorch's fused kernels take)
    and at most ATTENTION_BLOCK_BYTES of scores at a time. Set on the instances, so the module's class, its
    weights and its state dict are untouched; generate() sets it (on or off) for every video."""
    from .models.vae import AttnBlock

    for block in vae.modules():
        if isinstance(block, AttnBlock):
            if on:
                block.forward = types.MethodType(_chunked_attention_forward, block)
            else:
                block.__dict__.pop("forward", None)


def _chunked_attention_forward(self, x: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
    B, C, H, W = x.shape
    h = self.norm(x)
    q, k, v = (m(h).flatten(2).transpose(1, 2).contiguous()[:, None] for m in (self.q, self.k, self.v))
    rows = _block_rows(B, H * W, x.element_size())
    out = torch.cat(
        [F.scaled_dot_product_attention(q[:, :, i : i + rows], k, v) for i in range(0, H * W, rows)], dim=2
    )
    return x + self.proj_out(out[:, 0].transpose(1, 2).reshape(B, C, H, W))


def _gib(n: int | None) -> str:
    return "an unknown amount" if n is None else f"{n / GIB:.1f} GiB"
