"""The `img2vid` command: generate, models, doctor and serve.

    img2vid generate photo.jpg                       # -> photo.mp4 with SVD-XT
    img2vid generate photos/ -o videos/ --seed 7     # one video per image
    img2vid generate photo.jpg --seeds 1,2,3 -o out/ --format webm

Every value is checked (with img2vid.params.check, the validator the Python API and the server use) before the
model loads, and every output path before any generation starts. Exit codes: 0 success; 2 bad input or usage
(including an existing output without --overwrite, or a size the free memory cannot hold); 1 a run-time failure
(out of memory, ...); 130 Ctrl-C; 143 SIGTERM (both remove any half-written output).
Only the standard library and light img2vid modules are imported while parsing; torch comes in with the model.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .config import PRESETS
from .errors import ImageError, Img2VidError, UsageError
from .params import (
    BOOLS,
    CHOICES,
    DTYPES,
    MAX_SIDE,
    MEMORY_MODES,
    MIN_SIDE,
    RANGES,
    SIDE_MULTIPLE,
    check,
    check_device,
)
from .version import __version__

PROG = "img2vid"
DEFAULT_MODEL = "svd-xt"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
OUTPUT_FORMATS = ("mp4", "webm", "gif", "webp", "png")  # png: a folder of PNG frames
# Generation parameter -> the flag that sets it (for error messages).
FLAGS = {
    "num_frames": "--frames",
    "num_steps": "--steps",
    "fps_id": "--fps-id",
    "motion_bucket_id": "--motion",
    "cond_aug": "--cond-aug",
    "min_cfg": "--min-cfg",
    "max_cfg": "--max-cfg",
    "guidance": "--guidance",
    "sampler": "--sampler",
    "seed": "--seed",
    "width": "--size",
    "height": "--size",
    "fit": "--fit",
    "decode_chunk_size": "--decode-chunk",
    "interpolate": "--interpolate",
    "watermark": "--watermark",
    "loop": "--loop",
    "extend": "--extend",
}
EXIT_OK, EXIT_RUNTIME, EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143


# ------------------------------------------------------------------------------------------------------------
# Parser


def _range_help(name: str, default: str | None = None) -> str:
    lo, hi, text = RANGES[name]
    extra = f", default {default}" if default is not None else ""
    return f"{text}; {lo:g}-{hi:g}{extra}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Stable Video Diffusion image-to-video in plain PyTorch.",
        epilog="Run 'img2vid COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_generate_parser(sub)

    p = sub.add_parser(
        "models",
        help="list the model presets and whether their weights are downloaded",
        description="List the model presets, their defaults, where their weights come from and whether they "
        "are already in the local huggingface_hub cache (no network access).",
    )
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "doctor",
        help="check the installation: torch, GPUs, codecs, model cache",
        description="Print versions, GPUs and free memory, the memory mode 'auto' would choose, the video "
        "codecs available, and whether a model's weights are cached. No network access; exit status 0.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model to check (default {DEFAULT_MODEL})")
    p.set_defaults(func=cmd_doctor)

    _add_warmup_parser(sub)
    from .server.main import add_serve_parser  # sets func=run_serve; FastAPI is imported only when serving

    add_serve_parser(sub)
    return parser


def _add_generate_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="turn an image (or a folder of images) into videos",
        description="Turn an image, or every image in a folder, into a video. Values left out take the "
        "model's defaults. Everything is checked before the model loads.",
        epilog="Output: with one image and one seed, -o is the output file: its suffix picks the format "
        "(.mp4 .webm .gif .webp, or no suffix for a folder of PNG frames); default <image stem>.mp4 here. "
        "With a folder of images or several --seeds, -o is a folder (default: the current one) that receives "
        "<stem>.mp4, or <stem>_seed<N>.mp4 per seed; --format picks the format. A path ending in '/', or an "
        "existing folder other than an earlier PNG-frame output, is always a folder to write into. Existing outputs are kept unless --overwrite.",
    )
    p.add_argument("input", metavar="IMAGE_OR_FOLDER", help="an image file, or a folder of images")
    p.add_argument("-o", "--output", metavar="OUT", help="output file, or folder (see below)")
    p.add_argument(
        "--format",
        metavar="{" + ",".join(OUTPUT_FORMATS) + "}",
        help="output format when -o is a folder or left out (default mp4; png: a folder of frames)",
    )
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        metavar="NAME|PATH",
        help=f"a preset ({', '.join(PRESETS)}; see 'img2vid models'), a .safetensors file, a diffusers "
        f"folder or a hub id (default {DEFAULT_MODEL})",
    )
    g = p.add_argument_group("generation")
    _add_sampling_options(g)
    _add_picture_options(g)
    _add_provenance_options(p.add_argument_group("length, loops and provenance"))
    _add_runtime_options(p.add_argument_group("runtime"))
    p.set_defaults(func=cmd_generate)


def _add_sampling_options(g) -> None:
    svd_xt = PRESETS[DEFAULT_MODEL].defaults
    g.add_argument(
        "--frames",
        metavar="N",
        help=_range_help("num_frames", f"the model's ({svd_xt.num_frames} for {DEFAULT_MODEL})"),
    )
    g.add_argument(
        "--steps",
        metavar="N",
        help=_range_help("num_steps", f"the model's ({svd_xt.num_steps} for {DEFAULT_MODEL})"),
    )
    g.add_argument("--fps-id", metavar="N", help=_range_help("fps_id", "6"))
    g.add_argument(
        "--fps", metavar="F", help="playback frame rate of the file only, 0.01-1000 (default: --fps-id + 1)"
    )
    g.add_argument("--motion", metavar="N", help=_range_help("motion_bucket_id", "127"))
    g.add_argument("--cond-aug", metavar="X", help=_range_help("cond_aug", "0.02"))
    g.add_argument(
        "--min-cfg",
        metavar="X",
        help=_range_help("min_cfg", f"the model's ({svd_xt.min_cfg:g} for {DEFAULT_MODEL})"),
    )
    g.add_argument(
        "--max-cfg",
        metavar="X",
        help=_range_help("max_cfg", f"the model's ({svd_xt.max_cfg:g} for {DEFAULT_MODEL})"),
    )
    g.add_argument(
        "--guidance",
        metavar="{" + ",".join(CHOICES["guidance"]) + "}",
        help="how the guidance scale goes from --min-cfg to --max-cfg over the frames (default linear)",
    )
    g.add_argument(
        "--sampler", metavar="{" + ",".join(CHOICES["sampler"]) + "}", help="sampler (default euler)"
    )


def _add_picture_options(g) -> None:
    seeds = g.add_mutually_exclusive_group()
    seeds.add_argument("--seed", metavar="N", help="random seed (default: a random one, printed)")
    seeds.add_argument("--seeds", metavar="N,N,...", help="several seeds: one video per seed and image")
    g.add_argument(
        "--size",
        metavar="WxH",
        help=f"video size, sides multiples of {SIDE_MULTIPLE} from {MIN_SIDE} to {MAX_SIDE} "
        "(default 1024x576, or 576x1024 for a portrait image)",
    )
    g.add_argument(
        "--fit",
        metavar="{" + ",".join(CHOICES["fit"]) + "}",
        help="crop the image to the video's shape, or pad it with black bars (default crop)",
    )
    chunk = PRESETS[DEFAULT_MODEL].defaults.decode_chunk_size
    g.add_argument(
        "--decode-chunk",
        metavar="N",
        help=_range_help("decode_chunk_size", f"the model's ({chunk} for {DEFAULT_MODEL})"),
    )
    g.add_argument(
        "--interpolate",
        metavar="{1,2,4}",
        help="add frames with RIFE: 2 or 4 times the frames ((N-1)*k+1) and the frame rate (default 1: none)",
    )
    g.add_argument(
        "--interpolate-weights",
        metavar="PATH|HUB_ID",
        help="RIFE v4.13 flownet .safetensors: a file, or owner/name[/file] on the hub (default: "
        "$IMG2VID_RIFE_WEIGHTS, else imaginairy/rife-interpolation)",
    )


def _add_provenance_options(g) -> None:
    g.add_argument("--extend", metavar="N", help=_range_help("extend", "0") + "; T + N(T-1) frames")
    g.add_argument(
        "--loop",
        metavar="{" + ",".join(CHOICES["loop"]) + "}",
        help="pingpong: play forward then backward (2T-2 frames), for a seamless loop (default none)",
    )
    g.add_argument("--watermark", action="store_true", help=BOOLS["watermark"] + " (as the reference does)")
    g.add_argument(
        "--sign",
        nargs=2,
        metavar=("CERT", "KEY"),
        help="add a C2PA manifest signed with this PEM certificate chain and private key (mp4, gif, webp, png; "
        'needs pip install "img2vid[c2pa]")',
    )


def _add_runtime_options(r) -> None:
    r.add_argument(
        "--device", metavar="DEV", help="torch device, e.g. cuda, cuda:1, cpu (default: cuda if available)"
    )
    r.add_argument(
        "--dtype",
        metavar="{" + ",".join(DTYPES) + "}",
        help="weights and compute precision (default fp16 on CUDA, fp32 on CPU)",
    )
    r.add_argument(
        "--memory",
        metavar="{" + ",".join(MEMORY_MODES) + "}",
        default="auto",
        help="fast: all on the GPU; low: for small GPUs, same result; auto: by free memory (default)",
    )
    _add_accel_options(r)
    r.add_argument(
        "--preview",
        metavar="FILE",
        help="keep FILE (.webp or .gif: animated; .png: the frames side by side) updated with a rough preview of "
        "every frame while sampling",
    )
    r.add_argument(
        "--timings",
        action="store_true",
        help="print where the time went at the end (process start, imports, loading, each phase, writing)",
    )
    r.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    r.add_argument("--quiet", action="store_true", help="no progress or loading messages")
    r.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")


# ------------------------------------------------------------------------------------------------------------
# Checking values (all before the model loads)


def _number(text: str):
    """Command-line text -> int or float when it is one, else the text (check() then names the problem)."""
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def _checked(name: str, value):
    try:
        return check(name, value)
    except Img2VidError as e:
        message = str(e).removeprefix(f"{getattr(e, 'field', name)}: ")
        raise UsageError(f"{FLAGS.get(name, name)}: {message}") from None


def _nearest_sides(x: int) -> list[int]:
    """The valid sides closest to x, closest first ([x] when x is valid)."""
    if MIN_SIDE <= x <= MAX_SIDE and x % SIDE_MULTIPLE == 0:
        return [x]
    down = x // SIDE_MULTIPLE * SIDE_MULTIPLE
    near = {min(MAX_SIDE, max(MIN_SIDE, v)) for v in (down, down + SIDE_MULTIPLE)}
    return sorted(near, key=lambda v: (abs(v - x), v))


def parse_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*[xX*]\s*(\d+)\s*", text)
    if not m:
        raise UsageError(f"--size: expected WIDTHxHEIGHT such as 1024x576, got {text!r}")
    w, h = int(m[1]), int(m[2])
    nw, nh = _nearest_sides(w), _nearest_sides(h)
    if nw != [w] or nh != [h]:
        sizes = sorted(((a, b) for a in nw for b in nh), key=lambda s: (abs(s[0] - w) + abs(s[1] - h), s))
        raise UsageError(
            f"--size: {w}x{h} is not a valid size: sides must be multiples of {SIDE_MULTIPLE} between "
            f"{MIN_SIDE} and {MAX_SIDE}; nearest: {' or '.join(f'{a}x{b}' for a, b in sizes[:2])}"
        )
    return _checked("width", w), _checked("height", h)


def generate_kwargs(args: argparse.Namespace) -> dict:
    """The keywords for Pipeline.generate given on the command line, checked (UsageError names the flag)."""
    kwargs = {}
    for name, attr in (
        ("num_frames", "frames"),
        ("num_steps", "steps"),
        ("fps_id", "fps_id"),
        ("motion_bucket_id", "motion"),
        ("cond_aug", "cond_aug"),
        ("min_cfg", "min_cfg"),
        ("max_cfg", "max_cfg"),
        ("decode_chunk_size", "decode_chunk"),
        ("interpolate", "interpolate"),
        ("extend", "extend"),
    ):
        text = getattr(args, attr)
        if text is not None:
            kwargs[name] = _checked(name, _number(text))
    if args.watermark:
        kwargs["watermark"] = True
    for name in ("guidance", "sampler", "fit", "loop"):
        text = getattr(args, name)
        if text is not None:
            kwargs[name] = _checked(name, text.strip().lower())
    if args.size is not None:
        kwargs["width"], kwargs["height"] = parse_size(args.size)
    return kwargs


def parse_seeds(args: argparse.Namespace) -> list[int | None]:
    if args.seed is not None:
        return [_checked("seed", _number(args.seed))]
    if args.seeds is None:
        return [None]  # the pipeline draws one (and records it)
    seeds = []
    for part in args.seeds.split(","):
        if not part.strip():
            raise UsageError(f"--seeds: expected comma-separated integers such as 1,2,3, got {args.seeds!r}")
        try:
            seed = check("seed", _number(part.strip()))
        except Img2VidError as e:
            raise UsageError(f"--seeds: {str(e).removeprefix('seed: ')}") from None
        if seed in seeds:
            raise UsageError(f"--seeds: {seed} is given twice")
        seeds.append(seed)
    return seeds


def parse_fps(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        fps = float(text)
    except ValueError:
        raise UsageError(f"--fps: must be a number, got {text!r}") from None
    if not (math.isfinite(fps) and fps > 0):
        raise UsageError(f"--fps: must be a positive number, got {text!r}")
    from .video import MAX_FPS, MIN_FPS

    if not MIN_FPS <= fps <= MAX_FPS:  # what every format stores faithfully (see video.py)
        raise UsageError(f"--fps: must be between {MIN_FPS:g} and {MAX_FPS:g}, got {text!r}")
    return fps


def parse_preview(text: str | None) -> Path | None:
    from .preview import FORMATS

    if text is None:
        return None
    path = Path(text)
    if path.suffix.lower() not in FORMATS:
        raise UsageError(f"--preview {text}: the name must end in {', '.join(FORMATS)}")
    if not path.parent.is_dir():
        raise UsageError(f"--preview {text}: the folder {path.parent} does not exist")
    if path.is_dir():
        raise UsageError(f"--preview {text}: is a folder")
    return path


def interpolation_weights(args: argparse.Namespace) -> str:
    """The RIFE weights, found (downloaded if need be) now: a missing file fails before the model loads."""
    preset = PRESETS.get(args.model)
    if args.interpolate_weights is None and preset is not None and preset.hub_id is None:
        return "random"  # a random-weights preset gets a random interpolator too
    from . import interpolate

    return interpolate.resolve_weights(args.interpolate_weights)


def _choice(flag: str, value: str | None, choices: tuple[str, ...]) -> str | None:
    if value is None:
        return None
    v = value.strip().lower()
    if v not in choices:
        raise UsageError(f"{flag}: must be one of {', '.join(choices)}, got {value!r}")
    return v


# ------------------------------------------------------------------------------------------------------------
# Planning: which image goes to which output


@dataclass
class Job:
    image: Path
    seed: int | None
    output: Path
    label: str


def list_images(folder: Path) -> list[Path]:
    """The images directly in `folder` (by suffix, any case), sorted by name; hidden files are skipped."""
    return sorted(
        (
            p
            for p in folder.iterdir()
            if not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        ),
        key=lambda p: p.name,
    )


def _output_suffix(fmt: str) -> str:
    return "" if fmt == "png" else f".{fmt}"


def _is_folder_target(out: str) -> bool:
    """-o names a folder to write into: ends in a separator, or an existing folder that is not itself a
    PNG-frame output (those hold params.json and are replaced with --overwrite)."""
    if out.endswith(("/", os.sep)):
        return True
    p = Path(out)
    return p.is_dir() and not (p / "params.json").is_file()


def _format_of(path: str) -> str:
    """The format a single output path asks for (its suffix), checked."""
    from .video import FORMATS, SUPPORTED

    suffix = Path(path).suffix.lower()
    if not suffix:
        return "png"
    if suffix not in FORMATS:
        raise UsageError(f"-o {path}: unknown video format {suffix!r}; supported: {SUPPORTED}")
    return suffix[1:]


def plan(args: argparse.Namespace, seeds: list[int | None], fmt: str | None) -> tuple[list[Job], str]:
    """The jobs of this run and their output format. Raises UsageError for a missing input and the like."""
    from .video import check_name_length

    for given in (args.input, args.output):
        if given is not None:
            check_name_length(given)  # before any stat() of it, which would fail with ENAMETOOLONG
    src = Path(args.input)
    if not src.exists():
        raise UsageError(f"{src}: no such file or folder")
    if src.is_dir():
        images = list_images(src)
        if not images:
            raise UsageError(f"{src}: no images in this folder (looked for {' '.join(IMAGE_SUFFIXES)})")
    else:
        images = [src]
    several = src.is_dir() or len(seeds) > 1

    if not several:
        out = args.output
        if out is None or _is_folder_target(out):
            fmt = fmt or "mp4"
            target = Path(out or ".") / (src.stem + _output_suffix(fmt))
        else:
            given = _format_of(out)
            if fmt is not None and fmt != given:
                raise UsageError(f"-o {out} is a {given} output but --format says {fmt}")
            fmt, target = given, Path(out)
        return [Job(src, seeds[0], target, src.name)], fmt

    fmt = fmt or "mp4"
    folder = Path(args.output) if args.output else Path(".")
    if args.output and not folder.is_dir():
        from .video import FORMATS

        if folder.exists():
            raise UsageError(
                f"-o {args.output}: is a file; a folder input or several seeds needs an output folder"
            )
        if folder.suffix.lower() in FORMATS:
            raise UsageError(
                f"-o {args.output}: a folder input or several seeds makes several videos, so -o names a folder "
                "(choose the format with --format)"
            )
    stems = [p.stem.lower() for p in images]
    jobs = []
    for image in images:
        # Two images with one stem (a.png, a.jpg) would share outputs: those keep their suffix in the name.
        stem = image.stem if stems.count(image.stem.lower()) == 1 else f"{image.stem}_{image.suffix[1:]}"
        for seed in seeds:
            name = f"{stem}_seed{seed}" if len(seeds) > 1 else stem
            label = image.name if len(seeds) == 1 else f"{image.name} seed {seed}"
            jobs.append(Job(image, seed, folder / (name + _output_suffix(fmt)), label))
    return jobs, fmt


def _check_codec(fmt: str) -> None:
    """Fail before loading when this installation cannot write `fmt`."""
    if fmt == "png":
        return
    from .video import codecs_available

    for label, ok in codecs_available().items():
        if fmt in label and not ok:
            raise UsageError(
                f"this installation cannot write {fmt} ({label}): choose another --format or -o suffix"
            )


def _check_outputs(jobs: list[Job], overwrite: bool) -> list[tuple[Job, str | None]]:
    """Each job with why its output cannot be written (exists, not a regular file, name too long, folder
    not writable), or None when it can."""
    from .video import OutputExistsError, check_output

    checked = []
    for job in jobs:
        try:
            check_output(job.output, overwrite=overwrite)
            checked.append((job, None))
        except OutputExistsError:
            checked.append((job, f"{job.output} already exists: use --overwrite to replace it"))
        except Img2VidError as e:
            checked.append((job, str(e)))
    return checked


# ------------------------------------------------------------------------------------------------------------
# Progress


def _duration(s: float) -> str:
    if s < 60:
        return f"{s:.1f}s"
    s = round(s)
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s // 60 % 60:02d}m"


PHASE_TEXT = {
    "loading": "starting...",
    "conditioning": "encoding the image...",
    "sampling": "sampling...",
    "decoding": "decoding...",
    "interpolating": "interpolating...",
    "writing": "writing...",
}


class Progress:
    """The generate callback: one updating line on a terminal, else a plain line every ~10% of the steps and one
    per phase after sampling. With `preview`, that file keeps the latest preview (as often as its ~1% budget
    allows)."""

    def __init__(self, label: str, total: int, stream=None, preview: Path | None = None, fps: float = 7):
        self.label, self.total = label, total
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.perf_counter()
        self.shown = 0  # length of the line on screen (tty)
        self.last_tenth = -1
        self.step, self.phase = 0, "loading"
        self.preview, self.fps = preview, fps
        self.throttle = None
        if self.tty:
            self._draw(None)

    def __call__(self, p) -> None:
        self.step, self.total = p.step, p.total
        if p.phase == "sampling" and p.step:
            self._on_step(p.eta_s)
            self._write_preview(p)
        else:
            self.set_phase(p.phase)

    def set_phase(self, phase: str) -> None:
        self.phase = phase
        if self.tty:
            self._draw(None)
        elif phase in ("decoding", "interpolating", "writing"):
            self._print(PHASE_TEXT[phase].removesuffix("..."))

    def _on_step(self, eta: float | None) -> None:
        self.phase = "sampling"
        if self.tty:
            return self._draw(eta)
        tenth = self.step * 10 // self.total
        if tenth > self.last_tenth or self.step == self.total:
            self.last_tenth = tenth
            tail = "" if self.step == self.total else f", ETA {_duration(eta or 0)}"
            self._print(f"step {self.step}/{self.total} ({100 * self.step // self.total}%), "
                        f"{_duration(time.perf_counter() - self.start)} elapsed{tail}")  # fmt: skip

    def _print(self, text: str) -> None:
        print(f"{PROG}: {self.label}: {text}", file=self.stream, flush=True)

    def _write_preview(self, p) -> None:
        if self.preview is None or p.preview is None:  # None: a later segment's sampling starts (--extend)
            return
        from .preview import Throttle, encode, write_atomic

        self.throttle = self.throttle or Throttle()
        try:
            data = self.throttle.run(lambda: encode(p.preview, self.fps, self.preview.suffix.lower()))
            if data is not None:
                write_atomic(self.preview, data)
        except OSError as e:  # the video matters more than its preview: say so once and go on
            self.preview = None
            _error(f"--preview: cannot write {e.filename or ''}: {e.strerror or e}; previews stopped")

    def _draw(self, eta: float | None) -> None:
        cols = shutil.get_terminal_size((80, 24)).columns
        step, total = self.step, self.total
        if self.phase == "sampling" and eta is not None and step < total:
            tail = f"ETA {_duration(eta)}"
        else:
            tail = PHASE_TEXT.get(self.phase, self.phase)
        head = f"{self.label} {step}/{total} "
        rest = f" {_duration(time.perf_counter() - self.start)} {tail}"
        width = max(10, min(30, cols - 1 - len(head) - len(rest) - 2))
        filled = width * step // max(total, 1)
        line = f"{head}[{'#' * filled}{'.' * (width - filled)}]{rest}"[: cols - 1]
        self.stream.write("\r" + line.ljust(self.shown))
        self.stream.flush()
        self.shown = len(line)

    def clear(self) -> None:
        if self.tty and self.shown:
            self.stream.write("\r" + " " * self.shown + "\r")
            self.stream.flush()
            self.shown = 0


_active: Progress | None = None  # the line on screen, cleared before a log message or an error


def _clear_progress() -> None:
    if _active is not None:
        _active.clear()


class _LogHandler(logging.Handler):
    """img2vid's log messages on stderr (looked up when written, so that redirection and capture work)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _clear_progress()
            sys.stderr.write(f"{PROG}: {record.levelname.lower()}: {self.format(record)}\n")
        except Exception:
            self.handleError(record)


