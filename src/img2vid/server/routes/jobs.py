"""The job API: submit, list, status, events, preview, video, input image, cancel."""

from __future__ import annotations

import functools
import json
import secrets
import time
from datetime import datetime, timezone

import anyio
from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import HTTPException
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from ...errors import ParameterError
from .. import options, upload
from ..context import Context, ErrorBody, error, get_context
from ..live import Live
from ..store import FINISHED, PRIORITIES, Job, JobStore, KeyReused, QueueFull, valid_id
from .model import parameter_spec

router = APIRouter(tags=["jobs"])
MAX_OFFSET = 2**63 - 1  # SQLite's largest integer: a larger OFFSET would overflow its binding
PRIORITY_NAMES = {v: k for k, v in PRIORITIES.items()}
EVENTS_POLL_S = 0.25  # how often an event stream looks for a change
EVENTS_KEEPALIVE_S = 15.0  # a comment line now and then keeps proxies from closing a quiet stream
EVENTS_MAX_S = 30.0  # a stream ends after this (the browser reconnects): shutdown never waits on one for long


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _eta(job: Job, now: float) -> float | None:
    if job.status != "running" or not job.step or not job.total or job.progress_at is None or not job.started:
        return None
    per_step = (job.progress_at - job.started) / job.step
    return round(max(0.0, per_step * (job.total - job.step) - (now - job.progress_at)), 1)


def job_json(job: Job, store: JobStore, live: Live | None = None) -> dict:
    """The job as the API shows it; `live` (the dispatcher's) adds its phase and latest preview."""
    base = f"/v1/jobs/{job.id}"
    phase = live.phase if live is not None and job.status == "running" else None
    preview = live is not None and live.preview is not None
    return {
        "id": job.id,
        "status": job.status,
        "progress": {"step": job.step, "total": job.total},
        "phase": phase,
        # Only sampling's steps predict the time left: no "0 s left" while decoding.
        "eta_s": _eta(job, time.time()) if phase in (None, "sampling") else None,
        "preview_url": f"{base}/preview?v={live.version}" if preview else None,
        "queue_position": store.queue_position(job),
        "parameters": job.params,
        "resolved_parameters": job.resolved,
        "error": job.error,
        "attempts": job.attempts,
        "cancel_requested": job.cancel_requested,
        "created": _iso(job.created),
        "started": _iso(job.started),
        "finished": _iso(job.finished),
        "url": base,
        "image_url": base + "/image",
        "video_url": base + "/video" if job.status == "succeeded" and not job.files_deleted else None,
        "priority": PRIORITY_NAMES.get(job.priority, str(job.priority)),
        "webhook": job.webhook,
        "files_deleted": _iso(job.files_deleted),
    }


def _multipart_schema() -> dict:
    props: dict = {"image": {"type": "string", "format": "binary", "description": "the input image"}}
    for name, s in parameter_spec().items():
        if s["type"] == "choice":
            props[name] = {"type": "string", "enum": s["choices"], "description": s["help"]}
        elif s["type"] == "bool":
            props[name] = {"type": "boolean", "description": s["help"]}
        else:
            props[name] = {
                "type": "integer" if s["type"] == "int" else "number",
                "minimum": s["min"],
                "maximum": s["max"],
                "description": s["help"],
            }
    props["priority"] = {"type": "string", "enum": list(PRIORITIES), "description": "queue order (normal)"}
    props["webhook"] = {"type": "string", "description": "URL POSTed the job, signed, when it ends"}
    schema = {"type": "object", "required": ["image"], "properties": props}
    key = {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": "the same key within 24 h answers with the same job (422 if the request differs)",
    }
    return {
        "parameters": [key],
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}},
    }


def _queue_full(ctx: Context, store: JobStore, queued: int) -> JSONResponse:
    durations = store.recent_durations()
    per_job = sum(durations) / len(durations) if durations else 30.0
    retry = int(min(3600, max(1, per_job / max(1, len(ctx.workers)))))
    return error(
        429, f"the queue is full ({queued} jobs waiting); try again later", {"Retry-After": str(retry)}
    )


def _refusal(ctx: Context, store: JobStore) -> JSONResponse | None:
    """Why a new job cannot be taken now, before its upload is read; None when it can."""
    if ctx.workers and all(w.error() for w in ctx.workers):
        return error(503, ctx.not_ready_reason())  # queueing would only make the job wait forever
    problem = ctx.space_problem()
    if problem is not None:
        return error(507, problem)
    queued = store.count("queued")
    return _queue_full(ctx, store, queued) if queued >= ctx.max_queue else None


