"""The embedded store is created owner-only: its directory 0700, its files 0600."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from proxy.config import Config
from proxy.wiring import make_core


async def test_embedded_store_is_owner_only(tmp_path: Path) -> None:
    data_dir = tmp_path / "store"
    old = os.umask(0o022)
    try:
        core = make_core(Config(data_dir=str(data_dir)), announce=False)
        backend = core.backends["embedded"]
        await backend.start()
        try:
            assert (await backend.health())["status"] == "up"
        finally:
            await backend.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    files = [p for p in data_dir.iterdir() if p.is_file()]
    assert files, "the store created no file"
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
