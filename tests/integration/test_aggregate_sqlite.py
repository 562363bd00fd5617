"""The SQLite aggregation compiler's stages against a real store file, results compared
exactly (docs/aggregation.md)."""

from __future__ import annotations

from proxy.query.aggregate.ast import View
from tests.integration.aggregate_sqlite_support import Store, fails, people, store, strip

__all__ = ["people", "store"]  # fixtures


# ---- $match, $skip, $limit, $count, $sort --------------------------------------------------


def test_match_in_base_scan_and_later(people: Store) -> None:
    sql, _ = people.sql([{"$match": {"city": "oslo"}}, {"$match": {"age": {"$gt": 30}}}])
    assert sql.count("MATERIALIZED") == 1  # both in the base scan's WHERE
    out = people.run([{"$match": {"city": "oslo"}}, {"$match": {"age": {"$gt": 30}}}])
    assert [d["_id"] for d in out] == ["p1", "p3"]
    out = people.run([{"$skip": 1}, {"$match": {"tags": "b"}}])
    assert [d["_id"] for d in out] == ["p3"]


def test_guard_and_missing_table(people: Store) -> None:
    from proxy.config import Limits
    from proxy.query.parse import parse_filter

    guard = parse_filter({"city": "rome"}, Limits())
    out = people.run([{"$project": {"name": 1}}], views={"items": View("items", guard)})
    assert out == [{"_id": "p2", "name": "bob"}, {"_id": "p4", "name": "di"}]
    assert people.run([{"$count": "n"}], "nothing") == []
    assert people.run([{"$facet": {"a": [{"$count": "n"}]}}], "nothing") == [{"a": []}]


def test_readable_fields(store: Store) -> None:
    store.put("items", [{"_id": "1", "a": {"x": 1, "y": 2}, "b": 3, "c": {"z": 1}}])
    view = View("items", None, frozenset({"a.x", "b"}))
    assert store.run([], views={"items": view}) == [
        {"_id": "1", "_version": 1, "a": {"x": 1}, "b": 3}
    ]


def test_skip_limit_count(people: Store) -> None:
    out = people.run([{"$skip": 1}, {"$limit": 2}])
    assert [d["_id"] for d in out] == ["p2", "p3"]
    assert people.run([{"$match": {"age": {"$gte": 31}}}, {"$count": "n"}]) == [{"n": 3}]
    assert people.run([{"$match": {"age": 99}}, {"$count": "n"}]) == []


def test_cap_plus_one(people: Store) -> None:
    assert len(people.run([], cap=2)) == 3


def test_sort_stable_cross_type(people: Store) -> None:
    out = people.run([{"$sort": {"age": -1}}])
    assert [d["_id"] for d in out] == ["p5", "p1", "p3", "p2", "p4"]
    out = people.run([{"$sort": {"city": 1, "name": -1}}])
    assert [d["_id"] for d in out] == ["p5", "p3", "p1", "p4", "p2"]
    out = people.run([{"$sort": {"score": 1}}])  # missing/null, numbers, strings
    assert [d["_id"] for d in out] == ["p3", "p5", "p1", "p2", "p4"]


def test_sort_arrays_min_max_and_empty(store: Store) -> None:
    store.put(
        "items",
        [
            {"_id": "1", "v": [3, 9]},
            {"_id": "2", "v": 5},
            {"_id": "3", "v": []},
            {"_id": "4", "v": None},
            {"_id": "5", "v": [1, "z"]},
        ],
    )
    assert [d["_id"] for d in store.run([{"$sort": {"v": 1}}])] == ["3", "4", "5", "1", "2"]
    assert [d["_id"] for d in store.run([{"$sort": {"v": -1}}])] == ["5", "1", "2", "4", "3"]


def test_sort_path_into_array_of_objects(store: Store) -> None:
    store.put("items", [{"_id": "1", "a": [{"b": 7}, {"b": 2}]}, {"_id": "2", "a": {"b": 4}}])
    assert [d["_id"] for d in store.run([{"$sort": {"a.b": 1}}])] == ["1", "2"]
    assert [d["_id"] for d in store.run([{"$sort": {"a.b": -1}}])] == ["1", "2"]


# ---- $group ----------------------------------------------------------------------------------


