"""Front end of aggregation pipelines: the request body → validated Pipeline (stages, limits,
refusals), and the field paths a pipeline reads (for the policy check)."""

from __future__ import annotations

import itertools
import re
from typing import Any

from proxy import numbers
from proxy.config import Limits
from proxy.errors import ForbiddenOperator, InvalidCollection, InvalidQuery, LimitExceeded
from proxy.query.aggregate.ast import (
    ACCUMULATORS,
    Accumulator,
    AddFields,
    Bucket,
    Count,
    Expr,
    Facet,
    FieldPath,
    Group,
    Limit,
    Lit,
    Lookup,
    Match,
    Pipeline,
    Project,
    ReplaceRoot,
    Skip,
    Sort,
    SortKey,
    Stage,
    Unset,
    Unwind,
)
from proxy.query.aggregate.parse_expr import (
    FORBIDDEN,
    ExprParser,
    as_int,
    check_name,
    invalid,
    is_operator_object,
    parse_path,
    refuse_operator,
)
from proxy.query.aggregate.parse_paths import foreign_paths, source_paths
from proxy.query.parse import parse_filter
from proxy.query.spec import json_depth_ok

__all__ = ["COLLECTION_RE", "foreign_paths", "parse_body", "parse_pipeline", "source_paths"]

COLLECTION_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,62}")  # = proxy.backends.base's (tested)
MAX_SORT_KEYS = 32
MAX_COUNT = 2**63 - 1  # $skip / $limit
STAGES = frozenset(
    [
        "$match",
        "$addFields",
        "$set",
        "$unset",
        "$project",
        "$replaceRoot",
        "$replaceWith",
        "$group",
        "$sort",
        "$skip",
        "$limit",
        "$unwind",
        "$count",
        "$sortByCount",
        "$lookup",
        "$facet",
        "$bucket",
    ]
)
LOOKUP_KEYS = frozenset({"from", "localField", "foreignField", "as"})


def parse_body(body: Any, limits: Limits) -> tuple[Pipeline, bool]:
    """``{"pipeline": [...], "explain"?: bool}`` → (pipeline, explain)."""
    if not isinstance(body, dict):
        raise invalid("the body must be an object {pipeline, explain?}", "body")
    for key in body:
        if key not in ("pipeline", "explain"):
            raise invalid(f"unknown body field {str(key)[:60]!r}", "body")
    if "pipeline" not in body:
        raise invalid("the body needs a pipeline", "body")
    explain = body.get("explain", False)
    if not isinstance(explain, bool):
        raise invalid("explain must be a boolean", "explain")
    return parse_pipeline(body["pipeline"], limits), explain


def parse_pipeline(raw: Any, limits: Limits) -> Pipeline:
    if not isinstance(raw, list):
        raise invalid("pipeline must be an array of stages", "pipeline")
    if not json_depth_ok(raw, limits.max_json_depth):
        raise LimitExceeded(
            f"pipeline is nested deeper than {limits.max_json_depth} levels", code="too_deep"
        )
    total = _count_stages(raw)
    if total > limits.max_pipeline_stages:
        raise LimitExceeded(
            f"the pipeline has {total} stages ($facet sub-stages counted), more than "
            f"{limits.max_pipeline_stages}",
            code="pipeline_too_long",
            details={"stages": total, "limit": limits.max_pipeline_stages},
        )
    parser = _StageParser(limits)
    stages = parser.stages(raw, "pipeline", in_facet=False)
    return Pipeline(stages, tuple(sorted(set(parser.lookups))))


def _count_stages(raw: list[Any]) -> int:
    """Stages, with each well-shaped ``$facet``'s sub-stages (one level: deeper is refused)."""
    total = len(raw)
    for stage in raw:
        if isinstance(stage, dict) and len(stage) == 1 and isinstance(stage.get("$facet"), dict):
            total += sum(len(v) for v in stage["$facet"].values() if isinstance(v, list))
    return total


