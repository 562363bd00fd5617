"""The aggregation reference's stages and accumulators: MongoDB's documented examples and each
bullet of docs/aggregation.md, with exact expected outputs."""

from __future__ import annotations

from typing import Any

import pytest

from tests.reference_aggregate import ExpressionFailed, aggregate, promised, results_equal

Json = Any
Docs = list[dict[str, Json]]


def run(docs: list[dict[str, Json]], pipeline: list[dict[str, Json]], **others: Json) -> Json:
    return aggregate({"c": docs, **others}, "c", pipeline)


def ids(n: int, **fields: list[Json]) -> list[dict[str, Json]]:
    return [{"_id": str(i), **{k: v[i] for k, v in fields.items()}} for i in range(n)]


SALES: Docs = [
    {"_id": "1", "item": "abc", "price": 10, "quantity": 2},
    {"_id": "2", "item": "jkl", "price": 20, "quantity": 1},
    {"_id": "3", "item": "xyz", "price": 5, "quantity": 10},
    {"_id": "4", "item": "xyz", "price": 5, "quantity": 20},
    {"_id": "5", "item": "abc", "price": 10, "quantity": 10},
]


# ---- order and the API ------------------------------------------------------------------


def test_documents_enter_in_id_byte_order_and_unknown_collection_is_empty() -> None:
    docs: Docs = [{"_id": "b"}, {"_id": "é"}, {"_id": "B"}, {"_id": "a"}]
    assert run(docs, []) == [{"_id": "B"}, {"_id": "a"}, {"_id": "b"}, {"_id": "é"}]
    assert aggregate({}, "nothing", [{"$count": "n"}]) == []


def test_results_equal_is_type_aware_with_tolerance() -> None:
    assert results_equal([{"a": 1, "b": [2.0]}], [{"b": [2], "a": 1.0000000001}])
    assert not results_equal([{"a": True}], [{"a": 1}])
    assert not results_equal([{"a": 1}, {"a": 2}], [{"a": 2}, {"a": 1}])
    assert not results_equal([{"a": 1}], [{"a": 1, "b": None}])
    assert results_equal([0.0], [1e-13])


# ---- $group and accumulators ----------------------------------------------------------------


def test_group_sales_totals_mongodb_example() -> None:
    out = run(
        SALES,
        [
            {
                "$group": {
                    "_id": "$item",
                    "totalSaleAmount": {"$sum": {"$multiply": ["$price", "$quantity"]}},
                    "averageQuantity": {"$avg": "$quantity"},
                    "count": {"$sum": 1},
                    "n": {"$count": {}},
                }
            },
            {"$sort": {"totalSaleAmount": -1}},
        ],
    )
    assert out == [
        {"_id": "xyz", "totalSaleAmount": 150, "averageQuantity": 15.0, "count": 2, "n": 2},
        {"_id": "abc", "totalSaleAmount": 120, "averageQuantity": 6.0, "count": 2, "n": 2},
        {"_id": "jkl", "totalSaleAmount": 20, "averageQuantity": 1.0, "count": 1, "n": 1},
    ]


def test_group_null_id_is_one_group_and_groups_come_in_first_document_order() -> None:
    out = run(SALES, [{"$group": {"_id": None, "total": {"$sum": "$quantity"}}}])
    assert out == [{"_id": None, "total": 43}]
    out = run(SALES, [{"$group": {"_id": "$item"}}])
    assert out == [{"_id": "abc"}, {"_id": "jkl"}, {"_id": "xyz"}]


def test_missing_and_null_are_one_group_key() -> None:
    docs: Docs = [
        {"_id": "1"},
        {"_id": "2", "a": None},
        {"_id": "3", "a": 1},
        {"_id": "4", "a": 1.0},
    ]
    out = run(docs, [{"$group": {"_id": "$a", "ids": {"$push": "$_id"}}}])
    assert out == [{"_id": None, "ids": ["1", "2"]}, {"_id": 1, "ids": ["3", "4"]}]


