"""SQLite back end of the query language: AST → SQL text + bound parameters (JSON1, 3.40+)."""

from proxy.query import cursor as cursors
from proxy.query.common import order_by
from proxy.query.sqlite.filter import FilterCompiler
from proxy.query.sqlite.functions import (
    COLLATION,
    FN_ARITH,
    FN_CANON,
    FN_CMP,
    FN_FAIL,
    FN_REGEXP,
    arith,
    canonical,
    canonical_json,
    compare_json,
    compare_json_sql,
    compile_regex,
    loads,
    regex_search,
)
from proxy.query.sqlite.sort import (
    after_cursor,
    cursor_tag,
    decode_cursor,
    encode_cursor,
    sort_exprs,
)
from proxy.query.sqlite.update import MAX_PADDING, UpdateCompiler
from proxy.query.sqlite.values import (
    Names,
    Params,
    index_path,
    is_index,
    json_text,
    sql_number,
)

__all__ = [
    "COLLATION",
    "FN_ARITH",
    "FN_CANON",
    "FN_CMP",
    "FN_FAIL",
    "FN_REGEXP",
    "MAX_PADDING",
    "FilterCompiler",
    "Names",
    "Params",
    "UpdateCompiler",
    "after_cursor",
    "arith",
    "canonical",
    "canonical_json",
    "compare_json",
    "compare_json_sql",
    "compile_regex",
    "cursor_tag",
    "cursors",
    "decode_cursor",
    "encode_cursor",
    "index_path",
    "is_index",
    "json_text",
    "loads",
    "order_by",
    "regex_search",
    "sort_exprs",
    "sql_number",
]
