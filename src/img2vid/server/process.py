"""A worker whose pipeline runs in a child process, so that a generation that dies takes only its job.

The kernel's out-of-memory killer, or a crash in a native library, ends the child instead of the server:
the job it was running fails with the reason, and a new child loads the model again while the server
answers and the queue waits. Bytes, dicts and numbers cross the pipe, as the Worker interface promises.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import Img2VidError
from .worker import JobResult, LocalWorker, Progress, RemoteWorker, WorkerLost

log = logging.getLogger("img2vid.server")


class ProcessWorker(RemoteWorker):
    """Like LocalWorker(load=...), with the model in a child process (`load` must be picklable, e.g. a
    functools.partial of img2vid.load)."""

    def __init__(self, load: Callable[[], Any], *, name: str | None = None, log_level: str = "WARNING"):
        super().__init__(load, name, log_level)
        self._proc = self._conn = None

    def start(self) -> None:
        if self._proc is None:
            self._spawn()

    def _spawn(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
        self._conn, child_end = ctx.Pipe()
        self._proc = ctx.Process(
            target=_child_main, args=(child_end, self._load, self._log_level), name="img2vid-worker"
        )
        self._proc.start()
        child_end.close()
        threading.Thread(
            target=self._await_model, args=(self._conn,), name="img2vid-load", daemon=True
        ).start()

    def _await_model(self, conn) -> None:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            message = ("error", f"the worker process ended while loading the model ({self._exit_text()})")
        if message[0] == "ready":
            self._info, self._profile, self._capacity = message[1:]
            self._ready.set()
        elif not self._closed:
            self._error = message[1]
            log.error("%s", self._error)

    def run(self, job_id: str, image: bytes, params: dict, on_progress: Progress) -> JobResult:
        with self._lock:
            if not self._ready.is_set():
                raise WorkerLost("the worker has no model loaded")
            try:
                kind, value, capacity = self._exchange(("run", job_id, image, params), on_progress)
            except (EOFError, OSError):
                raise Img2VidError(self._restart()) from None
        self._capacity = capacity
        if kind == "raised":
            raise value
        return value

    def _exchange(self, request, on_progress: Progress):
        """Send a job and answer its progress until its outcome comes back."""
        self._conn.send(request)
        while True:
            message = self._conn.recv()
            if message[0] != "progress":
                return message
            self._conn.send(bool(on_progress(*message[1:])))  # step, total and the info dict

    def _restart(self) -> str:
        """The child died under a job: say why for the job, and load the model again in a new child."""
        self._ready.clear()
        why = f"the worker process died while running this job ({self._exit_text()})"
        if not self._closed:  # close() ends a child that outlived the shutdown's wait: no new one then
            log.error("%s; starting a new one", why)
            self._spawn()
        return why

    def _exit_text(self) -> str:
        self._proc.join(5)
        code = self._proc.exitcode
        if code is None:
            return "it stopped answering"
        if code == -signal.SIGKILL:
            return "killed by SIGKILL, as the kernel does when memory runs out"
        if code < 0:
            return f"killed by signal {signal.Signals(-code).name}"
        return f"exit status {code}"

    def close(self) -> None:
        self._closed = True
        self._ready.clear()
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(OSError):
            self._conn.send(("exit",))
        proc.join(10)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)
        self._conn.close()


def _child_main(conn, load: Callable[[], Any], log_level: str) -> None:
    # Ctrl-C in a terminal reaches the whole process group; the server stops this child itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s (worker): %(message)s")
    try:
        worker = LocalWorker(load())
    except Exception as e:
        conn.send(("error", f"the model failed to load: {type(e).__name__}: {e}"))
        return
    from .. import memory

    conn.send(("ready", worker.info(), memory.profile(worker.pipeline), worker.capacity))
    while True:
        try:
            request = conn.recv()
        except EOFError:  # the server is gone
            return
        if request[0] == "exit":
            return
        _, job_id, image, params = request

        def on_progress(step: int, total: int, info: dict | None = None) -> bool:
            conn.send(("progress", step, total, info or {}))
            return conn.recv()

        try:
            outcome = ("done", worker.run(job_id, image, params, on_progress))
        except Exception as e:
            outcome = ("raised", _portable(e))
        conn.send((*outcome, worker.capacity))
        worker.compile_missing()


def _exit_with_parent(parent: int) -> None:
    # A server killed by SIGKILL cannot stop its child; the restarted server re-queues the job, which must
    # not run here at the same time.
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _portable(e: Exception) -> Exception:
    """`e` as an exception that survives pickling: some img2vid errors take other arguments than their
    message, which unpickling cannot give back."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        if isinstance(e, Img2VidError):
            return Img2VidError(str(e))
        return RuntimeError(f"{type(e).__name__}: {e}")
