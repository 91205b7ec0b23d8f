"""What a running job is doing beyond its stored step: its phase, its ETA and its latest preview image.

Held in the API process's memory only (a preview is worth nothing after a restart), for the last MAX_JOBS jobs.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, replace

MAX_JOBS = 64  # previews are a few tens of KB: a bounded few MB at most


@dataclass(frozen=True)
class Live:
    phase: str | None = None
    eta_s: float | None = None
    preview: bytes | None = None
    preview_type: str | None = None
    version: int = 0  # counts the previews: a client fetches again when it changes


class LiveJobs:
    """Thread-safe: dispatcher slots write, API requests read."""

    def __init__(self, max_jobs: int = MAX_JOBS):
        self.max_jobs = max_jobs
        self._jobs: OrderedDict[str, Live] = OrderedDict()
        self._lock = threading.Lock()

    def start(self, job_id: str) -> None:
        """A job (or its retry) begins: nothing known yet."""
        self._put(job_id, Live())

    def update(self, job_id: str, info: dict | None) -> None:
        """A worker's progress info: {"phase", "eta_s", and sometimes "preview" (bytes) with "preview_type"}."""
        if not info:
            return
        with self._lock:
            old = self._jobs.get(job_id, Live())
        new = replace(old, phase=info.get("phase", old.phase), eta_s=info.get("eta_s"))
        if isinstance(info.get("preview"), bytes):
            kind = info.get("preview_type") or "image/webp"
            new = replace(new, preview=info["preview"], preview_type=kind, version=old.version + 1)
        self._put(job_id, new)

    def get(self, job_id: str) -> Live | None:
        with self._lock:
            return self._jobs.get(job_id)

    def _put(self, job_id: str, live: Live) -> None:
        with self._lock:
            self._jobs[job_id] = live
            self._jobs.move_to_end(job_id)
            while len(self._jobs) > self.max_jobs:
                self._jobs.popitem(last=False)