def test_compound_id_with_a_missing_part_equals_the_same_with_null() -> None:
    docs: Docs = [
        {"_id": "1", "b": 2},
        {"_id": "2", "a": None, "b": 2},
        {"_id": "3", "a": 1, "b": 2},
    ]
    out = run(docs, [{"$group": {"_id": {"a": "$a", "b": "$b"}, "n": {"$sum": 1}}}])
    assert out == [{"_id": {"a": None, "b": 2}, "n": 2}, {"_id": {"a": 1, "b": 2}, "n": 1}]
    out = run([{"_id": "1"}], [{"$group": {"_id": {"a": "$a"}}}])
    assert out == [{"_id": {"a": None}}]


def test_sum_and_avg_ignore_non_numbers() -> None:
    docs = ids(6, v=[1, "2", None, [3], True, 2.5])
    out = run(
        [*docs, {"_id": "9"}],
        [{"$group": {"_id": None, "s": {"$sum": "$v"}, "a": {"$avg": "$v"}}}],
    )
    assert out == [{"_id": None, "s": 3.5, "a": 1.75}]


def test_avg_of_nothing_is_null_and_sum_of_nothing_is_zero() -> None:
    docs = ids(3, v=["x", None, {"a": 1}])
    out = run(docs, [{"$group": {"_id": None, "s": {"$sum": "$v"}, "a": {"$avg": "$v"}}}])
    assert out == [{"_id": None, "s": 0, "a": None}]


def test_min_max_across_types_in_sort_order_ignoring_null_and_missing() -> None:
    docs: Docs = [*ids(5, v=[None, 3, "a", [1], True]), {"_id": "9"}]
    out = run(docs, [{"$group": {"_id": None, "lo": {"$min": "$v"}, "hi": {"$max": "$v"}}}])
    assert out == [{"_id": None, "lo": 3, "hi": True}]
    out = run(ids(2, v=["b", 10]), [{"$group": {"_id": 0, "lo": {"$min": "$v"}}}])
    assert out == [{"_id": 0, "lo": 10}]
    docs = [{"_id": "1"}, {"_id": "2", "v": None}]
    out = run(docs, [{"$group": {"_id": 0, "lo": {"$min": "$v"}, "hi": {"$max": "$v"}}}])
    assert out == [{"_id": 0, "lo": None, "hi": None}]


def test_first_last_push_follow_the_preceding_sort() -> None:
    out = run(
        SALES,
        [
            {"$sort": {"quantity": -1}},
            {
                "$group": {
                    "_id": "$item",
                    "first": {"$first": "$quantity"},
                    "last": {"$last": "$quantity"},
                    "all": {"$push": "$quantity"},
                }
            },
        ],
    )
    assert out == [
        {"_id": "xyz", "first": 20, "last": 10, "all": [20, 10]},
        {"_id": "abc", "first": 10, "last": 2, "all": [10, 2]},
        {"_id": "jkl", "first": 1, "last": 1, "all": [1]},
    ]


def test_first_of_missing_is_null_push_and_add_to_set_leave_missing_out() -> None:
    docs: Docs = [
        {"_id": "1"},
        {"_id": "2", "v": None},
        {"_id": "3", "v": 1},
        {"_id": "4", "v": 1.0},
    ]
    spec = {
        "_id": 0,
        "f": {"$first": "$v"},
        "l": {"$last": "$v"},
        "p": {"$push": "$v"},
        "s": {"$addToSet": "$v"},
    }
    out = run([*docs, {"_id": "5", "v": [1]}], [{"$group": spec}])
    assert out == [{"_id": 0, "f": None, "l": [1], "p": [None, 1, 1.0, [1]], "s": [None, 1, [1]]}]
    assert run([*docs, {"_id": "5"}], [{"$group": spec}])[0]["l"] is None


def test_group_and_count_over_no_input_give_no_document() -> None:
    assert run([], [{"$group": {"_id": None, "n": {"$sum": 1}}}]) == []
    assert run(SALES, [{"$match": {"item": "none"}}, {"$count": "n"}]) == []
    assert run(SALES, [{"$count": "n"}]) == [{"n": 5}]


