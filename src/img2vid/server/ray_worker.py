"""Workers that are Ray actors: one per GPU of a Ray cluster (or N CPU actors), each loading the model once.

The API process keeps the store and every file, as with any worker: an actor gets (job id, image bytes,
parameters) and hands back the video bytes. Progress is polled from the actor while the job runs, and a
cancel is passed back the same way. An actor that dies (killed, out of memory, its node lost) raises
WorkerLost for its job, which the dispatcher puts back in the queue once; a new actor replaces it.
Only `img2vid serve --ray` imports this module, and with it Ray.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import ray
from ray.exceptions import RayError, RayTaskError

from ..errors import Img2VidError
from .process import _portable
from .worker import JobResult, LocalWorker, Progress, RemoteWorker, WorkerLost

log = logging.getLogger("img2vid.server")
POLL_S = 0.2  # how often a running job's progress is asked for
RESPAWN_WAIT_S = 5.0  # between tries to start an actor that died before it was ready
MAX_FAILED_STARTS = 3  # actors in a row dead before ready: the cluster cannot run one (img2vid missing?)


class Generator:
    """The actor: a LocalWorker around the loaded pipeline. Threaded (max_concurrency=2) so that poll()
    answers while run() generates."""

    def __init__(self, load: Callable[[], Any], log_level: str):
        logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s (actor): %(message)s")
        # The latest report: (count of reports, step, total, info); info as the worker's Progress gives it
        # (phase, eta_s, and a preview kept until a poll has taken it).
        self._progress: tuple[int, int, int, dict] = (0, 0, 0, {})
        self._progress_lock = threading.Lock()
        self._job: str | None = None
        self._stop = threading.Event()
        try:
            self._worker, self._error = LocalWorker(load()), None
        except Exception as e:  # kept to say why: a load that failed would fail again on any restart
            self._worker, self._error = None, f"the model failed to load: {type(e).__name__}: {e}"

    def hello(self) -> tuple:
        """("ready", info, memory profile, free bytes, host) or ("error", why)."""
        if self._error is not None:
            return ("error", self._error)
        from .. import memory

        profile = memory.profile(self._worker.pipeline)
        return ("ready", self._worker.info(), profile, self._worker.capacity, socket.gethostname())

    def run(self, job_id: str, image: bytes, params: dict) -> tuple:
        """(kind, value, free bytes): ("done", JobResult) or ("raised", a picklable exception)."""
        with self._progress_lock:
            self._job, self._progress = job_id, (0, 0, 0, {})
        self._stop.clear()

        def on_progress(step: int, total: int, info: dict | None = None) -> bool:
            with self._progress_lock:
                count, _, _, last = self._progress
                merged = {**last, **(info or {})}  # a preview not yet polled survives a report without one
                self._progress = (count + 1, step, total, merged)
            return not self._stop.is_set()

        try:
            outcome = ("done", self._worker.run(job_id, image, params, on_progress))
        except Exception as e:
            outcome = ("raised", _portable(e))
        finally:
            self._job = None
        self._worker.compile_missing()
        return (*outcome, self._worker.capacity)

    def poll(self, job_id: str, keep_going: bool) -> tuple[int, int, int, dict]:
        """The running job's latest (count of reports, step, total, info); keep_going=False asks it to stop at
        its next step. A preview is handed over once."""
        if not keep_going and self._job == job_id:
            self._stop.set()
        with self._progress_lock:
            count, step, total, info = self._progress
            rest = {k: v for k, v in info.items() if k not in ("preview", "preview_type")}
            self._progress = (count, step, total, rest)
        return count, step, total, info


def _kill(actor) -> None:
    with contextlib.suppress(Exception):  # already gone, or Ray shut down: nothing left to kill
        ray.kill(actor, no_restart=True)


def _reason(e: Exception) -> str:
    """Ray's multi-line error as one line: what happened and, when Ray knows it, why."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip() and not line.startswith("\t")]
    return " ".join(lines[:3]) or type(e).__name__


