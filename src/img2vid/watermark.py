"""The reference's invisible watermark, in numpy: Stability AI's generative-models marks every SVD video with
invisible-watermark's "dwtDct" method and a fixed 48-bit message; this writes the same mark without OpenCV,
PyWavelets or invisible-watermark.

What "dwtDct" does (invisible-watermark 0.2.0, imwatermark/maxDct.py): convert to YUV (OpenCV's BGR2YUV), take
a one-level Haar DWT of U only (its scales are [0, 36, 36] but it loops over channels 0 and 1), cut the
approximation band into 4x4 blocks, and in each block move the largest-magnitude coefficient other than the
first to 0.25 or 0.75 of a step of 36, for bit 0 or 1 of the message (block n carries bit n mod 48). Despite
the name no DCT is taken. A decoder averages each bit's votes over all blocks.
"""

from __future__ import annotations

import numpy as np

MESSAGE = 0b101100111110110010010000011110111011000110011110  # generative-models' WATERMARK_MESSAGE
BITS = np.array([int(b) for b in f"{MESSAGE:048b}"], dtype=np.uint8)
SCALE = 36.0
BLOCK = 4


def _u_channel(rgb: np.ndarray) -> np.ndarray:
    """OpenCV's U of YUV for 8-bit images: 0.492 (B - Y) + 128, in float64."""
    r, g, b = (rgb[..., i].astype(np.float64) for i in range(3))
    y = 0.299 * r + 0.587 * g + 0.114 * b
    return 0.492 * (b - y) + 128.0


def _haar(u: np.ndarray) -> tuple[np.ndarray, ...]:
    """pywt.dwt2(u, "haar"): (cA, cH, cV, cD) of each 2x2 block [[a, b], [c, d]]."""
    a, b, c, d = u[0::2, 0::2], u[0::2, 1::2], u[1::2, 0::2], u[1::2, 1::2]
    return (a + b + c + d) / 2, (a + b - c - d) / 2, (a - b + c - d) / 2, (a - b - c + d) / 2


def _blocks(ca: np.ndarray) -> np.ndarray:
    """(N, 16) views of the 4x4 blocks of the approximation band, in raster order (N = rows x columns)."""
    rows, cols = ca.shape[0] // BLOCK, ca.shape[1] // BLOCK
    cut = ca[: rows * BLOCK, : cols * BLOCK]
    return cut.reshape(rows, BLOCK, cols, BLOCK).transpose(0, 2, 1, 3).reshape(-1, BLOCK * BLOCK)


def _peak(flat: np.ndarray) -> np.ndarray:
    """Index in each block of the largest-magnitude coefficient, the first one excluded."""
    return np.argmax(np.abs(flat[:, 1:]), axis=1) + 1


def embed_frame(rgb: np.ndarray, bits: np.ndarray = BITS, passes: int = 3) -> np.ndarray:
    """One uint8 (H, W, 3) RGB frame with the message in it (uint8, same shape).

    The first pass is invisible-watermark's encoder. Where its change moved a block's peak to another
    coefficient, or rounding to 8 bits pushed a value across the threshold, that block would read wrong: the
    further passes snap the peak the decoder now sees, on the 8-bit result, in those blocks only."""
    out = rgb
    for i in range(passes):
        out, changed = _pass(out, bits, first=i == 0)
        if i and not changed:
            break
    return out