def test_group_all_accumulators(people: Store) -> None:
    out = people.run(
        [
            {
                "$group": {
                    "_id": "$city",
                    "n": {"$sum": 1},
                    "c": {"$count": {}},
                    "total": {"$sum": "$score"},
                    "avg": {"$avg": "$age"},
                    "lo": {"$min": "$score"},
                    "hi": {"$max": "$score"},
                    "first": {"$first": "$age"},
                    "last": {"$last": "$age"},
                    "names": {"$push": "$name"},
                    "ages": {"$push": "$age"},
                    "tags": {"$addToSet": "$tags"},
                }
            }
        ]
    )
    assert out == [
        {
            "_id": "oslo",
            "n": 2,
            "c": 2,
            "total": 2.5,
            "avg": 31.0,
            "lo": 2.5,
            "hi": 2.5,
            "first": 31,
            "last": 31,
            "names": ["ann", "cy"],
            "ages": [31, 31],
            "tags": [["a", "b"], ["b"]],
        },
        {
            "_id": "rome",
            "n": 2,
            "c": 2,
            "total": 4,
            "avg": 25.0,
            "lo": 4,
            "hi": "x",
            "first": 25,
            "last": None,
            "names": ["bob", "di"],
            "ages": [25],
            "tags": [[], "solo"],
        },
        {
            "_id": None,
            "n": 1,
            "c": 1,
            "total": 0,
            "avg": 40.0,
            "lo": None,
            "hi": None,
            "first": 40.0,
            "last": 40.0,
            "names": ["ed"],
            "ages": [40.0],
            "tags": [],
        },
    ]


def test_group_keys_canonical_and_object_keys(store: Store) -> None:
    store.put(
        "items",
        [
            {"_id": "1", "k": 1, "v": 1},
            {"_id": "2", "k": 1.0, "v": 1.0},
            {"_id": "3", "v": 2},
            {"_id": "4", "k": None, "v": 2},
            {"_id": "5", "k": {"b": 1, "a": 2}, "v": "s"},
            {"_id": "6", "k": {"a": 2, "b": 1}, "v": 1},
        ],
    )
    out = store.run([{"$group": {"_id": "$k", "n": {"$sum": 1}, "s": {"$addToSet": "$v"}}}])
    assert out == [
        {"_id": 1, "n": 2, "s": [1]},
        {"_id": None, "n": 2, "s": [2]},
        {"_id": {"b": 1, "a": 2}, "n": 2, "s": ["s", 1]},
    ]
    out = store.run([{"$group": {"_id": {"k": "$k"}, "n": {"$sum": 1}}}, {"$match": {"n": 2}}])
    assert out[0] == {"_id": {"k": 1}, "n": 2}
    assert {"_id": {"k": None}, "n": 2} in out


def test_group_over_nothing_and_constant_key(people: Store) -> None:
    assert people.run([{"$match": {"age": 1000}}, {"$group": {"_id": None}}]) == []
    out = people.run([{"$group": {"_id": None, "m": {"$max": "$age"}, "s": {"$sum": "$age"}}}])
    assert out == [{"_id": None, "m": 40.0, "s": 127.0}]


def test_sort_by_count(people: Store) -> None:
    out = people.run([{"$sortByCount": "$age"}])
    assert out == [
        {"_id": 31, "count": 2},
        {"_id": 25, "count": 1},
        {"_id": None, "count": 1},
        {"_id": 40.0, "count": 1},
    ]


# ---- reshaping ------------------------------------------------------------------------------


def test_project_inclusion_exclusion_computed(store: Store) -> None:
    store.put(
        "items", [{"_id": "1", "a": [{"b": 1, "c": 2}, 5, {"c": 3}], "d": {"e": 1, "f": 2}, "g": 7}]
    )
    assert store.run([{"$project": {"a.b": 1, "d.e": 1}}]) == [
        {"_id": "1", "a": [{"b": 1}, {}], "d": {"e": 1}}
    ]
    assert store.run([{"$project": {"_id": 0, "g": 1, "h": {"$add": ["$g", 1]}}}]) == [
        {"g": 7, "h": 8}
    ]
    assert store.run([{"$project": {"a": 0, "d.f": 0, "_version": 0}}]) == [
        {"_id": "1", "d": {"e": 1}, "g": 7}
    ]
    assert store.run([{"$project": {"_id": 0, "x": "$nothing", "y": "$g"}}]) == [{"y": 7}]


def test_add_fields_dotted_through_arrays(store: Store) -> None:
    store.put("items", [{"_id": "1", "a": [{"b": 1}, 2, [{"c": 1}]], "s": 5}])
    out = strip(store.run([{"$addFields": {"a.z": 9, "s.t": 1, "n.m": "$s", "gone": "$nope"}}]))
    assert out == [
        {
            "_id": "1",
            "a": [{"b": 1, "z": 9}, {"z": 9}, [{"c": 1, "z": 9}]],
            "s": {"t": 1},
            "n": {"m": 5},
        }
    ]
    out = strip(store.run([{"$set": {"s": "$nope", "k": "$s"}}]))
    assert out == [{"_id": "1", "a": [{"b": 1}, 2, [{"c": 1}]], "k": 5}]