def _error(message: str) -> None:
    _clear_progress()
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)


def _info(args, message: str) -> None:
    if not args.quiet:
        print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0].strip() if lines else "(no message)"


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, MemoryError) or any(c.__name__ == "OutOfMemoryError" for c in type(e).__mro__):
        return True
    text = str(e).lower()
    return "out of memory" in text or "can't allocate memory" in text


def _runtime_error(e: BaseException, label: str | None = None) -> None:
    where = f"{label}: " if label else ""
    _error(f"{where}{type(e).__name__}: {_first_line(e)}")
    if _is_oom(e):
        hint = "try --memory low, or a smaller --decode-chunk (e.g. 4), --frames or --size"
    else:
        hint = "run again with --debug to see the traceback"
    print(f"{PROG}: hint: {hint}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------------
# Commands


class Timeline:
    """Moments of one command, in seconds since the process started (Linux; elsewhere since main())."""

    def __init__(self):
        self.start = time.perf_counter() - _process_age()
        self.marks: dict[str, float] = {}
        self.videos: list[dict] = []

    def mark(self, name: str) -> None:
        self.marks[name] = round(time.perf_counter() - self.start, 3)

    def as_json(self) -> str:
        return json.dumps({"marks": self.marks, "videos": self.videos})


def _process_age() -> float:
    """How long ago this process started, from /proc (10 ms resolution); 0 where that cannot be read."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # seconds after boot
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


TIMELINE = Timeline()


@dataclass
class _Run:
    """One `generate` command: its checked values, its jobs, and how they went."""

    kwargs: dict  # for Pipeline.generate
    fps: float | None
    sign: tuple[bytes, bytes] | None  # PEM certificate chain and key for a C2PA manifest
    jobs: list[Job]
    several: bool  # a folder or several seeds: report a summary at the end
    failures: list[str] = field(default_factory=list)  # one message each, naming the file
    preview: Path | None = None  # --preview
    rife: str | None = None  # the interpolation weights, resolved before the model loads
    bad_input: bool = False
    runtime_failed: bool = False
    made: int = 0

    def fail(self, message: str) -> None:
        self.bad_input = True
        _error(message)
        self.failures.append(message)

    def exit_status(self) -> int:
        return EXIT_RUNTIME if self.runtime_failed else EXIT_BAD_INPUT if self.bad_input else EXIT_OK


def cmd_generate(args: argparse.Namespace) -> int:
    run = _checked_run(args)
    _drop_unusable(args, run)
    if run.jobs:
        pipe = _load_model(args)
        pipe.interpolation_weights = run.rife or pipe.interpolation_weights
        total_steps = run.kwargs.get("num_steps") or pipe.defaults["num_steps"]
        for i, job in enumerate(run.jobs, 1):
            if not _make_video(args, run, pipe, job, i, total_steps):
                break
        if run.made and not run.runtime_failed:
            _compile_after(args, pipe)
    _report(run.failures, run.made, run.several)
    TIMELINE.mark("end")
    if args.timings:
        print(f"{PROG}: timings {TIMELINE.as_json()}", file=sys.stderr, flush=True)
    return run.exit_status()


def _checked_run(args: argparse.Namespace) -> _Run:
    """Every value and the output plan, checked: nothing heavy happens before all of them are right."""
    kwargs = generate_kwargs(args)
    seeds = parse_seeds(args)
    fps = parse_fps(args.fps)
    fmt = _choice("--format", args.format, OUTPUT_FORMATS)
    args.dtype = _choice("--dtype", args.dtype, DTYPES)
    args.memory = _choice("--memory", args.memory, MEMORY_MODES)
    jobs, fmt = plan(args, seeds, fmt)
    _check_codec(fmt)
    sign = _check_signing(args.sign, fmt)
    check_device(args.device)
    run = _Run(kwargs, fps, sign, jobs, several=len(jobs) > 1 or Path(args.input).is_dir())
    run.preview = parse_preview(args.preview)
    if kwargs.get("interpolate", 1) > 1:
        run.rife = interpolation_weights(args)
    return run


def _check_signing(given: list[str] | None, fmt: str) -> tuple[bytes, bytes] | None:
    """--sign's certificate and key, read now: a missing c2pa extra or file fails before the model loads."""
    if given is None:
        return None
    from .provenance import check_signing

    try:
        return check_signing(_output_suffix(fmt), *given)
    except Img2VidError as e:
        raise UsageError(f"--sign: {e}") from None


def _drop_unusable(args: argparse.Namespace, run: _Run) -> None:
    """Outputs that cannot be written and images that cannot be read: reported now, not after a model load."""
    ready = []
    for job, problem in _check_outputs(run.jobs, args.overwrite):
        if problem is None:
            ready.append(job)
        else:
            run.fail(problem)
    from .image import load_image  # imports torch: only now that the arguments are known to be right

    unreadable = set()
    for image in dict.fromkeys(job.image for job in ready):  # each image once, in order
        try:
            load_image(image).close()
        except ImageError as e:
            unreadable.add(image)
            run.fail(str(e))
    run.jobs = [job for job in ready if job.image not in unreadable]


def _load_model(args: argparse.Namespace):
    TIMELINE.mark("arguments checked")
    import img2vid

    TIMELINE.mark("torch imported")
    started = time.perf_counter()
    pipe = img2vid.load(
        args.model,
        device=args.device,
        dtype=args.dtype,
        memory=args.memory,
        accel=_accel_choice(args),
    )
    TIMELINE.mark("model loaded")
    dtype_name = str(pipe.dtype).removeprefix("torch.")
    mode = getattr(pipe, "memory", args.memory)
    reason = getattr(pipe, "memory_reason", "")
    _info(
        args,
        f"loaded {pipe.source} on {pipe.device}, {dtype_name}, memory mode {mode}"
        + (f" ({reason})" if reason else "")
        + f", in {_duration(time.perf_counter() - started)}",
    )
    return pipe


def _make_video(args: argparse.Namespace, run: _Run, pipe, job: Job, i: int, total_steps: int) -> bool:
    """Generate and write one job's video; False when the run must stop (a run-time failure)."""
    global _active
    label = f"[{i}/{len(run.jobs)}] {job.label}" if len(run.jobs) > 1 else job.label
    fps = (run.kwargs.get("fps_id", 6) + 1) * run.kwargs.get("interpolate", 1)
    progress = None if args.quiet else Progress(label, total_steps, preview=run.preview, fps=fps)
    _active = progress
    t0 = time.perf_counter()
    try:
        video = pipe.generate(str(job.image), seed=job.seed, callback=progress, **run.kwargs)
        if progress is not None:
            progress.set_phase("writing")
        path = video.save(job.output, overwrite=args.overwrite, fps=run.fps, sign=run.sign)
    except Img2VidError as e:  # a bad image, too large for the memory, an output that appeared meanwhile
        if args.debug:
            raise
        run.fail(str(e))
        return True
    except Exception as e:
        if args.debug:
            raise
        _stop_after(e, run, job, len(run.jobs) - i)
        return False
    finally:
        if progress is not None:
            progress.clear()
        _active = None
    run.made += 1
    TIMELINE.mark(f"video {i} written")
    TIMELINE.videos.append(video.params.get("timings", {}))
    play = run.fps if run.fps is not None else video.fps
    print(
        f"wrote {path}: {video.num_frames} frames, {video.width}x{video.height}, {play:g} fps, "
        f"seed {video.params.get('seed', job.seed)}, {time.perf_counter() - t0:.1f} s",
        flush=True,
    )
    return True


def _stop_after(e: Exception, run: _Run, job: Job, left: int) -> None:
    _runtime_error(e, job.label if run.several else None)
    run.failures.append(f"{job.label}: {type(e).__name__}: {_first_line(e)}")
    run.runtime_failed = True
    if left:  # out of memory or a broken device: the next ones would fail the same way
        print(f"{PROG}: stopping; {left} video(s) not made", file=sys.stderr, flush=True)


def _add_warmup_parser(sub) -> None:
    p = sub.add_parser(
        "warmup",
        help="compile for this GPU now, so that later videos of a size start fast",
        description="Load the model, run one denoising step at the given size and frame count, and build the "
        "compiled artifacts that are missing for them (minutes for the full-size networks, once per GPU, torch "
        "version, dtype and size; kept in img2vid's cache). `generate` builds them after its videos anyway; "
        "this does it ahead of time, e.g. when a machine is set up.",
    )
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"model preset, file, folder or hub id (default {DEFAULT_MODEL})",
    )
    p.add_argument("--size", metavar="WxH", help="video size (default: the model's, 1024x576)")
    p.add_argument("--frames", type=int, help="frame count (default: the model's)")
    p.add_argument("--device", help="e.g. cuda:1 (default: cuda)")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), help="default fp16 on CUDA")
    p.add_argument("--memory", default="auto", choices=MEMORY_MODES, help="memory mode to compile for")
    _add_accel_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    p.set_defaults(func=cmd_warmup)