# ---- $sort, $skip, $limit ---------------------------------------------------------------


def test_sort_is_stable_and_multi_key() -> None:
    out = run(SALES, [{"$sort": {"price": 1, "quantity": -1}}, {"$project": {"_id": 1}}])
    assert out == [{"_id": "4"}, {"_id": "3"}, {"_id": "5"}, {"_id": "1"}, {"_id": "2"}]
    out = run(SALES, [{"$sort": {"item": 1}}, {"$project": {"_id": 1}}])
    assert out == [{"_id": "1"}, {"_id": "5"}, {"_id": "2"}, {"_id": "3"}, {"_id": "4"}]


def test_sort_arrays_by_smallest_ascending_largest_descending_empty_below_null() -> None:
    docs = ids(5, v=[[1, 5], [3], [], None, [2, 4]])
    docs.append({"_id": "5"})
    asc = run(docs, [{"$sort": {"v": 1}}, {"$project": {"_id": 1}}])
    assert [d["_id"] for d in asc] == ["2", "3", "5", "0", "4", "1"]
    desc = run(docs, [{"$sort": {"v": -1}}, {"$project": {"_id": 1}}])
    assert [d["_id"] for d in desc] == ["0", "4", "1", "3", "5", "2"]


def test_sort_across_types_and_into_arrays_of_objects() -> None:
    docs = ids(5, v=[True, "a", 2, None, [{"x": 1}]])
    out = run(docs, [{"$sort": {"v": 1}}, {"$project": {"_id": 1}}])
    assert [d["_id"] for d in out] == ["3", "2", "1", "4", "0"]
    docs = ids(3, v=[[{"x": 3}, {"x": 1}], [{"x": 2}], [{"y": 1}]])
    out = run(docs, [{"$sort": {"v.x": 1}}, {"$project": {"_id": 1}}])
    assert [d["_id"] for d in out] == ["2", "0", "1"]
    out = run(docs, [{"$sort": {"v.x": -1}}, {"$project": {"_id": 1}}])
    assert [d["_id"] for d in out] == ["0", "1", "2"]


def test_skip_and_limit() -> None:
    out = run(SALES, [{"$skip": 1}, {"$limit": 2}, {"$project": {"_id": 1}}])
    assert out == [{"_id": "2"}, {"_id": "3"}]
    assert run(SALES, [{"$skip": 9}]) == []


# ---- $unwind ----------------------------------------------------------------------------

CLOTHING: Docs = [
    {"_id": "1", "item": "Shirt", "sizes": ["S", "M", "L"]},
    {"_id": "2", "item": "Shorts", "sizes": []},
    {"_id": "3", "item": "Hat", "sizes": "M"},
    {"_id": "4", "item": "Gloves"},
    {"_id": "5", "item": "Scarf", "sizes": None},
]


def test_unwind_mongodb_example() -> None:
    out = run(CLOTHING, [{"$unwind": "$sizes"}])
    assert out == [
        {"_id": "1", "item": "Shirt", "sizes": "S"},
        {"_id": "1", "item": "Shirt", "sizes": "M"},
        {"_id": "1", "item": "Shirt", "sizes": "L"},
        {"_id": "3", "item": "Hat", "sizes": "M"},
    ]


def test_unwind_preserve_null_and_empty_arrays_and_include_array_index() -> None:
    spec = {"path": "$sizes", "includeArrayIndex": "i", "preserveNullAndEmptyArrays": True}
    out = run(CLOTHING, [{"$unwind": spec}])
    assert out == [
        {"_id": "1", "item": "Shirt", "sizes": "S", "i": 0},
        {"_id": "1", "item": "Shirt", "sizes": "M", "i": 1},
        {"_id": "1", "item": "Shirt", "sizes": "L", "i": 2},
        {"_id": "2", "item": "Shorts", "i": None},
        {"_id": "3", "item": "Hat", "sizes": "M", "i": None},
        {"_id": "4", "item": "Gloves", "i": None},
        {"_id": "5", "item": "Scarf", "sizes": None, "i": None},
    ]
    out = run(CLOTHING, [{"$unwind": {"path": "$sizes", "includeArrayIndex": "i"}}])
    assert [d["i"] for d in out] == [0, 1, 2, None]


