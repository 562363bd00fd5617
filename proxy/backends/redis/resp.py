"""One pipelined Redis connection (hiredis) for the read cache's hot path.
Why it exists and how it fails: docs/redis.md."""

from __future__ import annotations

import asyncio
import collections
import ssl
from typing import Any, Final, cast

import hiredis
from redis.asyncio.connection import SSLConnection, parse_url

from proxy.tls import tls_failure

ReplyError: Final = hiredis.ReplyError

Arg = bytes | str | int | float


class PipeBroken(Exception):
    """The connection is gone; every command waiting on it failed with this."""


class Pipe(asyncio.Protocol):
    """A connected pipe: ``call(*args)`` returns a future of the reply. Every command
    must be answered within ``deadline`` seconds of being queued, or the pipe breaks."""

    def __init__(self, deadline: float) -> None:
        if not deadline > 0:
            raise ValueError(f"deadline must be > 0, got {deadline!r}")
        self.deadline = deadline
        self._loop = asyncio.get_running_loop()
        self._reader = hiredis.Reader()
        self._waiting: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self._out: list[bytes] = []
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._overdue: asyncio.Future[Any] | None = None  # found late once, given one turn
        self._broken: PipeBroken | None = None

    @property
    def broken(self) -> bool:
        return self._broken is not None

    @property
    def in_flight(self) -> int:
        """Commands sent (or about to be) and not answered yet."""
        return len(self._waiting)

    def call(self, *args: Arg) -> asyncio.Future[Any]:
        """Queue one command; it is written at the end of this event-loop turn together
        with every other command queued in the turn. Raises ``PipeBroken`` at once when
        the pipe is broken. Cancelling the future abandons the reply, not the command."""
        if self._broken is not None:
            raise self._broken
        loop = self._loop
        future = loop.create_future()
        due = loop.time() + self.deadline
        self._waiting.append((future, due))
        if not self._out:
            loop.call_soon(self._send)
        # (hiredis's stub types the argument as a 1-tuple)
        self._out.append(hiredis.pack_command(args))  # type: ignore[arg-type]
        if self._timer is None:
            self._timer = loop.call_at(due, self._check)
        return future

    def close(self) -> None:
        self._break(PipeBroken("cache Redis connection closed"))

    # -- internals ---------------------------------------------------------------------

    def _send(self) -> None:
        out, self._out = self._out, []
        transport = self._transport
        if transport is not None and self._broken is None and out:
            transport.writelines(out)

    def _check(self) -> None:
        """Fires at the oldest waiting command's deadline (or earlier): break if that
        command is still unanswered, else wait for the next oldest's deadline. Commands
        are answered in order, so the oldest one is the only one to watch. A command found
        late is given one more loop turn first: after a stall of this process, timers run
        before the loop reads its sockets, and the reply may be waiting there already."""
        self._timer = None
        if self._broken is not None or not self._waiting:
            return
        future, due = self._waiting[0]
        if due > self._loop.time():
            self._timer = self._loop.call_at(due, self._check)
        elif self._overdue is not future:
            self._overdue = future
            self._send()  # in case the stall came before this turn's write
            self._timer = self._loop.call_later(0.001, self._check)
        else:
            self._break(PipeBroken(f"no reply from the cache Redis within {self.deadline}s"))

    def _break(self, why: PipeBroken) -> None:
        if self._broken is not None:
            return
        self._broken = why
        self._out.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.abort()
        waiting, self._waiting = self._waiting, collections.deque()
        for future, _ in waiting:
            if not future.done():
                future.set_exception(why)

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport: no isinstance
        if self._broken is not None:  # closed while connecting
            cast(asyncio.Transport, transport).abort()
            return
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        waiting = self._waiting
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self._break(PipeBroken(f"cache Redis protocol error: {exc}"))
                return
            if reply is False:
                return
            if not waiting:
                self._break(PipeBroken("cache Redis sent a reply nobody asked for"))
                return
            future = waiting.popleft()[0]
            if not future.done():  # its caller may have given up
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._break(PipeBroken("cache Redis connection lost"))


def _ssl_context(opts: dict[str, Any]) -> ssl.SSLContext:
    """The TLS context a ``rediss://`` URL asks for (redis-py's query parameters)."""
    ctx = ssl.create_default_context(cafile=opts.get("ssl_ca_certs"))
    reqs = str(opts.get("ssl_cert_reqs", "required")).lower()
    check = opts.get("ssl_check_hostname", True)
    if isinstance(check, str):
        check = check.lower() not in ("false", "0", "no", "off")
    if reqs == "none":
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.check_hostname = bool(check)
        ctx.verify_mode = ssl.CERT_OPTIONAL if reqs == "optional" else ssl.CERT_REQUIRED
    if opts.get("ssl_certfile"):
        ctx.load_cert_chain(opts["ssl_certfile"], opts.get("ssl_keyfile"))
    return ctx


async def open_pipe(url: str, deadline: float, connect_timeout: float) -> Pipe:
    """Connect to the Redis of ``url`` (``redis://`` or ``rediss://``, with the user,
    password and database number it names) within ``connect_timeout`` seconds. Raises
    ``PipeBroken`` on any failure; the message never contains the URL."""
    opts: dict[str, Any] = dict(parse_url(url))
    if "path" in opts:
        raise ValueError("the cache needs a redis:// or rediss:// URL")
    loop = asyncio.get_running_loop()
    pipe = Pipe(deadline)
    tls = _ssl_context(opts) if opts.get("connection_class") is SSLConnection else None
    host = opts.get("host") or "localhost"
    try:
        async with asyncio.timeout(connect_timeout):
            await loop.create_connection(lambda: pipe, host, int(opts.get("port") or 6379), ssl=tls)
            handshake = []
            password, username = opts.get("password"), opts.get("username")
            if password is not None:
                auth = ("AUTH", username, password) if username else ("AUTH", password)
                handshake.append(pipe.call(*auth))
            if opts.get("db"):
                handshake.append(pipe.call("SELECT", int(opts["db"])))
            for reply in await asyncio.gather(*handshake):
                if isinstance(reply, ReplyError):
                    raise PipeBroken(f"cache Redis refused the handshake: {reply}")
    except PipeBroken:
        pipe.close()
        raise
    except (OSError, TimeoutError, ssl.SSLError) as exc:
        pipe.close()
        why = tls_failure(exc) or type(exc).__name__
        raise PipeBroken(f"cannot connect to the cache Redis ({why})") from exc
    return pipe