def cmd_warmup(args: argparse.Namespace) -> int:
    width, height = parse_size(args.size) if args.size else (None, None)
    import img2vid

    pipe = img2vid.load(
        args.model, device=args.device, dtype=args.dtype, memory=args.memory, accel=_accel_choice(args)
    )
    if not pipe.accel.on("compiled"):
        _error(f"nothing to compile: {pipe.accel.paths['compiled']}")
        return EXIT_BAD_INPUT
    built = pipe.warmup(width, height, args.frames, progress=lambda text: _info(args, text))
    _info(args, f"{built} artifact(s) built; videos of this size now start fast")
    return EXIT_OK


def _add_accel_options(r) -> None:
    r.add_argument(
        "--accel",
        metavar="PATHS",
        default=None,
        help="fast paths: auto (every one that can run here, the default), none, or a comma-separated list of "
        "channels_last, flash_attention, quack_geglu, compiled (see img2vid doctor)",
    )
    r.add_argument(
        "--no-compile",
        action="store_true",
        help="never compile: run the networks eagerly and build no compiled artifacts",
    )


def _accel_choice(args: argparse.Namespace):
    """--accel, less `compiled` with --no-compile; None: the default (IMG2VID_ACCEL, else auto)."""
    if not getattr(args, "no_compile", False):
        return args.accel
    from .accel import without_compiled

    return without_compiled(args.accel)


