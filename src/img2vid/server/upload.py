"""Reading a job's multipart upload: the body within its size limit, the parameters, and the image."""

from __future__ import annotations

import io
import re
import warnings

from fastapi import Request
from fastapi.exceptions import HTTPException
from PIL import Image
from starlette.datastructures import UploadFile

from ..errors import ImageError, ParameterError
from ..image import load_image
from ..params import INTS, PARAM_NAMES, GenerateParams
from . import options

IMAGE_EXT = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tiff"}
MULTIPART_SLACK = 64 * 1024  # room for the parameter fields and multipart framing around the image
INT_TEXT = re.compile(r"\s*[+-]?\d+\s*")


def too_large(limit: int) -> HTTPException:
    return HTTPException(413, f"the upload is larger than the {limit / 2**20:g} MB limit")


def check_length(request: Request, limit: int) -> None:
    """Refuse at once a body whose Content-Length already says it is too large."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit + MULTIPART_SLACK:
        raise too_large(limit)


async def read_form(request: Request, limit: int):
    """The parsed multipart form, counting bytes as they arrive: a chunked upload has no length to trust."""
    received = 0

    async def receive_limited():
        nonlocal received
        message = await request.receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit + MULTIPART_SLACK:
                raise too_large(limit)
        return message

    limited = Request(request.scope, receive_limited)
    return await limited.form(
        max_files=1, max_fields=len(PARAM_NAMES) + len(options.FIELDS) + 1, max_part_size=4096
    )


def parse_params(form) -> dict:
    """The form's generate parameters, validated; raises ParameterError naming the field."""
    values = {}
    for key in form:
        if key == "image" or key in options.FIELDS:
            continue
        if key not in PARAM_NAMES:
            raise ParameterError(key, "unknown parameter")
        items = form.getlist(key)
        if len(items) != 1 or not isinstance(items[0], str):
            raise ParameterError(key, "give one value")
        text = items[0].strip()
        if text == "":
            continue  # an empty form field means "use the default"
        # params.check() parses integers through float, which rounds seeds above 2**53; parse them exactly.
        values[key] = int(text) if key in INTS and INT_TEXT.fullmatch(text) else text
    return GenerateParams(**values).validate().as_dict()


async def read_image(form, limit: int) -> bytes:
    """The uploaded image's bytes; raises ParameterError (no image) or HTTPException (too large)."""
    upload = form.get("image")
    if not isinstance(upload, UploadFile):
        raise ParameterError("image", "an image file is required")
    if upload.size is not None and upload.size > limit:
        raise too_large(limit)
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise too_large(limit)
    if not data:
        raise ParameterError("image", "the file is empty")
    return data


def sniff_image(data: bytes) -> tuple[str, str, tuple[int, int]]:
    """(extension, mime type, size as the pipeline sees it) of an image Pillow recognises by its content;
    raises HTTPException."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # load_image has the real limit
            with Image.open(io.BytesIO(data)) as im:
                fmt = im.format
                im.verify()
    except Image.DecompressionBombError:
        raise HTTPException(413, "the image has too many pixels") from None
    except Exception:
        raise HTTPException(
            415, "the upload is not an image this server can read (PNG, JPEG, WebP, ...)"
        ) from None
    try:
        # verify() reads no pixels: decode now so a truncated or oversized image is refused here, with the
        # pipeline's own message, instead of queueing a job that can only fail.
        with load_image(data) as im:
            size = im.size  # after the EXIF rotation: the size the video's shape follows
    except ImageError as e:
        raise HTTPException(415, str(e).replace("image bytes: ", "the image: ")) from None
    return IMAGE_EXT.get(fmt, ".img"), Image.MIME.get(fmt, "application/octet-stream"), size
