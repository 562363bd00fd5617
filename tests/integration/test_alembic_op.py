"""The ``alembic_upgrade`` operation (issue 15, extra ``dbproxy[alembic]``): a real Alembic
environment built in a temporary directory, run against a fresh PostgreSQL database."""

from __future__ import annotations

import asyncio
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

pytest.importorskip("alembic")
pytest.importorskip("sqlalchemy")
pytest.importorskip("psycopg")

from proxy.migrate.alembic_op import AlembicFailed, alembic_upgrade
from tests.conftest import PG_ADMIN_DSN, _with_db

pytestmark = pytest.mark.integration

ENV_PY = """
from alembic import context
from sqlalchemy import engine_from_config, pool

config = context.config


def run_offline():
    context.configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online():
    connection = config.attributes.get("connection")
    if connection is not None:  # the cookbook's shared connection
        context.configure(connection=connection, transactional_ddl=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = engine_from_config(
        config.get_section(config.config_ini_section, {}), prefix="sqlalchemy.",
        poolclass=pool.NullPool,
    )
    with engine.connect() as conn:
        context.configure(connection=conn)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
"""

SCRIPT_MAKO = '''"""${message}"""
revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = None
depends_on = None


def upgrade():
    ${upgrades if upgrades else "pass"}


def downgrade():
    ${downgrades if downgrades else "pass"}
'''


def revision_file(rev: str, down: str | None, body: str) -> str:
    upgrade = textwrap.indent(textwrap.dedent(body).strip(), "    ")
    return (
        "from alembic import op\nimport sqlalchemy as sa\n\n"
        f"revision = {rev!r}\ndown_revision = {down!r}\nbranch_labels = None\n"
        "depends_on = None\n\n\n"
        f"def upgrade():\n{upgrade}\n\n\ndef downgrade():\n    pass\n"
    )


def build_env(root: Path, revisions: list[tuple[str, str | None, str]]) -> str:
    env = root / "alembic_env"
    (env / "versions").mkdir(parents=True)
    (env / "env.py").write_text(ENV_PY)
    (env / "script.py.mako").write_text(SCRIPT_MAKO)
    for rev, down, body in revisions:
        (env / "versions" / f"{rev}.py").write_text(revision_file(rev, down, body))
    return str(env)


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
def fresh_dsn() -> Iterator[str]:
    name = f"dbproxy_alembic_{uuid.uuid4().hex[:10]}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    try:
        yield _with_db(PG_ADMIN_DSN, name)
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


CREATE_ITEMS = """
op.create_table(
    "items",
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
)
"""
ADD_COLUMN = 'op.add_column("items", sa.Column("price", sa.Numeric))'


async def columns(dsn: str, table: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_name = $1 "
            "ORDER BY ordinal_position",
            table,
        )
        return [r["column_name"] for r in rows]
    finally:
        await conn.close()


