"""Video files: write frames as MP4, WebM, GIF, animated WebP or a folder of PNGs, with the generation
parameters stored inside, and read those parameters back.

Every file is written under a temporary name next to its destination and renamed into place when complete,
so a crash never leaves a half-written video under the real name; an exception (Ctrl-C, the CLI's SIGTERM)
removes the temporary. Only a regular file, or a folder of frames this module wrote, is ever replaced.
"""

from __future__ import annotations

import io
import json
import numbers
import os
import secrets
import shutil
import stat
import struct
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin, features

from . import provenance
from .errors import Img2VidError
from .version import __version__

FORMATS = (".mp4", ".webm", ".gif", ".webp")
SUPPORTED = ".mp4, .webm, .gif, .webp, or a folder (a path without suffix) of PNG frames"
_ENCODERS = {".mp4": "libx264", ".webm": "libvpx-vp9", ".gif": "gif"}
_ENCODER_OPTIONS = {
    ".mp4": {"crf": "17", "preset": "medium"},
    ".webm": {"crf": "24", "b": "0", "row-mt": "1", "cpu-used": "4", "deadline": "good"},  # b=0: quality mode
}
_EXIF_IMAGE_DESCRIPTION = 0x010E
_FRAME_NAME = "frame_{:04d}.png"
_PARAMS_NAME = "params.json"
# Playback rates every format stores faithfully: GIF delays are whole centiseconds up to 65535, time bases
# are fractions with denominators up to 1001 (below 1/1001 the rate rounds to 0).
MIN_FPS, MAX_FPS = 0.01, 1000.0
NAME_MAX = 255  # bytes in one file name on common file systems, where os.pathconf cannot tell


class OutputExistsError(Img2VidError, FileExistsError):
    """The output path exists and overwriting was not asked for."""


@dataclass
class Video:
    frames: np.ndarray  # uint8 (T, H, W, 3)
    fps: float
    params: dict = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return self.frames.shape[0]

    @property
    def height(self) -> int:
        return self.frames.shape[1]

    @property
    def width(self) -> int:
        return self.frames.shape[2]

    def save(self, path, *, overwrite: bool = False, fps: float | None = None, sign=None) -> Path:
        """Write the video (see `write_video`) with its generation parameters as metadata; `sign`:
        (certificate chain, private key), PEM paths or bytes, adds a signed C2PA manifest."""
        return write_video(
            path, self.frames, self.fps if fps is None else fps, self.params, overwrite=overwrite, sign=sign
        )


def write_video(
    path, frames, fps: float, metadata: dict | None = None, *, overwrite: bool = False, sign=None
) -> Path:
    """Write uint8 (T, H, W, 3) RGB `frames` played at `fps` to `path`; the format follows its suffix.

    - .mp4: H.264 (libx264, yuv420p, BT.709, crf 17). .webm: VP9 (libvpx-vp9, yuv420p). Both play at exactly
      `fps` and need even width and height.
    - .gif: one palette for the whole video (chosen from its frames), dithered. GIF delays are whole
      centiseconds, so the frame rate is approximate: at 7 fps the delays alternate 14 and 15 cs (the total
      duration stays right) and readers usually report 100/14 = 7.14 fps. Browsers play delays under 2 cs
      slowly, so keep GIFs at 50 fps or less.
    - .webp: animated lossy WebP (quality 90), delays in whole milliseconds (again rounded so the total
      duration stays right). Every frame is kept, even one identical to the previous.
    - no suffix or a trailing separator: a folder of frame_0000.png, frame_0001.png, ... and params.json.

    `metadata` (JSON-serialisable; anything else is stored as its str()) goes into the file: the container's
    "comment" tag for mp4/webm, a comment extension for gif, EXIF ImageDescription for webp, params.json for
    a folder. `read_metadata` reads it back. An existing output is replaced only with overwrite=True.

    Every format also carries an XMP packet saying the video is AI-generated (IPTC digital source type
    trainedAlgorithmicMedia), with the model (metadata["model"]) and img2vid's version: see
    img2vid.provenance, whose `read_provenance` reads it back. `sign` = (certificate chain, private key),
    PEM paths or bytes, adds a C2PA manifest signed with them (needs the `c2pa` extra; not for .webm).
    """
    kind = _kind(path)
    path = Path(path)
    frames = _check_frames(frames, kind)
    check_fps(fps)
    # A fraction, so that 7 stays exactly 7 (and 29.97 becomes 2997/100) in the file's time base.
    rate = Fraction(fps if isinstance(fps, Fraction) else float(fps)).limit_denominator(1001)
    text = json.dumps(metadata or {}, default=str)  # ASCII-only (ensure_ascii), so it fits EXIF too
    model = str((metadata or {}).get("model", "unknown"))
    xmp = provenance.xmp_packet(model, __version__)
    pems = provenance.check_signing(kind, *sign) if sign is not None else None
    if kind:
        _encoder(kind)  # fail before any work if this PyAV build lacks the codec
    _check_target(path, kind, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, ".tmp")
    try:
        if kind == "":
            _write_folder(tmp, frames, text, xmp)
        elif kind == ".webp":
            _write_webp(tmp, frames, rate, text, xmp)
        else:
            _write_av(tmp, kind, frames, rate, text, xmp)
        if pems is not None:
            _sign(tmp, kind, pems, model)
        _check_target(path, kind, overwrite)  # again: something may have appeared there meanwhile
        _move_into_place(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp)
        else:
            tmp.unlink(missing_ok=True)
        raise
    return path