class _StageParser:
    __slots__ = ("expr", "limits", "lookups")

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.expr = ExprParser(limits)
        self.lookups: list[str] = []

    def stages(self, raw: list[Any], at: str, *, in_facet: bool) -> tuple[Stage, ...]:
        out: list[Stage] = []
        for i, stage in enumerate(raw):
            where = f"{at}[{i}]"
            if not isinstance(stage, dict) or len(stage) != 1:
                raise invalid("a stage must be an object with exactly one key", where)
            ((name, arg),) = stage.items()
            if name not in STAGES:
                refuse_operator(str(name), where, "stage")
            if name == "$facet" and in_facet:
                raise InvalidQuery(
                    f"$facet may not be used inside $facet (at {where})",
                    code="nested_facet",
                    details={"at": where},
                )
            out.extend(self.stage(name, arg, f"{where}.{name}"))
        return tuple(out)

    def stage(self, name: str, arg: Any, at: str) -> list[Stage]:
        if name == "$match":
            return [self.match(arg, at)]
        if name in ("$addFields", "$set"):
            return [self.add_fields(arg, at)]
        if name == "$unset":
            return [self.unset(arg, at)]
        if name == "$project":
            return [self.project(arg, at)]
        if name == "$replaceRoot":
            if not isinstance(arg, dict) or set(arg) != {"newRoot"}:
                raise invalid("$replaceRoot takes {newRoot: expression}", at)
            return [ReplaceRoot(self.expr.parse(arg["newRoot"], f"{at}.newRoot"))]
        if name == "$replaceWith":
            return [ReplaceRoot(self.expr.parse(arg, at))]
        if name == "$group":
            return [self.group(arg, at)]
        if name == "$sort":
            return [self.sort(arg, at)]
        if name == "$skip":
            return [Skip(_count(arg, 0, at))]
        if name == "$limit":
            return [Limit(_count(arg, 1, at))]
        if name == "$unwind":
            return [self.unwind(arg, at)]
        if name == "$count":
            return [Count(check_name(arg, at, "$count field name"))]
        if name == "$sortByCount":
            key = self.expr.parse(arg, at)
            self.expr.spend(at)
            count = Accumulator("sum", Lit(1))
            return [Group(key, (("count", count),)), Sort((SortKey(("count",), True),))]
        if name == "$lookup":
            return [self.lookup(arg, at)]
        if name == "$facet":
            return [self.facet(arg, at)]
        return [self.bucket(arg, at)]

    def match(self, arg: Any, at: str) -> Match:
        if not isinstance(arg, dict):
            raise invalid("$match takes a filter object", at)
        try:
            return Match(parse_filter(arg, self.limits))
        except ForbiddenOperator:
            raise
        except InvalidQuery as e:  # $out/$merge are unknown to the query language: forbidden here
            op = e.details.get("operator")
            if e.code == "unknown_operator" and op in FORBIDDEN:
                where = e.details.get("path")
                raise ForbiddenOperator(
                    f"{op} is not allowed (at {at}, filter {where})",
                    details={**e.details, "at": at},
                ) from None
            raise

    def paths_of(self, keys: list[Any], at: str) -> list[FieldPath]:
        paths = [parse_path(k, self.limits, at) for k in keys]
        _no_collisions(paths, at)
        return paths

    def add_fields(self, arg: Any, at: str) -> AddFields:
        if not isinstance(arg, dict) or not arg:
            raise invalid("$addFields / $set take a non-empty object {path: expression}", at)
        paths = self.paths_of(list(arg), at)
        values = [self.expr.parse(v, f"{at}.{k}") for k, v in arg.items()]
        return AddFields(tuple(zip(paths, values, strict=True)))

    def unset(self, arg: Any, at: str) -> Unset:
        names = [arg] if isinstance(arg, str) else arg
        if not isinstance(names, list) or not names:
            raise invalid("$unset takes a path or a non-empty array of paths", at)
        return Unset(tuple(self.paths_of(names, at)))

    def project(self, arg: Any, at: str) -> Project | Unset:
        if not isinstance(arg, dict) or not arg:
            raise invalid("$project takes a non-empty object", at)
        entries: list[tuple[FieldPath, str, Expr | None]] = []
        self._projection(arg, (), at, entries)
        _no_collisions([p for p, _, _ in entries], at)
        exclude_id = any(p == ("_id",) and kind == "exclude" for p, kind, _ in entries)
        rest = [(p, kind, e) for p, kind, e in entries if p != ("_id",) or kind == "compute"]
        excluded = [p for p, kind, _ in rest if kind == "exclude"]
        kept = [(p, e) for p, kind, e in rest if kind != "exclude"]
        if excluded and kept:
            raise invalid("$project may not mix inclusion and exclusion (except _id: 0)", at)
        if kept or (not excluded and not exclude_id):
            return Project(tuple(kept), exclude_id)
        return Unset(tuple(p for p, kind, _ in entries if kind == "exclude"))

    def _projection(
        self,
        spec: dict[str, Any],
        prefix: FieldPath,
        at: str,
        out: list[tuple[FieldPath, str, Expr | None]],
    ) -> None:
        for key, value in spec.items():
            path = prefix + parse_path(key, self.limits, at)
            if len(path) > self.limits.max_path_segments:
                raise invalid(
                    f"a projected path has more than {self.limits.max_path_segments} segments", at
                )
            where = f"{at}.{key}"
            if isinstance(value, int | float):  # bools too: true / false
                out.append((path, "include" if value else "exclude", None))
            elif isinstance(value, dict) and not is_operator_object(value, where):
                if not value:
                    raise invalid("an empty object is not a projection", where)
                self._projection(value, path, where, out)
            else:
                out.append((path, "compute", self.expr.parse(value, where)))

    def group(self, arg: Any, at: str) -> Group:
        if not isinstance(arg, dict) or "_id" not in arg:
            raise invalid("$group takes an object with _id", at)
        key = self.expr.parse(arg["_id"], f"{at}._id")
        accs = [(name, spec) for name, spec in arg.items() if name != "_id"]
        return Group(key, self.accumulators(accs, at))

    def accumulators(
        self, items: list[tuple[Any, Any]], at: str
    ) -> tuple[tuple[str, Accumulator], ...]:
        out = []
        for name, spec in items:
            where = f"{at}.{name}"
            check_name(name, where)
            if not isinstance(spec, dict) or len(spec) != 1:
                raise invalid("an accumulator is an object {$accumulator: expression}", where)
            ((op, value),) = spec.items()
            if not op.startswith("$"):
                raise invalid("an accumulator is an object {$accumulator: expression}", where)
            if op[1:] not in ACCUMULATORS:
                refuse_operator(op, where, "accumulator")
            if op == "$count":
                if value != {}:
                    raise invalid("$count takes {}", where)
                self.expr.spend(where)
                out.append((name, Accumulator("count", Lit(1))))
                continue
            if isinstance(value, list):
                raise invalid(f"{op} takes one expression, not an array", where)
            out.append((name, Accumulator(op[1:], self.expr.parse(value, f"{where}.{op}"))))
        return tuple(out)

    def sort(self, arg: Any, at: str) -> Sort:
        if not isinstance(arg, dict) or not arg:
            raise invalid("$sort takes a non-empty object {path: 1 | -1}", at)
        if len(arg) > MAX_SORT_KEYS:
            raise invalid(f"$sort takes at most {MAX_SORT_KEYS} keys", at)
        keys = []
        for name, direction in arg.items():
            path = parse_path(name, self.limits, at)
            d = as_int(direction)
            if d not in (1, -1):
                raise invalid("a $sort direction is 1 or -1", f"{at}.{name}")
            keys.append(SortKey(path, d == -1))
        return Sort(tuple(keys))

    def unwind(self, arg: Any, at: str) -> Unwind:
        spec = {"path": arg} if isinstance(arg, str) else arg
        if not isinstance(spec, dict) or "path" not in spec:
            raise invalid("$unwind takes '$path' or {path, includeArrayIndex?, ...}", at)
        for key in spec:
            if key not in ("path", "includeArrayIndex", "preserveNullAndEmptyArrays"):
                raise invalid(f"$unwind: unknown argument {str(key)[:60]!r}", at)
        raw_path = spec["path"]
        if not isinstance(raw_path, str) or not raw_path.startswith("$"):
            raise invalid("$unwind path must be a string starting with '$'", f"{at}.path")
        path = parse_path(raw_path[1:], self.limits, f"{at}.path")
        index = None
        if "includeArrayIndex" in spec:
            index = parse_path(spec["includeArrayIndex"], self.limits, f"{at}.includeArrayIndex")
        preserve = spec.get("preserveNullAndEmptyArrays", False)
        if not isinstance(preserve, bool):
            raise invalid("preserveNullAndEmptyArrays must be a boolean", at)
        return Unwind(path, index, preserve)

    def lookup(self, arg: Any, at: str) -> Lookup:
        if not isinstance(arg, dict):
            raise invalid("$lookup takes {from, localField, foreignField, as}", at)
        if "pipeline" in arg or "let" in arg:
            raise invalid("$lookup: only the localField/foreignField form is supported", at)
        if set(arg) != LOOKUP_KEYS:
            raise invalid("$lookup takes exactly {from, localField, foreignField, as}", at)
        source = arg["from"]
        if not isinstance(source, str) or not COLLECTION_RE.fullmatch(source):
            raise InvalidCollection(
                f"$lookup from {str(source)[:60]!r} is not a collection name (at {at}.from)",
                details={"at": f"{at}.from"},
            )
        self.lookups.append(source)
        if len(self.lookups) > self.limits.max_lookups:
            raise LimitExceeded(
                f"more than {self.limits.max_lookups} $lookup stages (at {at})",
                code="too_many_lookups",
                details={"at": at, "limit": self.limits.max_lookups},
            )
        local = parse_path(arg["localField"], self.limits, f"{at}.localField")
        foreign = parse_path(arg["foreignField"], self.limits, f"{at}.foreignField")
        as_ = parse_path(arg["as"], self.limits, f"{at}.as")
        return Lookup(source, local, foreign, as_)

    def facet(self, arg: Any, at: str) -> Facet:
        if not isinstance(arg, dict) or not arg:
            raise invalid("$facet takes a non-empty object {name: [stages]}", at)
        facets = []
        for name, sub in arg.items():
            where = f"{at}.{name}"
            check_name(name, where, "facet name")
            if not isinstance(sub, list):
                raise invalid("a $facet sub-pipeline must be an array of stages", where)
            facets.append((name, self.stages(sub, where, in_facet=True)))
        return Facet(tuple(facets))

    def bucket(self, arg: Any, at: str) -> Bucket:
        if not isinstance(arg, dict) or "groupBy" not in arg or "boundaries" not in arg:
            raise invalid("$bucket takes {groupBy, boundaries, default?, output?}", at)
        for key in arg:
            if key not in ("groupBy", "boundaries", "default", "output"):
                raise invalid(f"$bucket: unknown argument {str(key)[:60]!r}", at)
        group_by = self.expr.parse(arg["groupBy"], f"{at}.groupBy")
        bounds = _boundaries(arg["boundaries"], f"{at}.boundaries")
        has_default = "default" in arg
        default = arg.get("default")
        if has_default:
            _check_default(default, bounds, f"{at}.default")
        if "output" in arg:
            output = arg["output"]
            if not isinstance(output, dict):
                raise invalid("$bucket output must be an object of accumulators", f"{at}.output")
            accs = self.accumulators(list(output.items()), f"{at}.output")
        else:
            self.expr.spend(at)
            accs = (("count", Accumulator("sum", Lit(1))),)
        return Bucket(group_by, bounds, default, has_default, accs)


