"""Unit tests of the Collection Schema model (issue 15): what parses into which values, and
every refusal a 400 with a stable code naming its place."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import BadRequest
from proxy.schema.model import (
    CONSTRAINT_KINDS,
    FIELD_TYPES,
    MAX_ENUM,
    MAX_FIELDS,
    MAX_PATH_DEPTH,
    MAX_PATTERN,
    MISSING,
    CollectionSchema,
    IndexKey,
    IndexSpec,
    Validation,
    parse_index,
    parse_path,
    parse_schema,
)


def refused(raw: Any, code: str = "invalid_schema", collection: str = "c") -> BadRequest:
    with pytest.raises(BadRequest) as info:
        parse_schema(raw, collection)
    assert info.value.status == 400
    assert info.value.code == code, info.value.message
    return info.value


def field(**kw: Any) -> dict[str, Any]:
    return {"fields": [{"name": "f", **kw}]}


# ---- what parses ------------------------------------------------------------------------------


def test_a_full_schema_parses_into_its_values() -> None:
    s = parse_schema(
        {
            "name": "users",
            "database": "main",
            "fields": [
                {"name": "email", "type": "string", "required": True, "constraints": ["unique"]},
                {"name": "age", "type": ["integer", "null"], "constraints": ["min:0", "max:1e3"]},
                {"name": "address.city", "type": "string", "default_value": "Paris"},
            ],
            "indexes": [{"name": "by_age", "fields": ["-age", "email"]}],
            "validation": {"level": "moderate", "action": "warn"},
            "security": {"access_control": "owner"},
        },
        "users",
    )
    assert s.name == "users" and s.database == "main"
    email, age, city = s.fields
    assert email.path == ("email",) and email.types == ("string",) and email.required
    assert email.unique and not email.immutable and email.default is MISSING
    assert age.types == ("integer", "null")
    assert [(c.kind, c.value, c.text) for c in age.constraints] == [
        ("min", 0, "min:0"),
        ("max", 1000.0, "max:1e3"),
    ]
    assert isinstance(age.constraint("min").value, int)  # type: ignore[union-attr]
    assert city.path == ("address", "city") and city.default == "Paris" and not city.required
    assert s.indexes == (
        IndexSpec("by_age", (IndexKey(("age",), True), IndexKey(("email",))), unique=False),
    )
    assert s.validation == Validation("moderate", "warn") and not s.validation.enforced
    assert s.security == {"access_control": "owner"}
    assert s.field(("address", "city")) is city and s.field(("nope",)) is None


def test_defaults_of_an_empty_schema() -> None:
    s = parse_schema({}, "c")
    assert s == CollectionSchema("c")
    assert s.validation.level == "strict" and s.validation.action == "error"
    assert s.validation.enforced
    f = parse_schema(field(), "c").fields[0]
    assert f.types == ("any",) and not f.required and f.constraints == () and f.default is MISSING


def test_a_null_default_is_a_default() -> None:
    f = parse_schema(field(type=["string", "null"], default_value=None), "c").fields[0]
    assert f.default is None


def test_to_dict_round_trips() -> None:
    raw = {
        "name": "c",
        "database": None,
        "fields": [
            {"name": "a", "type": "string", "required": True, "constraints": ["pattern:^x"]},
            {
                "name": "b.c",
                "type": ["integer", "null"],
                "required": False,
                "default_value": 3,
                "constraints": ["min:1", "enum:1|2|3"],
            },
        ],
        "indexes": [{"name": "ix", "fields": ["a", "-b.c"], "unique": True}],
        "partitioning": None,
        "security": None,
        "validation": {"level": "strict", "action": "warn"},
        "search": None,
    }
    s = parse_schema(raw, "c")
    assert s.to_dict() == raw
    assert parse_schema(s.to_dict(), "c") == s


def test_any_among_types_means_any() -> None:
    assert parse_schema(field(type=["string", "any"]), "c").fields[0].types == ("any",)


@pytest.mark.parametrize(
    ("types", "constraint", "value"),
    [
        (["string"], "enum:a|1|true|null", ("a", "1", "true", "null")),
        (["integer"], "enum:1|2|3", (1, 2, 3)),
        (["number", "null"], "enum:1.5|null|2e2", (1.5, None, 200.0)),
        (["boolean"], "enum:true|false", (True, False)),
        (["integer"], "enum:1|x", (1, "x")),
        (["datetime"], "enum:2024-01-01T00:00:00Z", ("2024-01-01T00:00:00Z",)),
    ],
)
def test_enum_values_are_read_for_the_field_type(
    types: list[str], constraint: str, value: tuple[Any, ...]
) -> None:
    f = parse_schema(field(type=types, constraints=[constraint]), "c").fields[0]
    assert f.constraint("enum").value == value  # type: ignore[union-attr]


def test_all_indexes_adds_one_per_unique_constraint_not_already_covered() -> None:
    s = parse_schema(
        {
            "fields": [
                {"name": "email", "constraints": ["unique"]},
                {"name": "a.b", "constraints": ["unique"]},
            ],
            "indexes": [{"name": "email_ix", "fields": ["email"], "unique": True}],
        },
        "c",
    )
    assert [(ix.name, ix.unique, [k.text for k in ix.keys]) for ix in s.all_indexes()] == [
        ("email_ix", True, ["email"]),
        ("a_b_unique", True, ["a.b"]),
    ]
    clash = {
        "fields": [{"name": "email", "constraints": ["unique"]}],
        "indexes": [{"name": "email_unique", "fields": ["email", "x"]}],
    }
    assert "named like a unique constraint" in refused(clash).message


def test_scalar_kinds_only_for_an_enforced_schema_and_plain_paths() -> None:
    raw = {
        "fields": [
            {"name": "n", "type": ["integer", "null"]},
            {"name": "s", "type": "datetime"},
            {"name": "b", "type": "boolean"},
            {"name": "mixed", "type": ["string", "integer"]},
            {"name": "anything"},
            {"name": "obj", "type": ["object", "null"]},
            {"name": "obj.x", "type": "number"},
            {"name": "free.y", "type": "string"},  # parent undeclared: may be an array
        ]
    }
    assert parse_schema(raw, "c").scalar_kinds() == {
        ("n",): "number",
        ("s",): "string",
        ("b",): "boolean",
        ("obj", "x"): "number",
    }
    warn = {**raw, "validation": {"action": "warn"}}
    assert parse_schema(warn, "c").scalar_kinds() == {}
    moderate = {**raw, "validation": {"level": "moderate"}}
    assert parse_schema(moderate, "c").scalar_kinds() == {}


# ---- refusals -----------------------------------------------------------------------------------


def test_unknown_constraint_is_its_own_code() -> None:
    err = refused(field(constraints=["min:1", "maxlen:3"]), "unknown_constraint")
    assert err.details == {"at": "schema.fields[0].constraints[1]"}
    assert "maxlen" in err.message
    refused(field(constraints=["Unique"]), "unknown_constraint")
    refused(field(constraints=[""]), "unknown_constraint")


@pytest.mark.parametrize(
    ("constraint", "fragment"),
    [
        ("min", "needs an argument"),
        ("min:", "needs an argument"),
        ("min:abc", "needs a number"),
        ("max:1e999", "finite"),
        ("max:nan", "needs a number"),
        ("min_length:-1", "non-negative integer"),
        ("max_length:1.5", "non-negative integer"),
        ("max_length:1234567890", "non-negative integer"),
        ("unique:yes", "takes no argument"),
        ("immutable:", "takes no argument"),
        ("pattern:", "needs an argument"),
        ("pattern:" + "a" * (MAX_PATTERN + 1), "at most"),
        ("enum:" + "|".join(str(i) for i in range(MAX_ENUM + 1)), "at most"),
    ],
)
def test_bad_constraint_arguments(constraint: str, fragment: str) -> None:
    err = refused(field(type="any", constraints=[constraint]))
    assert fragment in err.message
    assert err.details == {"at": "schema.fields[0].constraints[0]"}


def test_a_constraint_twice_and_non_string_constraints() -> None:
    assert "twice" in refused(field(constraints=["min:1", "min:2"])).message
    assert refused(field(constraints=[3])).details == {"at": "schema.fields[0].constraints[0]"}
    assert refused(field(constraints="min:1")).details == {"at": "schema.fields[0].constraints"}


@pytest.mark.parametrize("bad", ["text", "int", "Integer", 3, [], ["string", "string"], None])
def test_bad_types(bad: Any) -> None:
    err = refused(field(type=bad))
    assert err.details == {"at": "schema.fields[0].type"}


def test_every_type_name_parses() -> None:
    for t in FIELD_TYPES:
        assert parse_schema(field(type=t), "c").fields[0].types == (t,)
    assert len(CONSTRAINT_KINDS) == 8


def test_duplicate_fields() -> None:
    raw = {"fields": [{"name": "a.b"}, {"name": "c"}, {"name": "a.b", "type": "string"}]}
    err = refused(raw)
    assert "declared twice" in err.message and err.details == {"at": "schema.fields[2]"}


def test_a_field_under_a_scalar_parent_is_refused() -> None:
    err = refused({"fields": [{"name": "a", "type": "string"}, {"name": "a.b"}]})
    assert "not an object" in err.message
    parse_schema({"fields": [{"name": "a", "type": ["object", "null"]}, {"name": "a.b"}]}, "c")
    parse_schema({"fields": [{"name": "a"}, {"name": "a.b"}]}, "c")  # any


def test_partitioning_is_kept_and_checked() -> None:
    schema = parse_schema({"partitioning": {"strategy": "hash", "key": "id", "partitions": 4}}, "c")
    assert schema.to_dict()["partitioning"] == {
        "strategy": "hash",
        "key": "id",
        "unique_id": "global",
        "partitions": 4,
    }
    err = refused({"partitioning": {"strategy": "hash", "key": "id"}})
    assert err.details == {"at": "schema.partitioning.partitions"}
    # a declared key must be of the strategy's kind and never null
    err = refused(
        {
            "fields": [{"name": "n", "type": "string"}],
            "partitioning": {"strategy": "range", "key": "n", "bounds": [1, 2]},
        }
    )
    assert err.details == {"at": "schema.partitioning.key"}
    refused(
        {
            "fields": [{"name": "n", "type": ["integer", "null"]}],
            "partitioning": {"strategy": "range", "key": "n", "bounds": [1, 2]},
        }
    )
    parse_schema({"partitioning": None}, "c")
    parse_schema({"partitioning": {}}, "c")


@pytest.mark.parametrize(
    ("raw", "at"),
    [
        ([], "schema"),
        ({"nme": "c"}, "schema"),
        ({"name": "other"}, "schema.name"),
        ({"database": 3}, "schema.database"),
        ({"security": "open"}, "schema.security"),
        ({"search": []}, "schema.search"),
        ({"fields": {}}, "schema.fields"),
        ({"fields": [{"name": f"f{i}"} for i in range(MAX_FIELDS + 1)]}, "schema.fields"),
        ({"fields": ["a"]}, "schema.fields[0]"),
        ({"fields": [{"name": "a", "default": 1}]}, "schema.fields[0]"),
        ({"fields": [{"name": "a", "required": "yes"}]}, "schema.fields[0].required"),
        ({"fields": [{"name": "_id", "default_value": "x"}]}, "schema.fields[0]"),
        ({"fields": [{"name": "_id.x"}]}, "schema.fields[0]"),
        ({"validation": "strict"}, "schema.validation"),
        ({"validation": {"level": "strict", "mode": "x"}}, "schema.validation"),
        ({"validation": {"level": "off"}}, "schema.validation.level"),
        ({"validation": {"action": "ignore"}}, "schema.validation.action"),
        ({"indexes": {}}, "schema.indexes"),
        ({"indexes": [{"name": "i", "fields": ["a"]}] * 2}, "schema.indexes"),
    ],
)
def test_schema_refusals_name_their_place(raw: Any, at: str) -> None:
    assert refused(raw).details == {"at": at}


@pytest.mark.parametrize(
    "name",
    ["", "a..b", ".a", "a.", "1a", "a-b", "a b", "$a", "_version", "_version.x", "a." * 9 + "a", 3],
)
def test_bad_field_paths(name: Any) -> None:
    err = refused({"fields": [{"name": name}]})
    assert err.details == {"at": "schema.fields[0].name"}


def test_good_field_paths() -> None:
    assert parse_path("a", "x") == ("a",)
    assert parse_path("_id", "x") == ("_id",)
    assert parse_path("a_1.B2._c", "x") == ("a_1", "B2", "_c")
    deepest = ".".join(["s"] * MAX_PATH_DEPTH)
    assert parse_path(deepest, "x") == ("s",) * MAX_PATH_DEPTH


@given(
    st.from_regex(
        r"[A-Za-z_][A-Za-z0-9_]{0,20}(\.[A-Za-z_][A-Za-z0-9_]{0,20}){0,3}", fullmatch=True
    )
)
def test_any_plain_dotted_path_parses_to_its_segments(path: str) -> None:
    if path.split(".")[0] == "_version":
        with pytest.raises(BadRequest):
            parse_path(path, "x")
    else:
        assert parse_path(path, "x") == tuple(path.split("."))


# ---- indexes ------------------------------------------------------------------------------------


def test_index_parsing() -> None:
    ix = parse_index({"name": "by_a", "fields": ["a.b", "-c", "+d"], "unique": True})
    assert ix.name == "by_a" and ix.unique and ix.partial_filter is None
    assert ix.keys == (IndexKey(("a", "b")), IndexKey(("c",), True), IndexKey(("d",)))
    assert [k.text for k in ix.keys] == ["a.b", "-c", "d"]
    assert ix.to_dict() == {"name": "by_a", "fields": ["a.b", "-c", "d"], "unique": True}
    partial = parse_index({"name": "p", "fields": ["a"], "partial_filter": {"a": {"$gt": 1}}})
    assert partial.partial_filter == {"a": {"$gt": 1}}
    assert partial.to_dict()["partial_filter"] == {"a": {"$gt": 1}}


@pytest.mark.parametrize(
    ("raw", "at"),
    [
        ("by_a", "index"),
        ({"name": "i", "fields": ["a"], "sparse": True}, "index"),
        ({"fields": ["a"]}, "index.name"),
        ({"name": "1i", "fields": ["a"]}, "index.name"),
        ({"name": "i" * 41, "fields": ["a"]}, "index.name"),
        ({"name": "bad-name", "fields": ["a"]}, "index.name"),
        ({"name": "i"}, "index.fields"),
        ({"name": "i", "fields": []}, "index.fields"),
        ({"name": "i", "fields": "a"}, "index.fields"),
        ({"name": "i", "fields": [f"f{n}" for n in range(9)]}, "index.fields"),
        ({"name": "i", "fields": [1]}, "index.fields[0]"),
        ({"name": "i", "fields": ["a;drop"]}, "index.fields[0]"),
        ({"name": "i", "fields": ["-"]}, "index.fields[0]"),
        ({"name": "i", "fields": ["a", "b", "-a"]}, "index.fields"),
        ({"name": "i", "fields": ["a"], "unique": 1}, "index.unique"),
        ({"name": "i", "fields": ["a"], "partial_filter": []}, "index.partial_filter"),
        ({"name": "i", "fields": ["a"], "partial_filter": {"$where": "1"}}, "index.partial_filter"),
    ],
)
def test_index_refusals_name_their_place(raw: Any, at: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_index(raw)
    assert info.value.status == 400 and info.value.code == "invalid_schema"
    assert info.value.details == {"at": at}


def test_an_index_inside_a_schema_names_its_place() -> None:
    err = refused({"indexes": [{"name": "ok", "fields": ["a"]}, {"name": "x", "fields": []}]})
    assert err.details == {"at": "schema.indexes[1].fields"}
