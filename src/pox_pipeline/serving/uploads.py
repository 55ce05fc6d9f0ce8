"""Uploads: read, decoded within the limits, kept only when configured (stripped, 0600, for
``serve.upload_retention_days``)."""

from __future__ import annotations

import os
import re
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from pox_pipeline.common import preprocess
from pox_pipeline.common.preprocess import ImageError, ImageTooLarge, UnsupportedFormat
from pox_pipeline.serving.policy import DecisionPolicy
from pox_pipeline.serving.settings import ServeConfig

if TYPE_CHECKING:
    pass


# ---------------------------------------------------------------------------- uploads


def read_upload(path: Path, max_bytes: int) -> bytes:
    """An uploaded file's bytes, its temporary file deleted at once.

    BentoML hands a file parameter over as a temporary file that it deletes only after the
    response has gone out; deleting it here keeps a photo on disk for milliseconds. Too large
    is refused from the size, before reading.
    """
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ImageTooLarge(f"the file is {size:,} bytes; the limit is {max_bytes:,} bytes")
        return path.read_bytes()
    finally:
        path.unlink(missing_ok=True)


def decode_upload(data: bytes, settings: ServeConfig, image_size: int) -> Image.Image:
    """Upload bytes -> upright RGB photo within the limits, a JPEG shrunk as it is decoded to
    the smallest size that covers ``image_size`` (as prepare decodes training photos), or
    :class:`ImageError`."""
    photo = preprocess.decode_image(data, draft=image_size, **settings.decode_limits())
    if settings.store_uploads:
        store_upload(photo, settings.upload_dir, settings.upload_retention_days)
    return photo


# The names store_upload gives (the purge deletes nothing else, wherever upload_dir points).
STORED_UPLOAD_NAME = re.compile(r"\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{8}\.[a-z0-9]+")
# After the purge at service start, kept uploads past their retention are deleted at most this
# often, as photos are stored: a scan at every upload would grow with the folder.
UPLOAD_PURGE_EVERY_S = 3600.0
_last_upload_purge: dict[Path, float] = {}  # folder -> time.monotonic() of its last purge


def open_upload_dir(upload_dir: Path, retention_days: float) -> int:
    """At service start (``serve.store_uploads``): the folder, owner-only (0700, also one made
    before with a wider mode), its uploads past ``retention_days`` deleted; returns how many."""
    upload_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    upload_dir.chmod(0o700)
    return purge_uploads(upload_dir, retention_days)


def store_upload(
    photo: Image.Image, upload_dir: Path, retention_days: float, now: datetime | None = None
) -> Path:
    """Keep an accepted photo (only when ``serve.store_uploads``) as PNG, owner-only (0600).

    The photo as decoded (upright RGB, shrunk as served) is re-encoded from its pixels alone:
    nothing of the upload's metadata (EXIF with GPS and the camera, ICC profile, text chunks)
    is kept. The client's filename is never used (it may itself identify the patient): the
    name is a UTC timestamp and a random suffix. Uploads past ``retention_days`` are deleted
    when the last purge is older than :data:`UPLOAD_PURGE_EVERY_S`.
    """
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S.%fZ")
    upload_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = upload_dir / f"{stamp}-{secrets.token_hex(4)}.png"
    # O_EXCL: never through a link or over a file someone placed there; 0600 whatever the umask
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as handle:
        Image.fromarray(np.asarray(photo)).save(handle, format="PNG")
    last = _last_upload_purge.get(upload_dir)
    if last is None or time.monotonic() - last >= UPLOAD_PURGE_EVERY_S:
        purge_uploads(upload_dir, retention_days)
    return path


def purge_uploads(upload_dir: Path, retention_days: float, now: float | None = None) -> int:
    """Delete the kept uploads (:data:`STORED_UPLOAD_NAME`) last written more than
    ``retention_days`` before ``now`` (epoch seconds, default: now); returns how many."""
    cutoff = (time.time() if now is None else now) - retention_days * 86400
    _last_upload_purge[upload_dir] = time.monotonic()
    deleted = 0
    with os.scandir(upload_dir) as entries:
        for entry in entries:
            if (
                STORED_UPLOAD_NAME.fullmatch(entry.name)
                and entry.is_file(follow_symlinks=False)
                and entry.stat(follow_symlinks=False).st_mtime < cutoff
            ):
                Path(entry.path).unlink(missing_ok=True)  # a concurrent purge may be first
                deleted += 1
    return deleted


def load_upload(
    path: Path, settings: ServeConfig, policy: DecisionPolicy
) -> tuple[Image.Image, np.ndarray]:
    """An uploaded file -> (photo, uint8 model input: what the model process takes, never a
    float32 copy here); raises :class:`ImageError` with the reason."""
    photo = decode_upload(read_upload(path, settings.max_upload_bytes), settings, policy.image_size)
    return photo, preprocess.model_pixels(photo, policy.image_size, policy.resample)


def http_status(error: ImageError) -> int:
    """413 for uploads over the limits, 415 for a file in no accepted format, 400 for anything
    else that is not a usable photo."""
    if isinstance(error, ImageTooLarge):
        return 413
    return 415 if isinstance(error, UnsupportedFormat) else 400


