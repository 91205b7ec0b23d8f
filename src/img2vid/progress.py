"""What `Pipeline.generate` tells its callback: the phase, the step, an ETA and a live preview of the frames.

`callback(progress)` (one parameter) receives a `Progress` at the start of every phase and after every
sampling step; the older `callback(step, total, latents)` still receives the sampling steps only. Either
stops generation by returning False.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import torch

from .errors import Cancelled

# In order; "writing" is reported by whoever writes the file (the CLI, a server worker), not by generate.
PHASES = ("loading", "conditioning", "sampling", "decoding", "interpolating", "writing")

# The linear SD 1.x latent -> RGB map ComfyUI's previews use (comfy/latent_formats.py, SD15, no bias): rows are
# the 4 latent channels, columns R, G, B, giving [-1, 1]. SVD's latents live in the same SD VAE space.
LATENT_RGB = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)


@torch.no_grad()
def latent_preview(latents: torch.Tensor) -> torch.Tensor:
    """(T, 4, h, w) scaled latents -> (T, h, w, 3) uint8 on their device: every frame at latent resolution."""
    factors = torch.tensor(LATENT_RGB, device=latents.device, dtype=torch.float32) / 2
    rgb = torch.einsum("tchw,cr->thwr", latents.float(), factors) + 0.5  # [-1, 1] -> [0, 1]
    return rgb.clamp(0, 1).mul(255).round().to(torch.uint8)


@dataclass
class Progress:
    """One report. step/total count sampling steps (step 0 before the first); eta_s is the sampling time left
    (None outside sampling: decoding's length is not known from the steps); `preview` is computed on first
    use, so a callback that never looks at it costs nothing."""

    phase: str
    step: int
    total: int
    eta_s: float | None = None
    elapsed_s: float = 0.0
    latents: torch.Tensor | None = field(default=None, repr=False)  # x after the step
    denoised: torch.Tensor | None = field(
        default=None, repr=False
    )  # the step's estimate of the clean latents

    @cached_property
    def preview(self):
        """The frames as numpy uint8 (T, h, w, 3) at latent resolution (1/8 of the video's), or None."""
        return None if self.denoised is None else latent_preview(self.denoised).cpu().numpy()


def _legacy(callback: Callable) -> bool:
    """A callback(step, total, latents) of before Progress existed: it takes three positional arguments."""
    try:
        inspect.signature(callback).bind(0, 0, None)
    except TypeError:
        return False
    except ValueError:  # no signature to read (some builtins): the documented old form
        return True
    return True


class Reporter:
    """Feeds one generate call's phases and steps to its callback (either form), with the ETA."""

    def __init__(self, callback: Callable | None, total: int):
        self.callback, self.total = callback, total
        self.legacy = callback is not None and _legacy(callback)
        self.start = self.sampling_start = time.perf_counter()
        self.step = 0
        self.steps_before = 0  # steps of earlier segments (generate's extend), not timed by this sampling

    def phase(self, name: str) -> None:
        if name == "sampling":
            self.sampling_start, self.steps_before = time.perf_counter(), self.step
        if not self.legacy:
            self._send(Progress(name, self.step, self.total, None, self._elapsed()))

    def on_step(self, step: int, total: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
        """The sampler's callback."""
        self.step, self.total = step, total
        if self.legacy:
            return self._check(self.callback(step, total, x))
        per_step = (time.perf_counter() - self.sampling_start) / max(1, step - self.steps_before)
        eta = round(per_step * (total - step), 1)
        self._send(Progress("sampling", step, total, eta, self._elapsed(), latents=x, denoised=denoised))

    def _elapsed(self) -> float:
        return round(time.perf_counter() - self.start, 3)

    def _send(self, progress: Progress) -> None:
        if self.callback is not None:
            self._check(self.callback(progress))

    def _check(self, answer) -> None:
        if answer is False:
            raise Cancelled(f"stopped by the callback after step {self.step} of {self.total}")
