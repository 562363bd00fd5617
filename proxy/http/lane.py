"""The fast lane: a whole ``GET /api/db/{c}/{id}`` or ``POST /api/db/{c}/query`` that arrives
in one read on an idle connection is parsed by llhttp (httptools) and answered without
aiohttp's request, task and response machinery; everything else is aiohttp's. See docs/http.md."""

from __future__ import annotations

import asyncio
import logging
import platform
import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Protocol

import httptools
from aiohttp import __version__ as aiohttp_version
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

log = logging.getLogger(__name__)

MAX_CHUNK = 16384  # a lane request is at most this many bytes, headers and body together
MAX_HEADERS = 64
MAX_BACKLOG = 65536  # bytes read while a lane request runs, before reading pauses
ROUTED = frozenset({"migrations", "schema"})  # reserved names with GET routes of their own
SERVER = f"Python/{platform.python_version_tuple()[0]}.{platform.python_version_tuple()[1]} "
SERVER += f"aiohttp/{aiohttp_version}"
_REFUSED = frozenset({"transfer-encoding", "expect", "upgrade", "x-transaction-id"})


class LaneRequest(dict[Any, Any]):
    """The part of ``web.Request`` the shortcut handlers read (``fast_path``): method,
    path, headers, the body, and the per-request state (``request[KEY]``)."""

    __slots__ = ("body", "content_length", "content_type", "headers", "method", "raw_path")

    query_string = ""

    def __init__(
        self, method: str, raw_path: str, headers: CIMultiDictProxy[str], body: bytes
    ) -> None:
        super().__init__()
        self.method = method
        self.raw_path = raw_path
        self.headers = headers
        self.body = body
        self.content_length: int | None = len(body) if "Content-Length" in headers else None
        raw_type = headers.get("Content-Type")
        self.content_type = (
            "application/octet-stream"
            if raw_type is None
            else raw_type.split(";", 1)[0].strip().lower()
        )

    @property
    def path(self) -> str:
        return self.raw_path

    @property
    def path_qs(self) -> str:
        return self.raw_path

    async def read(self) -> bytes:
        return self.body


