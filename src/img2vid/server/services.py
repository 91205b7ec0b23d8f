"""The API process's helpers that follow jobs as they end: webhook deliveries and output retention.

They listen to the store (JobStore.listeners), so every way a job ends (done, failed, canceled, failed at
a restart's recovery) is seen once, with or without Ray, and none of them slows the queue.
"""

from __future__ import annotations

from .context import Context
from .retention import Janitor
from .routes.jobs import job_json
from .store import JobStore
from .webhooks import WebhookSender


class Services:
    def __init__(self, ctx: Context, store: JobStore):
        self.store = store
        self.sender = None
        self.janitor = None
        if ctx.webhook_secret:
            self.sender = WebhookSender(ctx.webhook_secret, backoff_s=ctx.webhook_backoff_s)
            store.listeners.append(self._notify)
        if ctx.retain_days is not None or ctx.retain_bytes is not None:
            max_age = ctx.retain_days * 86400 if ctx.retain_days is not None else None
            self.janitor = Janitor(store, max_age, ctx.retain_bytes, ctx.retention_interval_s)
            store.listeners.append(self.janitor.wake)

    def start(self) -> None:
        for service in (self.sender, self.janitor):
            if service is not None:
                service.start()

    def stop(self) -> None:
        for service in (self.sender, self.janitor):
            if service is not None:
                service.stop()

    def _notify(self, job_id: str) -> None:
        job = self.store.get(job_id)
        if job is not None and job.webhook:
            self.sender.send(job.webhook, job_json(job, self.store))