def _pass(rgb: np.ndarray, bits: np.ndarray, first: bool) -> tuple[np.ndarray, int]:
    """Snap the peaks (all of them on the first pass, else those reading wrong); returns the 8-bit frame and
    how many blocks were snapped."""
    h, w = rgb.shape[0] // 4 * 4, rgb.shape[1] // 4 * 4  # as invisible-watermark: whole 4x4 pixel cells
    u = _u_channel(rgb[:h, :w])
    ca, ch, cv, cd = _haar(u)
    flat = _blocks(ca)
    n = np.arange(len(flat))
    pos, bit = _peak(flat), bits[n % len(bits)]
    val = flat[n, pos]
    # Snap |value| to 0.25 (bit 0) or 0.75 (bit 1) of its step of SCALE, keeping the sign.
    target = np.where(val >= 0, 1.0, -1.0) * ((np.abs(val) // SCALE) + 0.25 + 0.5 * bit) * SCALE
    if first:
        todo = n
        flat[n, pos] = target
    else:
        todo = n[((np.abs(val) % SCALE) > 0.5 * SCALE) != bit.astype(bool)]
        _snap_contenders(flat, todo, bit[todo])
    if first:  # invisible-watermark's idwt2((cA, (cV, cH, cD))): H and V swapped, so the pictures match
        ch, cv = cv, ch
    du = _inverse_haar(_unblocks(flat, ca), ch, cv, cd) - u
    out = rgb.astype(np.float64)
    # Back through OpenCV's YUV2BGR with Y and V unchanged: B moves 2.032 dU, G -0.395 dU, R not at all.
    out[:h, :w, 2] += 2.032 * du
    out[:h, :w, 1] -= 0.395 * du
    return np.clip(np.rint(out), 0, 255).astype(np.uint8), len(todo)


def _snap_contenders(flat: np.ndarray, rows: np.ndarray, bit: np.ndarray) -> None:
    """In blocks `rows`, move every coefficient that could become the peak (within SCALE/2 of it) to the
    nearest value that reads as its bit: whichever the decoder then picks, it reads right."""
    block = flat[rows, 1:]
    mag = np.abs(block)
    contenders = mag >= mag.max(axis=1, keepdims=True) - 0.5 * SCALE
    residue = (0.25 + 0.5 * bit[:, None]) * SCALE
    near = np.round((mag - residue) / SCALE) * SCALE + residue
    near = np.where(near < 0, near + SCALE, near)
    flat[rows, 1:] = np.where(contenders, np.where(block >= 0, near, -near), block)


def _unblocks(flat: np.ndarray, ca: np.ndarray) -> np.ndarray:
    """`ca` with its 4x4 blocks replaced by `flat` (the inverse of _blocks)."""
    rows, cols = ca.shape[0] // BLOCK, ca.shape[1] // BLOCK
    out = ca.copy()
    out[: rows * BLOCK, : cols * BLOCK] = (
        flat.reshape(rows, cols, BLOCK, BLOCK).transpose(0, 2, 1, 3).reshape(rows * BLOCK, cols * BLOCK)
    )
    return out


def _inverse_haar(ca, ch, cv, cd) -> np.ndarray:
    """pywt.idwt2((ca, (ch, cv, cd)), "haar")."""
    u = np.empty((ca.shape[0] * 2, ca.shape[1] * 2))
    u[0::2, 0::2] = (ca + ch + cv + cd) / 2
    u[0::2, 1::2] = (ca + ch - cv - cd) / 2
    u[1::2, 0::2] = (ca - ch + cv - cd) / 2
    u[1::2, 1::2] = (ca - ch - cv + cd) / 2
    return u


def embed(frames: np.ndarray, bits: np.ndarray = BITS) -> np.ndarray:
    """uint8 (T, H, W, 3) RGB frames, each marked (a new array)."""
    return np.stack([embed_frame(f, bits) for f in frames])


def decode_frame(rgb: np.ndarray, length: int = len(BITS)) -> np.ndarray:
    """Each bit's share of 1-votes over the frame's blocks (float, length `length`): > 0.5 reads as 1."""
    h, w = rgb.shape[0] // 4 * 4, rgb.shape[1] // 4 * 4
    flat = _blocks(_haar(_u_channel(rgb[:h, :w]))[0])
    val = np.abs(flat[np.arange(len(flat)), _peak(flat)])
    votes = (val % SCALE > 0.5 * SCALE).astype(np.float64)
    index = np.arange(len(flat)) % length
    return np.bincount(index, votes, length) / np.maximum(np.bincount(index, minlength=length), 1)


def bit_accuracy(rgb: np.ndarray, bits: np.ndarray = BITS) -> float:
    """The share of the message's bits that `decode_frame` reads back right from one frame."""
    return float(np.mean((decode_frame(rgb, len(bits)) > 0.5) == bits.astype(bool)))
