"""TLS shared by every connection dbproxy makes or accepts: contexts built from PEM files,
and a driver's TLS failure told in one safe sentence naming the cause (README: Security)."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from typing import Final

__all__ = ["client_context", "server_context", "tls_failure", "watch_certificate"]

log = logging.getLogger(__name__)

_MAX_REASON: Final = 160


def client_context(
    ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None
) -> ssl.SSLContext:
    """Verify the server (certificate and host name) against ``ca_file`` (else the system
    store); present ``cert_file``/``key_file`` when the server asks for a client certificate."""
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


def server_context(cert_file: str, key_file: str, client_ca: str | None = None) -> ssl.SSLContext:
    """A listener's context; with ``client_ca`` every client must present a certificate it
    signed (mutual TLS)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    if client_ca:
        ctx.load_verify_locations(cafile=client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def tls_failure(exc: BaseException | None) -> str | None:
    """What went wrong in a TLS handshake, as a sentence safe for clients and logs (never
    a secret: OpenSSL's reason and the certificate check); None when ``exc`` (or what it
    was raised from) is not a TLS failure."""
    seen = 0
    while exc is not None and seen < 5:
        inner = getattr(exc, "certificate_error", None)  # aiohttp wraps the ssl error
        if isinstance(inner, ssl.SSLError):
            exc = inner
        if isinstance(exc, ssl.SSLCertVerificationError):
            reason = getattr(exc, "verify_message", None) or getattr(exc, "reason", None)
            return f"the server's TLS certificate was refused: {_clip(str(reason or exc))}"
        if isinstance(exc, ssl.SSLError):
            reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None)
            return f"the TLS handshake failed: {_clip(str(reason or exc))}"
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _clip(text: str) -> str:
    text = text.strip().rstrip(".")
    return text if len(text) <= _MAX_REASON else text[:_MAX_REASON] + "..."


def _file_stamp(*paths: str) -> tuple[int, ...]:
    try:
        return tuple(os.stat(p).st_mtime_ns for p in paths)
    except OSError:
        return ()


async def watch_certificate(
    context: ssl.SSLContext, cert_file: str, key_file: str, interval: float, who: str
) -> None:
    """Until cancelled: reload ``context``'s certificate when its files change
    (cert-manager renews the Secret, the kubelet swaps the mounted files); new connections
    get the new one, and a pair that does not load leaves the old one in place."""
    stamp = _file_stamp(cert_file, key_file)
    while True:
        await asyncio.sleep(interval)
        fresh = _file_stamp(cert_file, key_file)
        if fresh and fresh != stamp:
            stamp = fresh
            try:
                context.load_cert_chain(cert_file, key_file)
                log.info("%s: certificate reloaded from %s", who, cert_file)
            except (OSError, ssl.SSLError) as err:
                log.warning("%s: new certificate not loaded (keeping the old): %s", who, err)