async def _read_job(request: Request, ctx: Context) -> tuple[dict, dict, bytes, str, str]:
    """(parameters, queue options, image bytes, extension, mime type) of the upload, checked against a
    worker's memory; raises ParameterError (NotEnoughMemory among them), HTTPException."""
    limit = ctx.max_upload_bytes
    upload.check_length(request, limit)
    form = await upload.read_form(request, limit)
    try:
        params = upload.parse_params(form)
        queue_options = options.parse(form, ctx.webhook_secret is not None)
        async with ctx.decode_slots:  # a bounded number of uploads in memory and being decoded at once
            data = await upload.read_image(form, limit)
            ext, mime, size = await run_in_threadpool(upload.sniff_image, data)
    finally:
        await form.close()
    worker = ctx.ready_worker()
    if worker is not None and hasattr(worker, "check"):  # a job no worker could ever hold is refused now
        await run_in_threadpool(worker.check, params, size)
    return params, queue_options, data, ext, mime


def _replayed(store: JobStore, e: KeyReused) -> JSONResponse:
    """The answer to a request whose Idempotency-Key was used before: its job, or 422 for another request."""
    job = store.get(e.job_id)
    if not e.same or job is None:
        return error(
            422,
            f"this {options.KEY_HEADER} was used for another request (job {e.job_id}) in the last 24 h;"
            " send a new key for a new job",
            field=options.KEY_HEADER,
        )
    headers = {"Location": f"/v1/jobs/{job.id}", "Idempotent-Replayed": "true"}
    return JSONResponse(job_json(job, store), status_code=202, headers=headers)


@router.post(
    "/v1/jobs",
    status_code=202,
    openapi_extra=_multipart_schema(),
    responses={
        413: {"model": ErrorBody, "description": "the upload or its image is too large"},
        415: {"model": ErrorBody, "description": "not an image this server can read"},
        422: {"model": ErrorBody, "description": "a bad parameter, or a job too large for the memory"},
        429: {"model": ErrorBody, "description": "the queue is full (see Retry-After)"},
        503: {"model": ErrorBody, "description": "no worker can run jobs, or the job store failed"},
        507: {"model": ErrorBody, "description": "out of disk space: no new jobs until there is room"},
    },
)
async def submit(request: Request, ctx: Context = Depends(get_context)):
    """Queue a job: multipart form with `image` and any generate parameters (omitted = model default;
    omitted seed = a random one, recorded). 422 names the bad field (`fields`: every parameter that sets
    the size of a job too large for the worker's memory), 413 too large, 415 not an image, 429 queue
    full, 503 no worker can run it, 507 out of disk space."""
    store = ctx.get_store()
    refusal = await run_in_threadpool(_refusal, ctx, store)
    if refusal is not None:
        return refusal
    try:
        params, queue_options, data, ext, mime = await _read_job(request, ctx)
        key = options.idempotency(request.headers, params, data, queue_options)
    except ParameterError as e:
        return error(422, str(e), field=e.field, fields=list(getattr(e, "fields", [e.field])))
    if params["seed"] is None:
        # Below 2**32 so the seed survives JavaScript numbers in the page intact.
        params["seed"] = secrets.randbelow(2**32)
    create = functools.partial(store.create, idempotency=key, **queue_options)
    try:
        job = await run_in_threadpool(create, params, data, ext, mime, ctx.max_queue)
    except QueueFull as e:
        return await run_in_threadpool(_queue_full, ctx, store, e.queued)
    except KeyReused as e:
        return await run_in_threadpool(_replayed, store, e)
    ctx.dispatcher.wake()
    return JSONResponse(job_json(job, store), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})


@router.get("/v1/jobs")
def list_jobs(
    limit: int = Query(20, ge=1, le=200),
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
    ctx: Context = Depends(get_context),
):
    """The history, newest first."""
    store = ctx.get_store()
    jobs, total = store.list(limit, offset)
    shown = [job_json(j, store, _live(ctx, j.id)) for j in jobs]
    return {"jobs": shown, "total": total, "limit": limit, "offset": offset}


def _live(ctx: Context, job_id: str) -> Live | None:
    return ctx.dispatcher.live.get(job_id) if ctx.dispatcher is not None else None


def _find(ctx: Context, job_id: str) -> tuple[JobStore, Job]:
    store = ctx.get_store()
    job = store.get(job_id) if valid_id(job_id) else None
    if job is None:
        raise HTTPException(404, "no such job")
    return store, job


