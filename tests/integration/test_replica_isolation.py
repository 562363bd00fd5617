"""The replica fixture never touches the machine's PostgreSQL (issue 13, item 13): its primary
is a private cluster, its hba file, rules, configuration and slots stay as they were."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PG_ADMIN_DSN
from tests.replica import replicated_pair

pytestmark = pytest.mark.integration


def machine(sql: str) -> str:
    out = subprocess.run(
        ["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", PG_ADMIN_DSN, "-c", sql],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return out.stdout.strip()


def machine_state() -> dict[str, Any]:
    """What a test could change on the machine's server: its hba file and the rules loaded from
    it, when it last loaded its configuration, and the replication slots and WAL senders that
    belong to this test process (other test sessions may run at the same time)."""
    hba_file = machine("SHOW hba_file")
    mine = f"dbproxy\\_replica\\_{os.getpid()}\\_%"
    return {
        "hba_file": hba_file,
        "hba_text": Path(hba_file).read_bytes() if os.access(hba_file, os.R_OK) else None,
        "hba_rules": machine(
            "SELECT line_number, type, database, user_name, address, netmask, auth_method,"
            " options, error FROM pg_hba_file_rules ORDER BY line_number"
        ),
        "conf_loaded": machine("SELECT pg_conf_load_time()"),
        "my_slots": machine(
            f"SELECT slot_name FROM pg_replication_slots WHERE slot_name LIKE '{mine}'"
        ),
        "my_senders": machine(
            "SELECT count(*) FROM pg_stat_replication r JOIN pg_replication_slots s"
            f" ON s.active_pid = r.pid WHERE s.slot_name LIKE '{mine}'"
        ),
    }


def test_replica_pair_leaves_the_machine_server_untouched() -> None:
    before = machine_state()
    machine_id = machine("SELECT system_identifier FROM pg_control_system()")
    with replicated_pair() as (primary, replica):
        during = machine_state()
        assert replica.primary_port == primary.port != 5432
        assert replica.port not in (5432, primary.port)
        # the replica streams from the private cluster, not from the machine's server
        primary_id = replica.query_primary("SELECT system_identifier FROM pg_control_system()")
        assert replica.query("SELECT system_identifier FROM pg_control_system()") == primary_id
        assert primary_id != machine_id
        assert replica.query("SELECT sender_port FROM pg_stat_wal_receiver") == str(primary.port)
        assert (
            replica.query_primary(
                f"SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{replica.slot}'"
            )
            == "1"
        )
        replica.query_primary("CREATE TABLE streamed (n int); INSERT INTO streamed VALUES (7)")
        replica.wait_caught_up()
        assert replica.query("SELECT n FROM streamed") == "7"
        roots = [primary.root, replica.root]
    after = machine_state()
    assert during == before
    assert after == before
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    for root in roots:
        assert root is not None and not Path(root).exists()
        assert str(root) not in ps
