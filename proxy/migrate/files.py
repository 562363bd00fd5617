"""A directory of migration files (.yaml, .yml, .json: the Migration model) read in
dependency order, and what ``dbproxy migrate`` prints while it applies them."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, TextIO

import orjson

from proxy.errors import ConfigError, ProxyError
from proxy.migrate.ops import Migration, order, parse_migration
from proxy.problems import Problems, read_yaml

SUFFIXES = (".yaml", ".yml", ".json")
MAX_JSON_BYTES = 4 * 1024 * 1024


def load_directory(directory: str) -> list[Migration]:
    """Every migration file of ``directory``, parsed and validated, in dependency order
    (ties by version, then id); every problem at once (ConfigError)."""
    problems = Problems()
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(SUFFIXES))
    except OSError as exc:
        raise ConfigError([f"{directory}: {exc.strerror or type(exc).__name__}"]) from None
    found: list[Migration] = []
    for name in names:
        if name.startswith("."):
            continue
        path = Path(directory) / name
        raw = _read(path, name, problems)
        if raw is None:
            continue
        try:
            found.append(parse_migration(raw))
        except ProxyError as err:
            problems.add(name, err.message)
    if problems.items:
        raise ConfigError(problems.items)
    if not found:
        raise ConfigError([f"{directory}: no migration files (*.yaml, *.yml, *.json)"])
    try:
        return order(found)
    except ProxyError as err:
        raise ConfigError([err.message]) from None


def _read(path: Path, name: str, problems: Problems) -> Any:
    if name.endswith(".json"):
        try:
            data = path.read_bytes()
        except OSError as exc:
            problems.add(name, f"cannot read: {exc.strerror or type(exc).__name__}")
            return None
        if len(data) > MAX_JSON_BYTES:
            problems.add(name, f"larger than {MAX_JSON_BYTES} bytes")
            return None
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            problems.add(name, f"invalid JSON: {exc}")
            return None
    return read_yaml(path, problems, where=name, noun="migration file", empty="is empty")


class Progress:
    """A carriage-return bar on a terminal, plain lines otherwise."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.tty = self.out.isatty()
        self._last = ""

    def update(self, record: dict[str, Any]) -> None:
        steps = max(1, int(record.get("steps") or 1))
        step = min(int(record.get("step") or 0), steps)
        p = record.get("progress") or {}
        rows = f" {p.get('rows_done', 0)}/{p.get('rows_total', 0)} rows" if p else ""
        text = f"{record['id']}: step {step}/{steps}{rows}"
        if self.tty:
            width = 30
            filled = int(width * step / steps)
            self.out.write(f"\r[{'#' * filled}{'-' * (width - filled)}] {text}\x1b[K")
            self.out.flush()
        elif text != self._last:
            self.out.write(text + "\n")
        self._last = text

    def line(self, text: str) -> None:
        if self.tty and self._last:
            self.out.write("\r\x1b[K")
        self.out.write(text + "\n")
        self.out.flush()
        self._last = ""
