"""Telling a job's webhook URL that the job ended: a signed POST, retried with backoff on its own thread.

The body is the job's JSON (as GET /v1/jobs/{id} answers it); the `X-Img2vid-Signature` header is
`sha256=` + the hex HMAC-SHA256 of the exact body bytes under the server's webhook secret. A receiver that
fails or hangs only delays its own retries: the queue never waits for a delivery.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import itertools
import json
import logging
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field

log = logging.getLogger("img2vid.server")
SIGNATURE_HEADER = "X-Img2vid-Signature"
SECRET_ENV = "IMG2VID_WEBHOOK_SECRET"


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@dataclass(order=True)
class _Delivery:
    due: float
    order: int  # ties on `due` keep the order deliveries were queued in
    url: str = field(compare=False)
    body: bytes = field(compare=False)
    delivery_id: str = field(compare=False)
    attempt: int = field(default=1, compare=False)


class WebhookSender:
    """send() queues a delivery; one thread posts them, retrying after backoff_s, 2*backoff_s, 4*... ."""

    def __init__(self, secret: str, attempts: int = 6, backoff_s: float = 2.0, timeout_s: float = 10.0):
        self.secret, self.attempts, self.backoff_s, self.timeout_s = secret, attempts, backoff_s, timeout_s
        self._heap: list[_Delivery] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="img2vid-webhooks", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop at once: deliveries still waiting are dropped, and logged."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        self._thread.join(self.timeout_s + 1)
        for d in self._heap:
            log.warning("webhook %s to %s not delivered: the server stopped", d.delivery_id, d.url)

    def send(self, url: str, payload: dict) -> None:
        body = json.dumps(payload, separators=(",", ":")).encode()
        self._push(_Delivery(time.monotonic(), next(self._order), url, body, uuid.uuid4().hex))

    def _push(self, delivery: _Delivery) -> None:
        with self._wake:
            heapq.heappush(self._heap, delivery)
            self._wake.notify_all()

    def _next(self) -> _Delivery | None:
        """The next delivery once it is due; None when stopping."""
        with self._wake:
            while not self._stopping:
                wait = self._heap[0].due - time.monotonic() if self._heap else None
                if wait is not None and wait <= 0:
                    return heapq.heappop(self._heap)
                self._wake.wait(wait)
            return None

    def _loop(self) -> None:
        while (delivery := self._next()) is not None:
            problem = self._post(delivery)
            if problem is None:
                continue
            if delivery.attempt >= self.attempts:
                log.error("webhook %s: gave up after %d tries: %s", delivery.url, delivery.attempt, problem)
                continue
            delay = self.backoff_s * 2 ** (delivery.attempt - 1)
            log.warning("webhook %s: %s; retrying in %.1f s", delivery.url, problem, delay)
            delivery.attempt += 1
            delivery.due = time.monotonic() + delay
            self._push(delivery)

    def _post(self, delivery: _Delivery) -> str | None:
        """None when the receiver answered 2xx, else what went wrong."""
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "img2vid-webhook",
            SIGNATURE_HEADER: sign(self.secret, delivery.body),
            "X-Img2vid-Delivery": delivery.delivery_id,
        }
        request = urllib.request.Request(delivery.url, data=delivery.body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return None if 200 <= response.status < 300 else f"HTTP {response.status}"
        except urllib.error.HTTPError as e:
            return f"HTTP {e.code}"
        except Exception as e:  # refused, timed out, bad TLS, bad URL: all the receiver's problem
            return f"{type(e).__name__}: {e}"
