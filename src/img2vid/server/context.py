"""What every route needs: the app's settings, its job store and dispatcher, and one error shape."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from .dispatcher import Dispatcher
from .store import JobStore
from .worker import Worker


class Context:
    """Settings fixed at create_app, plus the store and dispatcher that exist while the app runs."""

    def __init__(self, data_dir, workers: list[Worker], **settings):
        self.data_dir = data_dir
        self.workers = workers
        self.max_queue: int = settings["max_queue"]
        self.max_upload_bytes: int = settings["max_upload_bytes"]
        self.min_free_bytes: int = settings["min_free_bytes"]
        self.max_attempts: int = settings["max_attempts"]
        self.poll_s: float = settings["poll_s"]
        self.stop_timeout: float = settings["stop_timeout"]
        self.webhook_secret: str | None = settings.get("webhook_secret")
        self.webhook_backoff_s: float = settings.get("webhook_backoff_s", 2.0)
        self.retain_days: float | None = settings.get("retain_days")
        self.retain_bytes: int | None = settings.get("retain_bytes")
        self.retention_interval_s: float = settings.get("retention_interval_s", 300.0)
        self.store: JobStore | None = None
        self.dispatcher: Dispatcher | None = None
        self.decode_slots = None  # an anyio.Semaphore, made in the app's event loop at start-up

    def get_store(self) -> JobStore:
        if self.store is None:
            raise HTTPException(503, "the server is starting or stopping")
        return self.store

    def space_problem(self) -> str | None:
        """Why no new job can be stored now (disk full, data directory not writable), else None."""
        return self.get_store().space_problem(self.min_free_bytes)

    def ready_worker(self) -> Worker | None:
        return next((w for w in self.workers if w.ready()), None)

    def not_ready_reason(self) -> str:
        if not self.workers:
            return "no workers: this server only keeps the queue"
        errors = [w.error() for w in self.workers if w.error()]
        return "; ".join(errors) if errors else "the model is loading"


def get_context(request: Request) -> Context:
    """The route dependency: the Context that create_app stored on the app."""
    return request.app.state.ctx


class ErrorBody(BaseModel):
    """Every refusal's body (the OpenAPI schema of `error`)."""

    detail: str
    field: str | None = None  # 422: the parameter at fault
    fields: list[str] | None = None  # 422: every parameter at fault (size and frames: too large for memory)


def error(status: int, detail: str, headers: dict | None = None, **extra) -> JSONResponse:
    return JSONResponse({"detail": detail, **extra}, status_code=status, headers=headers)
