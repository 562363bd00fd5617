"""The fault-and-abuse suite: hostile input, faults and starvation against real processes and
real databases (issue 13). It reuses the e2e fixtures that start ``dbproxy serve``."""

from __future__ import annotations

from tests.e2e.conftest import launch, pg_server  # noqa: F401  (fixtures shared with e2e)
