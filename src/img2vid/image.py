"""Input images: load anything Pillow can read as plain RGB, choose the video size, fit the image to it.

Every failure is an `ImageError` with a one-line message naming the source and the problem.
"""

from __future__ import annotations

import io
import math
import numbers
import os
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import ImageError, ParameterError
from .params import FITS, MAX_SIDE, MIN_SIDE, SIDE_MULTIPLE

# Images larger than this are refused from their header, before any pixel is decoded (a 64-megapixel RGB
# image already takes 192 MB). Pillow's own limit (Image.MAX_IMAGE_PIXELS) is left alone; note it still
# refuses anything above 2 x MAX_IMAGE_PIXELS (~179 megapixels) even if MAX_PIXELS is raised past that.
MAX_PIXELS = 64_000_000
DEFAULT_LANDSCAPE = (1024, 576)  # SVD's training resolution
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def load_image(src) -> Image.Image:
    """Return `src` (a path, bytes, a PIL image or a numpy array) as a new RGB image.

    EXIF orientation is applied, transparency is composited on white, only the first frame of an
    animation is used. Truncated files fail: this relies on Pillow's default
    `ImageFile.LOAD_TRUNCATED_IMAGES = False`, which this module never changes.
    """
    if isinstance(src, np.ndarray):
        return _from_array(src)
    if isinstance(src, Image.Image):
        _check_pixels(src.size, "image")
        return _decode(src, "image")
    if isinstance(src, bytes | bytearray | memoryview):
        name, data = "image bytes", bytes(src)
        if not data:
            raise ImageError(f"{name}: empty (0 bytes)")
        return _open(io.BytesIO(data), name)
    if isinstance(src, str | os.PathLike):
        name = os.fspath(src)
        if not os.path.exists(name):
            raise ImageError(f"{name}: no such file")
        if os.path.isdir(name):
            raise ImageError(f"{name}: is a folder, not an image file")
        if os.path.getsize(name) == 0:
            raise ImageError(f"{name}: empty file (0 bytes)")
        try:
            with open(name, "rb") as f:
                return _open(f, name)
        except OSError as e:  # permission denied and the like; decoding errors are handled in _open
            raise ImageError(f"{name}: cannot open: {e.strerror or e}") from None
    raise ImageError(f"unsupported image source of type {type(src).__name__}: use a path, bytes or an array")


def _open(fp, name: str) -> Image.Image:
    try:
        # The bomb warning (images above Image.MAX_IMAGE_PIXELS) is silenced because we refuse those
        # ourselves just below, with a clearer message.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(fp)
    except Image.UnidentifiedImageError:
        raise ImageError(f"{name}: not an image (or a format Pillow cannot read)") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{name}: too large to decode safely: {e}") from None
    except Exception as e:
        raise ImageError(f"{name}: truncated or corrupt image header ({e})") from None
    with im:
        _check_pixels(im.size, name)
        return _decode(im, name)


def _check_pixels(size: tuple[int, int], name: str) -> None:
    w, h = size
    if w * h > MAX_PIXELS:
        raise ImageError(
            f"{name}: too large: {w}x{h} is {w * h / 1e6:.0f} megapixels, over the limit of "
            f"{MAX_PIXELS / 1e6:g} (img2vid.image.MAX_PIXELS)"
        )
    if w < 1 or h < 1:
        raise ImageError(f"{name}: image has no pixels ({w}x{h})")


def _decode(im: Image.Image, name: str) -> Image.Image:
    try:
        im.load()  # decodes fully now, so a truncated file fails here rather than loading half grey
        return _to_rgb(ImageOps.exif_transpose(im))
    except ImageError:
        raise
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, struct.error... on bad data
        raise ImageError(f"{name}: truncated or corrupt image data ({e or type(e).__name__})") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in _SIXTEEN_BIT or im.mode in ("I", "F"):
        im = Image.fromarray(_to_uint8(np.asarray(im), im.mode))
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), rgba).convert("RGB")
    try:
        return im if im.mode == "RGB" else im.convert("RGB")
    except ValueError as e:  # e.g. LAB, which Pillow cannot convert without a colour profile
        raise ImageError(f"unsupported colour mode {im.mode} ({e})") from None


