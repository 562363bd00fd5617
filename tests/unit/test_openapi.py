"""The OpenAPI description cannot drift: it validates as OpenAPI 3.1, it has exactly the
routes of the sidecar's real aiohttp router, and its error codes cover the README's."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from openapi_spec_validator import validate
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError

from proxy.config import Config
from proxy.http import openapi
from proxy.http.app import build_app
from proxy.http.openapi_page import render
from proxy.http.openapi_parts import ERROR_CODES
from proxy.wiring import build_monitoring, make_core

README = Path(__file__).resolve().parents[2] / "README.md"


def sidecar_routes(tmp_path: Path) -> set[tuple[str, str]]:
    """(METHOD, path template) of every route of the app ``dbproxy serve`` builds (HEAD
    is aiohttp's automatic twin of each GET: described by the GET)."""
    config = Config(data_dir=str(tmp_path))
    core = make_core(config, announce=False)
    app = build_app(config, core, build_monitoring(config, core, None))
    found = set()
    for route in app.router.routes():
        assert isinstance(route.resource, web.Resource)
        if route.method != "HEAD":
            found.add((route.method, route.resource.canonical))
    return found


def test_the_description_is_valid_openapi_3_1() -> None:
    doc = openapi.document()
    assert doc["openapi"].startswith("3.1")
    validate(doc)  # raises on any problem


def test_the_validator_would_catch_a_broken_document() -> None:
    broken: dict[str, Any] = {**openapi.document(), "paths": {"/x": {"get": {"responses": 3}}}}
    with pytest.raises(OpenAPIValidationError):
        validate(broken)


def test_every_route_is_described_and_every_description_is_a_route(tmp_path: Path) -> None:
    routes = sidecar_routes(tmp_path)
    described = set(openapi.operations())
    assert routes - described == set(), "routes with no description"
    assert described - routes == set(), "descriptions with no route"
    assert len(routes) >= 24


def test_every_operation_documents_its_errors_in_the_one_envelope() -> None:
    doc = openapi.document()
    ids = []
    for path, item in doc["paths"].items():
        for method, op in item.items():
            ids.append(op["operationId"])
            assert "500" in op["responses"], (method, path)
            for status, response in op["responses"].items():
                if int(status) >= 400 and "$ref" in response:
                    name = response["$ref"].rsplit("/", 1)[1]
                    body = doc["components"]["responses"][name]["content"]
                    assert body["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/Error"
                    }
            for param in op["parameters"]:
                if "$ref" in param:  # every reference resolves
                    assert param["$ref"].rsplit("/", 1)[1] in doc["components"]["parameters"]
    assert len(ids) == len(set(ids)), "operationIds are unique"


def test_the_headers_clients_send_are_described() -> None:
    params = openapi.document()["components"]["parameters"]
    for header in (
        "If-Match",
        "If-None-Match",
        "Idempotency-Key",
        "X-Transaction-Id",
        "X-Consistency-Token",
        "X-Read-Preference",
        "X-Request-Id",
    ):
        assert params[header]["in"] == "header"
    put = openapi.document()["paths"]["/api/db/{collection}/{id}"]["put"]
    names = {p["$ref"].rsplit("/", 1)[1] for p in put["parameters"] if "$ref" in p}
    assert {"If-Match", "If-None-Match", "Idempotency-Key", "X-Transaction-Id"} <= names


def readme_error_codes() -> dict[int, set[str]]:
    text = README.read_text()
    section = text[text.index("## Errors") : text.index("## Reliability")]
    table: dict[int, set[str]] = {}
    for line in section.splitlines():
        m = re.match(r"\| (\d{3}) \| (.*) \|$", line)
        if m:
            codes = set(re.findall(r"`([a-z][a-z0-9_]*)`", m.group(2))) - {"details"}
            table[int(m.group(1))] = codes
    return table


def test_the_error_codes_cover_the_readme_table() -> None:
    readme = readme_error_codes()
    assert len(readme) >= 15
    for status, codes in readme.items():
        assert status in ERROR_CODES, status
        assert codes <= set(ERROR_CODES[status]), (status, codes - set(ERROR_CODES[status]))


class _Texts(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.links: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("href", "src") and value is not None:
                self.links.append(value)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_the_page_shows_every_operation_and_fetches_nothing() -> None:
    doc = openapi.document()
    page = render(doc)
    parser = _Texts()
    parser.feed(page)
    text = " ".join(parser.text)
    for method, path in openapi.operations():
        assert f"{method} {path}" in " ".join(text.split()) or path in text, (method, path)
    assert "script" not in parser.tags and "link" not in parser.tags and "img" not in parser.tags
    external = [u for u in parser.links if not u.startswith("#") and u != "openapi.json"]
    assert external == []  # nothing fetched: in-page anchors and the document only
    assert "version_mismatch" in text  # the codes are on the page
    assert "X-Consistency-Token" in text


def test_the_page_escapes_what_it_shows() -> None:
    doc = {**openapi.document(), "info": {"title": "<script>x</script>", "version": "1"}}
    page = render(doc)
    assert "<script>" not in page and "&lt;script&gt;" in page