def check_fps(fps) -> None:
    """Raise Img2VidError unless `fps` is a number in [MIN_FPS, MAX_FPS]."""
    if isinstance(fps, bool) or not isinstance(fps, numbers.Real) or not 0 < fps < float("inf"):
        raise Img2VidError(f"fps must be a positive number, got {fps!r}")
    if not MIN_FPS <= fps <= MAX_FPS:
        raise Img2VidError(f"fps must be between {MIN_FPS:g} and {MAX_FPS:g}, got {fps!r}")


def check_output(path, *, overwrite: bool = False) -> None:
    """Raise Img2VidError now, before any work, if `write_video(path, ..., overwrite=overwrite)` would be
    refused or could not write there: unknown suffix, an existing output (or anything but a regular file or
    a frames folder, even with overwrite), a name too long, a folder that cannot be written."""
    kind = _kind(path)
    path = Path(path)
    check_name_length(path)
    _check_target(path, kind, overwrite)
    folder = path.parent
    while not (folder.exists() or folder.is_symlink()):  # write_video creates the missing folders
        folder = folder.parent
    if not folder.is_dir():
        raise Img2VidError(f"cannot write {path}: {folder} is not a folder")
    # Creating a file is the one test that covers permissions, read-only mounts and the temporary's name.
    probe = (
        _sibling(path, ".tmp") if folder == path.parent else folder / f".img2vid.{secrets.token_hex(4)}.tmp"
    )
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as e:
        raise Img2VidError(f"cannot write {path}: {e.strerror} ({folder})") from None


def check_name_length(path) -> None:
    """Raise Img2VidError when a part of `path` is longer than a file name may be."""
    path = Path(path)
    for part in path.parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise Img2VidError(
                f"{path}: the name {part[:24]}... is {len(os.fsencode(part))} bytes long; file names can "
                f"have at most {NAME_MAX}"
            )


def _sibling(path: Path, ending: str) -> Path:
    """A hidden name beside `path` for its temporary or old copy, cut to fit in NAME_MAX bytes."""
    tail = f".{secrets.token_hex(4)}{ending}"
    stem = os.fsencode(path.name)[: NAME_MAX - 1 - len(tail)].decode("utf-8", "ignore")
    return path.with_name(f".{stem}{tail}")


def read_metadata(path) -> dict:
    """The metadata dict that `write_video` stored in `path`; {} when it holds none (or not a JSON object)."""
    import av  # lazy, here and below: importing img2vid must not need PyAV (GPU workers never write files)

    path = Path(path)
    if not path.exists():
        raise Img2VidError(f"{path}: no such file or folder")
    try:
        if path.is_dir():
            params = path / _PARAMS_NAME
            text = params.read_text(encoding="utf-8") if params.is_file() else None
        elif path.suffix.lower() == ".webp":  # PyAV cannot open animated WebP (see _write_webp)
            with Image.open(path) as im:
                text = im.getexif().get(_EXIF_IMAGE_DESCRIPTION)
        else:
            with av.open(str(path)) as container:  # matroska upper-cases tag names: "COMMENT"
                text = next((v for k, v in container.metadata.items() if k.lower() == "comment"), None)
    except (OSError, av.FFmpegError) as e:
        raise Img2VidError(f"{path}: cannot read ({e})") from None
    try:
        data = json.loads(text) if text else {}
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def codecs_available() -> dict[str, bool]:
    """Which output formats this installation can write (for a `doctor` command)."""
    out = {}
    for label, kind in (("h264 (mp4)", ".mp4"), ("vp9 (webm)", ".webm"), ("gif", ".gif")):
        try:
            _encoder(kind)
            out[label] = True
        except Img2VidError:
            out[label] = False
    out["webp"] = bool(features.check("webp"))
    return out


def _kind(path) -> str:
    """The output suffix, or "" for a folder of PNGs."""
    text = os.fspath(path)
    if text.endswith(("/", os.sep)) or not Path(text).suffix:
        return ""
    suffix = Path(text).suffix.lower()
    if suffix not in FORMATS:
        raise Img2VidError(f"{text}: unknown video format {suffix!r}; supported: {SUPPORTED}")
    return suffix