def _to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """Scale high-depth grey to 8 bits (65535 -> 255), rather than clipping everything above 255 to white."""
    a = a.astype(np.float64)
    # Mode "I" above 255 is taken as 16-bit samples in 32-bit ints (how older Pillow opened 16-bit PNGs).
    if mode in _SIXTEEN_BIT or (mode == "I" and a.max(initial=0) > 255):
        a = a / 257
    elif mode == "F" and a.max(initial=0) <= 1:  # floats in [0, 1]
        a = a * 255
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _from_array(a: np.ndarray) -> Image.Image:
    name = f"array of shape {a.shape} and dtype {a.dtype}"
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ImageError(f"{name}: expected (H, W), (H, W, 3) or (H, W, 4)")
    _check_pixels((a.shape[1], a.shape[0]), name)
    if a.dtype.kind == "f":
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise ImageError(f"{name}: float arrays must hold finite values in [0, 1]")
        a = np.rint(a * 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        raise ImageError(f"{name}: unsupported dtype, use uint8 (0-255) or float (0-1)")
    return _to_rgb(Image.fromarray(np.ascontiguousarray(a)))


def target_size(
    image_size: tuple[int, int], width: int | None = None, height: int | None = None
) -> tuple[int, int]:
    """The video size (width, height) for an image of `image_size`.

    Neither given: 1024x576, or 576x1024 for a portrait image. Both given: checked (multiples of 64 between
    256 and 2048). One given: the other follows the image's aspect ratio, rounded to a multiple of 64.
    """
    iw, ih = image_size
    if iw < 1 or ih < 1:
        raise ImageError(f"image size {iw}x{ih} has no pixels")
    if width is None and height is None:
        return DEFAULT_LANDSCAPE if iw >= ih else DEFAULT_LANDSCAPE[::-1]
    if width is not None and height is not None:
        w, h = _as_int(width, "width"), _as_int(height, "height")
        if _nearest(w) != [w] or _nearest(h) != [h]:
            sizes = sorted(
                ((a, b) for a in _nearest(w) for b in _nearest(h)),
                key=lambda s: abs(s[0] - w) + abs(s[1] - h),
            )
            _invalid(f"{w}x{h} is not a valid size", [f"{a}x{b}" for a, b in sizes])
        return w, h
    name, side = ("width", width) if width is not None else ("height", height)
    side = _as_int(side, name)
    if _nearest(side) != [side]:
        _invalid(f"{name} {side} is not valid", [str(v) for v in _nearest(side)])
    ratio = ih / iw if name == "width" else iw / ih
    other = min(MAX_SIDE, max(MIN_SIDE, math.floor(side * ratio / SIDE_MULTIPLE + 0.5) * SIDE_MULTIPLE))
    return (side, other) if name == "width" else (other, side)


def _as_int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise ImageError(f"{name} must be a whole number of pixels, got {v!r}")
    return int(v)


def _nearest(x: int) -> list[int]:
    """The valid sides closest to `x`, closest first: [x] itself when x is valid."""
    down = x // SIDE_MULTIPLE * SIDE_MULTIPLE
    near = {
        min(MAX_SIDE, max(MIN_SIDE, v)) for v in ((down, down + SIDE_MULTIPLE) if x % SIDE_MULTIPLE else (x,))
    }
    return sorted(near, key=lambda v: (abs(v - x), v))


def _invalid(what: str, nearest: list[str]):
    raise ImageError(
        f"{what}: sides must be multiples of {SIDE_MULTIPLE} between {MIN_SIDE} and {MAX_SIDE}; "
        f"nearest: {' or '.join(nearest[:2])}"
    )


def fit_image(img: Image.Image, width: int, height: int, fit: str = "crop") -> Image.Image:
    """Resize `img` to exactly width x height without squashing it.

    "crop" scales it to cover the frame and cuts the overflow equally from both sides; "pad" scales it to fit
    inside and adds centred black bars. An image already at the size is returned as is (no resampling).
    """
    if fit not in FITS:
        raise ParameterError("fit", f"must be one of {', '.join(FITS)}, got {fit!r}")
    img = _to_rgb(img)
    if img.size == (width, height):
        return img
    # LANCZOS antialiases when shrinking and is the sharpest of Pillow's filters when enlarging; both
    # ImageOps helpers resize with sub-pixel centring, so even a 1x1 image becomes a uniform frame.
    if fit == "crop":
        return ImageOps.fit(img, (width, height), Image.Resampling.LANCZOS)
    return ImageOps.pad(img, (width, height), Image.Resampling.LANCZOS, color=(0, 0, 0))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB image as a float32 (3, H, W) tensor in [-1, 1], the range the VAE encoder expects."""
    a = torch.from_numpy(np.array(_to_rgb(img), dtype=np.float32))
    return (a / 127.5 - 1).permute(2, 0, 1).contiguous()


def prepare_image(src, width: int | None = None, height: int | None = None, fit: str = "crop") -> Image.Image:
    """Load `src` and fit it to the video size (see `target_size`): the one call the pipeline makes."""
    img = load_image(src)
    return fit_image(img, *target_size(img.size, width, height), fit=fit)
