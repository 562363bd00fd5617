"""Update operators compiled to one scalar subquery: the new document's JSON text (SQLite)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from proxy.query.ast import MAX_ARRAY_INDEX, Path, Update, UpdateOp
from proxy.query.sqlite.filter import FilterCompiler
from proxy.query.sqlite.functions import FN_ARITH, FN_CANON, FN_CMP, FN_FAIL, canonical
from proxy.query.sqlite.values import (
    BARRIER,
    INDEX_CLAMP,
    Names,
    Params,
    index_path,
    is_index,
    json_text,
    key_path,
    navigate,
)

MAX_PADDING = MAX_ARRAY_INDEX  # an update pads an array with nulls up to this index only


def _fail(message: str) -> str:
    assert "'" not in message
    return f"{FN_FAIL}('update_type_mismatch', '{message}')"


# A leaf builder gets the name of the leaf level's CTE (its row is aliased ``l``, columns
# c, t, p, ch) and returns (extra CTEs, extra FROM items, the rebuilt container's JSON).
Leaf = Callable[[str], tuple[list[str], str, str]]


_THROUGH_SCALAR = _fail("a field path runs through a value that is not an object or array")


def _concat(a: str, b: str) -> str:
    """Two minified JSON array texts joined into one."""
    return (
        f"(CASE WHEN json_array_length({b}) = 0 THEN {a} WHEN json_array_length({a}) = 0 "
        f"THEN {b} ELSE substr({a}, 1, length({a}) - 1) || ',' || substr({b}, 2) END)"
    )


def _json_equal(a: str, b: str) -> str:
    """Equality of two json_each rows aliased ``a`` and ``b``."""
    return (
        f"(CASE WHEN {a}.type IN ('integer', 'real') "
        f"THEN {b}.type IN ('integer', 'real') AND {a}.value = {b}.value "
        f"WHEN {a}.type IN ('object', 'array') THEN CASE WHEN {a}.type = {b}.type "
        f"THEN {FN_CANON}({a}.value) = {FN_CANON}({b}.value) ELSE FALSE END "
        f"ELSE {a}.type = {b}.type AND {a}.value IS {b}.value END)"
    )


class UpdateCompiler:
    """Compiles update operators to one scalar subquery: the new document's JSON text.

    Operators apply in order, each reading the previous one's document CTE. Type errors
    call ``dbp_fail`` (see docs/embedded-store.md)."""

    def __init__(self, params: Params, names: Names | None = None) -> None:
        self.p = params
        self.names = names or Names()

    def document_expr(self, update: Update, base: str) -> str:
        d = self.names.fresh("d")
        ctes = [f"{d}0(d) AS (SELECT {base})"]
        for i, op in enumerate(update.ops, start=1):
            ctes.extend(self._op(op, f"{d}{i - 1}", f"{d}{i}"))
        return f"(WITH {', '.join(ctes)} SELECT d FROM {d}{len(update.ops)})"

    # -- walking a path ----------------------------------------------------------------

    def _levels(
        self, src: str, segs: Sequence[str], w: str, *, create: bool, arrays: bool
    ) -> list[str]:
        """Top-down CTEs ``{w}L{i}(c, t, p, ch)``: the container at depth i (padded with
        nulls when an index goes past its end), its type, the JSON path of segment i in
        it (NULL when it cannot hold that segment) and the current child (NULL: missing)."""
        ctes: list[str] = []
        for i, seg in enumerate(segs):
            prev = src if i == 0 else f"{w}L{i - 1}"
            col = "d" if i == 0 else "ch"
            container = f"x.{col}" if i == 0 or not create else "COALESCE(x.ch, '{}')"
            ctes.append(
                f"{w}K{i}(c, t) AS (SELECT {container}, json_type({container}) "
                f"FROM {prev} x {BARRIER})"
            )
            key = self.p.add(key_path((seg,)))
            if is_index(seg) and arrays:
                idx = self.p.add(index_path(seg))
                n = self.p.add(min(int(seg), INDEX_CLAMP))
                gap = f"{n} - json_array_length(k.c)"
                if create:
                    nulls = f"replace(hex(zeroblob({gap} + 1)), '00', ',null')"
                    padded = (
                        f"CASE WHEN json_array_length(k.c) = 0 THEN '[' || substr({nulls}, 2) "
                        f"|| ']' ELSE substr(k.c, 1, length(k.c) - 1) || {nulls} || ']' END"
                    )
                    too_far = (
                        f"{FN_FAIL}('array_index_too_large', "
                        f"'an update may extend an array up to index {MAX_ARRAY_INDEX}')"
                    )
                    container = (
                        f"CASE WHEN k.t = 'array' AND {gap} >= 0 THEN CASE WHEN {gap} > 0 "
                        f"AND {n} > {MAX_ARRAY_INDEX} THEN {too_far} ELSE {padded} END "
                        "ELSE k.c END"
                    )
                    in_array = idx
                else:
                    container = "k.c"
                    in_array = f"CASE WHEN {gap} < 0 THEN {idx} END"
                path = f"CASE k.t WHEN 'object' THEN {key} WHEN 'array' THEN {in_array} END"
                child = (
                    f"CASE k.t WHEN 'object' THEN k.c -> {key} WHEN 'array' THEN k.c -> {idx} END"
                )
            else:
                container = "k.c"
                path = f"CASE WHEN k.t = 'object' THEN {key} END"
                child = f"k.c -> {key}"
            ctes.append(
                f"{w}L{i}(c, t, p, ch) AS (SELECT {container}, k.t, {path}, {child} "
                f"FROM {w}K{i} k {BARRIER})"
            )
        return ctes

    def _edit(
        self,
        src: str,
        path: Path | Sequence[str],
        out: str,
        leaf: Leaf,
        *,
        create: bool = True,
        arrays: bool = True,
    ) -> list[str]:
        """CTEs rebuilding document ``src`` with the child at ``path`` replaced by the leaf's
        value; the last one is ``out(d)``.

        create: missing containers become objects and a container that cannot hold the
        next segment is a type error. Otherwise (``$unset``, ``$pull``) a missing path
        leaves the document as it is, and the leaf runs only where the child exists."""
        segs = path.segments if isinstance(path, Path) else tuple(path)
        w = self.names.fresh("w")
        ctes = self._levels(src, segs, w, create=create, arrays=arrays)
        last = len(segs) - 1
        extra_ctes, joins, value = leaf(f"{w}L{last}")
        ctes.extend(extra_ctes)
        for i in range(last, -1, -1):
            name = out if i == 0 else f"{w}B{i}"
            if i == last:
                source, new = f"{w}L{i} l{joins}", value
            else:
                source, new = f"{w}L{i} l, {w}B{i + 1} b", "json_set(l.c, l.p, json(b.d))"
            if create:
                bad = f"CASE WHEN l.c IS NOT NULL THEN {_THROUGH_SCALAR} END"
                body = f"CASE WHEN l.p IS NULL THEN {bad} ELSE {new} END"
            else:
                body = f"CASE WHEN l.p IS NULL OR l.ch IS NULL THEN l.c ELSE {new} END"
            ctes.append(f"{name}(d) AS (SELECT {body} FROM {source} {BARRIER})")
        return ctes

    # -- operators ---------------------------------------------------------------------

    def _op(self, op: UpdateOp, src: str, out: str) -> list[str]:
        if op.op == "unset":
            return self._edit(src, op.path, out, self._unset_leaf, create=False)
        if op.op == "pull":
            return self._edit(src, op.path, out, self._pull_leaf(op), create=False)
        if op.op == "rename":
            return self._rename(op, src, out)
        builders: dict[str, Callable[[UpdateOp], Callable[[str], str]]] = {
            "set": self._set_value,
            "inc": self._arith_value,
            "mul": self._arith_value,
            "min": self._minmax_value,
            "max": self._minmax_value,
            "push": self._push_value,
        }
        if op.op == "addToSet":
            return self._edit(src, op.path, out, self._add_to_set_leaf(op))
        if op.op not in builders:
            raise TypeError(f"unknown update op {op.op}")
        value_of = builders[op.op](op)

        def leaf(level: str) -> tuple[list[str], str, str]:
            return [], "", f"json_set(l.c, l.p, json({value_of('l.ch')}))"

        return self._edit(src, op.path, out, leaf)

    def _set_value(self, op: UpdateOp) -> Callable[[str], str]:
        v = self.p.add(json_text(op.value))
        return lambda ch: v

    def _arith_value(self, op: UpdateOp) -> Callable[[str], str]:
        n = self.p.add(json_text(op.value))
        missing = n  # $mul on a missing field stores 0 (0.0 for a float operand)
        if op.op == "mul":
            missing = self.p.add("0.0" if isinstance(op.value, float) else "0")
        fail = _fail(f"${op.op} needs a numeric field")
        return lambda ch: (
            f"(CASE WHEN {ch} IS NULL THEN {missing} WHEN json_type({ch}) IN ('integer', 'real') "
            f"THEN {FN_ARITH}('{op.op}', {ch}, {n}) ELSE {fail} END)"
        )

    def _minmax_value(self, op: UpdateOp) -> Callable[[str], str]:
        v = self.p.add(json_text(op.value))
        cmp = "<" if op.op == "min" else ">"
        return lambda ch: (
            f"(CASE WHEN {ch} IS NULL OR {FN_CMP}({v}, {ch}) {cmp} 0 THEN {v} ELSE {ch} END)"
        )

    def _push_value(self, op: UpdateOp) -> Callable[[str], str]:
        items = self.p.add(json_text(list(op.value)))
        fail = _fail("$push needs an array field")
        return lambda ch: (
            f"(CASE WHEN {ch} IS NULL THEN {items} WHEN json_type({ch}) = 'array' "
            f"THEN {_concat(ch, items)} ELSE {fail} END)"
        )

    def _add_to_set_leaf(self, op: UpdateOp) -> Leaf:
        unique: dict[str, Any] = {}
        for item in op.value:
            unique.setdefault(canonical(item), item)
        items = self.p.add(json_text(list(unique.values())))
        fail = _fail("$addToSet needs an array field")
        a, y, nw = self.names.fresh("a"), self.names.fresh("y"), self.names.fresh("new")

        def leaf(level: str) -> tuple[list[str], str, str]:
            fresh = (
                f"SELECT json_group_array(json({items} -> {a}.fullkey)) "
                f"FROM json_each({items}) {a} "
                f"WHERE NOT EXISTS (SELECT 1 FROM json_each(CASE WHEN json_type(l.ch) = 'array' "
                f"THEN l.ch END) {y} WHERE {_json_equal(y, a)})"
            )
            cte = f"{nw}(items) AS (SELECT ({fresh}) FROM {level} l {BARRIER})"
            value = (
                f"(CASE WHEN l.ch IS NULL THEN {items} WHEN json_type(l.ch) = 'array' "
                f"THEN {_concat('l.ch', f'{nw}.items')} ELSE {fail} END)"
            )
            return [cte], f", {nw}", f"json_set(l.c, l.p, json({value}))"

        return leaf

    @staticmethod
    def _unset_leaf(level: str) -> tuple[list[str], str, str]:
        # MongoDB removes a field from an object but nulls an array element
        value = (
            "CASE l.t WHEN 'object' THEN json_remove(l.c, l.p) ELSE json_set(l.c, l.p, NULL) END"
        )
        return [], "", value

    def _pull_leaf(self, op: UpdateOp) -> Leaf:
        a = self.names.fresh("a")
        elem = (f"{a}.type", f"{a}.value")
        fc = FilterCompiler(self.p, self.names)
        if isinstance(op.value, tuple):
            match = " AND ".join(f"COALESCE({fc.value_test(elem, p)}, FALSE)" for p in op.value)
        else:
            match = f"COALESCE({fc.test_eq(elem, op.value)}, FALSE)"

        def leaf(level: str) -> tuple[list[str], str, str]:
            kept = (
                f"(SELECT json_group_array(json(l.ch -> {a}.fullkey)) FROM json_each(l.ch) {a} "
                f"WHERE NOT ({match}))"
            )
            value = (
                f"CASE WHEN json_type(l.ch) = 'array' THEN json_set(l.c, l.p, json({kept})) "
                f"ELSE l.c END"
            )
            return [], "", value

        return leaf

    def _rename(self, op: UpdateOp, src: str, out: str) -> list[str]:
        """MongoDB's $rename: a missing source changes nothing; a source inside an array
        is an error; the target is created like $set but through objects only."""
        r = self.names.fresh("r")
        source = op.path.segments
        target: Path = op.value
        objpath = self.p.add(key_path(source))
        anywhere = navigate(source, "x.d", self.p, self.names)
        ctes = [
            f"{r}S(anywhere, obj) AS (SELECT {anywhere}, x.d -> {objpath} FROM {src} x)",
            f"{r}R(d) AS (SELECT CASE WHEN s.obj IS NOT NULL THEN json_remove(x.d, {objpath}) END "
            f"FROM {src} x, {r}S s)",
        ]

        def leaf(level: str) -> tuple[list[str], str, str]:
            return [], f", {r}S s", "json_set(l.c, l.p, json(s.obj))"

        ctes += self._edit(f"{r}R", target, f"{r}E", leaf, arrays=False)
        fail = _fail("$rename cannot move a field out of an array")
        ctes.append(
            f"{out}(d) AS (SELECT CASE WHEN s.anywhere IS NULL THEN x.d WHEN s.obj IS NULL "
            f"THEN {fail} ELSE e.d END FROM {src} x, {r}S s, {r}E e)"
        )
        return ctes