class RayWorker(RemoteWorker):
    """The Worker interface over one actor; `options` are the actor's Ray options (num_gpus=1, or
    num_cpus=1 for a CPU actor). A dead actor is replaced by a new one, loading the model again."""

    def __init__(
        self, load: Callable[[], Any], options: dict, *, name: str | None = None, log_level="WARNING"
    ):
        super().__init__(load, name, log_level)
        self._options = options
        self._actor = self._host = None
        self.restarts = 0
        self._failed_starts = 0

    @property
    def actor(self):
        return self._actor

    def start(self) -> None:
        if self._actor is None:
            self._spawn()

    def _spawn(self) -> None:
        remote = ray.remote(**{"max_concurrency": 2, "max_restarts": 0, **self._options})(Generator)
        self._actor = actor = remote.remote(self._load, self._log_level)
        threading.Thread(target=self._await_model, args=(actor,), name="img2vid-actor", daemon=True).start()

    def _await_model(self, actor) -> None:
        try:
            message = ray.get(actor.hello.remote())
        except RayError as e:  # died while loading (node lost, killed): try a new one, unless closing
            self._start_failed(actor, _reason(e))
            return
        if message[0] == "ready":
            self._failed_starts = 0
            self._info, self._profile, self._capacity, self._host = message[1:]
            self._ready.set()
        elif not self._closed:
            self._error = message[1]
            log.error("%s", self._error)

    def _start_failed(self, actor, why: str) -> None:
        if self._closed or actor is not self._actor:
            return
        self._failed_starts += 1
        if self._failed_starts >= MAX_FAILED_STARTS:
            self._error = f"{self._failed_starts} Ray actors in a row died before loading the model: {why}"
            log.error("%s", self._error)
            return
        log.error("a Ray actor died while loading the model (%s); starting another", why)
        time.sleep(RESPAWN_WAIT_S)
        self._replace(actor)

    def _replace(self, dead) -> None:
        """A new actor for one that died; the old handle is killed in case Ray still thinks it lives."""
        self._ready.clear()
        _kill(dead)
        if not self._closed and dead is self._actor:
            self.restarts += 1
            self._spawn()

    def describe(self) -> dict:
        """What GET /v1/queue shows of this worker besides its state."""
        actor_id = self._actor._actor_id.hex() if self._actor is not None else None
        return {"kind": "ray", "actor": actor_id, "host": self._host, "restarts": self.restarts}

    def run(self, job_id: str, image: bytes, params: dict, on_progress: Progress) -> JobResult:
        with self._lock:
            actor = self._actor
            if not self._ready.is_set():
                raise WorkerLost("the Ray actor has no model loaded")
            try:
                kind, value, capacity = self._follow(actor, job_id, image, params, on_progress)
            except RayTaskError as e:  # a bug in the actor's own code, not the job's input
                raise Img2VidError(f"internal error in the Ray actor: {_reason(e)}") from None
            except RayError as e:
                log.error("the Ray actor running job %s died: %s; starting another", job_id, _reason(e))
                self._replace(actor)
                raise WorkerLost(f"the Ray actor running this job died: {_reason(e)}") from None
        self._capacity = capacity
        if kind == "raised":
            raise value
        return value

    def _follow(self, actor, job_id: str, image: bytes, params: dict, on_progress: Progress) -> tuple:
        """Start the job on the actor and relay its progress (phase, ETA, preview) and a stop until its outcome
        comes back."""
        ref = actor.run.remote(job_id, image, params)
        keep_going, seen = True, 0
        while not ray.wait([ref], timeout=POLL_S)[0]:
            count, step, total, info = ray.get(actor.poll.remote(job_id, keep_going))
            if count != seen and keep_going:
                seen = count
                keep_going = bool(on_progress(step, total, info))
                if not keep_going:
                    ray.get(actor.poll.remote(job_id, False))
        return ray.get(ref)

    def close(self) -> None:
        self._closed = True
        self._ready.clear()
        if self._actor is not None:
            _kill(self._actor)


def connect(address: str | None) -> dict:
    """Join the Ray cluster at `address` (None: RAY_ADDRESS, else a new local one); its resources."""
    if not ray.is_initialized():
        ray.init(address=address)
    return ray.cluster_resources()


def disconnect() -> None:
    ray.shutdown()


def make_ray_workers(load_on: Callable[[str], Callable], cpu_workers: int | None, **kw) -> list[RayWorker]:
    """One actor per GPU of the cluster (num_gpus=1, device cuda), or `cpu_workers` CPU actors (num_cpus=1,
    device cpu). load_on(device) gives the picklable loader of the model on that device."""
    if cpu_workers:
        return [RayWorker(load_on("cpu"), {"num_cpus": 1}, **kw) for _ in range(cpu_workers)]
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus == 0:
        raise Img2VidError("the Ray cluster has no GPUs: give --ray-workers N for N CPU actors")
    # Ray sets CUDA_VISIBLE_DEVICES in each actor to its own GPU, which "cuda" then means.
    return [RayWorker(load_on("cuda"), {"num_gpus": 1, "num_cpus": 1}, **kw) for _ in range(gpus)]
