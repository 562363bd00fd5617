"""The aggregation front end's expressions: every operator form, normalisation and refusal."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from proxy.query.aggregate.ast import (
    Arr,
    Call,
    Field,
    Iterate,
    Lit,
    Obj,
    Switch,
    Var,
)
from tests.unit.aggregate_parse_support import L, expr, expr_refused, refused

# ---- expressions ------------------------------------------------------------------------------


def test_scalars_paths_and_containers() -> None:
    assert expr("$a.b") == Field(("a", "b"))
    assert expr("$a.0") == Field(("a", "0"))
    assert expr("$$ROOT") == Field(())
    assert expr("$$CURRENT") == Field(())
    assert expr("$$ROOT.a.b") == Field(("a", "b"))
    assert expr("$$CURRENT.x") == Field(("x",))
    assert expr("plain") == Lit("plain")
    assert expr("") == Lit("")
    for v in (1, 2.5, True, False, None, -7):
        assert expr(v) == Lit(v)
    assert expr([1, "$a", [2]]) == Arr((Lit(1), Field(("a",)), Arr((Lit(2),))))
    assert expr({}) == Obj(())
    assert expr({"k": "$a", "l": {"m": 1}}) == Obj(
        (("k", Field(("a",))), ("l", Obj((("m", Lit(1)),))))
    )


def test_literal() -> None:
    assert expr({"$literal": "$a"}) == Lit("$a")
    assert expr({"$literal": {"$add": [1]}}) == Lit({"$add": [1]})
    assert expr({"$literal": [1, {"$out": 1}]}) == Lit([1, {"$out": 1}])


@pytest.mark.parametrize(
    "raw",
    ["$", "$a..b", "$.a", "$a.", "$a.$b", "$$ROOT.", "$$ROOT..a", "$" + ".".join(["a"] * 17)],
)
def test_bad_paths(raw: str) -> None:
    expr_refused(raw, "invalid_pipeline", "")


def test_path_segment_limit() -> None:
    assert expr("$" + ".".join(["a"] * 16)) == Field(("a",) * 16)
    limits = dataclasses.replace(L, max_path_segments=2)
    refused([{"$set": {"x": "$a.b.c"}}], "invalid_pipeline", limits=limits)
    refused([{"$set": {"a.b.c": 1}}], "invalid_pipeline", limits=limits)


@pytest.mark.parametrize("raw", ["$$NOW", "$$REMOVE", "$$this", "$$x.a", "$$", "$$root"])
def test_unknown_variable(raw: str) -> None:
    err = expr_refused(raw, "invalid_pipeline", "")
    assert "unknown variable" in err.message


def test_operator_object_shapes() -> None:
    expr_refused({"$add": [1], "b": 1}, "invalid_pipeline", "")
    expr_refused({"a": 1, "$add": [1]}, "invalid_pipeline", "")
    expr_refused({"a.b": 1}, "invalid_pipeline", "")
    expr_refused({"k": {"$bogus": 1}}, "unknown_operator", ".k", operator="$bogus")
    expr_refused({"$add": [1, {"$bogus": 1}]}, "unknown_operator", ".$add[1]", operator="$bogus")


@pytest.mark.parametrize("op", ["$function", "$accumulator", "$where", "$out", "$merge"])
def test_forbidden_operators(op: str) -> None:
    expr_refused({"k": [{op: {}}]}, "forbidden_operator", ".k[0]", operator=op)


VARIADIC = ["add", "multiply", "and", "or", "concat", "concatArrays"]
BINARY = [
    *["subtract", "divide", "mod", "eq", "ne", "gt", "gte", "lt", "lte", "cmp", "split"],
    "arrayElemAt",
    "in",
]
UNARY = [
    "abs",
    "floor",
    "ceil",
    "toLower",
    "toUpper",
    "strLenCP",
    "size",
    "type",
    "toString",
    "toInt",
    "toDouble",
    "not",
]


@pytest.mark.parametrize("op", VARIADIC)
def test_variadic(op: str) -> None:
    assert expr({f"${op}": []}) == Call(op, ())
    assert expr({f"${op}": ["$a", "$b", "$c"]}) == Call(
        op, (Field(("a",)), Field(("b",)), Field(("c",)))
    )
    assert expr({f"${op}": "$a"}) == Call(op, (Field(("a",)),))


@pytest.mark.parametrize("op", BINARY)
def test_binary(op: str) -> None:
    assert expr({f"${op}": ["$a", "$b"]}) == Call(op, (Field(("a",)), Field(("b",))))
    for bad in ([], ["$a"], ["$a", "$b", "$c"], "$a"):
        expr_refused({f"${op}": bad}, "invalid_pipeline", "")


@pytest.mark.parametrize("op", UNARY)
def test_unary(op: str) -> None:
    assert expr({f"${op}": "$a"}) == Call(op, (Field(("a",)),))
    assert expr({f"${op}": ["$a"]}) == Call(op, (Field(("a",)),))
    for bad in ([], ["$a", "$b"]):
        expr_refused({f"${op}": bad}, "invalid_pipeline", "")


def test_if_null_substr_slice_arity() -> None:
    assert expr({"$ifNull": ["$a", 0]}) == Call("ifNull", (Field(("a",)), Lit(0)))
    assert len(expr({"$ifNull": ["$a", "$b", 0]}).args) == 3
    expr_refused({"$ifNull": ["$a"]}, "invalid_pipeline", "")
    assert expr({"$substrCP": ["$s", 0, 2]}) == Call("substrCP", (Field(("s",)), Lit(0), Lit(2)))
    expr_refused({"$substrCP": ["$s", 0]}, "invalid_pipeline", "")
    assert expr({"$slice": ["$a", -2]}) == Call("slice", (Field(("a",)), Lit(-2)))
    assert expr({"$slice": ["$a", 1, 2]}) == Call("slice", (Field(("a",)), Lit(1), Lit(2)))
    for bad in (["$a"], ["$a", 1, 2, 3]):
        expr_refused({"$slice": bad}, "invalid_pipeline", "")


def test_cond_normalised() -> None:
    want = Call("cond", (Field(("a",)), Lit(1), Lit(2)))
    assert expr({"$cond": ["$a", 1, 2]}) == want
    assert expr({"$cond": {"if": "$a", "then": 1, "else": 2}}) == want
    for bad in (["$a", 1], {"if": "$a", "then": 1}, {"if": 1, "then": 1, "else": 1, "x": 1}, 5):
        expr_refused({"$cond": bad}, "invalid_pipeline")


def test_round_normalised() -> None:
    assert expr({"$round": "$x"}) == Call("round", (Field(("x",)), Lit(0)))
    assert expr({"$round": ["$x"]}) == Call("round", (Field(("x",)), Lit(0)))
    assert expr({"$round": ["$x", 2]}) == Call("round", (Field(("x",)), Lit(2)))
    assert expr({"$round": ["$x", 2.0]}) == Call("round", (Field(("x",)), Lit(2)))
    assert expr({"$round": ["$x", -20]}).args[1] == Lit(-20)
    assert expr({"$round": ["$x", 100]}).args[1] == Lit(100)
    assert expr({"$round": ["$x", "$p"]}).args[1] == Field(("p",))
    assert expr({"$round": ["$x", None]}).args[1] == Lit(None)
    for bad in (101, -21, 1.5, "2", True, [1], {"p": 1}):
        expr_refused({"$round": ["$x", bad]}, "invalid_pipeline")
    expr_refused({"$round": ["$x", 1, 2]}, "invalid_pipeline", "")
    expr_refused({"$round": []}, "invalid_pipeline", "")


def test_trim_and_not_normalised() -> None:
    assert expr({"$trim": {"input": "$s"}}) == Call("trim", (Field(("s",)), Lit(None)))
    assert expr({"$trim": {"input": "$s", "chars": "xy"}}) == Call(
        "trim", (Field(("s",)), Lit("xy"))
    )
    for bad in (
        {},
        {"chars": "x"},
        {"input": "$s", "x": 1},
        {"input": "$s", "chars": 5},
        {"input": "$s", "chars": ["x"]},
        "$s",
    ):
        expr_refused({"$trim": bad}, "invalid_pipeline")
    assert expr({"$not": "$a"}) == Call("not", (Field(("a",)),))
    assert expr({"$not": ["$a"]}) == Call("not", (Field(("a",)),))


def test_constant_arguments_checked() -> None:
    expr_refused({"$split": ["$s", ""]}, "invalid_pipeline")
    expr_refused({"$split": ["$s", 5]}, "invalid_pipeline")
    expr_refused({"$split": ["$s", [","]]}, "invalid_pipeline")
    expr_refused({"$arrayElemAt": ["$a", {"k": 1}]}, "invalid_pipeline")
    assert expr({"$split": ["$s", None]}).args[1] == Lit(None)
    for bad in (-1, 1.5, "1", None):
        expr_refused({"$substrCP": ["$s", bad, 1]}, "invalid_pipeline")
        expr_refused({"$substrCP": ["$s", 0, bad]}, "invalid_pipeline")
    assert expr({"$substrCP": ["$s", 1.0, "$n"]}).args[1:] == (Lit(1), Field(("n",)))
    assert expr({"$arrayElemAt": ["$a", -1.0]}).args[1] == Lit(-1)
    expr_refused({"$arrayElemAt": ["$a", 0.5]}, "invalid_pipeline")
    expr_refused({"$arrayElemAt": ["$a", "0"]}, "invalid_pipeline")
    expr_refused({"$slice": ["$a", 1, 0]}, "invalid_pipeline")
    expr_refused({"$slice": ["$a", 1, -1]}, "invalid_pipeline")
    expr_refused({"$slice": ["$a", "x"]}, "invalid_pipeline")
    assert expr({"$slice": ["$a", 0]}).args[1] == Lit(0)
    assert expr({"$in": ["$a", [1, "$b"]]}).args[1] == Arr((Lit(1), Field(("b",))))
    assert expr({"$in": ["$a", {"$literal": [1]}]}).args[1] == Lit([1])
    assert expr({"$in": ["$a", "$b"]}).args[1] == Field(("b",))
    for bad in (5, None, "x", {"k": 1}):
        expr_refused({"$in": ["$a", bad]}, "invalid_pipeline", ".$in[1]")


def test_numbers_out_of_range() -> None:
    expr_refused(2**64, "number_out_of_range")
    expr_refused({"$literal": {"a": [2**70]}}, "number_out_of_range")
    expr_refused(float("nan"), "number_out_of_range")


def test_switch() -> None:
    got = expr({"$switch": {"branches": [{"case": "$a", "then": 1}, {"case": "$b", "then": 2}]}})
    assert got == Switch(((Field(("a",)), Lit(1)), (Field(("b",)), Lit(2))), None)
    got = expr({"$switch": {"branches": [{"case": "$a", "then": 1}], "default": 0}})
    assert got == Switch(((Field(("a",)), Lit(1)),), Lit(0))
    for bad in (
        {},
        {"branches": []},
        {"branches": {}},
        {"branches": [{"case": 1}]},
        {"branches": [{"case": 1, "then": 1, "x": 1}]},
        {"branches": [5]},
        {"branches": [{"case": 1, "then": 1}], "other": 1},
    ):
        expr_refused({"$switch": bad}, "invalid_pipeline")


def test_filter_and_map() -> None:
    got = expr({"$filter": {"input": "$xs", "cond": {"$gt": ["$$this", "$min"]}}})
    assert got == Iterate(
        "filter", Field(("xs",)), "this", Call("gt", (Var("this", ()), Field(("min",))))
    )
    got = expr({"$filter": {"input": "$xs", "as": "x", "cond": "$$x.ok", "limit": 2}})
    assert got == Iterate("filter", Field(("xs",)), "x", Var("x", ("ok",)), Lit(2))
    got = expr({"$filter": {"input": "$xs", "cond": True, "limit": "$n"}})
    assert got.limit == Field(("n",))
    assert expr({"$filter": {"input": "$xs", "cond": True, "limit": None}}).limit is None
    got = expr({"$map": {"input": "$xs", "in": {"$add": ["$$this.v", 1]}}})
    assert got == Iterate("map", Field(("xs",)), "this", Call("add", (Var("this", ("v",)), Lit(1))))
    # nested: the outer name stays visible inside the inner body
    got = expr(
        {
            "$map": {
                "input": "$xs",
                "as": "o",
                "in": {"$map": {"input": "$$o.ys", "as": "i", "in": ["$$o", "$$i"]}},
            }
        }
    )
    assert got.body == Iterate("map", Var("o", ("ys",)), "i", Arr((Var("o", ()), Var("i", ()))))


@pytest.mark.parametrize(
    "raw",
    [
        {"$filter": {"input": "$xs"}},
        {"$filter": {"cond": True}},
        {"$filter": {"input": "$xs", "cond": True, "in": 1}},
        {"$filter": {"input": "$xs", "cond": True, "limit": 0}},
        {"$filter": {"input": "$xs", "cond": True, "limit": 1.5}},
        {"$filter": {"input": "$xs", "cond": True, "as": "X"}},
        {"$filter": {"input": "$xs", "cond": True, "as": "ROOT"}},
        {"$filter": {"input": "$xs", "cond": True, "as": ""}},
        {"$filter": {"input": "$xs", "cond": True, "as": 5}},
        {"$map": {"input": "$xs"}},
        {"$map": {"input": "$xs", "in": 1, "limit": 1}},
        {"$map": ["$xs"]},
        # the variable is bound only inside the body
        {"$map": {"input": "$$this", "in": 1}},
        {"$filter": {"input": "$xs", "as": "x", "cond": "$$this"}},
        {"$filter": {"input": "$xs", "cond": True, "limit": "$$this"}},
    ],
)
def test_iterate_refused(raw: Any) -> None:
    expr_refused(raw, "invalid_pipeline")
