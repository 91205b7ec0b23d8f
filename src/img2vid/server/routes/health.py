"""Liveness and readiness, for load balancers and `docker run --health-cmd`."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from ..context import Context, ErrorBody, error, get_context

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz():
    """200 while the process is up."""
    return {"ok": True}


@router.get("/readyz", responses={503: {"model": ErrorBody, "description": "not ready, and why"}})
def readyz(ctx: Context = Depends(get_context)):
    """200 once a worker has its model loaded and the data directory has room for new jobs; 503 before
    (or when loading failed, or the disk is full), saying why."""
    worker = ctx.ready_worker()
    if worker is None or ctx.store is None:
        return error(503, ctx.not_ready_reason())
    problem = ctx.space_problem()
    if problem is not None:
        return error(503, problem)
    return {"ready": True, "workers": sum(w.ready() for w in ctx.workers)}