def _encoder(kind: str) -> str:
    import av

    if kind == ".webp":
        if not features.check("webp"):
            raise Img2VidError("this Pillow has no WebP support: write .mp4, .webm or .gif instead")
        return "webp"
    name = _ENCODERS[kind]
    try:
        av.codec.Codec(name, "w")
    except (av.codec.codec.UnknownCodecError, ValueError):
        others = ", ".join(k for k in FORMATS if k != kind)
        raise Img2VidError(
            f"this PyAV build has no {name} encoder (needed for {kind}): write {others} or a PNG folder"
        ) from None
    return name


def _check_frames(frames, kind: str) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3 or 0 in frames.shape:
        raise Img2VidError(
            f"frames must be a uint8 array of shape (T, H, W, 3), got {frames.dtype} {frames.shape}"
        )
    height, width = frames.shape[1:3]
    if kind in (".mp4", ".webm") and (width % 2 or height % 2):
        raise Img2VidError(
            f"{kind} (yuv420p) needs an even width and height, got {width}x{height}: "
            "crop the frames or write .gif, .webp or a PNG folder"
        )
    return np.ascontiguousarray(frames)


def _check_target(path: Path, kind: str, overwrite: bool) -> None:
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # nothing there; a parent that is a file fails later
        return
    if not overwrite:
        raise OutputExistsError(f"{path} already exists: use --overwrite (overwrite=True) to replace it")
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        what = "a symbolic link" if stat.S_ISLNK(mode) else "a device, pipe or socket"
        raise Img2VidError(f"{path} is {what}, not a regular file: not replacing it; choose another path")
    if stat.S_ISDIR(mode):
        if kind:
            raise Img2VidError(f"{path} is a folder: cannot replace it with a {kind} file")
        # Only a folder this module wrote is replaced, so that overwrite=True cannot wipe an unrelated folder.
        strays = [p.name for p in path.iterdir() if p.name != _PARAMS_NAME and not _is_frame_name(p.name)]
        if strays:
            raise Img2VidError(
                f"{path} is a folder holding other files ({', '.join(sorted(strays)[:3])}...): "
                "not replacing it; choose another path"
            )


def _is_frame_name(name: str) -> bool:
    return name.startswith("frame_") and name.endswith(".png") and name[6:-4].isdigit()


def _move_into_place(tmp: Path, path: Path) -> None:
    if tmp.is_dir() and (path.exists() or path.is_symlink()):
        # rename() cannot replace a non-empty folder: move the old one aside first, delete it once replaced.
        old = _sibling(path, ".old")
        os.replace(path, old)
        os.replace(tmp, path)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
    else:
        os.replace(tmp, path)


def _sign(tmp: Path, kind: str, pems: tuple[bytes, bytes], model: str) -> None:
    """Replace the written temporary (or each frame of a folder) by its C2PA-signed copy."""
    for f in sorted(tmp.glob("frame_*.png")) if tmp.is_dir() else [tmp]:
        signed = f.with_name(f.name + ".signed")
        try:
            provenance.sign(f, signed, kind, *pems, model, __version__)
            os.replace(signed, f)
        finally:
            signed.unlink(missing_ok=True)


def _write_folder(tmp: Path, frames: np.ndarray, text: str, xmp: str) -> None:
    tmp.mkdir()
    info = PngImagePlugin.PngInfo()
    info.add_itxt(provenance.PNG_XMP_KEY, xmp)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(tmp / _FRAME_NAME.format(i), compress_level=6, pnginfo=info)
    (tmp / _PARAMS_NAME).write_text(text + "\n", encoding="utf-8")