def test_unwind_follows_objects_only() -> None:
    docs: Docs = [{"_id": "1", "a": {"b": [1, 2]}}, {"_id": "2", "a": [{"b": [3]}]}]
    assert run(docs, [{"$unwind": "$a.b"}]) == [
        {"_id": "1", "a": {"b": 1}},
        {"_id": "1", "a": {"b": 2}},
    ]


# ---- $lookup ----------------------------------------------------------------------------

ORDERS: Docs = [
    {"_id": "1", "item": "almonds", "price": 12, "quantity": 2},
    {"_id": "2", "item": "pecans", "price": 20, "quantity": 1},
    {"_id": "3"},
]
INVENTORY: Docs = [
    {"_id": "1", "sku": "almonds", "description": "product 1", "instock": 120},
    {"_id": "2", "sku": "bread", "description": "product 2", "instock": 80},
    {"_id": "3", "sku": "cashews", "description": "product 3", "instock": 60},
    {"_id": "4", "sku": "pecans", "description": "product 4", "instock": 70},
    {"_id": "5", "description": "Incomplete"},
    {"_id": "6"},
]
LOOKUP = {"from": "inventory", "localField": "item", "foreignField": "sku", "as": "docs"}


def test_lookup_orders_inventory_mongodb_example_missing_matches_null_and_missing() -> None:
    out = run(ORDERS, [{"$lookup": LOOKUP}], inventory=INVENTORY)
    assert out == [
        {**ORDERS[0], "docs": [INVENTORY[0]]},
        {**ORDERS[1], "docs": [INVENTORY[3]]},
        {"_id": "3", "docs": [INVENTORY[4], INVENTORY[5]]},
    ]


def test_lookup_array_local_field_matches_any_element_and_foreign_arrays() -> None:
    classes: Docs = [
        {"_id": "1", "title": "Reading", "enrollmentlist": ["giraffe2", "pandabear"]},
        {"_id": "2", "title": "Empty", "enrollmentlist": []},
    ]
    members: Docs = [
        {"_id": "1", "name": "artie", "tags": ["x"]},
        {"_id": "2", "name": "giraffe2", "tags": ["y", "x"]},
        {"_id": "3", "name": "pandabear"},
    ]
    spec = {"from": "members", "localField": "enrollmentlist", "foreignField": "name", "as": "m"}
    out = run(classes, [{"$lookup": spec}], members=members)
    assert out == [{**classes[0], "m": [members[1], members[2]]}, {**classes[1], "m": []}]
    spec = {"from": "members", "localField": "t", "foreignField": "tags", "as": "m"}
    out = run([{"_id": "1", "t": "x"}], [{"$lookup": spec}], members=members)
    assert [m["_id"] for m in out[0]["m"]] == ["1", "2"]


def test_lookup_foreign_documents_come_in_id_order_and_absent_collection_is_empty() -> None:
    inv: Docs = [{"_id": "b", "sku": 1}, {"_id": "a", "sku": 1.0}]
    spec = {"from": "inv", "localField": "k", "foreignField": "sku", "as": "x.y"}
    out = run([{"_id": "1", "k": 1}], [{"$lookup": spec}], inv=inv)
    assert out == [{"_id": "1", "k": 1, "x": {"y": [inv[1], inv[0]]}}]
    out = run([{"_id": "1", "k": 1}], [{"$lookup": {**spec, "from": "none"}}])
    assert out == [{"_id": "1", "k": 1, "x": {"y": []}}]


# ---- $facet, $bucket, $sortByCount, $count ----------------------------------------------