def _compile_after(args: argparse.Namespace, pipe) -> None:
    """After the videos are written: compile the shapes that ran eagerly, so that later runs load them."""
    missing = pipe.missing_compiled()
    if (
        not missing or pipe.compiled_backend(progress=lambda text: _info(args, text)) != "aot"
    ):  # torch.compile's graphs would die with this process
        return
    print(
        f"{PROG}: compiling for this GPU so that later runs at this size are faster (once, a few minutes; "
        "Ctrl-C skips it, the videos are kept; --no-compile never does this): " + ", ".join(missing),
        file=sys.stderr,
        flush=True,
    )
    try:
        pipe.build_missing(progress=lambda text: _info(args, text))
        TIMELINE.mark("compiled after")
    except KeyboardInterrupt:
        print(f"{PROG}: compiling skipped; the next run compiles again", file=sys.stderr, flush=True)


def _report(failures: list[str], made: int, several: bool) -> None:
    """After a folder or multi-seed run: what was made and what failed (each failure was also shown as it
    happened)."""
    if not several or not failures:
        return
    print(f"{PROG}: made {made} video(s); {len(failures)} failed:", file=sys.stderr)
    for message in failures:
        print(f"  {message}", file=sys.stderr)
    sys.stderr.flush()


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def cmd_models(args: argparse.Namespace) -> int:
    from .checkpoint import cached_path

    rows = [("NAME", "FRAMES", "STEPS", "CFG", "LOCAL", "DESCRIPTION")]
    weights = []
    for name, cfg in PRESETS.items():
        d = cfg.defaults
        if cfg.hub_id is None:
            local, where = "-", "weights: none, random (built in)"
        else:
            path = cached_path(cfg.hub_id, cfg.filename)
            local = "yes" if path else "no"
            where = f"weights: {cfg.hub_id} / {cfg.filename}" + (f"  (cached: {path})" if path else "")
        rows.append(
            (
                name,
                str(d.num_frames),
                str(d.num_steps),
                f"{d.min_cfg:.1f}-{d.max_cfg:.1f}",
                local,
                cfg.description,
            )
        )
        weights.append(where)
    lines = _table(rows)
    indent = " " * (max(len(r[0]) for r in rows) + 2)
    print(lines[0])
    for line, where in zip(lines[1:], weights, strict=True):
        print(line)
        print(indent + where)
    print(
        "\nWeights not cached are downloaded on first use (the stabilityai repositories are gated: accept the "
        "license on huggingface.co and log in or set HF_TOKEN). Any .safetensors file, diffusers folder or hub "
        "id also works as --model."
    )
    return EXIT_OK