def _write_av(tmp: Path, kind: str, frames: np.ndarray, rate: Fraction, text: str, xmp: str) -> None:
    import av

    height, width = frames.shape[1:3]
    # faststart puts the index first, so browsers start playing an mp4 before it is fully downloaded.
    options = {"movflags": "+faststart"} if kind == ".mp4" else {}
    with av.open(str(tmp), "w", format=kind[1:], container_options=options) as container:
        container.metadata["comment"] = text  # the gif muxer ignores this: see _insert_gif_comment
        if kind == ".webm":
            container.metadata["XMP"] = xmp  # Matroska has no XMP element: a tag is the nearest thing
        stream = container.add_stream(_ENCODERS[kind], rate=rate)
        stream.width, stream.height = width, height
        stream.time_base = 1 / rate  # one tick per frame, so the stored average rate is exactly `rate`
        stream.options = _ENCODER_OPTIONS.get(kind, {})
        if kind == ".gif":
            stream.pix_fmt = "pal8"
            palette = _gif_palette(frames)
            argb = np.zeros((256, 4), np.uint8)
            colours = np.array(palette.getpalette(), np.uint8).reshape(-1, 3)[:256]
            argb[:, 0], argb[: len(colours), 1:] = 255, colours
        else:
            # Convert and tag as BT.709 (limited range): untagged, players guess the matrix from the size.
            stream.pix_fmt = "yuv420p"
            cc = stream.codec_context
            cc.colorspace = cc.color_primaries = cc.color_trc = 1  # AVCOL_*_BT709
            cc.color_range = 1  # AVCOL_RANGE_MPEG
        for i, frame in enumerate(frames):
            if kind == ".gif":
                indices = Image.fromarray(frame).quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG)
                vf = av.VideoFrame.from_ndarray((np.asarray(indices), argb), format="pal8")
            else:
                vf = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(
                    format="yuv420p",
                    dst_colorspace="ITU709",
                    dst_color_range="MPEG",
                    dst_color_trc=1,
                    dst_color_primaries=1,
                )
            vf.pts = i
            container.mux(stream.encode(vf))
        container.mux(stream.encode())
    if kind == ".gif":
        _insert_gif_comment(tmp, text, xmp)
    elif kind == ".mp4":
        with open(tmp, "ab") as f:
            f.write(provenance.mp4_xmp_box(xmp))


def _gif_palette(frames: np.ndarray) -> Image.Image:
    """A 256-colour palette for the whole video, from up to 8 of its frames: a shared palette avoids the
    colour flicker that a palette per frame causes."""
    sample = frames[np.linspace(0, len(frames) - 1, min(8, len(frames))).round().astype(int)]
    return Image.fromarray(np.concatenate(list(sample), axis=0)).quantize(256, Image.Quantize.MEDIANCUT)


def _insert_gif_comment(path: Path, text: str, xmp: str) -> None:
    """Add a GIF comment extension after the header, where FFmpeg and Pillow both read it as "comment", and
    the XMP application extension.

    (Pillow could write the comment itself, but its GIF writer merges identical consecutive frames.)
    """
    data = path.read_bytes()
    flags = data[10]
    start = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # header, screen descriptor, global palette
    raw = text.encode()
    blocks = b"".join(bytes([len(raw[i : i + 255])]) + raw[i : i + 255] for i in range(0, len(raw), 255))
    comment = b"\x21\xfe" + blocks + b"\x00"
    path.write_bytes(data[:start] + comment + provenance.gif_xmp_extension(xmp) + data[start:])


def _write_webp(tmp: Path, frames: np.ndarray, rate: Fraction, text: str, xmp: str) -> None:
    """Assemble an animated WebP from frames encoded one by one by Pillow.

    Pillow's (and FFmpeg's) animated WebP writers use libwebp's WebPAnimEncoder, which merges a frame that
    looks (nearly) identical to the previous one into it, so a still stretch of video would lose frames.
    Note PyAV cannot read animated WebP back (FFmpeg's webp decoder handles still images only): use Pillow.
    """
    height, width = frames.shape[1:3]
    ms = [round(i * 1000 / rate) for i in range(len(frames) + 1)]  # timestamps, so durations sum exactly
    body = _chunk(
        b"VP8X", struct.pack("<B3x", 0x02 | 0x04 | 0x08) + _u24(width - 1) + _u24(height - 1)
    )  # anim, xmp, exif
    body += _chunk(b"ANIM", struct.pack("<4BH", 0, 0, 0, 255, 0))  # black background, loop forever
    for i, frame in enumerate(frames):
        still = io.BytesIO()
        Image.fromarray(frame).save(still, "WEBP", quality=90, method=4)
        bitstream = still.getvalue()[12:]  # the VP8/VP8L chunk after "RIFF<size>WEBP"
        if bitstream[:4] not in (b"VP8 ", b"VP8L"):  # an extended (VP8X) still cannot go in a frame as is
            raise Img2VidError(f"unexpected WebP layout from Pillow ({bitstream[:4]!r})")
        header = _u24(0) + _u24(0) + _u24(width - 1) + _u24(height - 1) + _u24(ms[i + 1] - ms[i])
        body += _chunk(b"ANMF", header + b"\x02" + bitstream)  # 0x02: don't blend with the previous frame
    exif = Image.Exif()
    exif[_EXIF_IMAGE_DESCRIPTION] = text
    body += _chunk(b"EXIF", exif.tobytes()[6:])  # without the "Exif\0\0" prefix, as the WebP spec says
    body += _chunk(b"XMP ", xmp.encode())
    tmp.write_bytes(b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WEBP" + body)


def _chunk(tag: bytes, data: bytes) -> bytes:
    return tag + struct.pack("<I", len(data)) + data + b"\x00" * (len(data) % 2)


def _u24(v: int) -> bytes:
    return struct.pack("<I", v)[:3]
