"""Redaction of connection strings: every password and secret parameter becomes ``***``."""

from __future__ import annotations

import re
from typing import Final

__all__ = ["SCHEME_RE", "redact_dsn"]

SCHEME_RE: Final = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_KEYWORD_DSN_RE: Final = re.compile(r"\s*[A-Za-z_][A-Za-z0-9_]*\s*=")
_KEYWORD_SECRET_RE: Final = re.compile(
    r"(?i)(\b(?:password|passwd|pwd|pass|sslpassword)\s*=\s*)('(?:[^'\\]|\\.)*'?|\S*)"
)
_HOST = r"(?:\[[0-9A-Fa-f:.%]*\]|[^:@,\[\]/?#]*)(?::\d*)?"
_HOST_LIST_RE: Final = re.compile(rf"{_HOST}(?:,{_HOST})*")
_SECRET_PARAM_WORDS: Final = ("password", "passwd", "secret", "token")
_SECRET_PARAMS: Final = frozenset({"pass", "pwd", "apikey", "api_key", "authmechanismproperties"})
_REDACTED: Final = "***"


def redact_dsn(dsn: str) -> str:
    """``dsn`` with its secrets replaced by ``***``: the password of ``user:pass@``, and
    query parameters such as ``?password=``. Never raises; an input it cannot make sense of
    is replaced by ``***`` as a whole, because it might be a secret itself."""
    if not dsn:
        return dsn
    match = SCHEME_RE.match(dsn)
    if match is None:
        return _redact_keyword_dsn(dsn)
    authority, tail = _redact_authority(dsn[match.end() :])
    return dsn[: match.end()] + authority + _redact_query(tail)


def _redact_keyword_dsn(dsn: str) -> str:
    """libpq ``key=value`` form: redact password values; anything else is opaque."""
    if _KEYWORD_DSN_RE.match(dsn):
        return _KEYWORD_SECRET_RE.sub(lambda m: m.group(1) + _REDACTED, dsn)
    return _REDACTED


def _first_of(text: str, chars: str) -> int:
    positions = [i for i in (text.find(c) for c in chars) if i >= 0]
    return min(positions) if positions else len(text)


def _redact_userinfo(userinfo: str) -> str:
    user, colon, _ = userinfo.partition(":")
    return f"{user}:{_REDACTED}" if colon else user


def _redact_authority(rest: str) -> tuple[str, str]:
    """Split ``rest`` (after ``scheme://``) into redacted authority and the remaining tail.

    A password holding an unencoded ``/``, ``?`` or ``#`` would end the authority early, so
    when an ``@`` appears later we err towards redacting too much rather than too little."""
    end = _first_of(rest, "/?#")
    authority, tail = rest[:end], rest[end:]
    if "@" in authority:
        userinfo, _, hosts = authority.rpartition("@")
        return f"{_redact_userinfo(userinfo)}@{hosts}", tail
    at = rest.rfind("@")
    if authority and at >= 0 and ":" in rest[:at]:
        after = rest[at + 1 :]
        end = _first_of(after, "/?#")
        return f"{_redact_userinfo(rest[:at])}@{after[:end]}", after[end:]
    if not _HOST_LIST_RE.fullmatch(authority):
        return _redact_userinfo(authority), tail
    return authority, tail


def _is_secret_param(key: str) -> bool:
    lowered = key.lower()
    return lowered in _SECRET_PARAMS or any(word in lowered for word in _SECRET_PARAM_WORDS)


def _redact_query(tail: str) -> str:
    before, hash_sign, fragment = tail.partition("#")
    path, question, query = before.partition("?")
    if not question:
        return tail
    pieces = []
    for piece in query.split("&"):
        key, equals, _ = piece.partition("=")
        pieces.append(f"{key}={_REDACTED}" if equals and _is_secret_param(key) else piece)
    return f"{path}?{'&'.join(pieces)}{hash_sign}{fragment}"