def _doctor_model(name: str) -> list[tuple[str, str]]:
    from .checkpoint import cached_path, is_diffusers_folder

    cfg = PRESETS.get(name)
    if cfg is not None and cfg.hub_id is None:
        return [(f"model {name}", "random weights, built in: nothing to download")]
    if cfg is not None:
        path = cached_path(cfg.hub_id, cfg.filename)
        return [
            (f"model {name}", f"downloads {cfg.filename} from https://huggingface.co/{cfg.hub_id}"),
            ("  cached", str(path) if path else "no (downloaded on first use)"),
        ]
    p = Path(name).expanduser()
    if p.exists():
        if p.is_dir():
            kind = (
                "a diffusers folder" if is_diffusers_folder(p) else "a folder, but not a diffusers SVD folder"
            )
        else:
            kind = "a file" + ("" if p.suffix.lower() == ".safetensors" else " (only .safetensors is read)")
        return [(f"model {name}", f"local: {kind}")]
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        known = next((c for c in PRESETS.values() if c.hub_id == name), None)
        filename = known.filename if known else "model_index.json"
        path = cached_path(name, filename)
        what = f"{filename}" if known else "the diffusers parts"
        return [
            (f"model {name}", f"hub repository: downloads {what}"),
            ("  cached", str(path) if path else "no (downloaded on first use)"),
        ]
    return [(f"model {name}", f"not a preset ({', '.join(PRESETS)}), an existing path or a hub id")]


