"""The listening side of the sidecar: bound sockets, and per connection the guards against
slow and idle clients and the connection cap (header/body timeouts, 408/503 envelopes)."""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import resource
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final, cast

import orjson
from aiohttp import web
from aiohttp.streams import StreamReader

from proxy.config import ServerConfig
from proxy.errors import ProxyError, RequestTimeout, TooManyConnections
from proxy.http.lane import Answer, Lane
from proxy.http.middleware import JSON, new_request_id
from proxy.http.parse_errors import EnvelopeRequestHandler

HEALTH_PATH = "/api/db/health"
HEALTH_LINE = b"GET " + HEALTH_PATH.encode() + b" "  # how a health check's request begins
OVERFLOW_HEADER_TIMEOUT = 2.0  # seconds an over-cap connection gets to send its headers
REFUSE_LINGER = 1.0  # seconds a refused connection is kept to read and drop the request
LANE_BUSY = 1e6  # the idle timer's horizon while a lane request runs (reset when it ends)


@dataclass(frozen=True, slots=True)
class Guard:
    """The per-connection limits: the cap (and its overflow reserve, where health is still
    answered and every other request gets 503), and the three timeouts."""

    max_connections: int
    header_timeout: float
    body_timeout: float
    idle_timeout: float

    @property
    def reserve(self) -> int:
        """Connections past the cap that are still read (health answered, others 503);
        past ``max_connections + reserve`` a connection gets 503 without being read."""
        return max(64, self.max_connections // 8)


def error_bytes(err: ProxyError, *, close: bool = True) -> bytes:
    """A whole HTTP/1.1 response with the error envelope, for a connection that has no
    request object (yet): a header timeout, or a connection refused at the door."""
    rid = new_request_id()
    body = orjson.dumps({"error": {**err.to_dict(), "request_id": rid}})
    head = [
        f"HTTP/1.1 {err.status} {_REASONS.get(err.status, 'Error')}",
        f"Content-Type: {JSON}",
        f"Content-Length: {len(body)}",
        f"X-Request-Id: {rid}",
    ]
    if err.retry_after is not None:
        head.append(f"Retry-After: {max(1, round(err.retry_after))}")
    if close:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


_REASONS = {408: "Request Timeout", 503: "Service Unavailable"}


def too_many() -> TooManyConnections:
    return TooManyConnections(
        "the sidecar has as many connections as it accepts; retry shortly", retry_after=1
    )


class GuardedHandler(EnvelopeRequestHandler):
    """aiohttp's connection protocol (parser errors in the envelope) plus two timers, armed
    only when needed: headers that do not complete within ``header_timeout`` of their first
    byte (408, closed), and a body that does not complete within ``body_timeout`` of its
    headers (the handler's read raises 408 ``body_timeout``; the connection closes after the
    answer). Idle keep-alive connections are aiohttp's ``keepalive_timeout``
    (``idle_timeout``). A request that arrives whole in one read, the usual case, arms
    nothing. With ``lane``, whole shortcut requests on an idle connection skip aiohttp
    (``lane.Lane``; the ``lane_*`` methods are what it needs of this protocol)."""

    __slots__ = ("_body", "_body_timer", "_guard", "_header_timeout", "_header_timer", "_lane")

    def __init__(
        self, manager: web.Server, guard: Guard, lane: Answer | None = None, **kwargs: Any
    ) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._header_timeout = guard.header_timeout
        self._header_timer: asyncio.TimerHandle | None = None
        self._body: StreamReader | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._lane = None if lane is None else Lane(lane, self)

    def overflow(self, answer: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]) -> None:
        """This connection is past the cap: a short header timeout, and ``answer``."""
        self._header_timeout = min(self._header_timeout, OVERFLOW_HEADER_TIMEOUT)
        self._request_handler = answer

    def data_received(self, data: bytes) -> None:
        lane = self._lane
        if lane is None or not lane.offer(data):
            self.lane_feed(data)

    def lane_feed(self, data: bytes) -> None:
        """aiohttp's reading, with the two timers."""
        body = self._body
        in_body = body is not None and not body.is_eof()
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:  # a request's headers are complete
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            if self._messages:
                self._watch_body(self._messages[-1][1])
        elif data and not in_body and self._header_timer is None and not self._force_close:
            self._header_timer = self._loop.call_later(self._header_timeout, self._headers_late)

    def lane_idle(self) -> bool:
        """Nothing of aiohttp's is under way: no request queued or running, no partial
        headers or body, no upgrade, not closing."""
        body = self._body
        return not (
            self._messages
            or self._request_in_progress
            or self._header_timer is not None
            or (body is not None and not body.is_eof())
            or self._payload_parser is not None
            or self._upgraded
            or self._close
            or self._force_close
        )

    def lane_begin(self) -> None:
        """A lane request runs: shutdown waits for it, the idle timer does not close."""
        self._request_in_progress = True
        self._next_keepalive_close_time = self._loop.time() + LANE_BUSY
        if self._manager is not None:
            self._manager.requests_count += 1

    def lane_end(self) -> None:
        self._request_in_progress = False
        waiter = self._handler_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        timeout = self._keepalive_timeout
        if not self._force_close and timeout > 0:
            close_time = self._loop.time() + timeout
            self._next_keepalive_close_time = close_time
            if self._keepalive_handle is None:
                self._keepalive_handle = self._loop.call_at(close_time, self._process_keepalive)

    def _watch_body(self, payload: StreamReader) -> None:
        if payload.is_eof() or self._guard.body_timeout <= 0:
            return
        if self._body_timer is not None:
            self._body_timer.cancel()
        self._body = payload
        self._body_timer = self._loop.call_later(self._guard.body_timeout, self._body_late, payload)
        payload.on_eof(self._body_done)

    def _body_done(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        self._body = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self._force_close or self._close or self._messages or self._request_in_progress:
            return
        if self.transport is not None:
            self.transport.write(
                error_bytes(
                    RequestTimeout(
                        f"the request headers did not arrive within {self._header_timeout:g} s",
                        code="header_timeout",
                    )
                )
            )
        self.force_close()

    def _body_late(self, payload: StreamReader) -> None:
        self._body_timer = None
        if payload.is_eof():
            return
        payload.set_exception(
            RequestTimeout(
                f"the request body did not arrive within {self._guard.body_timeout:g} s",
                code="body_timeout",
            )
        )
        self._lingering_time = 0.0  # do not wait for the rest of it either
        self.close()  # after the answer

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._lane is not None:
            self._lane.connection_lost()
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = None
        self._body = None
        super().connection_lost(exc)


class Refused(asyncio.Protocol):
    """A connection past the cap and its reserve: read the first bytes of its request
    (for at most REFUSE_LINGER); a health check is handed to a real handler, anything
    else gets 503 and is closed after a short linger (reading and dropping what comes,
    so that closing does not reset the answer away)."""

    def __init__(self, gate: ConnectionGate) -> None:
        self._gate = gate
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._head = b""
        self._answered = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._timer = self._gate.loop.call_later(REFUSE_LINGER, self._refuse)

    def data_received(self, data: bytes) -> None:
        if self._answered:
            return
        self._head += data
        if self._head.startswith(HEALTH_LINE):
            self._hand_over()
        elif len(self._head) >= len(HEALTH_LINE) or not HEALTH_LINE.startswith(self._head):
            self._refuse()

    def _hand_over(self) -> None:
        transport = self._transport
        assert transport is not None
        if self._timer is not None:
            self._timer.cancel()
        self._answered = True
        handler = self._gate.handler(overflow=True)
        transport.set_protocol(handler)
        handler.connection_made(transport)
        handler.data_received(self._head)

    def _refuse(self) -> None:
        transport = self._transport
        if self._answered or transport is None:
            return
        self._answered = True
        self._gate.refused += 1
        transport.write(error_bytes(too_many()))
        if transport.can_write_eof():
            transport.write_eof()
        self._timer = self._gate.loop.call_later(REFUSE_LINGER, transport.close)

    def eof_received(self) -> bool:
        if self._transport is not None:
            self._refuse()
            self._transport.close()
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._transport = None


class ConnectionGate:
    """The protocol factory the listening sockets use in place of aiohttp's ``Server``:
    every connection is still registered with (and shut down by) that server."""

    def __init__(self, server: web.Server, guard: Guard, lane: Answer | None = None) -> None:
        self._server = server
        self._guard = guard
        self._lane = lane
        self.loop = asyncio.get_running_loop()
        self.refused = 0  # requests and connections answered 503, for /metrics
        self._answer = self._overflow_answer
        self._kwargs = {**server._kwargs, "keepalive_timeout": guard.idle_timeout}

    def __call__(self) -> asyncio.BaseProtocol:
        guard = self._guard
        count = len(self._server._connections)
        if count >= guard.max_connections + guard.reserve:
            return Refused(self)
        return self.handler(overflow=count >= guard.max_connections)

    def handler(self, *, overflow: bool) -> GuardedHandler:
        lane = None if overflow else self._lane
        handler = GuardedHandler(self._server, self._guard, lane, loop=self.loop, **self._kwargs)
        if overflow:
            handler.overflow(self._answer)
        return handler

    async def _overflow_answer(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.method == "GET" and request.path == HEALTH_PATH:
            return await self._server.request_handler(request)
        self.refused += 1
        err = too_many()
        rid = new_request_id()
        response = web.Response(
            body=orjson.dumps({"error": {**err.to_dict(), "request_id": rid}}),
            status=err.status,
            content_type=JSON,
            headers={"Retry-After": "1", "X-Request-Id": rid},
        )
        response.force_close()
        return response


# ---- listening sockets ----------------------------------------------------------------


class AddressInUse(OSError):
    """The port is held by another process (this one's own workers share one socket)."""


def bind(host: str, port: int, backlog: int = 1024) -> list[socket.socket]:
    """Listening sockets for every address of ``host``, bound exclusively: no SO_REUSEPORT,
    so a second process cannot join the port (``--workers`` inherit these sockets)."""
    infos = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_ADDRCONFIG
    )
    seen: set[tuple[int, Any]] = set()
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as err:
                if err.errno == errno.EADDRINUSE:
                    raise AddressInUse(
                        errno.EADDRINUSE,
                        f"cannot listen on {host}:{port}: address already in use "
                        "(another process, perhaps another dbproxy, holds the port)",
                    ) from None
                raise
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def inherited(fds: list[int]) -> list[socket.socket]:
    """The listening sockets a ``--workers`` parent bound and passed down."""
    sockets = [socket.socket(fileno=fd) for fd in fds]
    for sock in sockets:
        sock.setblocking(False)
    return sockets


log = logging.getLogger(__name__)

FD_HEADROOM: Final = 256  # descriptors beyond client connections: pools, files, Redis


def connection_guard(s: ServerConfig) -> Guard:
    """The server settings as a Guard, the cap lowered (with a warning) when even the
    raised file-descriptor limit cannot hold it: refusing beats running out of them."""
    guard = Guard(
        s.max_connections, s.header_timeout_seconds, s.body_timeout_seconds, s.idle_timeout_seconds
    )
    wanted = guard.max_connections + guard.reserve + FD_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        top = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (top, hard))
            soft = top
        except (ValueError, OSError):
            pass
    if soft < wanted:
        cap = max(16, (soft - FD_HEADROOM) * 8 // 9)
        log.warning(
            "max_connections %d does not fit the file-descriptor limit %d: using %d",
            guard.max_connections,
            soft,
            cap,
        )
        guard = replace(guard, max_connections=cap)
    return guard


async def listen(
    server: web.Server,
    settings: ServerConfig,
    sockets: Sequence[socket.socket],
    tls: ssl.SSLContext | None = None,
    lane: Answer | None = None,
) -> tuple[ConnectionGate, list[asyncio.Server]]:
    """Accept on ``sockets`` through the connection guard (cap, header/body/idle timeouts,
    parser errors in the envelope): what ``serve``, ``collector`` and ``injector`` listen
    with; ``tls``: HTTPS (the handshake is done before the guard sees a byte)."""
    loop = asyncio.get_running_loop()
    gate = ConnectionGate(server, connection_guard(settings), lane)
    extra: dict[str, Any] = {"ssl": tls, "ssl_handshake_timeout": 10.0} if tls else {}
    listeners = [
        await loop.create_server(gate, sock=sock, backlog=1024, **extra) for sock in sockets
    ]
    return gate, listeners


GC_THRESHOLDS: Final = (50_000, 20, 20)


def tune_gc() -> None:
    """Once started: everything allocated so far (modules, pools, compiled policies) is
    moved out of the cycle collector's sight (``gc.freeze``), and young objects are
    collected every 50,000 net allocations instead of 700. A request allocates dozens of
    short-lived objects that reference counting frees anyway; with the default threshold
    the collector ran a few hundred times a second, re-scanning the same survivors. The
    benchmark measured about 7 % less CPU per GET-by-id; cyclic garbage waits a little
    longer, which costs at most a few MB."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


# ---- running an application -------------------------------------------------------------

ServerHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


@dataclass
class Running:
    """An application accepting on its sockets through the connection guard."""

    runner: web.AppRunner
    server: web.Server
    gate: ConnectionGate
    listeners: list[asyncio.Server]

    def clients(self) -> dict[str, int]:
        """Open client connections and the ones refused, for /metrics."""
        return {"open": len(self.server.connections), "refused": self.gate.refused}

    async def stop(self) -> None:
        """Stop accepting, then wait for the handlers and run the cleanup contexts."""
        for listener in self.listeners:
            listener.close()
        await self.runner.cleanup()


async def start(
    app: web.Application,
    settings: ServerConfig,
    sockets: Sequence[socket.socket],
    *,
    shutdown_timeout: float = 10.0,
    wrap: Callable[[ServerHandler], ServerHandler] | None = None,
    tls: ssl.SSLContext | None = None,
    lane: Answer | None = None,
) -> Running:
    """Start ``app`` (its startup contexts run) and accept on ``sockets``; ``wrap``
    replaces the server's request handler (the sidecar's by-id fast path), ``lane`` answers
    the fast lane's requests (``lane.Lane``); with ``tls`` the sockets speak HTTPS."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    server = runner.server
    assert server is not None
    if wrap is not None:
        server.request_handler = wrap(server.request_handler)
    gate, listeners = await listen(server, settings, sockets, tls, lane)
    return Running(runner, server, gate, listeners)
