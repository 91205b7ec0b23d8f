"""The job store: one SQLite database plus one folder per job under the data directory.

Only the API process touches it; workers get bytes in and hand bytes back. File names inside a job folder
are chosen here, never by a client, and a folder is only ever reached through a validated job id.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except (
    ImportError
):  # pragma: no cover - Windows: no cross-process lock, one server per data dir is on the user
    fcntl = None

log = logging.getLogger("img2vid.server")
JOB_ID = re.compile(r"[0-9a-f]{32}")
STATUSES = ("queued", "running", "succeeded", "failed", "canceled")
FINISHED = ("succeeded", "failed", "canceled")
VIDEO_NAME = "out.mp4"
PRIORITIES = {"low": 0, "normal": 1, "high": 2}
IDEMPOTENCY_S = 24 * 3600  # how long an Idempotency-Key names its job

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    params TEXT NOT NULL,
    resolved TEXT,
    image_name TEXT NOT NULL,
    image_type TEXT NOT NULL,
    video_name TEXT,
    step INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    created REAL NOT NULL,
    started REAL,
    progress_at REAL,
    finished REAL
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    job_id TEXT NOT NULL,
    created REAL NOT NULL
);
"""
# Columns added after the first release: a data directory made by an older server gets them at start-up.
_ADDED_COLUMNS = {
    "priority": "INTEGER NOT NULL DEFAULT 1",
    "webhook": "TEXT",
    "files_deleted": "REAL",
}


class StoreLocked(RuntimeError):
    """Another process already serves this data directory."""


class QueueFull(RuntimeError):
    """create() found `max_queue` jobs already waiting; `.queued` says how many."""

    def __init__(self, queued: int):
        super().__init__(f"the queue is full ({queued} jobs waiting)")
        self.queued = queued


class KeyReused(RuntimeError):
    """create() found its Idempotency-Key already used (within IDEMPOTENCY_S); `.same`: by the same request."""

    def __init__(self, job_id: str, same: bool):
        super().__init__(f"the Idempotency-Key was already used for job {job_id}")
        self.job_id, self.same = job_id, same


class StoreError(RuntimeError):
    """A file or database write failed; the message names the path and the errno. `.full`: out of space."""

    def __init__(self, message: str, full: bool):
        super().__init__(message)
        self.full = full


FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def describe_os_error(e: OSError) -> str:
    """'path: No space left on device (ENOSPC)': the path and the errno, for a job's error and the logs."""
    name = errno.errorcode.get(e.errno, str(e.errno)) if e.errno is not None else type(e).__name__
    where = f"{e.filename}: " if e.filename is not None else ""
    return f"{where}{e.strerror or e} ({name})"


def store_error(e: Exception, what: str) -> StoreError:
    """An OSError or sqlite3.Error from `what` (e.g. "writing the video") as a StoreError."""
    if isinstance(e, OSError):
        return StoreError(f"{what} failed: {describe_os_error(e)}", e.errno in FULL_ERRNOS)
    full = isinstance(e, sqlite3.OperationalError) and "full" in str(e)
    return StoreError(f"{what} failed: the job database: {e}", full)


@dataclass
class Job:
    seq: int
    id: str
    status: str
    params: dict
    resolved: dict | None
    image_name: str
    image_type: str
    video_name: str | None
    step: int
    total: int
    attempts: int
    cancel_requested: bool
    error: str | None
    created: float
    started: float | None
    progress_at: float | None
    finished: float | None
    priority: int = PRIORITIES["normal"]
    webhook: str | None = None  # the URL told when the job ends
    files_deleted: float | None = None  # when retention deleted the job's files

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        d = dict(row)
        d["params"] = json.loads(d["params"])
        d["resolved"] = json.loads(d["resolved"]) if d["resolved"] else None
        d["cancel_requested"] = bool(d["cancel_requested"])
        return cls(**d)