def cmd_doctor(args: argparse.Namespace) -> int:
    rows: list[tuple[str, str]] = [
        ("img2vid", __version__),
        ("python", f"{sys.version.split()[0]} ({sys.executable})"),
    ]
    for name, section in (
        ("torch", _doctor_torch),
        ("video", _doctor_video),
        ("hub", lambda: _doctor_hub(args.model)),
    ):
        try:
            rows.extend(section())
        except Exception as e:  # doctor reports; it never fails
            rows.append((name, f"error: {type(e).__name__}: {e}"))
    width = max(len(k) for k, _ in rows) + 2
    for key, value in rows:
        print(f"{key + ':':<{width}}{value}")
    return EXIT_OK


def _doctor_torch() -> list[tuple[str, str]]:
    import torch

    from . import memory
    from .pipeline import default_device, default_dtype

    out = [("torch", torch.__version__)]
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "none (CPU-only build)"
    if getattr(torch.version, "hip", None):
        build = f"ROCm {torch.version.hip}"
    out.append(("  GPU build", build))
    available = torch.cuda.is_available()
    out.append(("  CUDA available", "yes" if available else "no"))
    for i in range(torch.cuda.device_count() if available else 0):
        props = torch.cuda.get_device_properties(i)
        free = memory.free_vram_gib(torch.device(f"cuda:{i}"))
        free_text = f", {free:.1f} GiB free" if free is not None else ""
        out.append((f"  GPU {i}", f"{props.name}, {props.total_memory / 2**30:.1f} GiB{free_text}"))
    device = default_device()
    mode, why = memory.choose_memory_mode(device, "auto")
    dtype = str(default_dtype(device)).removeprefix("torch.")
    out.append(("  default device", f"{device}, {dtype}"))
    out.append(("  memory mode (auto)", f"{mode} ({why})"))
    return out + _fast_path_lines(device, default_dtype(device), mode)


