"""The ``alembic_upgrade`` migration operation: Alembic's upgrade (or its offline SQL for a dry
run) against a PostgreSQL database, in a worker thread; needs the extra ``dbproxy[alembic]``."""

from __future__ import annotations

import asyncio
import io
import logging
import threading
from typing import Any, Final

from proxy.errors import BadRequest, Conflict

log = logging.getLogger(__name__)

DRIVER: Final = "postgresql+psycopg"  # psycopg 3: a sync driver with binary wheels on PyPI
# Alembic's ``context`` is one module-level proxy: two upgrades in one process at once would
# share it, so they take turns (the migration lock already serialises each database).
_ONE_AT_A_TIME: Final = threading.Lock()


class AlembicUnavailable(BadRequest):
    """An ``alembic_upgrade`` asked of a dbproxy installed without the ``alembic`` extra."""

    code = "alembic_unavailable"


class AlembicFailed(Conflict):
    """The Alembic environment could not be loaded or its upgrade failed (rolled back where
    PostgreSQL allows it: Alembic runs the revisions in one transaction)."""

    code = "alembic_failed"


async def alembic_upgrade(
    dsn: str, directory: str, revision: str, *, dry_run: bool = False
) -> dict[str, Any]:
    """Upgrade the database at ``dsn`` with the Alembic environment in ``directory`` to
    ``revision`` (``head``, a revision id, ``+1``...): ``{"from", "to"}`` (the heads before and
    after; one id, None, or a list when there are several), and ``"sql"`` for a dry run (the
    offline SQL from the current revision; nothing is changed)."""
    if not isinstance(revision, str) or not revision or len(revision) > 200:
        raise BadRequest("alembic_upgrade needs a revision (like 'head')", code="invalid_query")
    return await asyncio.to_thread(_run, dsn, directory, revision, dry_run)


def _modules() -> tuple[Any, Any, Any, Any]:
    try:
        import psycopg  # noqa: F401  (the driver the engine loads by name)
        import sqlalchemy
        from alembic import command
        from alembic.config import Config
        from alembic.runtime.migration import MigrationContext
    except ImportError as err:
        raise AlembicUnavailable(
            f"the alembic_upgrade operation needs the extra dbproxy[alembic] ({err.name} is "
            "not installed): pip install 'dbproxy[alembic]'",
            details={"missing": err.name},
        ) from None
    return sqlalchemy, command, Config, MigrationContext


def _run(dsn: str, directory: str, revision: str, dry_run: bool) -> dict[str, Any]:
    sqlalchemy, command, config_cls, migration_context = _modules()
    stage = "connect"
    try:
        url = sqlalchemy.engine.make_url(dsn).set(drivername=DRIVER)
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    except Exception as err:
        raise _failed(err, stage, revision) from None
    buffer = io.StringIO()
    cfg = config_cls(output_buffer=buffer)
    cfg.set_main_option("script_location", directory)
    # configparser interpolates "%": a password holding one must reach env.py unchanged
    rendered = url.render_as_string(hide_password=False)
    cfg.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    try:
        with _ONE_AT_A_TIME:
            stage = "read the current revision"
            with engine.connect() as conn:
                before = tuple(migration_context.configure(conn).get_current_heads())
            if dry_run:
                stage = "plan the upgrade"
                return _plan(command, cfg, buffer, before, revision)
            stage = "upgrade"
            with engine.begin() as conn:  # env.py may run on it (config.attributes["connection"])
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, revision)
            stage = "read the new revision"
            with engine.connect() as conn:
                after = tuple(migration_context.configure(conn).get_current_heads())
    except BadRequest:
        raise
    except Exception as err:
        raise _failed(err, stage, revision) from None
    finally:
        engine.dispose()
    return {"from": _heads(before), "to": _heads(after)}


def _plan(
    command: Any, cfg: Any, buffer: io.StringIO, before: tuple[str, ...], revision: str
) -> dict[str, Any]:
    if len(before) > 1:
        raise AlembicFailed(
            "a dry run needs one current revision; the database has several heads",
            details={"revision": revision, "stage": "plan the upgrade", "from": sorted(before)},
        )
    command.upgrade(cfg, f"{before[0]}:{revision}" if before else revision, sql=True)
    return {"from": _heads(before), "to": _target(cfg, revision), "sql": buffer.getvalue()}


def _target(cfg: Any, revision: str) -> Any:
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(cfg)
    return _heads(tuple(s.revision for s in scripts.get_revisions(revision) if s is not None))


def _heads(heads: tuple[str, ...]) -> Any:
    return None if not heads else heads[0] if len(heads) == 1 else sorted(heads)


def _failed(err: Exception, stage: str, revision: str) -> AlembicFailed:
    """The error a client sees: Alembic's own messages (no SQL in them) are kept; a database
    or script error is named by its class and SQLSTATE only (its text may hold SQL)."""
    from alembic.util import CommandError

    log.warning("alembic_upgrade to %r failed at %s", revision, stage, exc_info=err)
    details: dict[str, Any] = {"revision": revision, "stage": stage, "error": type(err).__name__}
    orig = getattr(err, "orig", None)
    sqlstate = getattr(orig, "sqlstate", None) or getattr(err, "sqlstate", None)
    if isinstance(sqlstate, str) and len(sqlstate) == 5:
        details["sqlstate"] = sqlstate
    if isinstance(err, CommandError):
        reason = str(err).splitlines()[0][:300] if str(err) else "a command error"
    else:
        reason = type(err).__name__
        if "sqlstate" in details:
            reason += f", SQLSTATE {details['sqlstate']}"
    return AlembicFailed(
        f"alembic upgrade to {revision!r} failed at {stage}: {reason}", details=details
    )
