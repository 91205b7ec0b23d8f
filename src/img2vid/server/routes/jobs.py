"""The job API: submit, list, status, video, input image, cancel."""

from __future__ import annotations

import secrets
import time
from datetime import datetime, timezone

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import HTTPException
from fastapi.responses import FileResponse, JSONResponse

from ...errors import ParameterError
from .. import upload
from ..context import Context, ErrorBody, error, get_context
from ..store import Job, JobStore, QueueFull, valid_id
from .model import parameter_spec

router = APIRouter(tags=["jobs"])
MAX_OFFSET = 2**63 - 1  # SQLite's largest integer: a larger OFFSET would overflow its binding


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _eta(job: Job, now: float) -> float | None:
    if job.status != "running" or not job.step or not job.total or job.progress_at is None or not job.started:
        return None
    per_step = (job.progress_at - job.started) / job.step
    return round(max(0.0, per_step * (job.total - job.step) - (now - job.progress_at)), 1)


def job_json(job: Job, store: JobStore) -> dict:
    base = f"/v1/jobs/{job.id}"
    return {
        "id": job.id,
        "status": job.status,
        "progress": {"step": job.step, "total": job.total},
        "eta_s": _eta(job, time.time()),
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
        "video_url": base + "/video" if job.status == "succeeded" else None,
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
    schema = {"type": "object", "required": ["image"], "properties": props}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


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


async def _read_job(request: Request, ctx: Context) -> tuple[dict, bytes, str, str]:
    """(parameters, image bytes, extension, mime type) of the upload, checked against a worker's memory;
    raises ParameterError (NotEnoughMemory among them), HTTPException."""
    limit = ctx.max_upload_bytes
    upload.check_length(request, limit)
    form = await upload.read_form(request, limit)
    try:
        params = upload.parse_params(form)
        async with ctx.decode_slots:  # a bounded number of uploads in memory and being decoded at once
            data = await upload.read_image(form, limit)
            ext, mime, size = await run_in_threadpool(upload.sniff_image, data)
    finally:
        await form.close()
    worker = ctx.ready_worker()
    if worker is not None and hasattr(worker, "check"):  # a job no worker could ever hold is refused now
        await run_in_threadpool(worker.check, params, size)
    return params, data, ext, mime


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
        params, data, ext, mime = await _read_job(request, ctx)
    except ParameterError as e:
        return error(422, str(e), field=e.field, fields=list(getattr(e, "fields", [e.field])))
    if params["seed"] is None:
        # Below 2**32 so the seed survives JavaScript numbers in the page intact.
        params["seed"] = secrets.randbelow(2**32)
    try:
        job = await run_in_threadpool(store.create, params, data, ext, mime, ctx.max_queue)
    except QueueFull as e:
        return await run_in_threadpool(_queue_full, ctx, store, e.queued)
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
    return {"jobs": [job_json(j, store) for j in jobs], "total": total, "limit": limit, "offset": offset}


def _find(ctx: Context, job_id: str) -> tuple[JobStore, Job]:
    store = ctx.get_store()
    job = store.get(job_id) if valid_id(job_id) else None
    if job is None:
        raise HTTPException(404, "no such job")
    return store, job


@router.get("/v1/jobs/{job_id}")
def get_job(job_id: str, ctx: Context = Depends(get_context)):
    """Status, progress {step, total}, eta_s, parameters, error, timestamps, video url."""
    store, job = _find(ctx, job_id)
    return job_json(job, store)


@router.get("/v1/jobs/{job_id}/video", response_class=FileResponse)
def get_video(job_id: str, ctx: Context = Depends(get_context)):
    """The mp4 of a succeeded job (Range requests supported)."""
    store, job = _find(ctx, job_id)
    path = store.video_path(job)
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
            return JSONResponse(job_json(job, store), status_code=202)
        store.mark_canceled(job_id)  # no slot is running it, so nothing else would ever end it
        job = store.get(job_id)
    return job_json(job, store)
