"""What the internet sends, against the real server (issue 27): bodies far over the limit, sized
and chunked; thousands of form parts; a URL in place of the photo; 16-bit, RGBA and palette PNG
bombs eight at once; EPS, TIFF and PSD; a client sending a byte a second. Each gets a 4xx with a
reason, a good photo is answered after each, and the server's process tree stays within 1 GB of
memory above idle throughout. The guard's rules are first checked in-process, on a bare app."""

from __future__ import annotations

import asyncio
import io
import select
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
from PIL import Image
from starlette.responses import JSONResponse
from starlette.testclient import TestClient
from starlette.types import Message, Receive, Scope, Send

from helpers.serve import CLASSES, image_bytes, running_service, save_champion, write_serve_params
from pox_pipeline.common.config import compose
from pox_pipeline.serving.upload_guard import BodyLimits, UploadGuard

TIMEOUT_S = 60
MEMORY_BUDGET = 1_000_000_000  # bytes above the idle server, whatever clients send
BODY_DEADLINE_S = 3.0  # serve.request_body_timeout_s of the test server
FAR_OVER = 200 * 1024 * 1024  # bytes
BOMB_SIDE = 6000  # 36 megapixels


# ---------------------------------------------------------------------------- in-process


async def echo(scope: Scope, receive: Receive, send: Send) -> None:
    """The app behind the guard: reads the whole body and says how many bytes came."""
    size, more = 0, True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    await JSONResponse({"bytes": size})(scope, receive, send)


LIMITS = BodyLimits(files=1, file_bytes=1000, deadline_s=5, request_bytes=1000)
MULTIPART_B = {"content-type": "multipart/form-data; boundary=b"}
BOUNDARY = "hostile-boundary-7d1f"
FORM = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def envelope(field: str = "image", name: str = "photo.png") -> tuple[bytes, bytes]:
    """A one-file multipart form's bytes before and after the file's content."""
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{field}\"; "
            f"filename=\"{name}\"\r\nContent-Type: image/png\r\n\r\n").encode()  # fmt: skip
    return head, f"\r\n--{BOUNDARY}--\r\n".encode()


def chunked_zeros(size: int, block: int = 1024 * 1024) -> Iterator[bytes]:
    """A form of one file of ``size`` zero bytes, as a chunked body (no Content-Length)."""
    head, tail = envelope()
    yield head
    for _ in range(size // block):
        yield bytes(block)
    yield tail


@pytest.fixture(scope="module")
def guarded() -> TestClient:
    """The guard before :func:`echo` (no lifespan: the client is not entered)."""
    routes = {
        "/many": BodyLimits(files=3, file_bytes=1000, deadline_s=5, request_bytes=3000),
        # three files of 100 kB each, but no more than 150 kB in all (a /predict_batch form)
        "/capped": BodyLimits(files=3, file_bytes=100_000, deadline_s=5, request_bytes=150_000),
    }
    return TestClient(UploadGuard(echo, default=LIMITS, routes=routes))


def files(count: int, size: int = 10) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("image", (f"{i}.png", b"x" * size, "image/png")) for i in range(count)]


def test_the_guard_passes_forms_of_files_within_the_limits(guarded: TestClient) -> None:
    response = guarded.post("/predict", files=files(1, 900))
    assert response.status_code == 200 and response.json()["bytes"] > 900
    assert guarded.post("/many", files=files(3, 900)).status_code == 200
    assert guarded.get("/predict").status_code == 200


def test_a_form_of_files_each_within_the_limit_is_refused_over_the_request_limit(
    guarded: TestClient,
) -> None:
    assert guarded.post("/capped", files=files(1, 90_000)).status_code == 200
    response = guarded.post("/capped", files=files(3, 90_000))
    assert response.status_code == 413, response.text
    assert "150,000 in all" in response.json()["error"]


def test_the_guard_refuses_bodies_over_the_limit_sized_or_chunked(guarded: TestClient) -> None:
    sized = guarded.post("/predict", files=files(1, LIMITS.max_bytes))
    chunked = guarded.post(
        "/predict", content=chunked_zeros(LIMITS.max_bytes + 1000, block=1000), headers=FORM
    )
    for response, what in ((sized, "the request body is"), (chunked, "passed")):
        assert response.status_code == 413, response.text
        assert what in response.json()["error"] and "limit" in response.json()["error"]
        assert response.headers["connection"] == "close"
    assert "content-length" not in chunked.request.headers


