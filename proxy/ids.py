"""Document id generation: time-ordered, URL-safe, 26-character strings (ULID layout)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford base32: sorts like its values


def _b32(value: int, length: int) -> str:
    out = []
    for _ in range(length):
        out.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(out))


class IdGenerator:
    """48 bits of milliseconds then 80 random bits; monotonic within one millisecond."""

    __slots__ = ("_clock", "_last_ms", "_last_rand")

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._last_ms = -1
        self._last_rand = 0

    def new(self) -> str:
        ms = int(self._clock() * 1000)
        if ms <= self._last_ms:
            ms = self._last_ms
            rand = (self._last_rand + 1) & ((1 << 80) - 1)
        else:
            rand = int.from_bytes(os.urandom(10), "big") >> 1  # room to count up
        self._last_ms, self._last_rand = ms, rand
        return _b32(ms, 10) + _b32(rand, 16)
