"""HTTP messages aiohttp's parser refuses (over-long URL or header, too many headers, a bad
request line or framing): answered in the error envelope like every other error."""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from proxy.errors import BadRequest, ProxyError
from proxy.http.middleware import error_response, new_request_id

log = logging.getLogger(__name__)


def classify(exc: HttpProcessingError) -> ProxyError:
    """The client-facing error for a parser failure (never the parser's own text)."""
    if isinstance(exc, LineTooLong):
        line = exc.args[0] if exc.args else b""
        start = bytes(line[:16]) if isinstance(line, bytes | bytearray) else str(line).encode()
        if start.startswith((b"/", b"http:", b"https:")) or b" /" in start:
            err = BadRequest("the request URL is too long", code="uri_too_long")
            err.status = 414
            return err
        err = BadRequest("a request header is too large", code="header_too_large")
        err.status = 431
        return err
    if "too many headers" in str(exc.message).lower():
        err = BadRequest("the request has too many headers", code="header_too_large")
        err.status = 431
        return err
    return BadRequest("the request is not valid HTTP/1.1", code="bad_http_request")


class EnvelopeRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering parser errors in the JSON envelope and
    logging them at DEBUG (a client's garbage is not the server's error)."""

    __slots__ = ()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        log.debug("refused a malformed HTTP request: %s", type(exc).__name__)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; cannot send the error")
        response = error_response(classify(exc), new_request_id())
        response.force_close()
        return response
