"""What a worker is: something that turns (image bytes, parameters) into mp4 bytes.

The API process keeps the job store and every file; a worker only computes. `LocalWorker` runs a pipeline
in this process, `ProcessWorker` (server.process) in a child process, `RayWorker` (server.ray_worker) in a Ray
actor, which is why everything crossing the interface is plain bytes, dicts and numbers.
"""

from __future__ import annotations

import gc
import logging
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

log = logging.getLogger("img2vid.server")

# on_progress(step, total, info) -> keep going? False asks the worker to stop at once and raise errors.Cancelled.
# info, a plain dict (optional: older workers give only step and total): "phase" (img2vid.progress.PHASES),
# "eta_s", and now and then "preview" (bytes of an animated image of every frame) with "preview_type".
Progress = Callable[..., bool]


@dataclass
class JobResult:
    video: bytes  # the encoded mp4
    params: dict = field(
        default_factory=dict
    )  # the parameters the pipeline actually used (defaults resolved)
    fps: float | None = None


class WorkerLost(RuntimeError):
    """The worker died mid-job (process gone, actor lost): the job was not at fault, so it may be retried."""


@runtime_checkable
class Worker(Protocol):
    def start(self) -> None:
        """Begin loading the model; must not block."""

    def ready(self) -> bool:
        """True once `run` can be called."""

    def error(self) -> str | None:
        """Why the worker can never become ready (model failed to load), else None."""

    def info(self) -> dict:
        """{"model": name, "device": str, "defaults": {param: value}}; valid once ready."""

    def check(self, params: dict, image_size: tuple[int, int]) -> None:
        """Raise errors.ParameterError (NotEnoughMemory: too large for this worker's memory) for a job it
        could never run; called before the job is queued. Optional: a worker without it is not asked."""

    def run(self, job_id: str, image: bytes, params: dict, on_progress: Progress) -> JobResult:
        """Generate one video. Raises errors.Cancelled when on_progress returned False, errors.Img2VidError
        for a problem with the job's input, WorkerLost when the worker itself went away."""

    def close(self) -> None:
        """Free the model."""


