"""The HTTP job API and the web page, one FastAPI app over one job queue.

create_app() builds it without binding anything, so tests drive it through TestClient; serve() in
main.py adds the model loading and uvicorn. The routes live in routes/, one router per area.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from .context import Context, error
from .dispatcher import Dispatcher
from .guard import LOOPBACK_NAMES, Guard
from .routes import health, jobs, model, queue, web
from .routes.jobs import job_json
from .routes.model import parameter_spec
from .services import Services
from .store import JobStore, StoreError, store_error
from .worker import LocalWorker, Worker

__all__ = ["LOOPBACK_NAMES", "create_app", "job_json", "parameter_spec"]

log = logging.getLogger("img2vid.server")
# Uploads decoded at once: each may hold an image of up to image.MAX_PIXELS (64 MP, about 200 MB) decoded.
DECODE_SLOTS = 2


def _worker_list(workers, pipeline) -> list[Worker]:
    if pipeline is not None:
        if workers is not None:
            raise ValueError("give workers or pipeline, not both")
        return [LocalWorker(pipeline)]
    if workers is None:
        return []
    return list(workers) if isinstance(workers, Sequence) else [workers]


@asynccontextmanager
async def _lifespan(app: FastAPI):
    ctx: Context = app.state.ctx
    store = JobStore(ctx.data_dir, max_attempts=ctx.max_attempts)
    services = Services(ctx, store)  # before recover(): a job it fails is told to its webhook too
    services.start()
    for job_id, status in store.recover():
        log.warning("job %s was running when the server stopped: now %s", job_id, status)
    ctx.store = store
    ctx.decode_slots = anyio.Semaphore(DECODE_SLOTS)
    ctx.dispatcher = Dispatcher(store, ctx.workers, poll_s=ctx.poll_s)
    ctx.dispatcher.start()
    try:
        yield
    finally:
        await run_in_threadpool(ctx.dispatcher.stop, ctx.stop_timeout)
        await run_in_threadpool(services.stop)
        ctx.store = None
        store.close()


def create_app(
    data_dir,
    workers: Worker | Sequence[Worker] | None = None,
    *,
    pipeline=None,
    token: str | None = None,
    require_token: bool | None = None,
    max_queue: int = 100,
    max_upload_mb: float = 20,
    min_free_mb: float = 100,
    allowed_hosts: Sequence[str] | None = None,
    max_attempts: int = 2,
    poll_s: float = 1.0,
    stop_timeout: float = 30.0,
    webhook_secret: str | None = None,
    webhook_backoff_s: float = 2.0,
    retain_days: float | None = None,
    retain_gb: float | None = None,
) -> FastAPI:
    """The app over the job store in `data_dir`.

    workers: one Worker per GPU; or pipeline: a loaded pipeline, run by one LocalWorker. Neither gives a
    server that only keeps the queue. require_token (default: whether a token is given) makes every route
    but /healthz and the static page need `Authorization: Bearer <token>` (or `?token=`). allowed_hosts
    limits the Host header (serve() sets the loopback names when bound to loopback without a token).
    With less than `min_free_mb` free in `data_dir`, new jobs are refused (507) and /readyz says why.
    webhook_secret signs the POST sent to a job's `webhook` URL when it ends (no secret: no webhooks);
    retain_days / retain_gb delete finished jobs' files, oldest first (see retention.py).
    """
    workers = _worker_list(workers, pipeline)
    if require_token is None:
        require_token = token is not None
    if require_token and not token:
        raise ValueError("require_token needs a token")
    ctx = Context(
        data_dir,
        workers,
        max_queue=max_queue,
        max_upload_bytes=int(max_upload_mb * 2**20),
        min_free_bytes=int(min_free_mb * 2**20),
        max_attempts=max_attempts,
        poll_s=poll_s,
        stop_timeout=stop_timeout,
        webhook_secret=webhook_secret,
        webhook_backoff_s=webhook_backoff_s,
        retain_days=retain_days,
        retain_bytes=int(retain_gb * 2**30) if retain_gb is not None else None,
    )
    hosts = frozenset(allowed_hosts) if allowed_hosts is not None else None
    return _build(ctx, token if require_token else None, hosts)


def _build(ctx: Context, token: str | None, allowed_hosts: frozenset[str] | None) -> FastAPI:
    """The app over `ctx`, behind the Guard middleware."""
    app = FastAPI(
        title="img2vid",
        summary="Stable Video Diffusion image-to-video: a job queue",
        version="1",
        lifespan=_lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.ctx = ctx
    app.add_middleware(Guard, token=token, allowed_hosts=allowed_hosts)
    for area in (web, health, model, jobs, queue):
        app.include_router(area.router)
    app.add_exception_handler(StoreError, _store_error)
    app.add_exception_handler(OSError, _storage_error)
    app.add_exception_handler(sqlite3.Error, _storage_error)
    return app


def _store_error(request, e: StoreError):
    # Out of space is the server's condition, not the request's: 507 Insufficient Storage, else 503.
    return error(507 if e.full else 503, str(e))


def _storage_error(request, e: Exception):
    log.error("%s %s: %s", request.method, request.url.path, e)
    return _store_error(request, store_error(e, "the job store"))
