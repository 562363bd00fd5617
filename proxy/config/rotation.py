"""Credentials that rotate without a restart: the ``${file:}`` secrets of the connection
strings are watched (content, at an interval, and on demand: SIGHUP); a change is applied."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Final

from proxy.config.model import DatabaseConfig
from proxy.config.secrets import SecretTemplate, file_stamp

__all__ = ["DEFAULT_INTERVAL", "CredentialWatcher"]

log = logging.getLogger(__name__)

DEFAULT_INTERVAL: Final = 2.0  # seconds between looks at the secret files
Apply = Callable[[str], Awaitable[None]]


class CredentialWatcher:
    """For every database whose connection string reads a secret file: when a file's
    contents change, render the string again and ``apply`` it (once per change, only
    when the rendered string differs). A file that cannot be read keeps the old
    credentials (a Secret mount is swapped in two steps), and is logged once."""

    def __init__(
        self,
        databases: Mapping[str, tuple[DatabaseConfig, Apply]],
        interval: float = DEFAULT_INTERVAL,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be > 0, got {interval!r}")
        self.interval = interval
        self._watched: dict[str, tuple[SecretTemplate, Apply]] = {}
        self._current: dict[str, str] = {}
        for name, (db, apply) in databases.items():
            if db.secret is not None:
                self._watched[name] = (db.secret, apply)
                self._current[name] = db.connection_string
        files = {f for template, _ in self._watched.values() for f in template.files}
        self._stamps = {f: file_stamp(f) for f in files}
        self._unreadable: set[str] = set()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self.reloads = 0  # credential changes applied
        self.failures = 0  # changes that could not be applied

    @property
    def watching(self) -> bool:
        return bool(self._watched)

    def start(self) -> None:
        if self._watched and self._task is None:
            self._task = asyncio.create_task(self._run(), name="dbproxy-credentials")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def poke(self) -> None:
        """Look at the files now (SIGHUP), without waiting for the next round."""
        if self._watched:
            asyncio.get_running_loop().create_task(self.check())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check()
            except Exception:
                log.exception("credential check failed")

    async def check(self) -> int:
        """Apply what changed since the last look; the number of databases updated."""
        async with self._lock:
            changed = self._changed_files()
            if not changed:
                return 0
            updated = 0
            for name, (template, apply) in self._watched.items():
                if changed.isdisjoint(template.files):
                    continue
                updated += await self._apply(name, template, apply)
            return updated

    def _changed_files(self) -> set[str]:
        changed = set()
        for path, before in self._stamps.items():
            now = file_stamp(path)
            if now is None:
                if path not in self._unreadable:
                    self._unreadable.add(path)
                    log.warning("secret file %s cannot be read; keeping the credentials", path)
                continue
            self._unreadable.discard(path)
            if now != before:
                self._stamps[path] = now
                changed.add(path)
        return changed

    async def _apply(self, name: str, template: SecretTemplate, apply: Apply) -> int:
        try:
            dsn = template.render()
        except (OSError, UnicodeDecodeError) as exc:
            self.failures += 1
            for path in template.files:  # looked at again next round
                self._stamps[path] = None
            log.warning("database %s: secret not reloaded (%s)", name, type(exc).__name__)
            return 0
        if dsn == self._current[name]:
            return 0
        try:
            await apply(dsn)
        except Exception:
            self.failures += 1
            log.exception("database %s: new credentials could not be applied", name)
            return 0
        self._current[name] = dsn
        self.reloads += 1
        return 1