def test_unset_paths(store: Store) -> None:
    store.put("items", [{"_id": "1", "a": [{"b": 1, "c": 2}, 3], "d": 1, "e": {"f": 1, "g": 2}}])
    out = strip(store.run([{"$unset": ["a.b", "d", "e.f"]}]))
    assert out == [{"_id": "1", "a": [{"c": 2}, 3], "e": {"g": 2}}]
    assert strip(store.run([{"$unset": "d"}, {"$project": {"d": 0, "a": 0, "e": 0}}])) == [
        {"_id": "1"}
    ]


def test_unwind_forms(store: Store) -> None:
    store.put(
        "items",
        [
            {"_id": "1", "v": [1, [2], {"x": 3}]},
            {"_id": "2", "v": 7},
            {"_id": "3", "v": []},
            {"_id": "4", "v": None},
            {"_id": "5"},
            {"_id": "6", "v": {"w": ["a", "b"]}},
        ],
    )
    out = strip(store.run([{"$unwind": "$v"}]))
    assert out == [
        {"_id": "1", "v": 1},
        {"_id": "1", "v": [2]},
        {"_id": "1", "v": {"x": 3}},
        {"_id": "2", "v": 7},
        {"_id": "6", "v": {"w": ["a", "b"]}},
    ]
    raw = [
        {"$unwind": {"path": "$v", "includeArrayIndex": "i", "preserveNullAndEmptyArrays": True}}
    ]
    out = strip(store.run(raw))
    assert [(d["_id"], d.get("v", "-"), d["i"]) for d in out] == [
        ("1", 1, 0),
        ("1", [2], 1),
        ("1", {"x": 3}, 2),
        ("2", 7, None),
        ("3", "-", None),
        ("4", None, None),
        ("5", "-", None),
        ("6", {"w": ["a", "b"]}, None),
    ]
    out = strip(store.run([{"$unwind": "$v.w"}, {"$project": {"v": 1, "_id": 0}}]))
    assert out == [{"v": {"w": "a"}}, {"v": {"w": "b"}}]


def test_unwind_then_sort_is_stable(store: Store) -> None:
    store.put("items", [{"_id": "1", "v": [2, 1, 2]}, {"_id": "2", "v": [1, 2]}])
    raw = [{"$unwind": {"path": "$v", "includeArrayIndex": "i"}}, {"$sort": {"v": 1}}]
    out = [(d["_id"], d["i"]) for d in store.run(raw)]
    assert out == [("1", 1), ("2", 0), ("1", 0), ("1", 2), ("2", 1)]


def test_replace_root(store: Store) -> None:
    store.put("items", [{"_id": "1", "in": {"a": 1}}, {"_id": "2", "in": {"a": 2}}])
    assert store.run([{"$replaceRoot": {"newRoot": "$in"}}]) == [{"a": 1}, {"a": 2}]
    assert store.run([{"$replaceWith": {"x": "$in.a", "id": "$_id"}}]) == [
        {"x": 1, "id": "1"},
        {"x": 2, "id": "2"},
    ]
    fails(store, [{"$replaceRoot": {"newRoot": "$_id"}}], "$replaceRoot")


# ---- $lookup, $facet, $bucket ------------------------------------------------------------------


def test_lookup_matching_rules(store: Store) -> None:
    store.put(
        "items",
        [
            {"_id": "1", "k": 1},
            {"_id": "2", "k": [2, "x"]},
            {"_id": "3", "k": []},
            {"_id": "4"},
            {"_id": "5", "k": {"z": 1}},
        ],
    )
    store.put(
        "other",
        [
            {"_id": "b", "f": 1.0},
            {"_id": "a", "f": [1, 2]},
            {"_id": "c", "f": "x"},
            {"_id": "d", "f": None},
            {"_id": "e"},
            {"_id": "f", "f": {"z": 1}},
        ],
    )
    raw = [
        {"$lookup": {"from": "other", "localField": "k", "foreignField": "f", "as": "j"}},
        {"$project": {"ids": "$j._id"}},
    ]
    assert store.run(raw) == [
        {"_id": "1", "ids": ["a", "b"]},
        {"_id": "2", "ids": ["a", "c"]},
        {"_id": "3", "ids": []},
        {"_id": "4", "ids": ["d", "e"]},
        {"_id": "5", "ids": ["f"]},
    ]


