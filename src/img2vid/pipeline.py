"""`load()` and the Pipeline: the one generate path behind the Python API, the CLI and the server."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import accel, checkpoint, memory, sampling
from . import interpolate as interpolation  # the name `interpolate` is generate()'s parameter
from .config import ModelConfig
from .errors import ParameterError
from .image import prepare_image, to_tensor
from .memory import choose_memory_mode
from .models import build, init_random
from .params import GenerateParams
from .progress import Reporter
from .version import __version__ as _version
from .video import Video
from .watermark import embed as embed_watermark

log = logging.getLogger("img2vid")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    # CPUs are slow in half precision; on CUDA fp16 matches the reference's fp16 autocast.
    return torch.float16 if device.type == "cuda" else torch.float32


def _finish(frames: np.ndarray, decoded, p: GenerateParams, rife, report: Reporter, mark) -> np.ndarray:
    """The generated frames as written: interpolated, watermarked (every frame, in-between ones too), looped."""
    if rife is not None:
        report.phase("interpolating")
        frames = interpolation.interleave(
            frames, to_uint8(interpolation.in_between(rife, decoded, p.interpolate))
        )
        mark("interpolating")
    if p.watermark:
        frames = embed_watermark(frames)
        mark("watermark")
    if p.loop == "pingpong":
        frames = pingpong(frames)
    return frames


class Pipeline:
    def __init__(
        self,
        config: ModelConfig,
        nets: dict[str, nn.Module],
        device: torch.device,
        dtype: torch.dtype,
        source: str = "",
    ):
        self.config = config
        self.unet, self.vae, self.image_encoder = nets["unet"], nets["vae"], nets["image_encoder"]
        for net in nets.values():
            net.eval().requires_grad_(False)
        self.device, self.dtype, self.source = device, dtype, source
        self.memory, self.memory_reason = "fast", "default"
        self.memory_format = torch.contiguous_format  # of network inputs; channels_last sets its own
        self.accel = accel.Report()
        self.unet_forward = self.unet  # the compiled path replaces these two
        self.decoder_forward = self.vae.decoder
        # RIFE weights for `interpolate` (see img2vid.interpolate); None: IMG2VID_RIFE_WEIGHTS or the default.
        self.interpolation_weights: str | None = "random" if config.hub_id is None else None
        self._rife = None  # (source, network) once loaded

    def setup(self, mode: str = "fast", reason: str = "as asked", fast_paths="auto") -> Pipeline:
        """Place the networks for the memory mode ("fast" or "low", see img2vid.memory) and apply the fast paths
        (img2vid.accel: "auto", "none" or a list of names). Called once, by `load`."""
        self.memory, self.memory_reason = mode, reason
        self.accel = accel.apply(self, fast_paths)
        if self.offloading:
            if memory.use_expandable_segments():
                self.accel.settings.append("CUDA allocator: expandable_segments (low memory mode)")
            # Resident: the UNet only. The image encoder and VAE come on for their part of each video.
            memory.offload(self.image_encoder)
            memory.offload(self.vae)
        elif self.device.type == "cuda":
            memory.onload(self.image_encoder, self.device)
            memory.onload(self.vae, self.device)
        log.info("fast paths: %s", "; ".join(self.accel.lines()))
        return self

    def compiled_backend(self, progress: Callable[[str], None] | None = None) -> str | None:
        """ "aot" (artifacts on disk, loaded in seconds), "jit" (torch.compile in this process), or None.
        The first answer on a machine takes a check (a tiny build); `progress` hears of it."""
        f = self.unet_forward
        return f.backend(progress) if isinstance(f, accel.compiled.CompiledNet) else None

    def missing_compiled(self) -> list[str]:
        """The network shapes this pipeline ran eagerly for want of a compiled artifact."""
        nets = [
            f for f in (self.unet_forward, self.decoder_forward) if isinstance(f, accel.compiled.CompiledNet)
        ]
        return [f"{f.name} {'x'.join(map(str, spec[0][0]))}" for f in nets for spec, _ in f.missing.values()]

    def warmup(
        self,
        width: int | None = None,
        height: int | None = None,
        num_frames: int | None = None,
        progress: Callable[[str], None] = log.info,
    ) -> int:
        """Make later videos of this size and frame count start fast: run one denoising step (eagerly where no
        artifact exists yet) and build what is missing. Returns how many artifacts were built."""
        import numpy as np

        size = (height or 576, width or 1024) if width or height else (576, 1024)
        self.generate(np.full((*size, 3), 127, np.uint8), num_frames=num_frames, num_steps=1, seed=0,
                      width=width, height=height)  # fmt: skip
        return self.build_missing(progress)

    def build_missing(self, progress: Callable[[str], None] = log.info) -> int:
        """Compile every shape that ran eagerly (minutes for the full-size networks): later calls run compiled,
        and with the artifact backend later processes too. Returns how many shapes were compiled."""
        built = 0
        for f in (self.unet_forward, self.decoder_forward):
            if isinstance(f, accel.compiled.CompiledNet):
                with self._resident(f.net):
                    built += sum(f.build(key, progress) for key in list(f.missing))
        return built

    @property
    def offloading(self) -> bool:
        """Low-memory mode on a GPU: networks move on and off the device around their use."""
        return self.memory == "low" and self.device.type == "cuda"

    def default_decode_chunk(self) -> int:
        """The reference's 14 frames at a time; low-memory mode on a GPU decodes fewer (see img2vid.memory)."""
        chunk = self.config.defaults.decode_chunk_size
        return min(chunk, memory.LOW_MEMORY_DECODE_CHUNK) if self.offloading else chunk

    @contextlib.contextmanager
    def _resident(self, *modules: nn.Module):
        """When offloading, bring `modules` to the GPU for the block and send them back after."""
        low = self.offloading
        if low:
            for m in modules:
                memory.onload(m, self.device)
        try:
            yield
        finally:
            if low:
                for m in modules:
                    memory.offload(m)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def defaults(self) -> dict:
        """The values generate() uses for parameters left out (decode chunk as the memory mode sets it)."""
        return {**asdict(self.config.defaults), "decode_chunk_size": self.default_decode_chunk()}

    @torch.no_grad()
    def generate(
        self,
        image,
        *,
        num_frames: int | None = None,
        num_steps: int | None = None,
        fps_id: int = 6,
        motion_bucket_id: int = 127,
        cond_aug: float = 0.02,
        min_cfg: float | None = None,
        max_cfg: float | None = None,
        guidance: str = "linear",
        sampler: str = "euler",
        seed: int | None = None,
        noise: torch.Tensor | None = None,
        cond_noise: torch.Tensor | None = None,
        width: int | None = None,
        height: int | None = None,
        fit: str = "crop",
        decode_chunk_size: int | None = None,
        interpolate: int = 1,
        watermark: bool = False,
        loop: str = "none",
        extend: int = 0,
        sigmas: torch.Tensor | None = None,
        callback: Callable | None = None,
    ) -> Video:
        """Turn one image into a video.

        image: a path, bytes, a PIL image or an array. Parameters left as None take the variant's defaults
        (`self.defaults`). `noise` (T, 4, H/8, W/8) and `cond_noise` (3, H, W), standard normal, replace the
        seeded draws (of the first segment). `sigmas` (descending, ending in 0) replaces the EDM schedule.
        `interpolate` 2 or 4 adds RIFE frames between the generated ones ((T-1)*k+1 frames, k times the fps; see
        img2vid.interpolate). `callback(progress)` receives an img2vid.progress.Progress at each phase and after
        every step (with a preview of the frames); the older `callback(step, total, latents)` the steps only.
        Steps are counted over all segments. Returning False stops generation with `Cancelled`.

        `extend=N` adds N segments, each conditioned on the last frame of the one before and joined without
        repeating it: T + N (T - 1) frames; segment i uses seed + i. `watermark=True` embeds the reference's
        invisible watermark (img2vid.watermark) in every frame, interpolated ones included. `loop="pingpong"`
        plays the frames forward then back without doubling the end frames (T -> 2T - 2).

        The same seed on the same device and dtype gives the same video. It draws the conditioning noise, then
        the latent noise, from a generator seeded like the reference script's `torch.manual_seed(seed)`.
        """
        p = self._params(
            dict(num_frames=num_frames, num_steps=num_steps, fps_id=fps_id, motion_bucket_id=motion_bucket_id,
                 cond_aug=cond_aug, min_cfg=min_cfg, max_cfg=max_cfg, guidance=guidance, sampler=sampler,
                 seed=seed, width=width, height=height, fit=fit, decode_chunk_size=decode_chunk_size,
                 interpolate=interpolate, watermark=watermark, loop=loop or "none", extend=extend or 0),
            sigmas,
        )  # fmt: skip
        rife = self.interpolator() if p.interpolate > 1 else None  # a missing download fails before any step
        started = time.perf_counter()
        timings: dict[str, float] = {}
        mark = _phase_clock(self.device if self.device.type == "cuda" else None, timings)
        pil = prepare_image(image, p.width, p.height, p.fit)
        W, H = pil.size
        # Refuse now what the free memory cannot hold, or choose the lower-memory path that it can.
        fit = memory.check(self, W, H, {**p.as_dict(), "decode_chunk_size": decode_chunk_size})
        memory.use_chunked_attention(self.vae, fit.chunked_attention)
        seeds = segment_seeds(p.seed, p.extend)
        steps = p.num_steps if sigmas is None else len(sigmas) - 1
        report = Reporter(callback, len(seeds) * steps)
        report.phase("loading")
        given = (noise, cond_noise)
        frames, decoded, chunk = self._segments(pil, p, seeds, given, sigmas, fit.decode_chunk, report, mark)
        frames = _finish(frames, decoded, p, rife, report, mark)
        params = self._record(p, W, H, chunk, decode_chunk_size, fit)
        params.update(segment_seeds=seeds, total_frames=len(frames))
        params.update(seconds=round(time.perf_counter() - started, 3), timings=timings)
        return Video(frames=frames, fps=params["fps"], params=params)

    def _params(self, given: dict, sigmas: torch.Tensor | None) -> GenerateParams:
        """`given` with the variant's defaults for what is None, validated (ParameterError names the field)."""
        d = self.config.defaults
        if given["num_steps"] is None:
            given["num_steps"] = d.num_steps if sigmas is None else len(sigmas) - 1
        for name in ("num_frames", "min_cfg", "max_cfg"):
            if given[name] is None:
                given[name] = getattr(d, name)
        if given["seed"] is None:
            given["seed"] = random.randrange(2**32)
        if given["decode_chunk_size"] is None:
            given["decode_chunk_size"] = self.default_decode_chunk()
        return GenerateParams(**given).validate()

    def _segments(
        self, pil, p: GenerateParams, seeds: list[int], given: tuple, sigmas, chunk: int, report, mark
    ):
        """Every segment, joined: (uint8 frames, the decoded frames (T, 3, H, W) in [0, 1] when interpolation
        needs them (else None), the decode chunk last used). Segment i > 0 starts from the last frame so far and
        drops its own first frame, which re-renders it; after an out-of-memory retry, later segments keep the
        smaller chunk. `given`: the explicit (noise, cond_noise) of the first segment."""
        W, H = pil.size
        steps = report.total // len(seeds)
        parts: list[np.ndarray] = []
        kept: list[torch.Tensor] = []
        for i, seed in enumerate(seeds):
            if i:  # the next segment starts from the last frame so far, at the video's size
                pil = prepare_image(parts[-1][-1], W, H, "crop")
            noise, cond_noise = given if i == 0 else (None, None)
            decoded, frames, chunk = self._segment(
                pil, p, seed, noise, cond_noise, sigmas, chunk, report, mark, i * steps
            )
            parts.append(frames if i == 0 else frames[1:])
            if p.interpolate > 1:  # several segments wait on the CPU, not in the device's memory
                kept.append(decoded if len(seeds) == 1 else decoded[1 if i else 0 :].cpu())
        frames = np.concatenate(parts) if len(parts) > 1 else parts[0]
        decoded = (kept[0] if len(kept) == 1 else torch.cat(kept)) if kept else None
        return frames, decoded, chunk

    def _segment(
        self,
        pil,
        p: GenerateParams,
        seed: int,
        noise,
        cond_noise,
        sigmas,
        chunk: int,
        report,
        mark,
        offset: int,
    ):
        """One video of p.num_frames frames from the fitted image `pil` and `seed`: (decoded frames, uint8 frames,
        decode chunk used). Its steps are reported after the `offset` steps of the segments before it."""
        W, H = pil.size
        noise, cond_noise = self._noise(p, seed, W, H, noise, cond_noise)
        img = to_tensor(pil).to(self.device)[None]  # (1, 3, H, W) in [-1, 1]
        mark("prepare")
        report.phase("conditioning")
        cond = self.condition(img, cond_noise[None], p)
        mark("conditioning")
        latents = self._sample(cond, noise, sigmas, p, report, mark, offset)
        report.phase("decoding")
        decoded, used = self.decode(latents, chunk)
        frames = to_uint8(decoded)
        mark("decoding")
        return decoded, frames, used

    def _noise(
        self, p: GenerateParams, seed: int, W: int, H: int, noise, cond_noise
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The latent noise (T, 4, h, w) and conditioning noise (3, H, W): the draws of `seed` in the reference's
        order (conditioning noise, then latent noise), or the given ones."""
        dev, down = self.device, self.config.vae.downscale
        lat_shape = (p.num_frames, self.config.vae.latent_channels, H // down, W // down)
        g = torch.Generator(dev).manual_seed(seed)
        drawn_cond = torch.randn((1, 3, H, W), generator=g, device=dev)
        drawn_noise = torch.randn(lat_shape, generator=g, device=dev)
        cond_noise = _given(cond_noise, (3, H, W), "cond_noise", dev, drawn_cond[0])
        return _given(noise, lat_shape, "noise", dev, drawn_noise), cond_noise

    def _sample(
        self, cond: dict, noise: torch.Tensor, sigmas, p: GenerateParams, report, mark, offset: int = 0
    ) -> torch.Tensor:
        """The denoising loop: latents (T, 4, h, w), reporting each step after `offset` steps before it."""
        if sigmas is None:
            sigmas = sampling.edm_sigmas(p.num_steps)
        sigmas = sigmas.to(self.device, torch.float32)
        scales = sampling.guidance_scales(p.guidance, p.min_cfg, p.max_cfg, p.num_frames).to(self.device)
        denoise = self.denoiser(cond, scales, p.num_frames)

        def on_step(step: int, total: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
            if step == 1 and "first_step" not in mark.seen:
                mark("first_step")
            report.on_step(offset + step, report.total, x, denoised)

        report.phase("sampling")
        x = sampling.initial_latents(noise, sigmas)
        latents = sampling.SAMPLERS[p.sampler](denoise, x, sigmas, on_step)
        mark("sampling")
        return latents

    def _record(self, p: GenerateParams, W: int, H: int, chunk: int, asked_chunk, fit) -> dict:
        """The video's metadata: every value used, and notes on what made it differ from the reference."""
        d = self.config.defaults
        params = {
            "model": self.name,
            **p.as_dict(),
            "width": W,
            "height": H,
            "decode_chunk_size": chunk,
            "fps": (p.fps_id + 1) * p.interpolate,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": self.device.type,
            "img2vid": _version,
        }
        if p.interpolate > 1:
            params["frames_generated"] = p.num_frames + p.extend * (p.num_frames - 1)
            params["interpolation"] = (
                f"RIFE v4.13 flownet ({interpolation.weights_source(self.interpolation_weights)})"
            )
        if chunk != d.decode_chunk_size and asked_chunk is None and chunk == p.decode_chunk_size:
            params["note"] = (
                f"decoded {chunk} frames at a time (low-memory mode) instead of the reference's "
                f"{d.decode_chunk_size}: the temporal decoder mixes the frames of a chunk, so the video differs "
                "slightly; pass decode_chunk_size to choose"
            )
        if chunk != fit.decode_chunk:
            params["note"] = (
                f"decoded {chunk} frames at a time after running out of memory at {fit.decode_chunk}"
            )
        if fit.note():
            params["memory"] = fit.note()
        return params

    def interpolator(self):
        """The RIFE network for `interpolate`, loaded on first use from `self.interpolation_weights`."""
        source = interpolation.weights_source(self.interpolation_weights)
        if self._rife is None or self._rife[0] != source:
            dtype = self.dtype if self.device.type == "cuda" else torch.float32
            self._rife = (source, interpolation.load_interpolator(source, self.device, dtype))
        return self._rife[1]

    @torch.no_grad()
    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """The conditioning latent: x (N, 3, H, W) in [-1, 1], on any device -> (N, 4, H/8, W/8) float32 on this
        pipeline's device, the posterior mode of the reference's conditioning encoder (encoder, quant_conv),
        unscaled. H and W must be multiples of 8."""
        with self._resident(self.vae.encoder, self.vae.quant_conv):
            x = x.to(self.device, self.dtype).contiguous(memory_format=self.memory_format)
            return self.vae.encode(x).float()

    def condition(
        self, img: torch.Tensor, cond_noise: torch.Tensor, p: GenerateParams
    ) -> dict[str, torch.Tensor]:
        """The reference's conditioner: CLIP embedding of the clean image, conditioning latent of the noised image,
        and the vector (fps_id, motion_bucket_id, cond_aug), per frame. Unconditional inputs are zeros."""
        T = p.num_frames
        clip_in = clip_preprocess(
            img, self.config.clip.image_size, self.config.clip.mean, self.config.clip.std
        )
        with self._resident(self.image_encoder):
            context = self.image_encoder(clip_in.to(self.dtype))[:, None]  # (1, 1, D)
        latent = self.encode_image(img + p.cond_aug * cond_noise).to(self.dtype)  # (1, 4, h, w)
        vector = torch.tensor(
            [[p.fps_id, p.motion_bucket_id, p.cond_aug]], device=img.device, dtype=torch.float32
        )
        return {
            "context": context.expand(T, -1, -1),
            "latent": latent.expand(T, -1, -1, -1),
            "vector": vector.expand(T, -1),
        }

    def denoiser(self, cond: dict[str, torch.Tensor], scales: torch.Tensor, num_frames: int):
        """D(x, sigma) for one video: the preconditioned UNet with per-frame classifier-free guidance.

        Fast mode runs both halves as one batch (uncond first, as the reference); low-memory mode runs them one
        after the other (half the activations). Where every scale is 1 the guided result equals the conditional
        one, so the unconditional half is skipped."""
        guided = bool((scales != 1).any())
        T, dt = num_frames, self.dtype
        fmt = self.memory_format
        uncond = {k: v if k == "vector" else torch.zeros_like(v) for k, v in cond.items()}
        if not guided:
            batches = [cond]
        elif self.memory == "low":
            batches = [uncond, cond]
        else:
            batches = [{k: torch.cat([uncond[k], cond[k]]) for k in cond}]

        def run(x: torch.Tensor, sigma: torch.Tensor, inputs: dict) -> torch.Tensor:
            c_skip, c_out, c_in, c_noise = sampling.v_edm_scalings(sigma)
            reps = len(inputs["latent"]) // T
            x_in = torch.cat(
                [(x * c_in).to(dt).repeat(reps, 1, 1, 1), inputs["latent"]], dim=1
            )  # (reps*T, 8, h, w)
            x_in = x_in.contiguous(memory_format=fmt)
            out = self.unet_forward(x_in, c_noise.expand(reps * T), inputs["context"], inputs["vector"], T)
            return out.float() * c_out + x.repeat(reps, 1, 1, 1) * c_skip

        def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            denoised = torch.cat([run(x, sigma, inputs) for inputs in batches])
            if not guided:
                return denoised
            uncond_, cond_ = denoised.chunk(2)
            return sampling.cfg_combine(uncond_, cond_, scales)

        return denoise

    def decode(self, latents: torch.Tensor, chunk: int) -> tuple[torch.Tensor, int]:
        """Latents -> frames (T, 3, H, W) float32 in [0, 1] on the device, `chunk` frames at a time.

        The temporal decoder mixes the frames of a chunk, so the chunk changes the video. On CUDA out-of-memory
        the chunk is halved and decoding retried; the chunk actually used is returned with the frames."""
        low = self.offloading
        if low:  # the UNet's weights make room for the decoder's full-resolution activations
            memory.offload(self.unet)
        try:
            with self._resident(self.vae.decoder):
                return self._decode_chunks(latents, chunk)
        finally:
            if low:
                memory.onload(self.unet, self.device)

    def _decode_chunks(self, latents: torch.Tensor, chunk: int) -> tuple[torch.Tensor, int]:
        fmt = self.memory_format
        while True:
            try:
                parts = []
                for i in range(0, len(latents), chunk):
                    z = latents[i : i + chunk].to(self.dtype).contiguous(memory_format=fmt)
                    x = self.decoder_forward(z / self.config.vae.scale_factor, len(z)).float()
                    parts.append(((x + 1) / 2).clamp(0, 1))
                return torch.cat(parts), chunk
            except torch.OutOfMemoryError:
                if chunk == 1:
                    raise
                parts = []
                torch.cuda.empty_cache()
                new = max(1, chunk // 2)
                log.warning(
                    "out of GPU memory decoding %d frames at a time; retrying with %d (this changes the video slightly)",
                    chunk,
                    new,
                )
                chunk = new

    def __repr__(self) -> str:
        return f"Pipeline({self.name}, device={self.device}, dtype={self.dtype}, source={self.source!r})"


def _phase_clock(cuda: torch.device | None, timings: dict[str, float]) -> Callable[[str], None]:
    """mark(name): the seconds since the previous mark (since this call for the first), into timings[name]. On a
    GPU it waits for the queued work first, so each phase is charged with its own kernels."""
    last = [time.perf_counter()]

    def mark(name: str) -> None:
        if cuda is not None:
            torch.cuda.synchronize(cuda)
        now = time.perf_counter()
        timings[name] = round(timings.get(name, 0.0) + now - last[0], 3)  # summed over segments
        mark.seen.add(name)
        last[0] = now

    mark.seen = set()
    return mark


def segment_seeds(seed: int, extend: int) -> list[int]:
    """The seed of each segment: seed, seed + 1, ..., kept within the seed range (below 2**63)."""
    return [(seed + i) % 2**63 for i in range(extend + 1)]


def pingpong(frames: np.ndarray) -> np.ndarray:
    """Forward then backward, the end frames not doubled: f0..fT-1, fT-2..f1 (2T - 2 frames; T when T <= 2)."""
    return np.concatenate([frames, frames[-2:0:-1]])


def to_uint8(frames: torch.Tensor):
    """(T, 3, H, W) in [0, 1] -> numpy uint8 (T, H, W, 3), quantised where the frames are (a quarter of the bytes
    to copy). Truncates like the reference script (x * 255 cast to uint8), so a seed gives its pixels."""
    return frames.mul(255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()


def _given(t: torch.Tensor | None, shape: tuple, name: str, device, drawn: torch.Tensor) -> torch.Tensor:
    if t is None:
        return drawn
    t = torch.as_tensor(t)
    if tuple(t.shape) != tuple(shape):
        raise ParameterError(
            name, f"must have shape {tuple(shape)} for this size and frame count, got {tuple(t.shape)}"
        )
    return t.to(device, torch.float32)


def clip_preprocess(img: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> CLIP input: the whole frame resized to size x size (no crop) with the
    reference's kornia resize (Gaussian antialiasing, then bicubic with align_corners=True), then normalised."""
    x = resize_antialias(img.float(), (size, size))
    x = (x + 1) / 2
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def _gaussian_1d(ksize: int, sigma: float, device) -> torch.Tensor:
    x = torch.arange(ksize, device=device, dtype=torch.float32) - ksize // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def resize_antialias(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """kornia.geometry.resize(..., "bicubic", align_corners=True, antialias=True): blur with sigma
    (factor - 1) / 2 (at least 0.001), kernel about 4 sigma (odd, at least 3), reflect padding; then bicubic."""
    h, w = x.shape[-2:]
    sig = (max((h / size[0] - 1) / 2, 0.001), max((w / size[1] - 1) / 2, 0.001))
    ks = [max(int(4 * s), 3) for s in sig]
    ks = [k + 1 if k % 2 == 0 else k for k in ks]
    C = x.shape[1]
    ky = _gaussian_1d(ks[0], sig[0], x.device).view(1, 1, -1, 1).expand(C, 1, -1, 1)
    kx = _gaussian_1d(ks[1], sig[1], x.device).view(1, 1, 1, -1).expand(C, 1, 1, -1)
    x = F.conv2d(F.pad(x, (ks[1] // 2, ks[1] // 2, 0, 0), mode="reflect"), kx, groups=C)
    x = F.conv2d(F.pad(x, (0, 0, ks[0] // 2, ks[0] // 2), mode="reflect"), ky, groups=C)
    return F.interpolate(x, size=size, mode="bicubic", align_corners=True)


def load(
    source: str | os.PathLike = "svd-xt",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    variant: str | None = None,
    memory: str = "auto",
    accel: str | list[str] | None = None,
) -> Pipeline:
    """Load SVD from a preset name, a hub id, a single .safetensors file or a diffusers folder.

    Networks are built on the meta device, every key is checked, and tensors are read straight to `device`
    and cast there. `variant` forces the preset used for defaults and decoder (e.g. "svd-xt-1-1").
    `memory` is "auto", "fast" or "low" (see img2vid.memory). `accel` picks the fast paths: "auto" (every one
    that can run here; the default, or IMG2VID_ACCEL), "none", or a list of names (see img2vid.accel);
    `Pipeline.accel` reports which run and why.
    """
    memory_mode, memory_reason = choose_memory_mode(
        torch.device(device) if device is not None else default_device(), memory
    )
    device = torch.device(device) if device is not None else default_device()
    if isinstance(dtype, str):
        dtype = {
            "fp16": torch.float16,
            "float16": torch.float16,
            "bf16": torch.bfloat16,
            "bfloat16": torch.bfloat16,
            "fp32": torch.float32,
            "float32": torch.float32,
        }[dtype]
    dtype = dtype or default_dtype(device)
    resolved = checkpoint.resolve(source, variant)
    if isinstance(resolved, ModelConfig):  # random weights (the tiny preset)
        nets = build(resolved, "cpu")
        for i, net in enumerate(nets.values()):
            init_random(net, seed=i)
            net.to(device, dtype)
        cfg, source_text = resolved, f"{resolved.name} (random weights)"
    else:
        nets = build(resolved.config, "meta")
        checkpoint.load_into(nets, resolved, device, dtype)
        cfg, source_text = resolved.config, resolved.description
    return Pipeline(cfg, nets, device, dtype, source=source_text).setup(memory_mode, memory_reason, accel)
