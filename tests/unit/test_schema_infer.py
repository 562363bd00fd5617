"""Unit tests of the field types inferred from a sample (issue 15, ``GET /api/db/schema``): the
paths, types and presence, the bounds, and that the inferred fields, declared as a schema,
accept every document of the sample."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from proxy.numbers import Unrepresentable
from proxy.schema.infer import infer_fields, value_type
from proxy.schema.model import FIELD_TYPES, parse_path, parse_schema
from proxy.schema.validate import compile_schema


def by_name(fields: list[dict[str, Any]]) -> dict[str, tuple[list[str], float]]:
    assert all(f["inferred"] is True for f in fields)
    assert [f["name"] for f in fields] == sorted(f["name"] for f in fields)
    return {f["name"]: (f["type"], f["present"]) for f in fields}


def test_paths_types_and_presence() -> None:
    docs = [
        {"_id": "1", "_version": 3, "name": "a", "age": 30, "address": {"city": "X"}},
        {"_id": "2", "_version": 1, "name": None, "age": 30.5, "tags": [{"deep": 1}]},
        {"_id": "3", "_version": 2, "name": "c", "address": None, "flag": True},
        {"_id": "4", "_version": 1, "name": "d", "age": 7},
    ]
    assert by_name(infer_fields(docs)) == {
        "_id": (["string"], 1.0),
        "address": (["null", "object"], 0.5),
        "address.city": (["string"], 0.25),
        "age": (["integer", "number"], 0.75),
        "flag": (["boolean"], 0.25),
        "name": (["null", "string"], 1.0),
        "tags": (["array"], 0.25),  # arrays are not descended
    }


def test_an_empty_sample_infers_nothing() -> None:
    assert infer_fields([]) == []
    assert infer_fields([{}, {}]) == []


def test_datetime_only_when_every_string_is_one() -> None:
    dates = [{"at": "2024-05-01T12:00:00Z"}, {"at": "2024-05-02T00:00:00.5+02:00"}, {"at": None}]
    assert by_name(infer_fields(dates))["at"] == (["datetime", "null"], 1.0)
    mixed = [*dates, {"at": "tomorrow"}]
    assert by_name(infer_fields(mixed))["at"] == (["null", "string"], 1.0)
    assert value_type("2024-13-01T00:00:00Z") == "string"  # not a real date
    assert value_type("2024-05-01") == "string"  # a date alone is not a date-time


def test_value_types() -> None:
    assert value_type(True) == "boolean" and value_type(0) == "integer"
    assert value_type(1.0) == "number" and value_type(Unrepresentable("1e999")) == "number"
    assert value_type({}) == "object" and value_type([]) == "array" and value_type(None) == "null"
    assert {value_type(v) for v in (None, True, 1, 1.5, "s", {}, [])} < set(FIELD_TYPES)


def test_max_depth_bounds_the_paths() -> None:
    doc = {"a": {"b": {"c": {"d": {"e": 1}}}}}
    assert [f["name"] for f in infer_fields([doc])] == ["a", "a.b", "a.b.c"]
    assert [f["name"] for f in infer_fields([doc], max_depth=1)] == ["a"]
    assert infer_fields([doc], max_depth=5)[-1] == {
        "name": "a.b.c.d.e",
        "type": ["integer"],
        "present": 1.0,
        "inferred": True,
    }


def test_max_fields_keeps_the_most_present() -> None:
    docs = [{"common": 1, f"rare{i:03}": i} for i in range(50)]
    names = [f["name"] for f in infer_fields(docs, max_fields=3)]
    assert names == ["common", "rare000", "rare001"]
    many = [{f"k{i}": i for i in range(5000)}]
    assert len(infer_fields(many)) == 200


def test_keys_that_cannot_be_declared_are_skipped() -> None:
    docs = [{"ok": 1, "first-name": "x", "a.b": 2, "$x": 3, "": 4, "9z": 5, "o": {"b c": 1}}]
    assert [f["name"] for f in infer_fields(docs)] == ["o", "ok"]


def test_presence_is_rounded_and_counts_documents_not_values() -> None:
    docs = [{"a": {"b": 1}}, {"a": {"b": 2}}, {"x": 1}]
    assert by_name(infer_fields(docs)) == {
        "a": (["object"], 0.6667),
        "a.b": (["integer"], 0.6667),
        "x": (["integer"], 0.3333),
    }


def test_non_objects_in_the_sample_are_ignored() -> None:
    assert by_name(infer_fields([{"a": 1}, "nope", None, [1]])) == {"a": (["integer"], 1.0)}  # type: ignore[list-item]


_keys = st.sampled_from(["a", "b", "c", "_id", "x_1", "bad-key"])
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=5),
    st.sampled_from(["2024-05-01T12:00:00Z", "2024-02-30T00:00:00Z", "2024-05-01t01:02:03z"]),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_keys, inner, max_size=3)),
    max_leaves=10,
)
_docs = st.lists(  # a stored document's _id is a string
    st.builds(lambda d, i: {**d, "_id": i}, st.dictionaries(_keys, _values, max_size=4), st.text()),
    max_size=8,
)


@given(_docs, st.integers(1, 4))
def test_the_inferred_fields_declare_a_schema_every_sampled_document_passes(
    docs: list[dict[str, Any]], depth: int
) -> None:
    fields = infer_fields(docs, max_depth=depth)
    for f in fields:
        assert len(parse_path(f["name"], "x")) <= depth
        assert f["type"] == sorted(set(f["type"])) and set(f["type"]) <= set(FIELD_TYPES)
        assert 0 < f["present"] <= 1
    declared = [{"name": f["name"], "type": f["type"]} for f in fields]
    validator = compile_schema(parse_schema({"fields": declared}, "c"))
    for doc in docs:
        assert validator.problems(doc) == []
    # a field present in every document could be declared required
    required = [
        {"name": f["name"], "type": f["type"], "required": True}
        for f in fields
        if f["present"] == 1.0 and "." not in f["name"]
    ]
    strict = compile_schema(parse_schema({"fields": required}, "c"))
    assert all(strict.is_valid(doc) for doc in docs)