class _Message:
    """What llhttp reports of one chunk: how many messages began and ended, the URL and
    the headers of the first."""

    __slots__ = ("begun", "body", "done", "headers", "url")

    def __init__(self) -> None:
        self.begun = 0
        self.done = 0
        self.url = b""
        self.headers: list[tuple[str, str]] = []
        self.body = b""

    def on_message_begin(self) -> None:
        self.begun += 1

    def on_url(self, url: bytes) -> None:
        if self.begun == 1:
            self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.begun == 1:
            # decoded as aiohttp's parser decodes them, so both ways in see the same text
            self.headers.append(
                (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
            )

    def on_body(self, body: bytes) -> None:
        if self.begun == 1:
            self.body += body

    def on_message_complete(self) -> None:
        self.done += 1


NOT_ONE = None  # the chunk is not exactly one whole message: the connection leaves the lane
ROUTER = "router"  # one whole message, for aiohttp


def take(data: bytes) -> LaneRequest | str | None:
    """Judge a chunk that starts at a message boundary: the lane's request, ``ROUTER`` (one
    whole message for aiohttp) or ``NOT_ONE`` (partial, several or malformed)."""
    msg = _Message()
    parser = httptools.HttpRequestParser(msg)
    try:
        parser.feed_data(data)
    except (httptools.HttpParserError, httptools.HttpParserUpgrade):
        return NOT_ONE  # malformed, or no longer HTTP after it
    if msg.begun != 1 or msg.done != 1:
        return NOT_ONE
    if len(data) > MAX_CHUNK or len(msg.headers) > MAX_HEADERS:
        return ROUTER
    if parser.get_http_version() != "1.1":
        return ROUTER
    method = parser.get_method()
    if method not in (b"GET", b"POST"):
        return ROUTER
    return _eligible(method.decode(), msg)


def _eligible(method: str, msg: _Message) -> LaneRequest | str:
    """The request, when it is one the shortcuts answer (the rules of ``fast_path``)."""
    url = msg.url
    if b"?" in url or b"%" in url or b"#" in url or not url.startswith(b"/api/db/"):
        return ROUTER
    parts = url.split(b"/")
    if len(parts) != 5 or not parts[3] or not parts[4]:
        return ROUTER
    if method == "GET":
        if parts[4] == b"count" or msg.body:
            return ROUTER
    elif parts[4] != b"query":
        return ROUTER
    if parts[3].decode("latin-1") in ROUTED:
        return ROUTER
    lengths = 0
    for name, value in msg.headers:
        low = name.lower()
        if low in _REFUSED:
            return ROUTER
        if low == "content-length":
            lengths += 1
        elif low == "connection" and value.strip().lower() != "keep-alive":
            return ROUTER  # close (or anything but the default) is aiohttp's to honour
    if lengths > 1 or (method == "POST" and lengths == 0):
        return ROUTER
    try:
        raw_path = url.decode("ascii")
    except UnicodeDecodeError:
        return ROUTER
    return LaneRequest(method, raw_path, CIMultiDictProxy(CIMultiDict(msg.headers)), msg.body)


class _Date:
    """The Date header, formatted once a second."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = -1
        self._value = ""

    def now(self) -> str:
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._value = formatdate(second, usegmt=True)
        return self._value


_DATE = _Date()
_REASONS = {s.value: s.phrase for s in HTTPStatus}


def serialize(response: web.StreamResponse) -> bytes:
    """The response as HTTP/1.1 bytes: status line, its headers, Content-Length, Date and
    Server as aiohttp writes them, and the body."""
    assert isinstance(response, web.Response)
    body = response.body
    assert isinstance(body, bytes | bytearray)
    status = response.status
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}"]
    for name, value in response.headers.items():
        if name == "Content-Length":
            continue
        if "\r" in value or "\n" in value:  # aiohttp refuses these too
            raise ValueError(f"header {name} holds a line break")
        lines.append(f"{name}: {value}")
    lines.append(f"Content-Length: {len(body)}")
    lines.append(f"Date: {_DATE.now()}")
    lines.append(f"Server: {SERVER}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + bytes(body)


Answer = Callable[[LaneRequest], Awaitable[web.StreamResponse]]


class LaneHost(Protocol):
    """What the lane needs of its connection's aiohttp protocol (``server.GuardedHandler``)."""

    transport: asyncio.Transport | None

    @property
    def writing_paused(self) -> bool: ...

    async def _drain_helper(self) -> None: ...

    def lane_idle(self) -> bool: ...

    def lane_feed(self, data: bytes) -> None: ...

    def lane_begin(self) -> None: ...

    def lane_end(self) -> None: ...


class Lane:
    """One connection's lane: a whole eligible request on an idle connection is answered
    here, one at a time; what arrives meanwhile waits (reading pauses past MAX_BACKLOG)
    and is offered again afterwards, so answers keep their order. A chunk that is not one
    whole message (pipelined, partial, malformed) goes to aiohttp, and the connection
    stays aiohttp's from then on: its parser may hold a partial message."""

    __slots__ = ("_answer", "_backlog", "_host", "_on", "_paused", "_size", "_task")

    def __init__(self, answer: Answer, host: LaneHost) -> None:
        self._answer = answer
        self._host = host
        self._on = True
        self._task: asyncio.Task[None] | None = None
        self._backlog: list[bytes] = []
        self._size = 0
        self._paused = False

    def offer(self, data: bytes) -> bool:
        """True when the lane took ``data`` (answers it, or holds it until its answer is
        written); False: aiohttp's, as it came."""
        if self._task is not None:
            self._backlog.append(data)
            self._size += len(data)
            transport = self._host.transport
            if self._size > MAX_BACKLOG and not self._paused and transport is not None:
                transport.pause_reading()
                self._paused = True
            return True
        if not self._on or not data:
            return False
        verdict = take(data)
        if verdict is NOT_ONE:
            self._on = False
            return False
        if isinstance(verdict, LaneRequest) and self._host.lane_idle():
            self._task = asyncio.get_running_loop().create_task(self._run(verdict))
            return True
        return False

    async def _run(self, request: LaneRequest) -> None:
        host = self._host
        host.lane_begin()
        try:
            try:
                payload = serialize(await self._answer(request))
            except Exception:  # the envelope answers every error: this is a bug of ours
                log.exception("the fast lane failed a request")
                payload = INTERNAL_ERROR
            transport = host.transport
            if transport is not None and not transport.is_closing():
                transport.write(payload)
                if payload is INTERNAL_ERROR:
                    self._on = False
                    transport.close()
                elif host.writing_paused:
                    await host._drain_helper()
        finally:
            host.lane_end()
            self._task = None
        self._resume()

    def _resume(self) -> None:
        data = b"".join(self._backlog)
        self._backlog.clear()
        self._size = 0
        transport = self._host.transport
        if self._paused:
            self._paused = False
            if transport is not None:
                transport.resume_reading()
        if data and transport is not None and not self.offer(data):
            self._host.lane_feed(data)

    def connection_lost(self) -> None:
        self._backlog.clear()
        self._on = False


_ERROR_BODY = b'{"error":{"code":"internal_error","message":"internal error"}}'
INTERNAL_ERROR = (
    b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_ERROR_BODY), _ERROR_BODY)
)
