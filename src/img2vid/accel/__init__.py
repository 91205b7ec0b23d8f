"""The optional fast paths, applied once to a loaded pipeline: each swaps modules of the networks for faster
equivalents, or changes their layout, and says why it is on or off. The networks in img2vid.models never branch
on them.

    channels_last    NHWC weights and inputs, and a group norm written for them (CUDA, half precision)
    flash_attention  the spatial self-attention through FlashAttention-4 (the `fa4` extra; Hopper/Blackwell, fp16)
    quack_geglu      each GEGLU feed-forward as one quack GEMM (the `fa4` extra; Hopper/Blackwell, fp16, fast mode)
    compiled         the UNet and the VAE decoder through AOTInductor artifacts, built once per GPU, torch
                     version, dtype and shape, loaded in seconds (CUDA)

`accel="auto"` (the default) takes every path that can run here; "none" takes none; a list, or a comma-separated
string, names the paths wanted. The environment variable IMG2VID_ACCEL sets the default the same way. `apply`
returns the report that the logs, `img2vid doctor` and each video's metadata show.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

from . import compiled, flash_attention, layout, quack_geglu

log = logging.getLogger("img2vid")

SWITCH = "IMG2VID_ACCEL"
PATHS = {m.NAME: m for m in (layout, flash_attention, quack_geglu, compiled)}  # applied in this order
NAMES = tuple(PATHS)


@dataclass
class Report:
    """Which fast paths run, and why the others do not; `settings` lists what they changed beyond the networks
    (process-wide flags, environment variables)."""

    paths: dict[str, str] = field(default_factory=dict)  # name -> "on" or "off: reason"
    settings: list[str] = field(default_factory=list)

    def on(self, name: str) -> bool:
        return self.paths.get(name) == "on"

    def lines(self) -> list[str]:
        return [f"{name}: {state}" for name, state in self.paths.items()] + [
            f"setting: {s}" for s in self.settings
        ]

    def as_dict(self) -> dict:
        return {"paths": dict(self.paths), "settings": list(self.settings)}


def requested(accel: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """The names asked for: "auto" or None (IMG2VID_ACCEL, else every path), "none", or names."""
    if accel is None:
        accel = os.environ.get(SWITCH, "auto")
    if isinstance(accel, str):
        accel = [a.strip() for a in accel.split(",") if a.strip()]
    accel = list(accel)
    if accel in (["auto"], ["all"]):
        return NAMES
    if accel in (["none"], []):
        return ()
    unknown = [a for a in accel if a not in PATHS]
    if unknown:
        raise ValueError(
            f"unknown fast path(s) {', '.join(unknown)}: choose from {', '.join(NAMES)}, or auto or none"
        )
    return tuple(n for n in NAMES if n in accel)


def without_compiled(accel) -> list[str] | str:
    """The paths `accel` asks for, less the compiled one (--no-compile)."""
    return [n for n in requested(accel) if n != compiled.NAME] or "none"


def apply(pipe, accel: str | list[str] | None = "auto") -> Report:
    """Apply the fast paths asked for that can run on the pipeline's device, dtype and memory mode; returns the
    report. Call once, on a freshly loaded pipeline (Pipeline.setup does)."""
    wanted = requested(accel)
    report = Report()
    for name, path in PATHS.items():
        if name not in wanted:
            report.paths[name] = "off: not asked for"
            continue
        reason = path.unavailable(pipe.device, pipe.dtype, pipe.memory)
        if reason is None:
            try:
                path.apply(pipe, report)
            except Exception as e:  # a broken optional install: the plain path, not a failure
                reason = f"failed to set up: {type(e).__name__}: {e}"
                log.warning("%s not used: %s", name, reason)
        report.paths[name] = "on" if reason is None else f"off: {reason}"
    return report


def availability(device: torch.device, dtype: torch.dtype, memory: str, accel=None) -> Report:
    """What `apply` would decide on this device, dtype and memory mode, without loading a model (img2vid
    doctor). A path listed "on" can still fail when set up (a broken optional install)."""
    wanted = requested(accel)
    report = Report()
    for name, path in PATHS.items():
        reason = path.unavailable(device, dtype, memory) if name in wanted else "not asked for"
        report.paths[name] = "on" if reason is None else f"off: {reason}"
    return report