async def version(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        if await conn.fetchval("SELECT to_regclass('alembic_version')") is None:
            return []
        return [r[0] for r in await conn.fetch("SELECT version_num FROM alembic_version")]
    finally:
        await conn.close()


async def test_upgrade_runs_the_revisions_and_reports_from_and_to(
    tmp_path: Path, fresh_dsn: str
) -> None:
    env = build_env(tmp_path, [("r1", None, CREATE_ITEMS), ("r2", "r1", ADD_COLUMN)])
    assert await alembic_upgrade(fresh_dsn, env, "r1") == {"from": None, "to": "r1"}
    assert await columns(fresh_dsn, "items") == ["id", "name"]
    assert await alembic_upgrade(fresh_dsn, env, "head") == {"from": "r1", "to": "r2"}
    assert await columns(fresh_dsn, "items") == ["id", "name", "price"]
    assert await version(fresh_dsn) == ["r2"]
    # at head already: a no-op
    assert await alembic_upgrade(fresh_dsn, env, "head") == {"from": "r2", "to": "r2"}


async def test_dry_run_answers_the_sql_from_the_current_revision_and_changes_nothing(
    tmp_path: Path, fresh_dsn: str
) -> None:
    env = build_env(tmp_path, [("r1", None, CREATE_ITEMS), ("r2", "r1", ADD_COLUMN)])
    plan = await alembic_upgrade(fresh_dsn, env, "head", dry_run=True)
    assert plan["from"] is None and plan["to"] == "r2"
    assert "CREATE TABLE items" in plan["sql"] and "ADD COLUMN price" in plan["sql"]
    assert await version(fresh_dsn) == [] and await columns(fresh_dsn, "items") == []
    await alembic_upgrade(fresh_dsn, env, "r1")
    plan = await alembic_upgrade(fresh_dsn, env, "head", dry_run=True)
    assert plan["from"] == "r1" and plan["to"] == "r2"
    assert "CREATE TABLE items" not in plan["sql"] and "ADD COLUMN price" in plan["sql"]
    assert await version(fresh_dsn) == ["r1"]


async def test_a_failing_revision_rolls_back_every_revision_of_the_run(
    tmp_path: Path, fresh_dsn: str
) -> None:
    broken = 'op.execute("SELECT no_such_column FROM items")'
    env = build_env(tmp_path, [("r1", None, CREATE_ITEMS), ("r2", "r1", broken)])
    with pytest.raises(AlembicFailed) as info:
        await alembic_upgrade(fresh_dsn, env, "head")
    err = info.value
    assert err.status == 409 and err.code == "alembic_failed"
    assert err.details["stage"] == "upgrade" and err.details["sqlstate"] == "42703"
    assert "no_such_column" not in err.message and "SELECT" not in err.message  # no SQL text
    # PostgreSQL's DDL is transactional: r1's table went with r2's failure
    assert await version(fresh_dsn) == [] and await columns(fresh_dsn, "items") == []


async def test_an_unknown_revision_or_directory_is_alembic_failed(
    tmp_path: Path, fresh_dsn: str
) -> None:
    env = build_env(tmp_path, [("r1", None, CREATE_ITEMS)])
    with pytest.raises(AlembicFailed) as info:
        await alembic_upgrade(fresh_dsn, env, "nope")
    assert "nope" in info.value.message and info.value.details["error"] == "CommandError"
    with pytest.raises(AlembicFailed) as info:
        await alembic_upgrade(fresh_dsn, str(tmp_path / "missing"), "head")
    assert info.value.code == "alembic_failed"


async def test_an_unreachable_database_is_alembic_failed(tmp_path: Path) -> None:
    env = build_env(tmp_path, [("r1", None, CREATE_ITEMS)])
    with pytest.raises(AlembicFailed) as info:
        await alembic_upgrade("postgresql://postgres@127.0.0.1:1/nope", env, "head")
    assert info.value.details["stage"] == "read the current revision"


async def test_a_missing_extra_is_alembic_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from proxy.migrate import alembic_op

    real_import = builtins.__import__

    def no_alembic(name: str, *args: object, **kw: object) -> object:
        if name == "alembic" or name.startswith("alembic."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_alembic)
    with pytest.raises(alembic_op.AlembicUnavailable) as info:
        await alembic_upgrade("postgresql://x@127.0.0.1/x", "/nowhere", "head")
    assert info.value.status == 400 and info.value.code == "alembic_unavailable"
    assert "dbproxy[alembic]" in info.value.message


async def test_the_migration_runner_runs_alembic_under_its_lock_and_records_it(
    tmp_path: Path, fresh_dsn: str
) -> None:
    from proxy.backends.postgres import PostgresBackend
    from proxy.config import DatabaseConfig, Limits
    from proxy.migrate.ops import parse_migration
    from proxy.migrate.runner import MigrationRunner

    env = build_env(tmp_path, [("r1", None, CREATE_ITEMS), ("r2", "r1", ADD_COLUMN)])
    cfg = DatabaseConfig(name="main", type="postgresql", connection_string=fresh_dsn)
    backend = PostgresBackend(cfg, Limits(), schema="dbproxy")
    await backend.start()
    try:
        runner = MigrationRunner(
            {"main": backend.migrations()}, "main", alembic_directories={"main": env}
        )
        raw = {
            "id": "alembic-head",
            "version": 3,
            "script": {"operations": [{"op": "alembic_upgrade", "revision": "head"}]},
        }
        planned = await runner.submit(parse_migration(raw), dry_run=True, wait=30.0)
        assert planned.status == 200 and await version(fresh_dsn) == []  # a plan only
        done = await runner.submit(parse_migration(raw), wait=30.0)
        assert done.status == 201 and done.body["status"] == "completed", done.body
        assert await columns(fresh_dsn, "items") == ["id", "name", "price"]
        assert await version(fresh_dsn) == ["r2"]
        again = await runner.submit(parse_migration(raw), wait=30.0)
        assert again.status == 200 and again.body.get("noop") is True
        status = await runner.status()
        assert status["current_version"] == 3
        await runner.close()
    finally:
        await backend.close()
