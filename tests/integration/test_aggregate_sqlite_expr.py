"""The SQLite aggregation compiler's expressions against a real store file: each operator's
values and run-time failures (docs/aggregation.md)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.aggregate_sqlite_support import Store, fails, store

__all__ = ["store"]  # the fixture


# ---- expressions -------------------------------------------------------------------------------

MISSING = "<missing>"
DOC = {
    "_id": "d",
    "i": 7,
    "n": -3,
    "f": 2.5,
    "z": 0,
    "s": "Héllo",
    "empty": "",
    "t": True,
    "nul": None,
    "arr": [1, 2, 3],
    "objs": [{"b": 1}, {"c": 2}, 5, [{"b": 3}]],
    "o": {"p": {"q": 1}},
}


@pytest.fixture
def one(store: Store) -> Store:
    store.put("items", [DOC])
    return store


def ev(store: Store, expr: Any) -> Any:
    out = store.run([{"$project": {"_id": 0, "r": expr}}])
    return out[0].get("r", MISSING)


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ({"$add": ["$i", "$n", 1]}, 5),
        ({"$add": ["$i", "$f"]}, 9.5),
        ({"$add": []}, 0),
        ({"$add": ["$i", "$nul"]}, None),
        ({"$add": ["$i", "$missing"]}, None),
        ({"$multiply": ["$i", "$n"]}, -21),
        ({"$multiply": []}, 1),
        ({"$subtract": ["$i", "$f"]}, 4.5),
        ({"$subtract": ["$i", None]}, None),
        ({"$divide": ["$i", 2]}, 3.5),
        ({"$divide": [6, 3]}, 2.0),
        ({"$mod": ["$i", 3]}, 1),
        ({"$mod": [-7, 3]}, -1),
        ({"$mod": [7.5, 2]}, 1.5),
        ({"$abs": "$n"}, 3),
        ({"$floor": "$f"}, 2.0),
        ({"$ceil": "$f"}, 3.0),
        ({"$floor": "$i"}, 7),
        ({"$round": ["$f", 0]}, 2.0),
        ({"$round": [3.5, 0]}, 4.0),
        ({"$round": [2.345, 2]}, 2.35),
        ({"$round": [1250, -2]}, 1200),
        ({"$round": ["$nul", 1]}, None),
        ({"$eq": ["$i", 7.0]}, True),
        ({"$ne": ["$i", 7]}, False),
        ({"$gt": ["$s", "$i"]}, True),
        ({"$lt": ["$missing", "$nul"]}, True),
        ({"$lte": ["$missing", "$missing"]}, True),
        ({"$gte": ["$t", "$arr"]}, True),
        ({"$gt": ["$arr", {"$literal": [1, 2]}]}, True),
        ({"$eq": ["$o", {"p": {"q": 1}}]}, True),
        ({"$cmp": ["$i", "$f"]}, 1),
        ({"$cmp": ["$f", "$f"]}, 0),
        ({"$cmp": ["$nul", "$f"]}, -1),
        ({"$and": ["$i", "$s", "$arr"]}, True),
        ({"$and": ["$i", "$z"]}, False),
        ({"$and": []}, True),
        ({"$or": ["$nul", "$missing", 0]}, False),
        ({"$or": ["$nul", ""]}, True),
        ({"$or": []}, False),
        ({"$not": ["$z"]}, True),
        ({"$not": [{"$literal": []}]}, False),
        ({"$cond": [{"$gt": ["$i", 5]}, "big", "small"]}, "big"),
        ({"$cond": {"if": "$nul", "then": 1, "else": "$missing"}}, MISSING),
        ({"$ifNull": ["$nul", "$missing", "$i"]}, 7),
        ({"$ifNull": ["$nul", "$missing"]}, MISSING),
        ({"$ifNull": ["$f", 1]}, 2.5),
        (
            {
                "$switch": {
                    "branches": [
                        {"case": {"$lt": ["$i", 0]}, "then": "neg"},
                        {"case": {"$gt": ["$i", 5]}, "then": "big"},
                    ],
                    "default": "other",
                }
            },
            "big",
        ),
        ({"$switch": {"branches": [{"case": "$z", "then": 1}], "default": "$nul"}}, None),
        ("$objs.b", [1, [3]]),
        ("$o.p.q", 1),
        ("$o.p.zz", MISSING),
        ("$i.x", MISSING),
        ("$arr.0", []),
        ({"$literal": "$i"}, "$i"),
        ({"k": "$i", "m": "$missing", "l": ["$missing", "$i"]}, {"k": 7, "l": [None, 7]}),
        ("$$ROOT.i", 7),
        ("$$CURRENT.o.p", {"q": 1}),
    ],
)
def test_expression(one: Store, expr: Any, expected: Any) -> None:
    got = ev(one, expr)
    assert (got == expected and type(got) is type(expected)) or (
        isinstance(expected, float) and got == pytest.approx(expected, rel=1e-9)
    ), (got, expected)


@pytest.mark.parametrize(
    ("expr", "word"),
    [
        ({"$add": ["$i", "$s"]}, "$add"),
        ({"$multiply": ["$arr", 1]}, "$multiply"),
        ({"$subtract": ["$t", 1]}, "$subtract"),
        ({"$divide": ["$i", "$z"]}, "$divide"),
        ({"$divide": ["$i", "$s"]}, "$divide"),
        ({"$mod": ["$i", 0]}, "$mod"),
        ({"$abs": "$s"}, "$abs"),
        ({"$floor": "$o"}, "$floor"),
        ({"$round": ["$f", "$f"]}, "$round"),
        ({"$round": ["$f", {"$add": [100, "$i"]}]}, "$round"),
        ({"$round": "$s"}, "$round"),
        ({"$switch": {"branches": [{"case": "$z", "then": 1}]}}, "$switch"),
        ({"$multiply": [1e300, 1e300]}, "$multiply"),
    ],
)
def test_expression_fails(one: Store, expr: Any, word: str) -> None:
    fails(one, [{"$project": {"r": expr}}], word)


def test_short_circuit_does_not_fail(one: Store) -> None:
    assert ev(one, {"$and": ["$z", {"$divide": [1, 0]}]}) is False
    assert ev(one, {"$or": ["$i", {"$divide": [1, 0]}]}) is True
    assert ev(one, {"$cond": [True, 1, {"$divide": [1, 0]}]}) == 1
    assert ev(one, {"$ifNull": ["$i", {"$divide": [1, 0]}]}) == 7


def test_deep_nesting_stays_small(one: Store) -> None:
    expr: Any = "$i"
    for _ in range(14):  # as deep as the front end's JSON nesting limit lets it be
        expr = {"$add": [expr, 1]}
    sql, _ = one.sql([{"$project": {"r": expr}}])
    assert len(sql) < 40_000
    assert ev(one, expr) == 21


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ({"$concat": ["$s", "-", "x"]}, "Héllo-x"),
        ({"$concat": []}, ""),
        ({"$concat": ["$s", "$nul"]}, None),
        ({"$toLower": "$s"}, "héllo"),
        ({"$toUpper": "$s"}, "HéLLO"),
        ({"$toUpper": "$missing"}, ""),
        ({"$substrCP": ["$s", 1, 3]}, "éll"),
        ({"$substrCP": ["$s", 3, 100]}, "lo"),
        ({"$substrCP": ["$nul", 0, 1]}, ""),
        ({"$strLenCP": "$s"}, 5),
        ({"$split": ["a,b,,c", ","]}, ["a", "b", "", "c"]),
        ({"$split": ["abc", "x"]}, ["abc"]),
        ({"$split": ["$nul", ","]}, None),
        ({"$trim": {"input": "  hi \u3000"}}, "hi"),
        ({"$trim": {"input": "xxhixy", "chars": "xy"}}, "hi"),
        ({"$trim": {"input": "$missing"}}, None),
        ({"$size": "$arr"}, 3),
        ({"$arrayElemAt": ["$arr", 0]}, 1),
        ({"$arrayElemAt": ["$arr", -1]}, 3),
        ({"$arrayElemAt": ["$arr", 5]}, MISSING),
        ({"$arrayElemAt": ["$arr", -4]}, MISSING),
        ({"$arrayElemAt": ["$nul", 0]}, None),
        ({"$in": [2, "$arr"]}, True),
        ({"$in": [2.0, "$arr"]}, True),
        ({"$in": ["2", "$arr"]}, False),
        ({"$in": ["$missing", [None]]}, False),
        ({"$in": [{"b": 1}, "$objs"]}, True),
        ({"$filter": {"input": "$arr", "cond": {"$gt": ["$$this", 1]}}}, [2, 3]),
        ({"$filter": {"input": "$arr", "as": "x", "cond": {"$ne": ["$$x", 2]}, "limit": 1}}, [1]),
        ({"$filter": {"input": "$nul", "cond": True}}, None),
        ({"$filter": {"input": [], "cond": True}}, []),
        ({"$map": {"input": "$arr", "in": {"$multiply": ["$$this", "$i"]}}}, [7, 14, 21]),
        ({"$map": {"input": "$objs", "as": "o", "in": "$$o.b"}}, [1, None, None, [3]]),
        (
            {
                "$map": {
                    "input": "$arr",
                    "as": "x",
                    "in": {"$map": {"input": "$arr", "in": {"$add": ["$$x", "$$this"]}}},
                }
            },
            [[2, 3, 4], [3, 4, 5], [4, 5, 6]],
        ),
        ({"$slice": ["$arr", 2]}, [1, 2]),
        ({"$slice": ["$arr", -2]}, [2, 3]),
        ({"$slice": ["$arr", 0]}, []),
        ({"$slice": ["$arr", 1, 5]}, [2, 3]),
        ({"$slice": ["$arr", -2, 1]}, [2]),
        ({"$slice": ["$arr", -9, 2]}, [1, 2]),
        ({"$slice": ["$nul", 1]}, None),
        ({"$concatArrays": ["$arr", [4], []]}, [1, 2, 3, 4]),
        ({"$concatArrays": []}, []),
        ({"$concatArrays": ["$arr", "$missing"]}, None),
        ({"$type": "$i"}, "int"),
        ({"$type": 2**40}, "long"),
        ({"$type": "$f"}, "double"),
        ({"$type": "$s"}, "string"),
        ({"$type": "$t"}, "bool"),
        ({"$type": "$nul"}, "null"),
        ({"$type": "$missing"}, "missing"),
        ({"$type": "$arr"}, "array"),
        ({"$type": "$o"}, "object"),
        ({"$toString": "$i"}, "7"),
        ({"$toString": 1.0}, "1"),
        ({"$toString": "$f"}, "2.5"),
        ({"$toString": "$t"}, "true"),
        ({"$toString": "$s"}, "Héllo"),
        ({"$toString": "$nul"}, None),
        ({"$toInt": "$f"}, 2),
        ({"$toInt": -2.9}, -2),
        ({"$toInt": "-42"}, -42),
        ({"$toInt": "$t"}, 1),
        ({"$toInt": "$missing"}, None),
        ({"$toDouble": "$i"}, 7.0),
        ({"$toDouble": "1.5e3"}, 1500.0),
        ({"$toDouble": False}, 0.0),
    ],
)
def test_string_array_type_operators(one: Store, expr: Any, expected: Any) -> None:
    got = ev(one, expr)
    same = got == expected and type(got) is type(expected)
    assert same or (isinstance(expected, float) and got == pytest.approx(expected)), got


@pytest.mark.parametrize(
    ("expr", "word"),
    [
        ({"$concat": ["$s", 1]}, "$concat"),
        ({"$toLower": 5}, "$toLower"),
        ({"$substrCP": ["$s", "$n", 2]}, "$substrCP"),
        ({"$substrCP": ["$arr", 0, 2]}, "$substrCP"),
        ({"$strLenCP": "$missing"}, "$strLenCP"),
        ({"$split": ["a", "$empty"]}, "$split"),
        ({"$split": ["$i", ","]}, "$split"),
        ({"$trim": {"input": "$i"}}, "$trim"),
        ({"$size": "$s"}, "$size"),
        ({"$size": "$missing"}, "$size"),
        ({"$arrayElemAt": ["$s", 0]}, "$arrayElemAt"),
        ({"$arrayElemAt": ["$arr", "$f"]}, "$arrayElemAt"),
        ({"$in": [1, "$s"]}, "$in"),
        ({"$filter": {"input": "$s", "cond": True}}, "$filter"),
        ({"$filter": {"input": "$arr", "cond": True, "limit": "$z"}}, "$filter"),
        ({"$map": {"input": 5, "in": 1}}, "$map"),
        ({"$slice": ["$arr", 1, "$z"]}, "$slice"),
        ({"$slice": ["$s", 1]}, "$slice"),
        ({"$concatArrays": ["$arr", 1]}, "$concatArrays"),
        ({"$toString": "$arr"}, "$toString"),
        ({"$toInt": "abc"}, "$toInt"),
        ({"$toInt": 2**31}, "$toInt"),
        ({"$toInt": "1.5"}, "$toInt"),
        ({"$toInt": "$arr"}, "$toInt"),
        ({"$toDouble": "abc"}, "$toDouble"),
        ({"$toDouble": "inf"}, "$toDouble"),
        ({"$toDouble": "$o"}, "$toDouble"),
    ],
)
def test_string_array_type_failures(one: Store, expr: Any, word: str) -> None:
    fails(one, [{"$project": {"r": expr}}], word)


def test_per_element_columns_are_per_document(store: Store) -> None:
    store.put("items", [{"_id": "1", "a": [1, 2]}, {"_id": "2", "a": [10]}, {"_id": "3"}])
    raw = [{"$project": {"_id": 0, "m": {"$map": {"input": "$a", "in": {"$add": ["$$this", 1]}}}}}]
    assert store.run(raw) == [{"m": [2, 3]}, {"m": [11]}, {"m": None}]


def test_nested_map_limit_is_a_clean_refusal(one: Store) -> None:
    from proxy.errors import UnsupportedByBackend

    expr: Any = "$$this"
    for _ in range(5):
        expr = {"$map": {"input": "$arr", "in": expr}}
    assert ev(one, {"$size": expr}) == 3
    with pytest.raises(UnsupportedByBackend):
        ev(one, {"$map": {"input": "$arr", "in": expr}})