def test_the_guard_refuses_more_parts_than_files_and_text_in_place_of_a_file(
    guarded: TestClient,
) -> None:
    two = guarded.post("/predict", files=files(2))
    assert two.status_code == 413 and "at most 1 file" in two.json()["error"]
    assert guarded.post("/many", files=files(4)).status_code == 413
    text_field = (b'--b\r\nContent-Disposition: form-data; name="image"\r\n\r\n'
                  b"https://example.com/photo.jpg\r\n--b--\r\n")  # fmt: skip
    url = guarded.post("/predict", content=text_field, headers=MULTIPART_B)
    assert url.status_code == 400 and "never fetched" in url.json()["error"], url.text
    form = guarded.post("/predict", data={"image": "https://example.com/photo.jpg"})
    assert form.status_code == 415 and "multipart" in form.json()["error"]
    assert guarded.post("/predict", json={"image": "abc"}).status_code == 415
    no_boundary = guarded.post(
        "/predict", content=b"--b\r\n", headers={"content-type": "multipart/form-data"}
    )
    assert no_boundary.status_code == 400 and "boundary" in no_boundary.json()["error"]
    malformed = guarded.post(
        "/predict",
        content=b"--b\r\nContent-Disposition form-data\r\n\r\nxx\r\n--b--\r\n",
        headers=MULTIPART_B,
    )
    assert malformed.status_code == 400 and "malformed" in malformed.json()["error"]


def test_the_guard_answers_a_slow_body_with_408_at_its_deadline() -> None:
    """A (empty) chunk every 50 ms against a 0.3 s deadline: 408 at the deadline."""
    limits = BodyLimits(files=1, file_bytes=1000, deadline_s=0.3, request_bytes=1000)
    sent: list[Message] = []

    async def slow() -> Message:
        await asyncio.sleep(0.05)
        return {"type": "http.request", "body": b"", "more_body": True}

    async def record(message: Message) -> None:
        sent.append(message)

    headers = [(b"content-type", FORM["Content-Type"].encode())]
    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": headers}
    started = time.monotonic()
    asyncio.run(UploadGuard(echo, default=limits)(scope, slow, record))
    assert time.monotonic() - started < 1.0
    assert sent[0]["status"] == 408 and b"within 0.3 s" in sent[1]["body"]


# ---------------------------------------------------------------------------- the real server


@dataclass(frozen=True)
class Server:
    url: str
    params: Path
    log: Path

    def post(self, data: bytes, route: str = "/predict", name: str = "photo.png"):
        upload = {"image" if route != "/predict_batch" else "images": (name, data, "image/png")}
        return requests.post(f"{self.url}{route}", files=upload, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The served tiny champion with the shipped limits, but a 3 s body deadline."""
    save_champion()
    root = tmp_path_factory.mktemp("hostile")
    params = write_serve_params(
        root / "params.yaml",
        f"serve.request_body_timeout_s={BODY_DEADLINE_S}",
        f"serve.upload_dir={root / 'uploads'}",
    )
    (root / "tmp").mkdir()
    log = root / "server.log"
    with running_service(params, log, {"TMPDIR": str(root / "tmp")}) as url:
        yield Server(url, params, log)


def server_processes(params: Path) -> list[psutil.Process]:
    """The server's process tree: every process started with its POX_PARAMS."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("POX_PARAMS") == str(params):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def tree_rss(processes: list[psutil.Process]) -> int:
    total = 0
    for proc in processes:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total


@pytest.fixture(scope="module")
def idle_rss(server: Server) -> int:
    """The tree's memory once it has answered a photo (lazy allocations made), at rest."""
    assert_answers(server)
    time.sleep(1)
    processes = server_processes(server.params)
    assert len(processes) >= 3, "supervisor, API worker and model worker"
    return int(np.median([tree_rss(processes) for _ in range(5)]))


@contextmanager
def peak_rss(server: Server, idle: int, what: str) -> Iterator[None]:
    """Samples the tree's memory every 20 ms while the block runs; fails when its peak goes
    more than MEMORY_BUDGET above ``idle`` (the message carries the measured peak)."""
    processes = server_processes(server.params)
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss(processes))
            done.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield
    finally:
        done.set()
        sampler.join()
    above = peak[0] - idle
    print(f"\n{what}: peak {above / 1e6:,.0f} MB above idle ({idle / 1e6:,.0f} MB)")
    assert above <= MEMORY_BUDGET, f"{what}: the server took {above / 1e6:,.0f} MB above idle"


def assert_answers(server: Server) -> None:
    """A good photo is still answered."""
    response = server.post(image_bytes(seed=42))
    assert response.status_code == 200, response.text
    assert response.json()["label"] in CLASSES


