"""What a job request says besides the generate parameters: its priority, its webhook, its Idempotency-Key.

These belong to the queue, not to the video: the API process keeps them and no worker ever sees them.
"""

from __future__ import annotations

import hashlib
import json
import re
from urllib.parse import urlsplit

from ..errors import ParameterError
from .store import PRIORITIES

FIELDS = ("priority", "webhook")  # form fields that are not generate parameters
KEY_HEADER = "Idempotency-Key"
KEY_TEXT = re.compile(r"[\x21-\x7e]{1,255}")  # printable ASCII without spaces, as the IETF draft's examples
MAX_URL = 2048


def parse(form, webhooks_signed: bool) -> dict:
    """{"priority": int, "webhook": url or None} from the form; raises ParameterError naming the field."""
    priority = _one(form, "priority") or "normal"
    if priority not in PRIORITIES:
        raise ParameterError("priority", f"one of {', '.join(PRIORITIES)}, not {priority!r}")
    webhook = _one(form, "webhook") or None
    if webhook is not None:
        _check_url(webhook, webhooks_signed)
    return {"priority": PRIORITIES[priority], "webhook": webhook}


def _one(form, key: str) -> str:
    items = form.getlist(key)
    if len(items) > 1 or (items and not isinstance(items[0], str)):
        raise ParameterError(key, "give one value")
    return items[0].strip() if items else ""


def _check_url(url: str, webhooks_signed: bool) -> None:
    if not webhooks_signed:
        # An unsigned call would let anyone who can reach the receiver fake a finished job.
        raise ParameterError("webhook", "this server has no webhook secret (img2vid serve --webhook-secret)")
    parts = urlsplit(url)
    if len(url) > MAX_URL or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ParameterError("webhook", f"an http(s) URL of at most {MAX_URL} characters, not {url[:80]!r}")


def idempotency(headers, params: dict, image: bytes, options: dict) -> tuple[str, str] | None:
    """(key, fingerprint of the request) when the request has an Idempotency-Key, else None; the
    fingerprint tells a retry of the same request from another request reusing the key."""
    key = headers.get(KEY_HEADER)
    if key is None:
        return None
    if not KEY_TEXT.fullmatch(key):
        raise ParameterError(KEY_HEADER, "1 to 255 printable ASCII characters without spaces")
    digest = hashlib.sha256(json.dumps({"params": params, **options}, sort_keys=True).encode())
    digest.update(hashlib.sha256(image).digest())
    return key, digest.hexdigest()
