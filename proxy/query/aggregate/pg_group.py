"""The input rows of a PostgreSQL ``$group`` / ``$bucket`` (docs/aggregation.md,
"Accumulators"): each accumulator argument computed once per row, its numeric value too.

Two fenced sub-selects (``OFFSET 0``, so the planner neither flattens them nor repeats an
expression per use):

- the inner one takes the group key ``g`` and each distinct argument ``a{i}`` out of the
  document once (every ``doc -> key`` copies the whole stored document first: reading the
  document once per argument, not once per use, is most of the saving);
- the outer one, when a numeric accumulator (``$sum $avg $min $max``) reads an argument,
  computes its number once per row, ``v{i} = CASE WHEN jsonb_typeof(a{i}) = 'number' THEN
  a{i}::numeric END`` (NULL: missing, null or not a number). ``$sum``/``$avg`` and the
  number bracket of ``$min``/``$max`` aggregate ``v{i}`` as it is; the other brackets test
  the type only of rows whose ``v{i}`` is NULL. One type test per argument and row, where
  each accumulator made its own (five for ``$sum`` and ``$max`` of one field).

A declared never-null number path (``View.numbers``) needs no test: ``v{i}`` is its cast,
taken out in the inner sub-select, and the outer one is left out when nothing else needs it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from proxy.query.aggregate.ast import Accumulator, Expr
from proxy.query.aggregate.pg_accum import counts
from proxy.query.aggregate.pg_values import is_type, num

NUMERIC = ("sum", "count", "avg", "min", "max")  # accumulators reading the number bracket


@dataclass(slots=True)
class Arg:
    """One distinct accumulator argument: its SQL over the document, whether an enforced
    schema declares it a never-null number, and what the accumulators read of it."""

    sql: str
    declared: bool
    value: bool = False  # the jsonb value (``a{i}``)
    number: bool = False  # the number (``v{i}``)


@dataclass(frozen=True, slots=True)
class Input:
    """``source``: the fenced sub-select the grouping reads (alias ``q``); per accumulator,
    the column of its jsonb argument and of its number (None: not read)."""

    source: str
    columns: tuple[tuple[str | None, str | None], ...]


def group_input(
    key: str,
    accs: Sequence[tuple[str, Accumulator]],
    expr: Callable[[Expr], str],
    declared: Callable[[Accumulator], bool],
    carried: Sequence[str],
    rel: str,
) -> Input:
    """The rows of ``rel`` (alias ``p``, its document ``p.doc``) as the grouping reads them:
    the ``carried`` ordering columns, the key ``g`` and the arguments' columns."""
    args: list[Arg] = []
    which: list[int | None] = []
    seen: list[Expr] = []  # an argument written twice is computed once
    for _, a in accs:
        if counts(a):
            which.append(None)
            continue
        if a.arg not in seen:
            seen.append(a.arg)
            args.append(Arg(expr(a.arg), declared(a)))
        i = seen.index(a.arg)
        which.append(i)
        arg = args[i]
        arg.number = arg.number or a.op in NUMERIC
        # a declared number's $min/$max is its number bracket alone
        brackets = a.op in ("min", "max") and not arg.declared
        arg.value = arg.value or a.op not in NUMERIC or brackets
    inner = [f"{key} AS g"]
    outer = ["q.g"]
    for i, arg in enumerate(args):
        typed = arg.number and not arg.declared
        if arg.value or typed:
            inner.append(f"{arg.sql} AS a{i}")
        if arg.value:
            outer.append(f"q.a{i}")
        if arg.number and arg.declared:
            inner.append(f"{num(arg.sql)} AS v{i}")
            outer.append(f"q.v{i}")
        if typed:
            col = f"q.a{i}"
            outer.append(f"CASE WHEN {is_type(col, 'number')} THEN {num(col)} END AS v{i}")
    lead = "".join(f"p.{c}, " for c in carried)
    source = f"SELECT {lead}{', '.join(inner)} FROM {rel} p OFFSET 0"
    if any(arg.number and not arg.declared for arg in args):
        lead = "".join(f"q.{c}, " for c in carried)
        source = f"SELECT {lead}{', '.join(outer)} FROM ({source}) q OFFSET 0"
    columns = tuple(
        (None, None)
        if i is None
        else (f"q.a{i}" if args[i].value else None, f"q.v{i}" if args[i].number else None)
        for i in which
    )
    return Input(source, columns)
