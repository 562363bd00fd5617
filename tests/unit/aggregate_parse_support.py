"""Shared helpers of the aggregation front end's unit tests (parse, expressions, paths)."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.config import Limits
from proxy.errors import ProxyError
from proxy.query.aggregate.parse import parse_pipeline

L = Limits()


def stages(*raw: Any, limits: Limits = L) -> tuple[Any, ...]:
    return parse_pipeline(list(raw), limits).stages


def one(raw: Any) -> Any:
    (stage,) = stages(raw)
    return stage


def expr(raw: Any) -> Any:
    stage = one({"$addFields": {"x": raw}})
    return stage.fields[0][1]


def refused(
    raw: Any,
    code: str,
    at: str | None = None,
    operator: str | None = None,
    limits: Limits = L,
) -> ProxyError:
    with pytest.raises(ProxyError) as info:
        parse_pipeline(raw, limits)
    err = info.value
    assert err.status == 400
    assert err.code == code, (err.code, err.message)
    if at is not None:
        assert err.details.get("at") == at, err.details
    if operator is not None:
        assert err.details.get("operator") == operator, err.details
    return err


def expr_refused(raw: Any, code: str, at: str | None = None, **kw: Any) -> ProxyError:
    full = None if at is None else "pipeline[0].$addFields.x" + at
    return refused([{"$addFields": {"x": raw}}], code, full, **kw)


LOOKUP = {"from": "orders", "localField": "a.id", "foreignField": "owner", "as": "o"}
