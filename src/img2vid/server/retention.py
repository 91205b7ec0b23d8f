"""Output retention: finished jobs' files deleted when older than N days, or oldest first while all jobs'
files together take more than X GB. The job rows stay (status, parameters, `files_deleted`); queued and
running jobs' files are never touched.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from .store import JobStore

log = logging.getLogger("img2vid.server")


def folder_bytes(folder: Path) -> int:
    try:
        return sum(e.stat().st_size for e in os.scandir(folder) if e.is_file())
    except FileNotFoundError:
        return 0


def sweep(
    store: JobStore, max_age_s: float | None, max_bytes: int | None, now: float | None = None
) -> list[str]:
    """Delete what the limits say must go, oldest finished first; returns the job ids whose files went."""
    now = time.time() if now is None else now
    finished = store.finished_with_files()
    doomed = [j.id for j in finished if max_age_s is not None and (j.finished or 0) < now - max_age_s]
    if max_bytes is not None:
        sizes = {j.id: folder_bytes(store.job_dir(j.id)) for j in finished}
        # Unfinished jobs count against the limit too, though only finished ones can give room back.
        total = sum(folder_bytes(Path(e.path)) for e in os.scandir(store.jobs_dir) if e.is_dir())
        total -= sum(sizes[i] for i in doomed)
        for job in finished:
            if total <= max_bytes:
                break
            if job.id not in doomed:
                doomed.append(job.id)
                total -= sizes[job.id]
    for job_id in doomed:
        store.delete_files(job_id)
    if doomed:
        log.info("retention: deleted the files of %d finished jobs", len(doomed))
    return doomed


class Janitor:
    """Runs sweep() every `interval_s` and soon after a job finishes (wake())."""

    def __init__(
        self, store: JobStore, max_age_s: float | None, max_bytes: int | None, interval_s: float = 300
    ):
        self.store, self.max_age_s, self.max_bytes, self.interval_s = store, max_age_s, max_bytes, interval_s
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="img2vid-retention", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self, job_id: str | None = None) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        self._thread.join(30)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                sweep(self.store, self.max_age_s, self.max_bytes)
            except Exception:  # a failed sweep is retried at the next one; the server goes on
                log.exception("retention: sweeping the job files failed")
            self._wake.wait(self.interval_s)
            self._wake.clear()