def _fast_path_lines(device, dtype, memory: str) -> list[tuple[str, str]]:
    """The fast-path report `load` would give here (img2vid.accel), and the compiled artifacts kept."""
    from . import accel

    out = []
    for line in accel.availability(device, dtype, memory).lines():
        name, state = line.split(": ", 1)
        out.append((f"  {name}", state))
    folder = accel.compiled.cache_root() / "compiled"
    artifacts = list(folder.glob("*.pt2")) if folder.is_dir() else []
    size = sum(p.stat().st_size for p in artifacts) / 2**20
    out.append(("  compiled artifacts", f"{len(artifacts)} in {folder} ({size:.0f} MiB)"))
    return out


def _doctor_video() -> list[tuple[str, str]]:
    from PIL import __version__ as pil_version

    from .video import codecs_available

    try:
        import av

        ffmpeg = getattr(av, "ffmpeg_version_info", None)
        out = [("PyAV", av.__version__ + (f" (FFmpeg {ffmpeg})" if ffmpeg else ""))]
    except ImportError:
        out = [("PyAV", "not installed (needed for mp4, webm and gif): pip install av")]
    out.append(("Pillow", pil_version))
    codecs = codecs_available()
    out.append(("  codecs", ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in codecs.items())))
    return out


def _doctor_hub(model: str) -> list[tuple[str, str]]:
    out = _doctor_model(model)
    try:
        from huggingface_hub import __version__ as hub_version
        from huggingface_hub.constants import HF_HUB_CACHE

        out.append(("huggingface_hub", f"{hub_version}, cache {HF_HUB_CACHE}"))
    except ImportError:
        out.append(("huggingface_hub", "not installed: pip install huggingface_hub"))
    offline = os.environ.get("HF_HUB_OFFLINE")
    out.append(("  HF_HUB_OFFLINE", f"set ({offline})" if offline else "not set"))
    out.append(("  HF_TOKEN", "set" if os.environ.get("HF_TOKEN") else "not set"))  # never its value
    return out


