"""A small TCP fault proxy for tests: forwards bytes between a client and a server, and can
add latency, blackhole traffic, reset connections, or cut a connection right after a
chosen byte pattern passed from client to server (e.g. PostgreSQL's COMMIT)."""

from __future__ import annotations

import asyncio
import contextlib


class FaultProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.latency = 0.0
        self.blackhole = False
        self.cut_after: bytes | None = None  # close both sides once this passes upstream
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self.reset_all()
            await self._server.wait_closed()
            await asyncio.sleep(0.05)  # let the handlers see their closed sockets

    def reset_all(self) -> None:
        for w in list(self._conns):
            w.transport.abort()
            with contextlib.suppress(Exception):
                w.close()
        self._conns.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._conns.update((writer, up_writer))
        muted = asyncio.Event()  # set once cut_after was seen: answers no longer reach us
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(
                self._pipe(reader, up_writer, writer, muted, upstream=True),
                self._pipe(up_reader, writer, up_writer, muted, upstream=False),
                return_exceptions=True,
            )

    async def _pipe(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        other: asyncio.StreamWriter,
        muted: asyncio.Event,
        *,
        upstream: bool,
    ) -> None:
        try:
            while True:
                data = await src.read(65536)
                if not data:
                    break
                while self.blackhole:
                    await asyncio.sleep(0.01)
                if self.latency:
                    await asyncio.sleep(self.latency)
                if not upstream and muted.is_set():
                    continue
                cut = upstream and self.cut_after is not None and self.cut_after in data
                if cut:
                    self.cut_after = None
                    self.cuts += 1
                    muted.set()
                dst.write(data)
                await dst.drain()
                if cut:
                    await asyncio.sleep(0.3)  # the server acts on it; its answer is dropped
                    dst.transport.abort()
                    other.transport.abort()
                    break
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                dst.transport.abort()
                dst.close()
            self._conns.discard(dst)