def test_facet_runs_each_sub_pipeline_over_the_same_input() -> None:
    out = run(
        SALES,
        [
            {
                "$facet": {
                    "byItem": [{"$sortByCount": "$item"}],
                    "cheap": [{"$match": {"price": {"$lt": 10}}}, {"$count": "n"}],
                    "none": [{"$match": {"price": 0}}],
                }
            }
        ],
    )
    assert out == [
        {
            "byItem": [
                {"_id": "abc", "count": 2},
                {"_id": "xyz", "count": 2},
                {"_id": "jkl", "count": 1},
            ],
            "cheap": [{"n": 2}],
            "none": [],
        }
    ]
    assert run([], [{"$facet": {"a": [{"$count": "n"}], "b": []}}]) == [{"a": [], "b": []}]


def test_sort_by_count_mongodb_example_ties_keep_group_order() -> None:
    docs = ids(5, tags=[["a", "b"], ["b"], ["c"], ["b", "c"], ["d"]])
    out = run(docs, [{"$unwind": "$tags"}, {"$sortByCount": "$tags"}])
    assert out == [
        {"_id": "b", "count": 3},
        {"_id": "c", "count": 2},
        {"_id": "a", "count": 1},
        {"_id": "d", "count": 1},
    ]


ARTWORK: Docs = [
    {"_id": "1", "title": "The Pillars of Society", "year": 1926, "price": 199.99},
    {"_id": "2", "title": "Melancholy III", "year": 1902, "price": 280.00},
    {"_id": "3", "title": "Dancer", "year": 1925, "price": 76.04},
    {"_id": "4", "title": "The Great Wave off Kanagawa", "price": 167.30},
    {"_id": "5", "title": "The Persistence of Memory", "year": 1931, "price": 483.00},
    {"_id": "6", "title": "Composition VII", "year": 1913, "price": 385.00},
    {"_id": "7", "title": "The Scream", "year": 1893},
    {"_id": "8", "title": "Blue Flower", "year": 1918, "price": 118.42},
]


def test_bucket_mongodb_example() -> None:
    spec = {
        "groupBy": "$price",
        "boundaries": [0, 200, 400],
        "default": "Other",
        "output": {"count": {"$sum": 1}, "titles": {"$push": "$title"}},
    }
    out = run(ARTWORK, [{"$bucket": spec}])
    assert out == [
        {
            "_id": 0,
            "count": 4,
            "titles": [
                "The Pillars of Society",
                "Dancer",
                "The Great Wave off Kanagawa",
                "Blue Flower",
            ],
        },
        {"_id": 200, "count": 2, "titles": ["Melancholy III", "Composition VII"]},
        {"_id": "Other", "count": 2, "titles": ["The Persistence of Memory", "The Scream"]},
    ]


def test_bucket_default_output_empty_buckets_and_no_default_fails() -> None:
    docs = ids(4, v=[1, 5, "a", 2])
    out = run(docs, [{"$bucket": {"groupBy": "$v", "boundaries": [0, 2, 3, 4], "default": -1}}])
    assert out == [{"_id": 0, "count": 1}, {"_id": 2, "count": 1}, {"_id": -1, "count": 2}]
    with pytest.raises(ExpressionFailed):
        run(docs, [{"$bucket": {"groupBy": "$v", "boundaries": [0, 6]}}])
    out = run(ids(2, v=["b", "ab"]), [{"$bucket": {"groupBy": "$v", "boundaries": ["a", "c"]}}])
    assert out == [{"_id": "a", "count": 2}]


# ---- document-shaping stages ------------------------------------------------------------


