"""The queue at a glance: how many wait, in which order, and what each worker is doing."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query

from ..context import Context, get_context
from ..worker import Worker
from .jobs import PRIORITY_NAMES

router = APIRouter(tags=["jobs"])


def worker_json(ctx: Context, index: int, worker: Worker) -> dict:
    """state: failed (can never run jobs, see error), starting (loading or restarting), busy, or idle."""
    job = ctx.dispatcher.running_job(worker) if ctx.dispatcher is not None else None
    if worker.error():
        state = "failed"
    elif job is not None:
        state = "busy"
    else:
        state = "idle" if worker.ready() else "starting"
    described = worker.describe() if hasattr(worker, "describe") else {}
    return {"index": index, "state": state, "job": job, "error": worker.error(), **described}


@router.get("/v1/queue")
def get_queue(limit: int = Query(100, ge=0, le=1000), ctx: Context = Depends(get_context)):
    """Queued and running counts, the first `limit` queued jobs in the order they will run (position 0
    runs next), and every worker's state."""
    store = ctx.get_store()
    jobs = [
        {"id": j.id, "position": i, "priority": PRIORITY_NAMES.get(j.priority, str(j.priority))}
        for i, j in enumerate(store.queued(limit))
    ]
    return {
        "queued": store.count("queued"),
        "running": store.count("running"),
        "jobs": jobs,
        "workers": [worker_json(ctx, i, w) for i, w in enumerate(ctx.workers)],
    }
