"""Live previews as files: every frame of `Progress.preview` as one small animated image, made only as often as
its cost stays under about 1% of the time (no torch here: the CLI checks --preview before loading anything).
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# suffix -> (Pillow format, MIME type). png is a strip of the frames side by side (no animation).
FORMATS = {".webp": ("WEBP", "image/webp"), ".gif": ("GIF", "image/gif"), ".png": ("PNG", "image/png")}
BUDGET = 0.01  # the share of the elapsed time previews may take


def default_suffix() -> str:
    """Animated WebP (small, every browser shows it) where Pillow can write it, else GIF."""
    from PIL import features

    return ".webp" if features.check("webp") else ".gif"


def encode(frames, fps: float, suffix: str = ".webp") -> bytes:
    """numpy uint8 (T, h, w, 3) -> an animated WebP or GIF looping at `fps`, or a PNG strip of the frames."""
    import numpy as np
    from PIL import Image

    fmt = FORMATS[suffix][0]
    buf = io.BytesIO()
    if fmt == "PNG":
        Image.fromarray(np.concatenate(list(frames), axis=1)).save(buf, fmt, compress_level=1)
        return buf.getvalue()
    images = [Image.fromarray(f) for f in frames]
    extra = {"quality": 50, "method": 0} if fmt == "WEBP" else {}  # method 0: the fastest WebP encoder
    duration = max(20, round(1000 / fps))
    images[0].save(buf, fmt, save_all=True, append_images=images[1:], duration=duration, loop=0, **extra)
    return buf.getvalue()


class Throttle:
    """Makes a preview when the time spent on previews so far is within `budget` of the time since it was
    created; the first one always (something to show early)."""

    def __init__(self, budget: float = BUDGET, clock: Callable[[], float] = time.perf_counter):
        self.budget, self.clock = budget, clock
        self.start = clock()
        self.spent = 0.0
        self.made = 0

    def due(self) -> bool:
        return self.made == 0 or self.spent <= self.budget * (self.clock() - self.start)

    def run(self, make: Callable[[], bytes]) -> bytes | None:
        """make() when due (its time counted), else None."""
        if not self.due():
            return None
        t = self.clock()
        data = make()
        self.spent += self.clock() - t
        self.made += 1
        return data


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data` in one step: a viewer never reads a half-written preview."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