# ------------------------------------------------------------------------------------------------------------
# Entry point


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default sys.argv[1:]) and return the exit status."""
    global _active
    TIMELINE.mark("main")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version and usage errors (argparse already printed them)
        return e.code if isinstance(e.code, int) else EXIT_BAD_INPUT if e.code else EXIT_OK
    debug = bool(getattr(args, "debug", False))
    logger = logging.getLogger("img2vid")
    handler, old_level = _LogHandler(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if debug else logging.WARNING)
    old_sigterm = _on_sigterm_raise()
    try:
        return args.func(args)
    except (KeyboardInterrupt, Terminated) as e:
        _clear_progress()
        terminated = isinstance(e, Terminated)
        print(f"\n{PROG}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr, flush=True)
        return EXIT_TERMINATED if terminated else EXIT_INTERRUPTED
    except Img2VidError as e:
        if debug:
            raise
        _error(str(e))
        return EXIT_BAD_INPUT
    except Exception as e:
        if debug:
            raise
        _runtime_error(e)
        return EXIT_RUNTIME
    finally:
        _active = None
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        if old_sigterm is not None:
            signal.signal(signal.SIGTERM, old_sigterm)


class Terminated(BaseException):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that half-written outputs are removed on the way."""


def _raise_terminated(signum, frame):
    raise Terminated


def _on_sigterm_raise():
    """Make SIGTERM raise Terminated while the command runs; returns the handler to restore (None: not set)."""
    if threading.current_thread() is not threading.main_thread():
        return None  # only the main thread may set handlers (tests may run main() elsewhere)
    return signal.signal(signal.SIGTERM, _raise_terminated)