def test_lookup_view_and_missing_collection(store: Store) -> None:
    from proxy.config import Limits
    from proxy.query.parse import parse_filter

    store.put("items", [{"_id": "1", "k": 1}])
    store.put("other", [{"_id": "a", "f": 1, "secret": 1}, {"_id": "b", "f": 1, "hide": True}])
    views = {
        "other": View("other", parse_filter({"hide": {"$ne": True}}, Limits()), frozenset({"f"}))
    }
    raw = [{"$lookup": {"from": "other", "localField": "k", "foreignField": "f", "as": "x.y"}}]
    out = strip(store.run(raw, views=views))
    assert out == [{"_id": "1", "k": 1, "x": {"y": [{"_id": "a", "_version": 1, "f": 1}]}}]
    raw = [{"$lookup": {"from": "gone", "localField": "k", "foreignField": "f", "as": "x"}}]
    assert strip(store.run(raw)) == [{"_id": "1", "k": 1, "x": []}]


def test_facet(people: Store) -> None:
    raw = [
        {"$match": {"age": {"$exists": True}}},
        {
            "$facet": {
                "n": [{"$count": "n"}],
                "old": [{"$sort": {"age": -1}}, {"$limit": 2}, {"$project": {"_id": 1}}],
                "none": [{"$match": {"age": 0}}],
                "by": [{"$sortByCount": "$city"}],
            }
        },
    ]
    assert people.run(raw) == [
        {
            "n": [{"n": 4}],
            "old": [{"_id": "p5"}, {"_id": "p1"}],
            "none": [],
            "by": [
                {"_id": "oslo", "count": 2},
                {"_id": "rome", "count": 1},
                {"_id": None, "count": 1},
            ],
        }
    ]


def test_bucket(people: Store) -> None:
    raw = [{"$bucket": {"groupBy": "$age", "boundaries": [20, 30, 35], "default": "other"}}]
    assert people.run(raw) == [
        {"_id": 20, "count": 1},
        {"_id": 30, "count": 2},
        {"_id": "other", "count": 2},
    ]
    raw = [
        {
            "$bucket": {
                "groupBy": "$name",
                "boundaries": ["a", "c", "z"],
                "output": {"names": {"$push": "$name"}, "avg": {"$avg": "$age"}},
            }
        }
    ]
    assert people.run(raw) == [
        {"_id": "a", "names": ["ann", "bob"], "avg": 28.0},
        {"_id": "c", "names": ["cy", "di", "ed"], "avg": 35.5},
    ]
    fails(people, [{"$bucket": {"groupBy": "$age", "boundaries": [20, 35]}}], "$bucket")


def test_first_match_sees_only_readable_fields(store: Store) -> None:
    store.put("items", [{"_id": "1", "a": 1, "secret": 5}, {"_id": "2", "a": 2}])
    view = View("items", None, frozenset({"a"}))
    out = store.run([{"$match": {"secret": {"$exists": False}}}], views={"items": view})
    assert [d["_id"] for d in out] == ["1", "2"]
    out = store.run([{"$match": {"a": 2}}, {"$project": {"a": 1}}], views={"items": view})
    assert out == [{"_id": "2", "a": 2}]


def test_set_missing_removes_and_creates_nothing(store: Store) -> None:
    store.put("items", [{"_id": "1", "a": 5, "b": [1, {"c": 1}], "d": {"e": 1}}])
    raw = [{"$set": {"a.x": "$nope", "b.c": "$nope", "d.e": "$nope", "f.g": "$nope"}}]
    assert strip(store.run(raw)) == [{"_id": "1", "a": 5, "b": [1, {}], "d": {}}]


def test_sum_past_64_bits(store: Store) -> None:
    big = 2**62
    store.put("items", [{"_id": str(i), "v": big} for i in range(4)] + [{"_id": "9", "v": -1}])
    out = store.run([{"$group": {"_id": None, "s": {"$sum": "$v"}, "n": {"$sum": -1}}}])
    assert out == [{"_id": None, "s": float(4 * big - 1), "n": -5}]
    assert isinstance(out[0]["n"], int)


