"""Unit tests of the SQLite compiler: SQL text depends only on shape, nothing is spliced, the
Python helpers behave, and the SQL it writes runs (on an in-memory database)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import given

from proxy.config import Limits
from proxy.errors import InvalidQuery, ProxyError, UnsupportedByBackend
from proxy.query import sqlite as q
from proxy.query.parse import parse_filter, parse_sort, parse_update
from tests import strategies
from tests.unit.test_query_pg import MARK, _filter, _ops, _path, _value

L = Limits(max_filter_nodes=1000)


def compile_filter(raw: dict[str, Any]) -> tuple[str, list[Any]]:
    params = q.Params()
    sql = q.FilterCompiler(params).where(parse_filter(raw, L))
    return sql, params.values


def compile_update(raw: dict[str, Any]) -> str:
    return q.UpdateCompiler(q.Params(["id"])).document_expr(parse_update(raw, L), "t.doc")


# ---- SQL text ---------------------------------------------------------------------------


@given(strategies.filters())
def test_sql_text_depends_only_on_shape(flt: dict[str, Any]) -> None:
    sql1, params1 = compile_filter(flt)
    sql2, params2 = compile_filter(_filter(flt))
    assert sql1 == sql2
    assert len(params1) == len(params2)
    assert MARK not in sql2  # no value or field name became SQL text


@given(strategies.updates())
def test_update_sql_depends_only_on_shape(update: dict[str, Any]) -> None:
    def operand(op: str, v: Any) -> Any:
        if op == "$rename":
            return _path(v)
        if op == "$pull" and isinstance(v, dict) and v and all(k.startswith("$") for k in v):
            return _ops(v)
        return _value(v)

    renamed = {
        op: {_path(k): operand(op, v) for k, v in fields.items()} for op, fields in update.items()
    }
    assert compile_update(update) == compile_update(renamed)
    assert MARK not in compile_update(renamed)


def test_paths_are_bound_json_paths() -> None:
    sql, params = compile_filter({"a b.0.é": 1, "x'; drop table t;--": 2})
    assert "drop" not in sql and "é" not in sql
    assert '$."a b"' in params and "$[0]" in params and '$."0"' in params and '$."é"' in params
    assert '$."x\'; drop table t;--"' in params


@pytest.mark.parametrize("segment", ['a"b', "a\\b", "a\nb", "\x01"])
def test_unaddressable_field_names_are_unsupported(segment: str) -> None:
    for compile_it in (
        lambda: compile_filter({f"x.{segment}": 1}),
        lambda: q.sort_exprs(parse_sort([[segment, 1]], L), q.Params()),
        lambda: compile_update({"$set": {segment: 1}}),
    ):
        with pytest.raises(UnsupportedByBackend) as info:
            compile_it()
        assert info.value.code == "unsupported_by_backend" and info.value.status == 400


def test_numeric_segments_are_ascii_digits() -> None:
    assert q.is_index("12") and not q.is_index("²") and not q.is_index("-1")
    assert q.index_path("3") == "$[3]"
    assert q.index_path("9" * 40) == f"$[{10**15}]"  # past the end of any array


def test_invalid_regex_fails_before_any_io() -> None:
    with pytest.raises(InvalidQuery) as info:
        compile_filter({"a": {"$regex": "(unclosed"}})
    assert info.value.code == "invalid_regex"


def test_nul_in_values_is_refused_like_postgresql() -> None:
    for raw in ({"a": "x\x00"}, {"a": {"$in": ["\x00"]}}, {"a": {"x": "\x00"}}):
        with pytest.raises(InvalidQuery) as info:
            compile_filter(raw)
        assert info.value.code == "invalid_value"
    assert q.json_text({"a": "\\u0000"}) == '{"a":"\\\\u0000"}'  # an escaped backslash is fine


def test_huge_integers_bind_as_doubles() -> None:
    # a filter may no longer carry 2**64 - 1 (number_out_of_range, issue 13 item 6); the
    # binding rule itself stays for values that reach the compiler some other way
    _, params = compile_filter({"a": 2**63 - 1, "b": {"$gt": -(2**63)}})
    assert 2**63 - 1 in params and -(2**63) in params
    assert q.sql_number(2**64 - 1) == float(2**64 - 1)


# ---- Python helpers ---------------------------------------------------------------------


def test_canonical_ignores_key_order_and_int_float() -> None:
    a = q.canonical_json('{"b": [1.0, {"y": 2, "x": -0.0}], "a": "é"}')
    b = q.canonical_json('{"a":"é","b":[1,{"x":0,"y":2.0}]}')
    assert a == b
    assert q.canonical(0.5) != q.canonical(1) and q.canonical(True) != q.canonical(1)


def test_value_order_follows_type_brackets() -> None:
    ordered = [None, -1, 0.5, 2, "B", "a", "é", {}, {"a": 1}, {"b": 0}, [], [1], [1, 2], [2], False]
    ordered.append(True)
    texts = [orjson.dumps(v).decode() for v in ordered]
    for i, a in enumerate(texts):
        for j, b in enumerate(texts):
            assert q.compare_json(a, b) == (i > j) - (i < j), (a, b)
    assert q.compare_json('{"a":1,"b":2}', '{"b":2.0,"a":1}') == 0


def test_arith_keeps_json_number_rules() -> None:
    assert q.arith("inc", "1", "2") == "3"
    assert q.arith("inc", "1", "2.5") == "3.5"
    assert q.arith("mul", "2", "1.5") == "3.0"
    assert q.arith("inc", "0.1", "0.2") == "0.30000000000000004"  # not SQLite's 15 digits
    with pytest.raises(ProxyError) as info:
        q.arith("mul", "1e308", "10")
    assert info.value.code == "number_out_of_range"  # was update_type_mismatch (issue 13, 6)


def test_regex_options_are_python_flags() -> None:
    assert q.regex_search("^c", "i", "Cy")
    assert not q.regex_search("^c", "", "Cy")
    assert q.regex_search("^b", "m", "a\nb") and not q.regex_search("^b", "", "a\nb")
    assert q.regex_search("a.b", "s", "a\nb") and not q.regex_search("a.b", "", "a\nb")
    assert q.regex_search("a b # comment", "x", "ab")
    assert q.compile_regex("x", "i") is q.compile_regex("x", "i")  # cached


def test_cursor_values_are_type_checked() -> None:
    keys = parse_sort("-age", L)
    tag = q.cursor_tag(keys)
    good = q.cursors.encode(tag, [2, 31, None, "p1"])
    assert q.decode_cursor(good, keys) == [2, 31, None, "p1"]
    for values in ([2, True, None, "p1"], [2, [1], None, "p1"], [2, 1, 5, "p1"]):
        with pytest.raises(InvalidQuery) as info:
            q.decode_cursor(q.cursors.encode(tag, values), keys)
        assert info.value.code == "invalid_cursor"
    other = q.cursors.encode(q.cursor_tag(parse_sort("age", L)), [2, 31, None, "p1"])
    with pytest.raises(InvalidQuery):
        q.decode_cursor(other, keys)


# ---- the SQL runs -------------------------------------------------------------------------


class _Failure:
    err: ProxyError | None = None


@pytest.fixture
def db() -> Iterator[tuple[sqlite3.Connection, _Failure]]:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    failure = _Failure()

    def keep(fn: Any) -> Any:
        def call(*args: Any) -> Any:
            try:
                return fn(*args)
            except ProxyError as err:
                failure.err = err
                raise

        return call

    def fail(code: str, message: str) -> None:
        raise InvalidQuery(message, code=code)

    conn.create_function(q.FN_REGEXP, 3, keep(q.regex_search), deterministic=True)
    conn.create_function(q.FN_CANON, 1, keep(q.canonical_json), deterministic=True)
    conn.create_function(q.FN_CMP, 2, keep(q.compare_json_sql), deterministic=True)
    conn.create_function(q.FN_ARITH, 3, keep(q.arith), deterministic=True)
    conn.create_function(q.FN_FAIL, 2, keep(fail))
    conn.create_collation(q.COLLATION, q.compare_json)
    conn.execute("CREATE TABLE c (_id TEXT PRIMARY KEY, doc TEXT NOT NULL)")
    try:
        yield conn, failure
    finally:
        conn.close()


def load(conn: sqlite3.Connection, *docs: dict[str, Any]) -> None:
    conn.execute("DELETE FROM c")
    for d in docs:
        conn.execute("INSERT INTO c VALUES (?, ?)", (d["_id"], orjson.dumps(d).decode()))


def matching(conn: sqlite3.Connection, flt: dict[str, Any]) -> list[str]:
    sql, params = compile_filter(flt)
    return sorted(r[0] for r in conn.execute(f"SELECT _id FROM c t WHERE {sql}", params))


def updated(db: tuple[sqlite3.Connection, _Failure], update: dict[str, Any]) -> Any:
    conn, failure = db
    params = q.Params(["d"])
    expr = q.UpdateCompiler(params).document_expr(parse_update(update, L), "t.doc")
    failure.err = None
    try:
        row = conn.execute(
            f"UPDATE c AS t SET doc = {expr} WHERE t._id = ?1 RETURNING doc", params.values
        ).fetchone()
    except sqlite3.OperationalError:
        assert failure.err is not None
        raise failure.err from None
    return orjson.loads(row[0])


def test_sixteen_segment_paths_compile_and_run(db: tuple[sqlite3.Connection, _Failure]) -> None:
    conn, _ = db
    deep: Any = 7
    for i in range(15):
        deep = {"a": [deep] if i % 4 == 0 else deep}
    load(conn, {"_id": "d", "a": deep})
    path = ".".join(["a"] * 16)
    assert matching(conn, {path: 7}) == ["d"]
    assert matching(conn, {path: {"$exists": False}}) == []
    params = q.Params()
    exprs = q.sort_exprs(parse_sort(".".join(["a", "0"] * 8), L), params)
    conn.execute(f"SELECT {q.order_by(exprs)} FROM c t", params.values).fetchall()
    got = updated(db, {"$set": {".".join(["b"] * 16): 1}})
    assert got["b"]["b"]["b"]["b"]["b"]["b"]["b"]["b"]["b"]["b"]["b"]["b"]["b"]["b"]["b"] == {
        "b": 1
    }


def test_array_index_updates_pad_with_nulls(db: tuple[sqlite3.Connection, _Failure]) -> None:
    conn, _ = db
    load(conn, {"_id": "d", "arr": [1], "o": {"0": "key"}})
    got = updated(db, {"$set": {"arr.3": "x", "o.0": "k2", "new.2": True}, "$inc": {"arr.0": 1}})
    assert got["arr"] == [2, None, None, "x"]
    assert got["o"] == {"0": "k2"} and got["new"] == {"2": True}
    got = updated(db, {"$unset": {"arr.1": "", "arr.9": "", "o.0": ""}})
    assert got["arr"] == [2, None, None, "x"] and got["o"] == {}
    with pytest.raises(InvalidQuery) as info:
        updated(db, {"$set": {f"arr.{q.MAX_PADDING + 10}": 1}})
    assert info.value.code == "array_index_too_large"


def test_float_results_keep_every_digit(db: tuple[sqlite3.Connection, _Failure]) -> None:
    conn, _ = db
    load(conn, {"_id": "d", "x": 0.1, "pi": 3.141592653589793})
    got = updated(db, {"$inc": {"x": 0.2}, "$max": {"pi": 3.0}, "$set": {"e": 2.718281828459045}})
    assert got["x"] == 0.30000000000000004
    assert got["pi"] == 3.141592653589793 and got["e"] == 2.718281828459045
    assert matching(conn, {"pi": 3.141592653589793, "x": {"$gt": 0.3}}) == ["d"]


def test_type_errors_fail_the_statement(db: tuple[sqlite3.Connection, _Failure]) -> None:
    conn, _ = db
    load(conn, {"_id": "d", "s": "text", "arr": [1, {"k": 1}]})
    for bad in (
        {"$inc": {"s": 1}},
        {"$push": {"s": 1}},
        {"$set": {"s.x": 1}},
        {"$set": {"arr.x": 1}},
        {"$rename": {"arr.1.k": "z"}},
    ):
        with pytest.raises(InvalidQuery) as info:
            updated(db, bad)
        assert info.value.code == "update_type_mismatch", bad
    doc = orjson.loads(conn.execute("SELECT doc FROM c").fetchone()[0])
    assert doc == {"_id": "d", "s": "text", "arr": [1, {"k": 1}]}


def test_in_with_every_type(db: tuple[sqlite3.Connection, _Failure]) -> None:
    conn, _ = db
    load(
        conn,
        {"_id": "n", "v": 1.0},
        {"_id": "t", "v": True},
        {"_id": "s", "v": ["x", "y"]},
        {"_id": "o", "v": {"b": 1, "a": [2]}},
        {"_id": "z", "v": None},
        {"_id": "m"},
    )
    assert matching(conn, {"v": {"$in": [1, True, "y", {"a": [2.0], "b": 1}]}}) == [
        "n",
        "o",
        "s",
        "t",
    ]
    assert matching(conn, {"v": {"$in": [None, 2]}}) == ["m", "z"]
    assert matching(conn, {"v": {"$nin": [1, None, "x"]}}) == ["o", "t"]
