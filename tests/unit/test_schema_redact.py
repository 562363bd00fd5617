"""``redact``: problems on paths a caller may not read say only that they do not match."""

from __future__ import annotations

from proxy.schema.validate import HIDDEN_MESSAGE, redact


def test_redact_keeps_readable_and_hides_the_rest_once_per_path() -> None:
    problems = [
        {"path": "n", "rule": "max", "message": "must be at most 100"},
        {"path": "secret", "rule": "type", "message": "must be of type integer (is string)"},
        {"path": "secret", "rule": "immutable", "message": "is immutable: once set ..."},
        {"path": "vault.pin", "rule": "min", "message": "must be at least 1000"},
    ]
    out = redact(problems, lambda path: path == "n")
    assert out == [
        problems[0],
        {"path": "secret", "rule": "hidden", "message": HIDDEN_MESSAGE},
        {"path": "vault.pin", "rule": "hidden", "message": HIDDEN_MESSAGE},
    ]
    assert redact(problems, lambda path: True) == problems
    assert "integer" not in HIDDEN_MESSAGE and not any(c.isdigit() for c in HIDDEN_MESSAGE)
