"""Schemathesis hooks for tests/e2e/test_openapi_fuzz.py (``SCHEMATHESIS_HOOKS``): every
interactive transaction the fuzzer begins is rolled back at once, as a client would end it,
so the run is not measuring the pool's transaction share (an honest 503)."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import schemathesis


@schemathesis.hook
def after_call(context: Any, case: Any, response: Any) -> None:
    url = str(response.request.url or "")
    if response.status_code != 201 or not url.endswith("/api/db/transaction"):
        return
    tx_id = json.loads(response.content).get("transaction_id")
    body = json.dumps({"action": "rollback", "transaction_id": tx_id}).encode()
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    for name in ("Authorization",):  # the same caller
        if name in response.request.headers:
            request.add_header(name, response.request.headers[name])
    try:
        with urllib.request.urlopen(request, timeout=10):
            pass
    except OSError:
        pass  # the reaper ends it (idle timeout)