def assert_refused(response: requests.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text[:500]
    reason = response.json()["error"]
    assert all(word in reason for word in words), reason


class ZeroFile:
    """A file of ``size`` zero bytes inside a form, read in blocks: requests sends it with its
    Content-Length and never holds it whole."""

    def __init__(self, size: int) -> None:
        self.parts = [*envelope()]
        self.remaining = size
        self.size = size + sum(map(len, self.parts))

    def __len__(self) -> int:
        return self.size

    def read(self, amount: int = 65536) -> bytes:
        if self.parts[0]:
            head, self.parts[0] = self.parts[0], b""
            return head
        if self.remaining:
            block = min(amount, self.remaining)
            self.remaining -= block
            return bytes(block)
        tail, self.parts[1] = self.parts[1], b""
        return tail


def test_bodies_far_over_the_limit_get_413_sized_and_chunked(server: Server, idle_rss: int) -> None:
    with peak_rss(server, idle_rss, "200 MB bodies"):
        sized = requests.post(f"{server.url}/predict", data=ZeroFile(FAR_OVER), headers=FORM,
                              timeout=TIMEOUT_S)  # fmt: skip
        assert sized.request.headers["Content-Length"] == str(len(ZeroFile(FAR_OVER)))
        assert_refused(sized, 413, "the request body is", "limit")
        assert_answers(server)
        chunked = requests.post(f"{server.url}/predict", data=chunked_zeros(FAR_OVER),
                                headers=FORM, timeout=TIMEOUT_S)  # fmt: skip
        assert chunked.request.headers["Transfer-Encoding"] == "chunked"
        assert_refused(chunked, 413, "passed", "limit")
        assert_answers(server)


def test_thousands_of_parts_get_413(server: Server, idle_rss: int) -> None:
    many = [("images", (f"{i}.png", b"x", "image/png")) for i in range(3000)]
    with peak_rss(server, idle_rss, "3,000 parts"):
        for route in ("/predict", "/predict_batch"):
            response = requests.post(f"{server.url}{route}", files=many, timeout=TIMEOUT_S)
            assert_refused(response, 413, "parts")
            assert_answers(server)


def test_a_url_in_place_of_the_photo_is_refused_and_never_fetched(server: Server) -> None:
    with socket.socket() as listener:  # where the URL points: nothing may connect
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.setblocking(False)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/photo.jpg"
        as_field = requests.post(f"{server.url}/predict", files={"image": (None, url)},
                                 timeout=TIMEOUT_S)  # fmt: skip
        assert_refused(as_field, 400, "text, not a file", "never fetched")
        as_form = requests.post(f"{server.url}/predict", data={"image": url}, timeout=TIMEOUT_S)
        assert_refused(as_form, 415, "multipart")
        as_json = requests.post(f"{server.url}/predict", json={"image": url}, timeout=TIMEOUT_S)
        assert_refused(as_json, 415, "application/json", "multipart")
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert_answers(server)


def png_bomb(mode: str, side: int = BOMB_SIDE) -> bytes:
    """A flat ``side`` x ``side`` PNG: megapixels in a file of kilobytes."""
    if mode == "P":
        image = Image.new("P", (side, side), 3)
        image.putpalette([value % 256 for value in range(768)])
    else:
        image = Image.new(mode, (side, side), {"I;16": 1000, "RGBA": (200, 150, 120, 128)}[mode])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def burst(server: Server, uploads: list[bytes]) -> list[requests.Response]:
    """All uploads posted at the same moment."""
    start = threading.Barrier(len(uploads))

    def post(data: bytes) -> requests.Response:
        start.wait()
        return server.post(data)

    with ThreadPoolExecutor(len(uploads)) as pool:
        return list(pool.map(post, uploads))


def test_eight_png_bombs_at_once_get_413_within_the_memory_budget(
    server: Server, idle_rss: int
) -> None:
    """16-bit grey, RGBA and palette PNGs of 36 megapixels, 49-152 KB each: before issue 27 the
    server decoded them all (about 4.8 GB, README); now each is refused from its header."""
    bombs = {mode: png_bomb(mode) for mode in ("I;16", "RGBA", "P")}
    assert max(map(len, bombs.values())) < 200_000
    uploads = [bombs[mode] for mode in ("I;16", "RGBA", "P", "I;16", "RGBA", "P", "I;16", "RGBA")]
    with peak_rss(server, idle_rss, "8 PNG bombs of 36 MP at once"):
        responses = burst(server, uploads)
    for response in responses:
        assert_refused(response, 413, "36,000,000 pixels", "limit")
    assert_answers(server)


def test_eight_pngs_at_the_decode_limit_at_once_are_answered_within_the_memory_budget(
    server: Server, idle_rss: int
) -> None:
    """Just under serve.max_decode_pixels (24 MP): decoded whole, then shrunk before any
    colour conversion, two at a time (serve.max_concurrent_decodes)."""
    side = 4800  # 23 MP
    pngs = {mode: png_bomb(mode, side) for mode in ("I;16", "RGBA", "P")}
    uploads = [pngs[mode] for mode in ("I;16", "RGBA", "P", "I;16", "RGBA", "P", "I;16", "RGBA")]
    with peak_rss(server, idle_rss, "8 PNGs of 23 MP at once"):
        responses = burst(server, uploads)
    for response in responses:
        assert response.status_code == 200, response.text
        assert response.json()["label"] in CLASSES


def other_formats() -> dict[str, bytes]:
    """EPS and TIFF as Pillow writes them; a PSD header (Pillow writes no PSD)."""
    found = {}
    photo = Image.open(io.BytesIO(image_bytes(seed=3)))
    for fmt in ("EPS", "TIFF"):
        buffer = io.BytesIO()
        photo.save(buffer, format=fmt)
        found[fmt] = buffer.getvalue()
    # signature, version 1, reserved, 3 channels, 40 x 48, 8 bits, RGB; empty sections
    found["PSD"] = (b"8BPS\x00\x01" + bytes(6) + b"\x00\x03" + (40).to_bytes(4, "big")
                    + (48).to_bytes(4, "big") + b"\x00\x08\x00\x03" + bytes(12))  # fmt: skip
    return found


@pytest.mark.parametrize("fmt", ["EPS", "TIFF", "PSD"])
def test_formats_the_service_does_not_list_get_415(server: Server, fmt: str) -> None:
    response = server.post(other_formats()[fmt], name=f"photo.{fmt.lower()}")
    assert_refused(response, 415, "accepted: JPEG, PNG, WEBP")
    assert_answers(server)


def slow_request(server: Server) -> tuple[socket.socket, bytes]:
    """A connection that has sent a /predict request's headers, with its body still to come
    (returned)."""
    head, tail = envelope()
    body = head + image_bytes(seed=1) + tail
    request = (f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {FORM['Content-Type']}"
               f"\r\nContent-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    port = int(server.url.rsplit(":", 1)[1])
    connection = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)
    connection.sendall(request)
    return connection, body


def answer_of(connection: socket.socket) -> bytes:
    """All the server sends until it closes the connection (as it does after a refusal)."""
    answer = b""
    while chunk := connection.recv(65536):
        answer += chunk
    return answer


def test_a_client_sending_a_byte_a_second_gets_408_and_holds_no_one_up(server: Server) -> None:
    slow, body = slow_request(server)
    with slow:
        started = time.monotonic()
        answered_meanwhile = ThreadPoolExecutor(1).submit(assert_answers, server)
        for byte in body:
            slow.sendall(bytes([byte]))
            if select.select([slow], [], [], 1.0)[0]:  # one byte a second, until answered
                break
            assert time.monotonic() - started < BODY_DEADLINE_S + 10, "never cut off"
        waited = time.monotonic() - started
        answer = answer_of(slow)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"did not arrive within 3 s" in answer
    assert BODY_DEADLINE_S - 0.5 < waited < BODY_DEADLINE_S + 5
    answered_meanwhile.result(timeout=TIMEOUT_S)
    assert_answers(server)


def test_over_max_concurrency_requests_get_429_until_the_slow_ones_are_cut_off(
    server: Server,
) -> None:
    """``serve.max_concurrency`` slow bodies hold every place: the next request gets BentoML's
    429 at once; at the body deadline they get 408 and photos are answered again."""
    places = int(compose().serve.max_concurrency)
    slow = [slow_request(server)[0] for _ in range(places)]
    try:
        time.sleep(0.5)  # all of them inside the server
        assert_refused(server.post(image_bytes(seed=8)), 429, "Too many requests")
        for connection in slow:
            assert answer_of(connection).startswith(b"HTTP/1.1 408 ")
    finally:
        for connection in slow:
            connection.close()
    assert_answers(server)


def test_the_log_holds_no_client_address(server: Server) -> None:
    log = server.log.read_text(errors="replace")
    assert "127.0.0.1:" not in log.replace(server.url.removeprefix("http://"), "")
    assert "path=/predict" not in log, "the access log is off by default"