def valid_id(job_id: str) -> bool:
    return isinstance(job_id, str) and JOB_ID.fullmatch(job_id) is not None


class JobStore:
    """Thread-safe: API threads and dispatcher slots share one connection behind one lock."""

    def __init__(self, data_dir: str | os.PathLike, max_attempts: int = 2):
        self.root = Path(data_dir).expanduser().resolve()
        self.jobs_dir = self.root / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.max_attempts = max_attempts
        self._lock_file = None
        if fcntl is not None:
            # Two servers on one data dir would both "recover" each other's running jobs.
            self._lock_file = open(self.root / ".lock", "w")  # noqa: SIM115 - held for the store's lifetime
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._lock_file.close()
                raise StoreLocked(f"another img2vid server is using {self.root}") from None
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.root / "jobs.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._add_columns()
        # Called with a job id each time a job reaches a terminal state (webhooks, retention).
        self.listeners: list[Callable[[str], None]] = []

    def _add_columns(self) -> None:
        have = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for name, decl in _ADDED_COLUMNS.items():
            if name not in have:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {decl}")
        self._db.execute("CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (status, priority DESC, seq)")

    def _finished(self, job_id: str) -> None:
        for listener in self.listeners:
            try:
                listener(job_id)
            except Exception:  # a listener's trouble must never undo or block the job's own record
                log.exception("job %s: a finish listener failed", job_id)

    def close(self) -> None:
        with self._lock:
            self._db.close()
            if self._lock_file is not None:
                self._lock_file.close()
                self._lock_file = None

    # -- files -------------------------------------------------------------------------------------------

    def job_dir(self, job_id: str) -> Path:
        if not valid_id(job_id):
            raise KeyError(job_id)
        return self.jobs_dir / job_id

    def image_path(self, job: Job) -> Path:
        return self.job_dir(job.id) / job.image_name

    def video_path(self, job: Job) -> Path | None:
        return self.job_dir(job.id) / job.video_name if job.video_name else None

    def read_image(self, job: Job) -> bytes:
        return self.image_path(job).read_bytes()

    # -- rows --------------------------------------------------------------------------------------------

    def create(
        self,
        params: dict,
        image: bytes,
        image_ext: str,
        image_type: str,
        max_queue: int | None = None,
        *,
        priority: int = PRIORITIES["normal"],
        webhook: str | None = None,
        idempotency: tuple[str, str] | None = None,
    ) -> Job:
        """A queued job holding `image`. With `max_queue`, raises QueueFull when that many already wait: the
        count and the insert are one transaction, so concurrent uploads cannot overshoot the limit.
        idempotency: (key, fingerprint of the request); raises KeyReused when the key names a job already."""
        job_id = uuid.uuid4().hex
        folder = self.job_dir(job_id)
        image_name = "input" + image_ext
        row = {"id": job_id, "params": json.dumps(params), "image_name": image_name, "image_type": image_type}
        row.update(priority=priority, webhook=webhook)
        try:
            folder.mkdir()
            (folder / image_name).write_bytes(image)
            self._insert(row, max_queue, idempotency)
        except BaseException as e:
            shutil.rmtree(folder, ignore_errors=True)
            if isinstance(e, OSError | sqlite3.Error):
                raise store_error(e, "storing the upload") from e
            raise
        return self.get(job_id)

    def _insert(self, row: dict, max_queue: int | None, idempotency: tuple[str, str] | None):
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if idempotency is not None:
                    self._claim_key(*idempotency, row["id"])
                if max_queue is not None:
                    queued = self._db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()[
                        0
                    ]
                    if queued >= max_queue:
                        raise QueueFull(queued)
                row.update(status="queued", created=time.time())
                names = ", ".join(row)
                marks = ", ".join("?" * len(row))
                self._db.execute(f"INSERT INTO jobs ({names}) VALUES ({marks})", tuple(row.values()))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _claim_key(self, key: str, fingerprint: str, job_id: str) -> None:
        """Inside _insert's transaction: the key now names `job_id`, or KeyReused names the job it had."""
        now = time.time()
        self._db.execute("DELETE FROM idempotency WHERE created < ?", (now - IDEMPOTENCY_S,))
        old = self._db.execute("SELECT fingerprint, job_id FROM idempotency WHERE key = ?", (key,)).fetchone()
        if old is not None:
            raise KeyReused(old[1], old[0] == fingerprint)
        self._db.execute(
            "INSERT INTO idempotency (key, fingerprint, job_id, created) VALUES (?, ?, ?, ?)",
            (key, fingerprint, job_id, now),
        )

    def get(self, job_id: str) -> Job | None:
        if not valid_id(job_id):
            return None
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job.from_row(row) if row else None

    def list(self, limit: int = 20, offset: int = 0) -> tuple[list[Job], int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs ORDER BY seq DESC LIMIT ? OFFSET ?", (limit, offset)
            ).fetchall()
            total = self._db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        return [Job.from_row(r) for r in rows], total

    def count(self, status: str) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM jobs WHERE status = ?", (status,)).fetchone()[0]

    def queue_position(self, job: Job) -> int | None:
        """0 means next in line: higher priority first, first come first served within one."""
        if job.status != "queued":
            return None
        with self._lock:
            return self._db.execute(
                "SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND (priority > ? OR (priority = ? AND seq < ?))",
                (job.priority, job.priority, job.seq),
            ).fetchone()[0]

    def queued(self, limit: int) -> list[Job]:
        """The first `limit` queued jobs, in the order they will run."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE status = 'queued' ORDER BY priority DESC, seq LIMIT ?", (limit,)
            ).fetchall()
        return [Job.from_row(r) for r in rows]

    def recent_durations(self, n: int = 10) -> list[float]:
        with self._lock:
            rows = self._db.execute(
                "SELECT finished - started FROM jobs WHERE status = 'succeeded' ORDER BY seq DESC LIMIT ?",
                (n,),
            ).fetchall()
        return [r[0] for r in rows if r[0] is not None]

    def _update(self, job_id: str, sql: str, args: tuple = (), where: str = "") -> bool:
        with self._lock:
            cur = self._db.execute(f"UPDATE jobs SET {sql} WHERE id = ? {where}", (*args, job_id))
            return cur.rowcount > 0

    def space_problem(self, min_free_bytes: int) -> str | None:
        """Why new jobs cannot be stored (too little free space, no write access), else None."""
        try:
            free = shutil.disk_usage(self.jobs_dir).free
        except OSError as e:
            return f"the data directory cannot be read: {describe_os_error(e)}"
        if free < min_free_bytes:
            return (
                f"out of disk space: {free / 2**20:.0f} MB free in {self.root}, "
                f"new jobs need at least {min_free_bytes / 2**20:.0f} MB"
            )
        if not os.access(self.jobs_dir, os.W_OK | os.X_OK):
            return f"{self.jobs_dir} is not writable"
        return None

    # -- the job life cycle ------------------------------------------------------------------------------

    def claim_next(self) -> Job | None:
        """The next queued job (highest priority, oldest within it) -> running, counting the attempt; None
        when the queue is empty."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT id FROM jobs WHERE status = 'queued' ORDER BY priority DESC, seq LIMIT 1"
                ).fetchone()
                if row is not None:
                    self._db.execute(
                        "UPDATE jobs SET status = 'running', attempts = attempts + 1, started = ?, step = 0,"
                        " total = 0, progress_at = NULL, error = NULL WHERE id = ?",
                        (time.time(), row[0]),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return self.get(row[0]) if row else None

    def set_progress(self, job_id: str, step: int, total: int) -> None:
        self._update(
            job_id,
            "step = ?, total = ?, progress_at = ?",
            (step, total, time.time()),
            "AND status = 'running'",
        )

    def succeed(self, job_id: str, video: bytes, resolved: dict | None) -> None:
        """Store the video and mark the job succeeded; raises StoreError (no file left behind) when it cannot."""
        folder = self.job_dir(job_id)
        tmp = folder / (VIDEO_NAME + ".part")
        try:
            tmp.write_bytes(video)
            # A crash mid-write must never leave a truncated out.mp4 behind a "succeeded" row.
            os.replace(tmp, folder / VIDEO_NAME)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise store_error(e, "writing the video") from e
        try:
            self._update(
                job_id,
                "status = 'succeeded', video_name = ?, resolved = ?, finished = ?, step = total",
                (VIDEO_NAME, json.dumps(resolved) if resolved is not None else None, time.time()),
            )
        except sqlite3.Error as e:
            (folder / VIDEO_NAME).unlink(missing_ok=True)
            raise store_error(e, "recording the video") from e
        self._finished(job_id)

    def fail(self, job_id: str, message: str) -> None:
        if self._update(job_id, "status = 'failed', error = ?, finished = ?", (message, time.time())):
            self._finished(job_id)

    def cancel(self, job_id: str) -> Job | None:
        """A queued job is canceled at once; a running one is flagged for its next step."""
        with self._lock:
            job = self.get(job_id)
            if job is None:
                return None
            if job.status == "queued":
                self._update(job_id, "status = 'canceled', finished = ?", (time.time(),))
                self._finished(job_id)
            elif job.status == "running":
                self._update(job_id, "cancel_requested = 1")
            return self.get(job_id)

    def mark_canceled(self, job_id: str) -> None:
        if self._update(
            job_id, "status = 'canceled', finished = ?", (time.time(),), "AND status = 'running'"
        ):
            self._finished(job_id)

    def requeue(self, job_id: str, count_attempt: bool = True) -> None:
        """Back to the queue; an attempt cut short by our own shutdown does not count against the job."""
        extra = "" if count_attempt else ", attempts = MAX(attempts - 1, 0)"
        self._update(
            job_id, "status = 'queued', started = NULL, step = 0, total = 0, progress_at = NULL" + extra
        )

    def recover(self) -> list[tuple[str, str]]:
        """Run once at start-up: jobs the previous process left "running" did not finish.

        Each gets one more try; a job that already had `max_attempts` is failed, since it may be the job
        that brings the process down. Returns (job id, new status) pairs.
        """
        for part in self.jobs_dir.glob("*/*.part"):  # a write cut short by the crash
            part.unlink(missing_ok=True)
        changes = []
        with self._lock:
            rows = self._db.execute(
                "SELECT id, attempts, cancel_requested FROM jobs WHERE status = 'running'"
            ).fetchall()
            for job_id, attempts, cancel_requested in rows:
                if cancel_requested:
                    self.mark_canceled(job_id)
                    changes.append((job_id, "canceled"))
                elif attempts >= self.max_attempts:
                    self.fail(
                        job_id,
                        f"the server stopped while this job was running, {attempts} times;"
                        " not retrying it again",
                    )
                    changes.append((job_id, "failed"))
                else:
                    self.requeue(job_id, count_attempt=True)
                    changes.append((job_id, "queued"))
        return changes

    # -- retention ---------------------------------------------------------------------------------------

    def finished_with_files(self) -> list[Job]:
        """Finished jobs whose files are still on disk, oldest finish first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE status IN ('succeeded', 'failed', 'canceled')"
                " AND files_deleted IS NULL ORDER BY finished, seq"
            ).fetchall()
        return [Job.from_row(r) for r in rows]

    def delete_files(self, job_id: str) -> None:
        """Delete a finished job's folder; the row stays, saying when its files went."""
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
        self._update(
            job_id, "files_deleted = ?", (time.time(),), "AND status IN ('succeeded', 'failed', 'canceled')"
        )
