"""The one "collect every problem, then raise" helper and the one safe YAML reader (size cap,
duplicate keys refused, no secrets echoed); config, policies and the collector share them."""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import Any, Final

import yaml

__all__ = [
    "MAX_YAML_BYTES",
    "PLAIN_KEY_RE",
    "Problems",
    "check_keys",
    "hint",
    "integer",
    "mapping",
    "number",
    "read_yaml",
    "show",
    "type_name",
    "yaml_problem",
]

MAX_YAML_BYTES: Final = 1 << 20
# Keys shown as they are in a problem's place; any other key is quoted (and cut).
PLAIN_KEY_RE: Final = re.compile(r"[A-Za-z0-9_.*?!\[\]+-]{1,64}")
_QUOTED_RE: Final = re.compile(r"'([^']{9,})'|\"([^\"]{9,})\"")


def show(value: str, limit: int = 64) -> str:
    """``value`` quoted for a message, cut to ``limit`` characters."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


class Problems:
    """Every problem found so far, each ``[prefix: ][where: ]message``; ``redact`` cleans a
    user value before it is shown, ``plain_key`` says which keys are shown unquoted."""

    __slots__ = ("items", "plain_key", "prefix", "redact")

    def __init__(
        self,
        items: list[str] | None = None,
        prefix: str = "",
        *,
        plain_key: re.Pattern[str] = PLAIN_KEY_RE,
        redact: Callable[[str], str] | None = None,
    ) -> None:
        self.items: list[str] = [] if items is None else items
        self.prefix = prefix
        self.plain_key = plain_key
        self.redact = redact

    def add(self, where: str, message: str) -> None:
        head = f"{self.prefix}: " if self.prefix else ""
        self.items.append(f"{head}{where}: {message}" if where else f"{head}{message}")

    def show(self, value: str, limit: int = 64) -> str:
        """A user value for a message: redacted, quoted and cut."""
        return show(value if self.redact is None else self.redact(value), limit)

    def join(self, path: str, key: object) -> str:
        """``path.key``, the key quoted unless it is plain."""
        plain = isinstance(key, str) and self.plain_key.fullmatch(key)
        shown = key if plain and isinstance(key, str) else self.show(str(key))
        return f"{path}.{shown}" if path else shown


def type_name(value: object) -> str:
    """The YAML/JSON word for the type of ``value``."""
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "list"}
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "mapping"
    return names.get(type(value), type(value).__name__)


def hint(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or nothing."""
    close = difflib.get_close_matches(word, sorted(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def mapping(value: object, where: str, problems: Problems) -> Mapping[Any, object] | None:
    """``value`` as a mapping ({} when null); None (and a problem) otherwise."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    problems.add(where, f"must be a mapping, got {type_name(value)}")
    return None


def check_keys(
    raw: Mapping[Any, object],
    allowed: Collection[str],
    where: str,
    problems: Problems,
    *,
    secret: bool = False,
) -> None:
    """Every key of ``raw`` not in ``allowed`` is a problem; in a ``secret`` section (where
    a token may have been pasted as a key) the key is shown cut to 8 characters."""
    for key in raw:
        if key in allowed:
            continue
        if secret:
            problems.add(f"{where}.{show(str(key)[:8] + '...')}", "unknown key")
        else:
            problems.add(problems.join(where, key), f"unknown key{hint(str(key), allowed)}")


def integer(
    value: object, where: str, problems: Problems, *, low: int = 1, high: int | None = None
) -> int | None:
    """An integer from ``low`` to ``high``; None (and a problem) otherwise."""
    if not isinstance(value, int) or isinstance(value, bool):
        problems.add(where, f"must be an integer, got {type_name(value)}")
        return None
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        problems.add(where, f"must be {bound} (got {value})")
        return None
    return value


def number(
    value: object, where: str, problems: Problems, *, allow_zero: bool = False
) -> float | None:
    """A finite number > 0 (>= 0 with ``allow_zero``); None (and a problem) otherwise."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        problems.add(where, f"must be a number, got {type_name(value)}")
        return None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = "a number >= 0" if allow_zero else "a positive number"
        problems.add(where, f"must be {bound} (got {value})")
        return None
    return float(value)


class _Loader(yaml.SafeLoader):
    """A safe loader that remembers duplicate mapping keys (YAML would keep the last one
    silently, dropping a setting without a word)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[str, int]] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = (key_node.tag, key_node.value)
                if key in seen:
                    self.duplicates.append((key_node.value, key_node.start_mark.line + 1))
                seen.add(key)
        return super().construct_mapping(node, deep)


def yaml_problem(exc: yaml.YAMLError) -> str:
    """The message for a YAML error, built from parts: ``str(exc)`` quotes the offending
    line (maybe a secret), so quotes in the parser's sentence are cut to 8 characters."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = exc.problem or exc.context or "syntax error"
        what = _QUOTED_RE.sub(lambda m: repr((m.group(1) or m.group(2))[:8] + "..."), what)
        return f"invalid YAML{where}: {what}"
    return f"invalid YAML ({type(exc).__name__})"


def _read_text(path: Path, problems: Problems, where: str, noun: str, cap: int) -> str | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        problems.add(where, f"{noun} not found")
        return None
    except OSError as exc:
        problems.add(where, f"cannot read {noun}: {exc.strerror or type(exc).__name__}")
        return None
    if len(data) > cap:
        problems.add(where, f"{noun} larger than {cap} bytes")
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        problems.add(where, f"{noun} is not valid UTF-8")
        return None


def read_yaml(
    path: str | Path,
    problems: Problems,
    *,
    where: str = "",
    noun: str = "file",
    empty: str | None = None,
    max_bytes: int = MAX_YAML_BYTES,
) -> dict[Any, object] | None:
    """The top-level mapping of the YAML file at ``path``; None (and a problem at ``where``)
    if unusable. An empty file is {} , or the problem ``empty`` when that is given."""
    text = _read_text(Path(path), problems, where, noun, max_bytes)
    if text is None:
        return None
    loader = _Loader(text)
    try:
        loaded = loader.get_single_data()
    except yaml.YAMLError as exc:
        problems.add(where, yaml_problem(exc))
        return None
    finally:
        loader.dispose()
    for key, line in loader.duplicates:
        at = f"{where}: line {line}" if where else f"line {line}"
        problems.add(at, f"duplicate key {problems.show(key)}")
    if loaded is None:
        if empty is None:
            return {}
        problems.add(where, empty)
        return None
    if not isinstance(loaded, dict):
        problems.add(where, f"top level must be a mapping, got {type_name(loaded)}")
        return None
    return loaded
