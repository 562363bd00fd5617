"""The HTML page of the OpenAPI description (``GET /api/db/docs``): our own small renderer,
its style shipped in the package (``assets/docs.css``); nothing fetched at run time."""

from __future__ import annotations

import json
from html import escape
from importlib import resources
from typing import Any

Json = dict[str, Any]
_METHODS = ("get", "post", "put", "patch", "delete")


def _css() -> str:
    return resources.files("proxy.http").joinpath("assets/docs.css").read_text("utf-8")


def _resolve(doc: Json, node: Json) -> Json:
    """``node``, or what its ``$ref`` points at (one level)."""
    target = node.get("$ref")
    if not isinstance(target, str):
        return node
    found: Any = doc
    for part in target.removeprefix("#/").split("/"):
        found = found[part]
    return dict(found)


def _schema_text(value: Json) -> str:
    target = value.get("$ref")
    if isinstance(target, str):
        name = target.rsplit("/", 1)[1]
        return f'<a href="#schema-{escape(name)}"><code>{escape(name)}</code></a>'
    if "anyOf" in value:
        return " or ".join(_schema_text(v) for v in value["anyOf"])
    kind = value.get("type", "any")
    text = "/".join(kind) if isinstance(kind, list) else str(kind)
    if kind == "array" and isinstance(value.get("items"), dict):
        text = f"array of {_schema_text(value['items'])}"
        return text
    extra = [f"{k} {json.dumps(value[k])}" for k in ("enum", "const", "pattern") if k in value]
    extra += [f"{k} {value[k]}" for k in ("minimum", "maximum", "maxLength") if k in value]
    return f"<code>{escape(text)}</code>" + (f" ({escape('; '.join(extra))})" if extra else "")


def _anchor(method: str, path: str) -> str:
    return f"{method}-{path}".replace("/", "-").replace("{", "").replace("}", "").strip("-")


def _parameters(doc: Json, params: list[Json]) -> str:
    if not params:
        return ""
    rows = []
    for raw in params:
        p = _resolve(doc, raw)
        required = "yes" if p.get("required") else ""
        rows.append(
            f"<tr><td><code>{escape(p['name'])}</code></td><td>{escape(p['in'])}</td>"
            f"<td>{required}</td><td>{_schema_text(p.get('schema', {}))}</td>"
            f"<td>{escape(p.get('description', ''))}</td></tr>"
        )
    head = "<tr><th>name</th><th>in</th><th>required</th><th>schema</th><th>about</th></tr>"
    return f"<h4>Parameters</h4><table>{head}{''.join(rows)}</table>"


def _responses(doc: Json, responses: Json) -> str:
    rows = []
    for status, raw in responses.items():
        r = _resolve(doc, raw)
        shown = [
            f"<code>{escape(media)}</code> {_schema_text(body.get('schema', {}))}"
            for media, body in r.get("content", {}).items()
        ]
        rows.append(
            f"<tr><td><b>{escape(status)}</b></td><td>{escape(r.get('description', ''))}</td>"
            f"<td>{'<br>'.join(shown)}</td></tr>"
        )
    head = "<tr><th>status</th><th>meaning</th><th>body</th></tr>"
    return f"<h4>Responses</h4><table>{head}{''.join(rows)}</table>"


def _operation(doc: Json, method: str, path: str, op: Json) -> str:
    body = ""
    if "requestBody" in op:
        media = op["requestBody"]["content"]["application/json"]
        shown = _schema_text(media["schema"])
        body = f"<h4>Request body</h4><p><code>application/json</code> {shown}</p>"
    return (
        f'<section class="op" id="{_anchor(method, path)}">'
        f'<h3><span class="method {method}">{method.upper()}</span> '
        f"<code>{escape(path)}</code></h3>"
        f"<p>{escape(op.get('summary', ''))}</p>"
        f"{_parameters(doc, op.get('parameters', []))}{body}{_responses(doc, op['responses'])}"
        "</section>"
    )


def render(doc: Json) -> str:
    """The whole page: operations by tag, then the schemas, every text escaped."""
    info = doc["info"]
    by_tag: dict[str, list[str]] = {t["name"]: [] for t in doc.get("tags", [])}
    nav: list[str] = []
    for path, item in doc["paths"].items():
        for method in _METHODS:
            op = item.get(method)
            if op is None:
                continue
            by_tag.setdefault(op["tags"][0], []).append(_operation(doc, method, path, op))
            nav.append(
                f'<li><a href="#{_anchor(method, path)}"><span class="method {method}">'
                f"{method.upper()}</span> {escape(path)}</a></li>"
            )
    sections = "".join(
        f"<h2>{escape(tag)}</h2>{''.join(ops)}" for tag, ops in by_tag.items() if ops
    )
    schemas = "".join(
        f'<h3 id="schema-{escape(name)}">{escape(name)}</h3>'
        f"<pre>{escape(json.dumps(value, indent=2, ensure_ascii=False))}</pre>"
        for name, value in doc["components"]["schemas"].items()
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(info['title'])}</title><style>{_css()}</style></head><body>"
        f"<h1>{escape(info['title'])}</h1><p>version {escape(info['version'])} · "
        '<a href="openapi.json">openapi.json</a></p>'
        f"<p>{escape(info.get('description', ''))}</p>"
        f"<nav><ul>{''.join(nav)}</ul></nav>{sections}<h2>Schemas</h2>{schemas}</body></html>"
    )
