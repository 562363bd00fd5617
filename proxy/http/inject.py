"""The sidecar injector's HTTP service: ``POST /mutate`` (AdmissionReview v1) and
``GET /healthz``."""

from __future__ import annotations

import logging
from typing import Final

import orjson
from aiohttp import web

from proxy.errors import BadRequest, InvalidJson, PayloadTooLarge
from proxy.http.middleware import envelope, json_response
from proxy.inject import InjectorSettings, mutate

__all__ = ["MAX_REVIEW_BYTES", "SETTINGS", "build_injector_app"]

log = logging.getLogger(__name__)

MAX_REVIEW_BYTES: Final = 3 * 1024 * 1024  # the API server's own request limit
SETTINGS: web.AppKey[InjectorSettings] = web.AppKey("injector_settings", InjectorSettings)


async def review(request: web.Request) -> web.Response:
    """POST /mutate: the AdmissionReview answered (200), or 400 when it is malformed."""
    if request.content_length is not None and request.content_length > MAX_REVIEW_BYTES:
        raise PayloadTooLarge(f"an AdmissionReview may be at most {MAX_REVIEW_BYTES} bytes")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(
            f"an AdmissionReview may be at most {MAX_REVIEW_BYTES} bytes"
        ) from None
    if not raw:
        raise BadRequest("a JSON body is required", code="missing_body")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidJson("the AdmissionReview is not valid JSON") from None
    answer = mutate(data, request.app[SETTINGS])
    response = answer["response"]
    if "patch" in response or not response["allowed"]:
        log.info(
            "review uid=%s: %s",
            response["uid"],
            "sidecar injected" if response["allowed"] else response["status"]["message"],
        )
    return json_response(answer)


async def healthz(_request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


def build_injector_app(settings: InjectorSettings) -> web.Application:
    """The injector's aiohttp application."""
    app = web.Application(middlewares=[envelope], client_max_size=MAX_REVIEW_BYTES)
    app[SETTINGS] = settings
    app.router.add_post("/mutate", review)
    app.router.add_get("/healthz", healthz)
    return app
