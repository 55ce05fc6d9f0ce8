"""Request bodies bounded before BentoML reads them: size, parts, files only, time.

BentoML parses a multipart body with Starlette before any code of the service runs, and does
not bound it: Starlette's "Too many files" (3,000 parts) and "Invalid multipart data" surface
as 500s, a text field in place of a photo is fetched as a URL (``serde.ensure_file``, also for
``application/x-www-form-urlencoded``), and a client sending a byte a second holds its request
(and one of ``serve.max_concurrency``'s places) until the request timeout. :class:`UploadGuard`,
an ASGI middleware on the API service, reads each body as it passes to BentoML and stops it
with a JSON ``{"error": reason}``:

- 413: over the byte limit, from ``Content-Length`` before a byte reaches BentoML, or when a
  chunked body passes it; more multipart parts than the route takes files;
- 400: a part that is not a file (a URL or text in place of the photo: never fetched), a
  malformed multipart body; 415: a body that is not multipart/form-data (JSON, a urlencoded
  form: BentoML logs the values it cannot validate);
- 408: a body still incomplete at the deadline.

A refused body is read on to its end and discarded (no longer than the deadline) before the
answer, so a client that sends its whole body before reading (requests, urllib3) still gets
the status instead of a reset connection; the connection is closed after it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Room in a body for the multipart framing (boundaries, part headers), beyond the files.
FORM_OVERHEAD_BYTES = 64 * 1024
MAX_PART_HEADER_BYTES = 16 * 1024  # one part's headers (its name and filename)
BODY_METHODS = ("POST", "PUT", "PATCH", "DELETE")


@dataclass(frozen=True)
class BodyLimits:
    """What one request body to a route may be: ``files`` uploads of at most ``file_bytes``
    each (plus the form's framing), at most ``request_bytes`` in all, complete within
    ``deadline_s`` of the request's start."""

    files: int
    file_bytes: int
    deadline_s: float
    request_bytes: int

    @property
    def max_bytes(self) -> int:
        return min(self.files * self.file_bytes, self.request_bytes) + FORM_OVERHEAD_BYTES


class Refused(Exception):
    """A body the guard stops; ``reason`` is fit for the client."""

    def __init__(self, status: int, reason: str, drain: bool = True) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.drain = drain  # read the rest of the body before answering (not for a slow one)


class BodyCheck:
    """Follows one body chunk by chunk: its size, and its multipart/form-data parts
    (python-multipart's parser, headers only: part contents are neither copied nor kept).
    Any other body is refused: the API's routes take files only, and BentoML would fetch a
    URL of a urlencoded form and log the values of a JSON body it cannot validate."""

    def __init__(self, headers: Headers, limits: BodyLimits) -> None:
        self.limits = limits
        self.received = 0
        self.complete = False
        self.parts = 0
        self._name = bytearray()  # the part header being read: its name and value
        self._value = bytearray()
        self._disposition = b""
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_bytes:
            raise self.too_large(f"the request body is {int(declared):,} bytes")
        media_type, options = parse_options_header(headers.get("content-type"))
        if media_type != b"multipart/form-data":
            raise Refused(
                415, f"the body is {media_type.decode('latin-1') or 'of no declared type'}: send "
                "the photo as a file in a multipart/form-data form",
            )  # fmt: skip
        if not options.get(b"boundary"):
            raise Refused(400, "the multipart/form-data body has no boundary")
        callbacks = {
            "on_part_begin": self._part_begins,
            "on_header_field": lambda data, start, end: self._add(self._name, data[start:end]),
            "on_header_value": lambda data, start, end: self._add(self._value, data[start:end]),
            "on_header_end": self._header_ends,
            "on_headers_finished": self._headers_finished,
        }
        self.parser = MultipartParser(options[b"boundary"], callbacks)  # type: ignore[arg-type]

    def too_large(self, what: str) -> Refused:
        return Refused(
            413,
            f"{what}; the limit is {self.limits.max_bytes:,} bytes ({self.limits.files} "
            f"file(s) of at most {self.limits.file_bytes:,} bytes, "
            f"{self.limits.request_bytes:,} in all)",
        )

    def feed(self, message: Message) -> None:
        """One ``http.request`` message: raises :class:`Refused` when the body breaks a limit."""
        chunk = message.get("body", b"")
        self.received += len(chunk)
        self.complete = not message.get("more_body", False)
        if self.received > self.limits.max_bytes:
            raise self.too_large(f"the request body passed {self.received:,} bytes")
        try:
            self.parser.write(chunk)
            if self.complete:
                self.parser.finalize()
        except FormParserError as error:
            raise Refused(400, f"the multipart/form-data body is malformed ({error})") from None

    def _part_begins(self) -> None:
        self.parts += 1
        if self.parts > self.limits.files:
            raise Refused(
                413, f"more than {self.limits.files} parts in the form; this route takes at "
                f"most {self.limits.files} file(s)",
            )  # fmt: skip
        self._disposition = b""

    def _add(self, buffer: bytearray, data: bytes) -> None:
        buffer += data
        if len(self._name) + len(self._value) > MAX_PART_HEADER_BYTES:
            raise Refused(400, f"a form part's header is over {MAX_PART_HEADER_BYTES:,} bytes")

    def _header_ends(self) -> None:
        if self._name.lower() == b"content-disposition":
            self._disposition = bytes(self._value)
        self._name.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"filename" not in options:
            field = options.get(b"name", b"").decode("latin-1")
            raise Refused(
                400, f"form field {field!r} is text, not a file: send the photo itself as a "
                "file (a URL is never fetched)",
            )  # fmt: skip


class UploadGuard:
    """ASGI middleware: every request with a body is checked by a :class:`BodyCheck` with
    the limits of its route (``routes``: path -> limits; others get ``default``)."""

    def __init__(
        self, app: ASGIApp, default: BodyLimits, routes: Mapping[str, BodyLimits] | None = None
    ) -> None:
        self.app = app
        self.default = default
        self.routes = dict(routes or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        limits = self.routes.get(scope["path"].rstrip("/"), self.default)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limits.deadline_s
        headers = Headers(scope=scope)
        try:
            check = BodyCheck(headers, limits)
        except Refused as refusal:
            # a client waiting for "100 Continue" has sent nothing yet: answer at once
            refusal.drain = headers.get("expect", "").lower() != "100-continue"
            await self.refuse(refusal, scope, receive, send, deadline)
            return
        refused: asyncio.Future[Refused] = loop.create_future()

        async def checked_receive() -> Message:
            if check.complete:  # the app may wait for the disconnect as long as it likes
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
                if message["type"] == "http.request":
                    check.feed(message)
                return message
            except TimeoutError:
                refusal = Refused(
                    408, f"the request body did not arrive within {limits.deadline_s:g} s "
                    f"({check.received:,} bytes came)", drain=False,
                )  # fmt: skip
            except Refused as error:
                refusal = error
                refusal.drain = not check.complete
            refused.set_result(refusal)
            return await loop.create_future()  # never done: the app is cancelled here

        app = asyncio.ensure_future(self.app(scope, checked_receive, send))
        try:
            await asyncio.wait({app, refused}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # BentoML's request timeout: the app goes too
            app.cancel()
            raise
        if not refused.done():
            refused.cancel()
            await app  # its result, or its exception
            return
        app.cancel()
        await asyncio.gather(app, return_exceptions=True)
        await self.refuse(refused.result(), scope, receive, send, deadline)

    @staticmethod
    async def refuse(
        refusal: Refused, scope: Scope, receive: Receive, send: Send, deadline: float
    ) -> None:
        """Discard the rest of the body (until the deadline), then answer and close."""
        if refusal.drain:
            try:
                async with asyncio.timeout_at(deadline):
                    while (message := await receive())["type"] == "http.request" and message.get(
                        "more_body", False
                    ):
                        pass
            except TimeoutError:
                pass
        response = JSONResponse(
            {"error": refusal.reason}, status_code=refusal.status, headers={"connection": "close"}
        )
        await response(scope, receive, send)
