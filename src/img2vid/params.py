"""The generation parameters, their ranges and one validator shared by the Python API, CLI and server.

Validation happens before any GPU work: a bad value raises `ParameterError` naming the field.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from .errors import ParameterError, UsageError

SAMPLERS = ("euler", "heun", "dpmpp_2m")
MEMORY_MODES = ("auto", "fast", "low")  # see img2vid.memory; here so the CLI can parse without torch
DTYPES = ("fp16", "bf16", "fp32")
GUIDANCES = ("linear", "triangle", "constant")
FITS = ("crop", "pad")
LOOPS = ("none", "pingpong")
MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE = 256, 2048, 64

# field -> (low, high, help). Inclusive ranges; None means the model's default decides.
RANGES: dict[str, tuple[float, float, str]] = {
    "num_frames": (1, 128, "frames in the video (SVD was trained on 14, SVD-XT on 25)"),
    "num_steps": (1, 200, "denoising steps: more is slower and usually cleaner"),
    "fps_id": (0, 100, "frame-rate conditioning (fps - 1); also sets the playback fps"),
    "motion_bucket_id": (0, 1023, "amount of motion: higher moves more (trained on 0-255)"),
    "cond_aug": (0.0, 10.0, "noise added to the conditioning image: higher drifts further from it"),
    "min_cfg": (0.0, 30.0, "guidance scale of the first frame"),
    "max_cfg": (0.0, 30.0, "guidance scale of the last frame"),
    "seed": (0, 2**63 - 1, "random seed: the same seed gives the same video"),
    "width": (MIN_SIDE, MAX_SIDE, "video width in pixels, a multiple of 64"),
    "height": (MIN_SIDE, MAX_SIDE, "video height in pixels, a multiple of 64"),
    "decode_chunk_size": (1, 128, "frames decoded together (changes the video slightly; lower saves memory)"),
    "interpolate": (1, 4, "frame interpolation (RIFE): 2 or 4 times the frames and fps; 1 none"),
    "extend": (0, 16, "more segments, each starting from the last frame of the one before (longer video)"),
}
INTERPOLATE_FACTORS = (1, 2, 4)
CHOICES: dict[str, tuple[str, ...]] = {"guidance": GUIDANCES, "sampler": SAMPLERS, "fit": FITS, "loop": LOOPS}
# on/off parameters: True/False, or the text a form or command line sends for them.
BOOLS: dict[str, str] = {"watermark": "embed the reference's invisible watermark in every frame"}
BOOL_TEXT = {
    "true": True,
    "1": True,
    "on": True,
    "yes": True,
    "false": False,
    "0": False,
    "off": False,
    "no": False,
}
INTS = {
    "num_frames",
    "num_steps",
    "fps_id",
    "motion_bucket_id",
    "seed",
    "width",
    "height",
    "decode_chunk_size",
    "interpolate",
    "extend",
}


@dataclass
class GenerateParams:
    num_frames: int | None = None
    num_steps: int | None = None
    fps_id: int = 6
    motion_bucket_id: int = 127
    cond_aug: float = 0.02
    min_cfg: float | None = None
    max_cfg: float | None = None
    guidance: str = "linear"
    sampler: str = "euler"
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    fit: str = "crop"
    decode_chunk_size: int | None = None
    interpolate: int = 1
    watermark: bool = False
    loop: str = "none"
    extend: int = 0

    def validate(self) -> GenerateParams:
        for f in fields(self):
            setattr(self, f.name, check(f.name, getattr(self, f.name)))
        return self

    def as_dict(self) -> dict:
        return asdict(self)


PARAM_NAMES = tuple(f.name for f in fields(GenerateParams))


def check(name: str, value):
    """Return `value` converted to its type, or raise ParameterError naming `name`."""
    if value is None:
        return None
    if name in BOOLS:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in BOOL_TEXT:
            return BOOL_TEXT[value.strip().lower()]
        raise ParameterError(name, f"must be true or false, got {value!r}")
    if name in CHOICES:
        if not isinstance(value, str) or value not in CHOICES[name]:
            raise ParameterError(name, f"must be one of {', '.join(CHOICES[name])}, got {value!r}")
        return value
    if name not in RANGES:
        raise ParameterError(name, "unknown parameter")
    lo, hi, _ = RANGES[name]
    try:
        if isinstance(value, bool):
            raise TypeError
        num = _to_int(value) if name in INTS else float(value)
    except (TypeError, ValueError, OverflowError):
        kind = "an integer" if name in INTS else "a number"
        raise ParameterError(name, f"must be {kind}, got {value!r}") from None
    if isinstance(num, float) and not math.isfinite(num):
        raise ParameterError(name, f"must be finite, got {value!r}")
    if not lo <= num <= hi:
        raise ParameterError(name, f"must be between {lo} and {hi}, got {value!r}")
    if name in ("width", "height") and num % SIDE_MULTIPLE:
        down = max(MIN_SIDE, num // SIDE_MULTIPLE * SIDE_MULTIPLE)
        up = min(MAX_SIDE, down + SIDE_MULTIPLE)
        raise ParameterError(
            name, f"must be a multiple of {SIDE_MULTIPLE}, got {num} (nearest: {down} or {up})"
        )
    if name == "interpolate" and num not in INTERPOLATE_FACTORS:
        raise ParameterError(
            name, f"must be one of {', '.join(map(str, INTERPOLATE_FACTORS))}, got {value!r}"
        )
    return num


def _to_int(value) -> int:
    """An int from an int, an integral float or integer text; exact for big seeds (no float round trip)."""
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            value = float(text)  # "25.0" is fine, "25.5" is not
    if not float(value).is_integer():
        raise ValueError(value)
    return int(value)


def check_device(device: str | None) -> None:
    """Raise UsageError unless `device` names a device this machine has (None: the default, always)."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"--device: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise UsageError(f"--device {device}: CUDA is not available ({why}); use --device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise UsageError(f"--device {device}: there are only {n} GPU(s) (cuda:0 to cuda:{n - 1})")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"--device {device}: MPS (Apple GPU) is not available; use --device cpu")
    elif dev.type != "cpu":
        raise UsageError(f"--device {device}: img2vid runs on cpu, cuda or mps")