@router.get("/v1/jobs/{job_id}")
def get_job(job_id: str, ctx: Context = Depends(get_context)):
    """Status, progress {step, total}, phase, eta_s, preview url, parameters, error, timestamps, video url."""
    store, job = _find(ctx, job_id)
    return job_json(job, store, _live(ctx, job_id))


def _event(name: str, body: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(body)}\n\n"


async def _events(request: Request, ctx: Context, job_id: str):
    """The stream of `job_events`: a `progress` event at each change, `end` with the final state."""
    yield "retry: 1000\n\n"  # reconnect after a second when a stream ends or drops
    last, quiet, started = None, 0.0, time.monotonic()
    while time.monotonic() - started < EVENTS_MAX_S:
        try:
            store, job = await run_in_threadpool(_find, ctx, job_id)
            body = await run_in_threadpool(job_json, job, store, _live(ctx, job_id))
        except HTTPException:  # the server is stopping
            return
        if job.status in FINISHED:
            yield _event("end", body)
            return
        changed = {k: v for k, v in body.items() if k != "eta_s"}  # the ETA alone ticks without news
        if changed != last or quiet >= EVENTS_KEEPALIVE_S:
            yield _event("progress", body)
            last, quiet = changed, 0.0
        if await request.is_disconnected():
            return
        await anyio.sleep(EVENTS_POLL_S)
        quiet += EVENTS_POLL_S


@router.get("/v1/jobs/{job_id}/events", response_class=StreamingResponse)
async def job_events(job_id: str, request: Request, ctx: Context = Depends(get_context)):
    """Server-sent events (text/event-stream): `progress` with the job's JSON (status, progress, phase, eta_s,
    preview_url) whenever it changes, then `end` with its final state. A stream lasts at most 30 s; clients
    (EventSource does it by itself) connect again. Browsers pass a token as `?token=`."""
    await run_in_threadpool(_find, ctx, job_id)  # 404 now, not inside a stream
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of the events
    return StreamingResponse(_events(request, ctx, job_id), media_type="text/event-stream", headers=headers)


@router.get("/v1/jobs/{job_id}/preview", responses={200: {"content": {"image/webp": {}, "image/gif": {}}}})
def get_preview(job_id: str, ctx: Context = Depends(get_context)):
    """The latest live preview: every frame, small and rough (the latents' colours), as an animated image."""
    _, job = _find(ctx, job_id)
    live = _live(ctx, job_id)
    if live is None or live.preview is None:
        why = (
            "it has not reached its first step yet"
            if job.status in ("queued", "running")
            else "none was kept"
        )
        raise HTTPException(404, f"no preview for this job: {why}")
    return Response(live.preview, media_type=live.preview_type, headers={"Cache-Control": "no-store"})


@router.get("/v1/jobs/{job_id}/video", response_class=FileResponse)
def get_video(job_id: str, ctx: Context = Depends(get_context)):
    """The mp4 of a succeeded job (Range requests supported)."""
    store, job = _find(ctx, job_id)
    path = store.video_path(job)
    if job.files_deleted:
        raise HTTPException(410, f"the video was deleted at {_iso(job.files_deleted)} (output retention)")
    if job.status != "succeeded" or path is None or not path.is_file():
        raise HTTPException(404, f"no video: the job is {job.status}")
    return FileResponse(
        path, media_type="video/mp4", filename=f"img2vid-{job.id[:8]}.mp4", content_disposition_type="inline"
    )


@router.get("/v1/jobs/{job_id}/image", response_class=FileResponse)
def get_image(job_id: str, ctx: Context = Depends(get_context)):
    """The job's input image."""
    store, job = _find(ctx, job_id)
    path = store.image_path(job)
    if not path.is_file():
        raise HTTPException(404, "the input image is gone")
    return FileResponse(path, media_type=job.image_type)


@router.delete("/v1/jobs/{job_id}")
def cancel_job(job_id: str, ctx: Context = Depends(get_context)):
    """Cancel: a queued job at once (200), a running one at its next step (202); a job left "running" with
    no worker on it (a slot that died) at once (200)."""
    store, job = _find(ctx, job_id)
    if job.status in ("succeeded", "failed"):
        return error(409, f"the job already {job.status}")
    job = store.cancel(job_id)
    if job.status == "running":
        if ctx.dispatcher.cancel(job_id):
            return JSONResponse(job_json(job, store, _live(ctx, job_id)), status_code=202)
        store.mark_canceled(job_id)  # no slot is running it, so nothing else would ever end it
        job = store.get(job_id)
    return job_json(job, store)