def test_add_fields_sees_the_input_document_and_sets_dotted_paths_over_arrays() -> None:
    doc = {"_id": "1", "a": 1, "s": {"x": 1}, "arr": [{"x": 1}, 5, [{"x": 2}, 6]]}
    out = run([doc], [{"$addFields": {"a": 2, "b": "$a", "s.y": 3, "arr.z": 0}}])
    assert out == [
        {
            "_id": "1",
            "a": 2,
            "b": 1,
            "s": {"x": 1, "y": 3},
            "arr": [{"x": 1, "z": 0}, {"z": 0}, [{"x": 2, "z": 0}, {"z": 0}]],
        }
    ]
    out = run([{"_id": "1", "a": 5, "b": 1}], [{"$set": {"a.x": 1, "b": "$nope"}}])
    assert out == [{"_id": "1", "a": {"x": 1}}]


def test_unset_and_exclusion_project() -> None:
    doc = {"_id": "1", "a": 1, "b": {"c": 1, "d": 2}, "arr": [{"c": 1, "e": 1}, 3]}
    out = run([doc], [{"$unset": ["a", "b.c", "arr.c"]}])
    assert out == [{"_id": "1", "b": {"d": 2}, "arr": [{"e": 1}, 3]}]
    assert run([doc], [{"$unset": "a"}, {"$project": {"b": 0, "arr": 0}}]) == [{"_id": "1"}]
    assert run([doc], [{"$project": {"_id": 0, "a": 0, "arr": False}}]) == [{"b": doc["b"]}]


def test_inclusion_project_keeps_id_sub_fields_of_array_elements_and_computes() -> None:
    doc = {
        "_id": "1",
        "a": 1,
        "b": {"c": 1, "d": 2},
        "arr": [{"c": 1, "e": 1}, 3, {"e": 2}],
        "s": 4,
    }
    out = run([doc], [{"$project": {"a": 1, "b.c": True, "arr.c": 1, "s.x": 1, "n": "$b.d"}}])
    assert out == [{"_id": "1", "a": 1, "b": {"c": 1}, "arr": [{"c": 1}, {}], "n": 2}]
    out = run([doc], [{"$project": {"_id": 0, "a": 1, "z": {"$literal": 1}, "m": "$missing"}}])
    assert out == [{"a": 1, "z": 1}]


def test_replace_root_and_replace_with_and_a_non_object_fails() -> None:
    docs: Docs = [{"_id": "1", "name": {"first": "John", "last": "Backus"}}]
    assert run(docs, [{"$replaceRoot": {"newRoot": "$name"}}]) == [docs[0]["name"]]
    out = run(docs, [{"$replaceWith": {"n": "$name.last", "x": "$nope"}}])
    assert out == [{"n": "Backus"}]
    with pytest.raises(ExpressionFailed, match="replaceRoot"):
        run([*docs, {"_id": "2"}], [{"$replaceRoot": {"newRoot": "$name"}}])


def test_match_later_in_the_pipeline_uses_the_query_language() -> None:
    out = run(
        SALES,
        [
            {"$group": {"_id": "$item", "q": {"$push": "$quantity"}}},
            {"$match": {"q": {"$gt": 9}}},
        ],
    )
    assert out == [{"_id": "abc", "q": [2, 10]}, {"_id": "xyz", "q": [10, 20]}]


def test_promised_flags_object_order_and_non_integral_to_string() -> None:
    docs = ids(2, v=[{"a": 1}, {"b": 1}])
    assert not promised({"c": docs}, "c", [{"$sort": {"v": 1}}])
    assert promised({"c": docs}, "c", [{"$sort": {"_id": 1}}])
    assert not promised({"c": ids(1, v=[0.5])}, "c", [{"$set": {"s": {"$toString": "$v"}}}])
    assert promised({"c": ids(1, v=[2.0])}, "c", [{"$set": {"s": {"$toString": "$v"}}}])
    assert promised({"c": ids(1, v=["x"])}, "c", [{"$set": {"s": {"$add": ["$v"]}}}])
    assert not promised({"c": ids(1, v=["x"])}, "c", [{"$set": {"s": {"$add": ["$v", None]}}}])


def test_exclusion_of_id_alone() -> None:
    doc = {"_id": "1", "a": 1, "b": 2}
    assert run([doc], [{"$project": {"_id": 0}}]) == [{"a": 1, "b": 2}]
