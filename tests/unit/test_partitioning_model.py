"""The ``partitioning`` declaration (issue 21): every strategy parsed, every bad part a 400
naming its place, and the unique-index rule of partitioned tables."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.errors import BadRequest
from proxy.schema.model import parse_schema
from proxy.schema.partitioning import Partitioning, check_unique_indexes, parse_partitioning


def bad(raw: Any) -> BadRequest:
    with pytest.raises(BadRequest) as info:
        parse_partitioning(raw)
    assert info.value.status == 400 and info.value.code == "invalid_schema"
    return info.value


def test_hash() -> None:
    spec = parse_partitioning({"strategy": "hash", "key": "tenant.id", "partitions": 8})
    assert spec == Partitioning("hash", ("tenant", "id"), partitions=8)
    assert spec.to_dict() == {
        "strategy": "hash",
        "key": "tenant.id",
        "unique_id": "global",
        "partitions": 8,
    }


def test_list() -> None:
    raw = {
        "strategy": "list",
        "key": "region",
        "values": {"eu": ["de", "fr"], "us": ["us"]},
        "default": True,
        "unique_id": "per_key",
    }
    spec = parse_partitioning(raw)
    assert spec.values == (("eu", ("de", "fr")), ("us", ("us",)))
    assert spec.default and spec.unique_id == "per_key"
    assert spec.to_dict()["values"] == {"eu": ["de", "fr"], "us": ["us"]}


def test_range_and_time() -> None:
    spec = parse_partitioning({"strategy": "range", "key": "n", "bounds": [10, 20.5, 100]})
    assert spec.bounds == (10, 20.5, 100)
    spec = parse_partitioning(
        {"strategy": "time", "key": "at", "interval": "month", "premake": 2, "retention": 3}
    )
    assert (spec.interval, spec.premake, spec.retention) == ("month", 2, 3)
    assert parse_partitioning({"strategy": "time", "key": "at", "interval": "day"}).premake == 4


@pytest.mark.parametrize(
    ("raw", "at"),
    [
        ("hash", "schema.partitioning"),
        ({"strategy": "shard", "key": "a"}, "schema.partitioning.strategy"),
        ({"strategy": "hash", "key": "a", "partitions": 1}, "schema.partitioning.partitions"),
        ({"strategy": "hash", "key": "a", "partitions": True}, "schema.partitioning.partitions"),
        ({"strategy": "hash", "key": "a", "partitions": 2, "bounds": []}, "schema.partitioning"),
        ({"strategy": "hash", "key": "_id", "partitions": 2}, "schema.partitioning.key"),
        ({"strategy": "hash", "key": "a;drop", "partitions": 2}, "schema.partitioning.key"),
        ({"strategy": "hash", "key": "", "partitions": 2}, "schema.partitioning.key"),
        (
            {"strategy": "hash", "key": "a", "partitions": 2, "unique_id": "x"},
            "schema.partitioning.unique_id",
        ),
        ({"strategy": "list", "key": "a", "values": {}}, "schema.partitioning.values"),
        ({"strategy": "list", "key": "a", "values": {"X y": [1]}}, "schema.partitioning.values"),
        (
            {"strategy": "list", "key": "a", "values": {"p": [{"x": 1}]}},
            "schema.partitioning.values.p",
        ),
        (
            {"strategy": "list", "key": "a", "values": {"p": [1], "q": [1]}},
            "schema.partitioning.values.q",
        ),
        (
            {"strategy": "list", "key": "a", "values": {"p": [1], "q": ["1"]}},
            "schema.partitioning.values",
        ),
        (
            {"strategy": "list", "key": "a", "values": {"p": [1]}, "default": 1},
            "schema.partitioning.default",
        ),
        ({"strategy": "range", "key": "a", "bounds": [3, 2]}, "schema.partitioning.bounds"),
        ({"strategy": "range", "key": "a", "bounds": [1, "b"]}, "schema.partitioning.bounds"),
        ({"strategy": "range", "key": "a", "bounds": []}, "schema.partitioning.bounds"),
        ({"strategy": "time", "key": "a", "interval": "hour"}, "schema.partitioning.interval"),
        (
            {"strategy": "time", "key": "a", "interval": "day", "retention": 0},
            "schema.partitioning.retention",
        ),
    ],
)
def test_bad_declarations(raw: Any, at: str) -> None:
    assert bad(raw).details == {"at": at}


def test_unique_index_must_include_the_key() -> None:
    spec = parse_partitioning({"strategy": "hash", "key": "t", "partitions": 2})
    check_unique_indexes(spec, [("ok", (("t",), ("email",)))], "schema.indexes")
    with pytest.raises(BadRequest) as info:
        check_unique_indexes(spec, [("by_email", (("email",),))], "schema.indexes")
    assert info.value.code == "unique_index_without_partition_key"
    assert info.value.details == {
        "at": "schema.indexes",
        "index": "by_email",
        "partition_key": "t",
    }


def test_the_schema_applies_the_unique_rule_to_unique_constraints() -> None:
    raw = {
        "fields": [{"name": "email", "type": "string", "constraints": ["unique"]}],
        "partitioning": {"strategy": "hash", "key": "t", "partitions": 2},
    }
    with pytest.raises(BadRequest) as info:
        parse_schema(raw, "c")
    assert info.value.code == "unique_index_without_partition_key"
    assert info.value.details is not None and info.value.details["index"] == "email_unique"