def test_lookup_inside_facet_and_after_group(store: Store) -> None:
    store.put("items", [{"_id": "1", "k": 1}, {"_id": "2", "k": 2}, {"_id": "3", "k": 1}])
    store.put("other", [{"_id": "a", "f": 1, "name": "one"}])
    lookup = {"from": "other", "localField": "_id", "foreignField": "f", "as": "o"}
    raw = [
        {"$group": {"_id": "$k", "n": {"$sum": 1}}},
        {"$facet": {"j": [{"$lookup": lookup}, {"$project": {"_id": 1, "names": "$o.name"}}]}},
    ]
    assert store.run(raw) == [{"j": [{"_id": 1, "names": ["one"]}, {"_id": 2, "names": []}]}]


# ---- every stage on every document: a failure is never skipped ---------------------------

_NONE = {"$gt": None}  # a filter nothing matches (SQLite compiles it to FALSE)


def test_failure_not_skipped_when_a_later_match_removes_all(store: Store) -> None:
    store.put("items", [{"_id": "0", "a": -2, "tags": []}])
    raw = [
        {"$group": {"_id": "$a"}},
        {"$match": {"a": None}},
        {"$group": {"_id": "$a", "a": {"$avg": {"$size": "$tags"}}}},
        {"$match": {"a": {"$gt": None}}},
    ]
    fails(store, raw, "$size")
    # the same without the failure: nothing out, no error
    raw[2] = {"$group": {"_id": "$a", "a": {"$avg": {"$size": {"$ifNull": ["$tags", []]}}}}}
    assert store.run(raw) == []


def test_failure_not_skipped_when_a_later_project_drops_the_field(store: Store) -> None:
    store.put("items", [{"_id": "1", "a": 1}, {"_id": "2", "a": [1, 2]}])
    fails(store, [{"$addFields": {"x": {"$size": "$a"}}}, {"$project": {"a": 1}}], "$size")
    raw = [
        {"$addFields": {"x": {"$divide": ["$a", 0]}}},
        {"$project": {"_id": 0, "a": 1}},
        {"$match": {"a": _NONE}},
    ]
    fails(store, raw, "$divide")
    raw = [{"$set": {"x": {"$toInt": "abc"}}}, {"$unset": "x"}, {"$count": "n"}]
    fails(store, raw, "$toInt")
    raw = [{"$replaceRoot": {"newRoot": "$a"}}, {"$match": {"a": _NONE}}]
    fails(store, raw, "$replaceRoot")
    raw = [{"$bucket": {"groupBy": "$a", "boundaries": [5, 6]}}, {"$match": {"a": _NONE}}]
    fails(store, raw, "$bucket")


def test_failure_not_skipped_in_a_facet_branch_that_yields_nothing(store: Store) -> None:
    store.put("items", [{"_id": "1", "a": 1}, {"_id": "2", "a": "x"}])
    branch = [{"$addFields": {"x": {"$size": "$a"}}}, {"$match": {"x": _NONE}}]
    fails(store, [{"$facet": {"f": branch, "n": [{"$count": "n"}]}}], "$size")
    fails(store, [{"$facet": {"f": branch}}, {"$match": {"f": _NONE}}], "$size")
    branch = [{"$project": {"x": {"$add": ["$a", 1]}}}, {"$limit": 1}, {"$match": {"x": 0}}]
    fails(store, [{"$facet": {"f": branch}}], "$add")
    # over no input a branch has nothing to evaluate: no failure
    raw = [{"$match": {"a": 99}}, {"$facet": {"f": branch}}]
    assert store.run(raw) == [{"f": []}]


def test_forced_only_where_an_expression_may_fail(store: Store) -> None:
    store.put("items", [{"_id": "1", "a": 1, "b": 4}, {"_id": "2", "a": 1, "b": 0}])
    plain = [
        {"$match": {"a": 1}},
        {"$group": {"_id": "$a", "s": {"$sum": "$b"}, "m": {"$avg": "$b"}, "x": {"$max": "$b"}}},
        {"$sort": {"s": -1}},
        {"$project": {"s": 1, "m": 1, "x": 1}},
    ]
    sql, _ = store.sql(plain)
    assert "CROSS JOIN" not in sql and "count(*)" not in sql
    assert store.run(plain) == [{"_id": 1, "s": 4, "m": 2.0, "x": 4}]
    # may fail, does not: the lazy branch is not taken, the result is exact
    safe = {"$cond": [{"$eq": ["$b", 0]}, None, {"$divide": [8, "$b"]}]}
    raw = [{"$addFields": {"q": safe}}, {"$project": {"q": 1}}]
    sql, _ = store.sql(raw)
    assert "CROSS JOIN" in sql
    assert store.run(raw) == [{"_id": "1", "q": 2.0}, {"_id": "2", "q": None}]
    assert store.run([*raw, {"$match": {"q": _NONE}}]) == []
