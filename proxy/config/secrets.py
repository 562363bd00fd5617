"""A connection string as resolved pieces: literal text (``${VAR}`` already in it) and the
``${file:...}`` secret files it reads, so that it can be rendered again when a file changes."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

__all__ = ["SecretTemplate", "file_stamp"]


@dataclass(frozen=True, slots=True)
class SecretTemplate:
    """``parts``: (is_file, text) — literal text, or the absolute path of a secret file whose
    stripped contents go there. Literal text may hold a resolved secret: never shown."""

    parts: tuple[tuple[bool, str], ...] = field(repr=False)

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(text for is_file, text in self.parts if is_file))

    def render(self) -> str:
        """The connection string with every file read now (OSError, UnicodeDecodeError)."""
        return "".join(_read(text) if is_file else text for is_file, text in self.parts)


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


def file_stamp(path: str) -> tuple[int, int, str] | None:
    """(mtime_ns, size, digest of the contents) of ``path``; None when it cannot be read.
    The digest catches a rewrite within the clock's resolution, and a Kubernetes Secret
    update (a symlink swapped to a new directory) shows as new contents."""
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, digest)