def _count(arg: Any, low: int, at: str) -> int:
    n = as_int(arg)
    if n is None or not low <= n <= MAX_COUNT:
        raise invalid(f"needs an integer >= {low}", at)
    return n


def _no_collisions(paths: list[FieldPath], at: str) -> None:
    seen = sorted(paths)
    for a, b in itertools.pairwise(seen):
        if b[: len(a)] == a:
            raise invalid(f"paths {'.'.join(a)[:60]!r} and {'.'.join(b)[:60]!r} collide", at)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _boundaries(raw: Any, at: str) -> tuple[Any, ...]:
    if not isinstance(raw, list) or len(raw) < 2:
        raise invalid("$bucket boundaries must be an array of at least two values", at)
    if not (all(_is_number(v) for v in raw) or all(isinstance(v, str) for v in raw)):
        raise invalid("$bucket boundaries must be all numbers or all strings", at)
    for v in raw:
        numbers.check_number(v)
    if any(not a < b for a, b in itertools.pairwise(raw)):
        raise invalid("$bucket boundaries must be strictly ascending", at)
    return tuple(raw)


def _check_default(default: Any, bounds: tuple[Any, ...], at: str) -> None:
    """A constant outside the boundaries' range (else its bucket would clash with one)."""
    if (isinstance(default, str) and default.startswith("$")) or (
        isinstance(default, dict) and any(str(k).startswith("$") for k in default)
    ):
        raise invalid("$bucket default must be a constant", at)
    numbers.check_value(default)
    same = _is_number(default) if _is_number(bounds[0]) else isinstance(default, str)
    if same and bounds[0] <= default < bounds[-1]:
        raise invalid("$bucket default must lie outside the boundaries' range", at)