def _plain(value: Any) -> Any:
    """numpy/torch scalars and paths from the pipeline -> JSON-safe values."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if hasattr(value, "item"):
        try:
            return value.item()
        except (ValueError, TypeError):
            pass
    return str(value)


def check_memory(model, capacity: int | None, params: dict, image_size: tuple[int, int]) -> None:
    """Worker.check for a worker whose `model` (pipeline or memory.Profile) has `capacity` bytes free while
    idle; nothing to check before the worker has measured them."""
    if model is None or capacity is None:
        return
    from .. import memory
    from ..image import target_size

    width, height = target_size(image_size, params.get("width"), params.get("height"))
    memory.check(model, width, height, params, free=capacity)


class RemoteWorker:
    """What ProcessWorker and RayWorker share: a model loaded elsewhere, its state as the last message said."""

    def __init__(self, load: Callable[[], Any], name: str | None, log_level: str):
        self._load, self._name, self._log_level = load, name, log_level
        self._lock = threading.Lock()  # one job at a time, and no restart under a running job
        self._ready = threading.Event()
        self._info: dict = {}
        self._profile = None  # memory.Profile of the remote pipeline
        self._capacity: int | None = None  # bytes free on its device while idle
        self._error: str | None = None
        self._closed = False

    def ready(self) -> bool:
        return self._ready.is_set()

    def error(self) -> str | None:
        return self._error

    def info(self) -> dict:
        return self._info or {"model": self._name, "device": None, "defaults": {}}

    def check(self, params: dict, image_size: tuple[int, int]) -> None:
        check_memory(self._profile, self._capacity, params, image_size)


class ProgressReports:
    """generate's callback for a worker: each Progress as on_progress(step, total, info) with plain values, and a
    preview encoded here (so that bytes cross the worker seam) only as often as ~1% of the time allows."""

    def __init__(self, on_progress: Progress, params: dict):
        from ..preview import Throttle, default_suffix

        self.on_progress, self.throttle, self.suffix = on_progress, Throttle(), default_suffix()
        fps_id = params.get("fps_id")
        self.fps = (6 if fps_id is None else fps_id) + 1
        self.step = self.total = 0

    def __call__(self, p) -> bool:
        from ..preview import FORMATS, encode

        self.step, self.total = int(p.step), int(p.total)
        info = {"phase": p.phase, "eta_s": p.eta_s}
        # p.preview is None for the report that starts sampling, which has steps before it under extend.
        if p.phase == "sampling" and p.step and p.preview is not None:
            data = self.throttle.run(lambda: encode(p.preview, self.fps, self.suffix))
            if data is not None:
                info.update(preview=data, preview_type=FORMATS[self.suffix][1])
        return bool(self.on_progress(self.step, self.total, info))

    def phase(self, name: str) -> None:
        """A phase after generate (writing): reported, but too late to stop at."""
        self.on_progress(self.step, self.total, {"phase": name, "eta_s": None})


class LocalWorker:
    """A pipeline in this process. Pass a loaded `pipeline`, or a `load` callable that is run on a thread
    by start() so the server answers (/healthz, /readyz = 503) while weights load."""

    def __init__(self, pipeline=None, *, load: Callable[[], Any] | None = None, name: str | None = None):
        if (pipeline is None) == (load is None):
            raise ValueError("give exactly one of pipeline or load")
        self._pipe = pipeline
        self._load = load
        self._name = name
        self._error: str | None = None
        self._loaded = threading.Event()
        self._busy = threading.Lock()
        self._thread: threading.Thread | None = None
        self._capacity: int | None = None  # bytes free on the device while idle, for check()
        if pipeline is not None:
            self._measure_capacity()
            self._loaded.set()

    def start(self) -> None:
        if self._loaded.is_set() or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._load_now, name="img2vid-load", daemon=True)
        self._thread.start()

    def _load_now(self) -> None:
        try:
            self._pipe = self._load()
            self._measure_capacity()
        except Exception as e:
            log.exception("loading the model failed")
            self._error = f"the model failed to load: {type(e).__name__}: {e}"
        else:
            self._loaded.set()

    def _measure_capacity(self) -> None:
        from .. import memory

        self._capacity = memory.free_bytes(self._pipe.device)

    def check(self, params: dict, image_size: tuple[int, int]) -> None:
        # Not loaded yet: generate() checks against the memory free when the job runs.
        check_memory(self._pipe, self._capacity, params, image_size)

    @property
    def pipeline(self):
        return self._pipe

    @property
    def capacity(self) -> int | None:
        """Bytes free on the device while idle (measured when loaded and after each job), for check()."""
        return self._capacity

    def ready(self) -> bool:
        return self._loaded.is_set()

    def error(self) -> str | None:
        return self._error

    def info(self) -> dict:
        pipe = self._pipe
        if pipe is None:
            return {"model": self._name, "device": None, "defaults": {}}
        return {
            "model": getattr(pipe, "name", self._name),
            "device": str(getattr(pipe, "device", "")) or None,
            "defaults": _plain(dict(getattr(pipe, "defaults", {}) or {})),
        }

    def run(self, job_id: str, image: bytes, params: dict, on_progress: Progress) -> JobResult:
        if not self.ready():
            raise WorkerLost("the worker has no model loaded")
        # None means "model default": leave those out so the pipeline's own defaults apply.
        kwargs = {k: v for k, v in params.items() if v is not None}
        callback = ProgressReports(on_progress, params)
        with self._busy:
            video = None
            try:
                video = self._pipe.generate(image, callback=callback, **kwargs)
                callback.phase("writing")
                # A private temp file: the encoder wants a path, and the API's disk is not the worker's.
                with tempfile.TemporaryDirectory(prefix="img2vid-") as tmp:
                    path = video.save(Path(tmp) / "out.mp4")
                    data = Path(path).read_bytes()
                return JobResult(
                    video=data, params=_plain(dict(getattr(video, "params", {}) or {})), fps=_plain(video.fps)
                )
            except Exception as e:
                if type(e).__name__ == "OutOfMemoryError":
                    from ..errors import Img2VidError

                    raise Img2VidError(
                        "out of GPU memory: try fewer frames, a smaller size or a lower decode_chunk_size"
                    ) from e
                raise
            finally:
                del video
                self._free_memory()
                self._measure_capacity()

    def _free_memory(self) -> None:
        # A canceled or failed run leaves activations behind; hand the memory back before the next job.
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass

    def compile_missing(self) -> None:
        """Compile the shapes the last jobs ran eagerly (see img2vid.accel.compiled): done between jobs, so
        that no job waits for it but the one that arrives meanwhile."""
        pipe = self._pipe
        missing = pipe.missing_compiled() if hasattr(pipe, "missing_compiled") else []
        if not missing:
            return
        log.info("compiling %s between jobs", ", ".join(missing))
        try:
            pipe.build_missing(progress=log.info)
        except Exception:  # compiling is an optimisation: the jobs run eagerly without it
            log.exception("compiling failed; jobs of those shapes keep running eagerly")

    def close(self) -> None:
        self._pipe = None
        self._loaded.clear()
        self._free_memory()
