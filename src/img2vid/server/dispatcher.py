"""Moves jobs from the store to idle workers and writes their progress and results back.

One slot thread per worker: it claims the oldest queued job (FIFO), calls worker.run, and records the
outcome. With remote workers, run() is a blocking remote call, so the same loop works unchanged.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from ..errors import Cancelled, Img2VidError
from .live import LiveJobs
from .store import Job, JobStore, describe_os_error
from .worker import Worker, WorkerLost

log = logging.getLogger("img2vid.server")


class Dispatcher:
    def __init__(self, store: JobStore, workers: Sequence[Worker], poll_s: float = 1.0):
        self.store = store
        self.workers = list(workers)
        self.poll_s = poll_s
        self._wake = threading.Condition()
        self._stopping = threading.Event()
        self._cancel: set[str] = set()
        self._active: set[str] = set()  # the jobs a slot is running now
        self._held: dict[int, str] = {}  # id(worker) -> the job it runs now, for GET /v1/queue
        self._cancel_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.live = LiveJobs()  # phase, ETA and preview of the running jobs

    def start(self) -> None:
        for i, worker in enumerate(self.workers):
            worker.start()
            t = threading.Thread(target=self._slot, args=(worker,), name=f"img2vid-slot-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 30.0) -> None:
        """Running jobs are stopped at their next step and put back in the queue, uncounted."""
        self._stopping.set()
        self.wake()
        for t in self._threads:
            t.join(timeout)
            if t.is_alive():
                # Left "running" in the store: the next start-up treats it like a crash and retries it once.
                log.warning("%s did not stop within %.0f s", t.name, timeout)

    def wake(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def cancel(self, job_id: str) -> bool:
        """Ask a running job to stop at its next step; False when no slot is running it (then nothing will
        ever look at the flag: the caller marks it canceled itself)."""
        with self._cancel_lock:
            if job_id not in self._active:
                return False
            self._cancel.add(job_id)
            return True

    def running_job(self, worker: Worker) -> str | None:
        """The id of the job `worker` is running now, else None."""
        return self._held.get(id(worker))

    def _canceled(self, job_id: str) -> bool:
        with self._cancel_lock:
            return job_id in self._cancel

    def _wait(self, seconds: float) -> None:
        with self._wake:
            if not self._stopping.is_set():
                self._wake.wait(seconds)

    def _claim(self) -> Job | None:
        # Claimed and registered under the cancel lock: cancel() never sees a claimed job as unowned.
        with self._cancel_lock:
            job = self.store.claim_next()
            if job is not None:
                self._active.add(job.id)
                if job.cancel_requested:
                    self._cancel.add(job.id)
            return job

    def _slot(self, worker: Worker) -> None:
        while not self._stopping.is_set():
            if not worker.ready():
                if worker.error():
                    return  # never going to work; /readyz reports why
                self._wait(0.2)
                continue
            try:
                job = self._claim()
            except Exception:
                log.exception("claiming a job failed")
                self._wait(self.poll_s)
                continue
            if job is None:
                self._wait(self.poll_s)
                continue
            self._held[id(worker)] = job.id
            try:
                self._run(worker, job)
            finally:
                self._held.pop(id(worker), None)
                with self._cancel_lock:
                    self._cancel.discard(job.id)
                    self._active.discard(job.id)

    def _run(self, worker: Worker, job: Job) -> None:
        log.info("job %s: started (attempt %d)", job.id, job.attempts)
        try:
            outcome = self._outcome(worker, job)
        except Exception as e:  # the job's own failure: recorded as its error
            outcome = ("failed", _failure_message(job, e))
        try:
            self._record(job, outcome)
        except Exception as e:
            # The result could not be stored (disk full, read-only folder): the job fails with the reason.
            log.error("job %s: %s", job.id, e)
            try:
                self.store.fail(job.id, str(e))
            except Exception:
                log.exception("job %s: recording its failure failed too", job.id)

    def _outcome(self, worker: Worker, job: Job) -> tuple[str, object]:
        """What became of the job: ("succeeded", result), ("canceled", None), ("queued", count_attempt) or
        ("failed", message); raises what the worker raised for a job that failed."""
        job_id = job.id
        reported = []
        self.live.start(job_id)

        def on_progress(step: int, total: int, info: dict | None = None) -> bool:
            self.live.update(job_id, info)
            try:
                self.store.set_progress(job_id, step, total)
            except Exception as e:
                if not reported:  # once per job, not a traceback per step
                    reported.append(e)
                    log.warning("job %s: recording progress failed: %s", job_id, e)
            return not (self._stopping.is_set() or self._canceled(job_id))

        try:
            image = self.store.read_image(job)
            result = worker.run(job_id, image, dict(job.params), on_progress)
        except Cancelled:
            if self._canceled(job_id):
                return "canceled", None
            return "queued", False  # interrupted by our own shutdown: not the job's fault
        except WorkerLost as e:
            log.warning("job %s: worker lost: %s", job_id, e)
            if job.attempts >= self.store.max_attempts:
                return "failed", f"the worker running this job was lost {job.attempts} times: {e}"
            return "queued", True
        # The cancel came after the last step; the user asked for no video, so keep none.
        return ("canceled", None) if self._canceled(job_id) else ("succeeded", result)

    def _record(self, job: Job, outcome: tuple[str, object]) -> None:
        status, value = outcome
        if status == "succeeded":
            self.store.succeed(job.id, value.video, {**value.params, "fps": value.fps})
        elif status == "canceled":
            self.store.mark_canceled(job.id)
        elif status == "queued":
            self.store.requeue(job.id, count_attempt=value)
        else:
            self.store.fail(job.id, value)
        log.info("job %s: %s%s", job.id, status, f": {value}" if status == "failed" else "")


def _failure_message(job: Job, e: Exception) -> str:
    if isinstance(e, Img2VidError):
        return str(e)
    if isinstance(e, OSError):
        return f"could not read or write a file: {describe_os_error(e)}"
    log.error("job %s: crashed", job.id, exc_info=e)
    return f"internal error: {type(e).__name__}: {e}"
