"""The migrations API: POST/GET /api/db/migrations, GET /api/db/migrations/{id} and
/api/db/migrations/status. Parses and presents; the runner (proxy.migrate) does the work."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy.errors import BadRequest, Unavailable
from proxy.http.documents import read_json
from proxy.http.keys import CONFIG, CORE, caller_of
from proxy.http.middleware import json_response
from proxy.migrate.ops import ID_RE, parse_migration
from proxy.migrate.runner import MigrationRunner
from proxy.pipeline import gate
from proxy.pipeline.gate import Caller
from proxy.policy.decide import denial


def _runner(request: web.Request) -> MigrationRunner:
    runner = request.app[CORE].migrations
    if runner is None:
        raise Unavailable("migrations are not available in this process", retry_after=None)
    return runner


def _flag(request: web.Request, name: str) -> bool:
    value = request.query.get(name, "false").lower()
    if value not in ("true", "false", "1", "0", ""):
        raise BadRequest(f"{name} must be true or false", code="invalid_parameter")
    return value in ("true", "1")


def _may_read(caller: Caller, record: dict[str, Any]) -> bool:
    """A record is readable with ``migrate`` on every collection its operations name (or
    service-wide; an operation naming none, sql or alembic, needs migrate_sql)."""
    if caller.decisions.service_wide("migrate"):
        return True
    ops = (record.get("model") or {}).get("script", {}).get("operations", [])
    for op in ops if isinstance(ops, list) else []:
        coll = op.get("collection") if isinstance(op, dict) else None
        coll = coll or (record.get("model") or {}).get("collection_or_table")
        if isinstance(coll, str):
            if not caller.decisions.get(coll, "migrate").granted:
                return False
        elif not caller.decisions.service_wide("migrate_sql"):
            return False
    return True


async def submit(request: web.Request) -> web.Response:
    """201: it ran now; 200: already completed (a no-op) or a dry run; 202: it goes on in
    the background (GET .../{id} shows its progress)."""
    caller = caller_of(request)
    migration = parse_migration(await read_json(request), request.app[CONFIG].limits)
    for collection in migration.collections():
        gate.authorize(caller, collection, "migrate")
    if migration.needs_sql_permission():
        gate.authorize_service_wide(caller, "migrate_sql")
    outcome = await _runner(request).submit(migration, dry_run=_flag(request, "dry_run"))
    return json_response(outcome.body, outcome.status)


async def list_records(request: web.Request) -> web.Response:
    caller = caller_of(request)
    if not caller.decisions.any_grant("migrate"):
        raise denial("migrate", "*")
    records = await _runner(request).records(request.query.get("database"))
    return json_response({"items": [r for r in records if _may_read(caller, r)], "next": None})


async def get_record(request: web.Request) -> web.Response:
    caller = caller_of(request)
    mig_id = request.match_info["id"]
    if not ID_RE.fullmatch(mig_id):
        raise BadRequest("not a migration id", code="invalid_migration_id")
    if not caller.decisions.any_grant("migrate"):
        raise denial("migrate", "*")
    record = await _runner(request).get(mig_id, request.query.get("database"))
    if not _may_read(caller, record):
        raise denial("migrate", "*")
    return json_response(record)


async def status(request: web.Request) -> web.Response:
    caller = caller_of(request)
    if not caller.decisions.any_grant("migrate"):
        raise denial("migrate", "*")
    return json_response(await _runner(request).status(request.query.get("database")))
