"""Moves jobs from the store to idle workers and writes their progress and results back.

One slot thread per worker: it claims the oldest queued job (FIFO), calls worker.run, and records the
outcome. With remote workers, run() is a blocking remote call, so the same loop works unchanged.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from ..errors import Cancelled, Img2VidError
from .store import Job, JobStore
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
        self._cancel_lock = threading.Lock()
        self._threads: list[threading.Thread] = []

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

    def cancel(self, job_id: str) -> None:
        with self._cancel_lock:
            self._cancel.add(job_id)

    def _canceled(self, job_id: str) -> bool:
        with self._cancel_lock:
            return job_id in self._cancel

    def _wait(self, seconds: float) -> None:
        with self._wake:
            if not self._stopping.is_set():
                self._wake.wait(seconds)

    def _slot(self, worker: Worker) -> None:
        while not self._stopping.is_set():
            if not worker.ready():
                if worker.error():
                    return  # never going to work; /readyz reports why
                self._wait(0.2)
                continue
            try:
                job = self.store.claim_next()
            except Exception:
                log.exception("claiming a job failed")
                self._wait(self.poll_s)
                continue
            if job is None:
                self._wait(self.poll_s)
                continue
            try:
                self._run(worker, job)
            except Exception:
                # Only the store can fail here (disk full, closed at shutdown); keep the slot alive.
                log.exception("recording the outcome of job %s failed", job.id)
                self._wait(self.poll_s)

    def _run(self, worker: Worker, job: Job) -> None:
        job_id = job.id
        if job.cancel_requested:
            self.cancel(job_id)

        def on_progress(step: int, total: int) -> bool:
            try:
                self.store.set_progress(job_id, step, total)
            except Exception:
                log.exception("recording progress of %s failed", job_id)
            return not (self._stopping.is_set() or self._canceled(job_id))

        log.info("job %s: started (attempt %d)", job_id, job.attempts)
        try:
            image = self.store.read_image(job)
            result = worker.run(job_id, image, dict(job.params), on_progress)
        except Cancelled:
            if self._canceled(job_id):
                self.store.mark_canceled(job_id)
                log.info("job %s: canceled", job_id)
            else:
                self.store.requeue(job_id, count_attempt=False)
                log.info("job %s: interrupted by shutdown, queued again", job_id)
        except WorkerLost as e:
            if job.attempts >= self.store.max_attempts:
                self.store.fail(job_id, f"the worker running this job was lost {job.attempts} times: {e}")
            else:
                self.store.requeue(job_id, count_attempt=True)
            log.warning("job %s: worker lost: %s", job_id, e)
        except Img2VidError as e:
            self.store.fail(job_id, str(e))
            log.info("job %s: failed: %s", job_id, e)
        except Exception as e:
            log.exception("job %s: crashed", job_id)
            self.store.fail(job_id, f"internal error: {type(e).__name__}: {e}")
        else:
            if self._canceled(job_id):
                # The cancel came after the last step; the user asked for no video, so keep none.
                self.store.mark_canceled(job_id)
            else:
                self.store.succeed(job_id, result.video, {**result.params, "fps": result.fps})
                log.info("job %s: succeeded", job_id)
        finally:
            with self._cancel_lock:
                self._cancel.discard(job_id)
