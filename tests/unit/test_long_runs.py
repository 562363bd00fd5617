"""``LongRuns``: the bounded set of statement texts that are planned for their values."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy.backends.postgres.execute import LongRuns


def test_remembers_and_forgets() -> None:
    runs = LongRuns(size=4)
    assert "SELECT 1" not in runs
    runs.add("SELECT 1")
    runs.add("SELECT 1")
    assert "SELECT 1" in runs and len(runs) == 1
    runs.discard("SELECT 1")
    runs.discard("SELECT 1")  # forgetting twice is harmless
    assert "SELECT 1" not in runs and len(runs) == 0


def test_the_oldest_goes_first_when_full() -> None:
    runs = LongRuns(size=3)
    for sql in ("a", "b", "c", "d"):
        runs.add(sql)
    assert [s in runs for s in ("a", "b", "c", "d")] == [False, True, True, True]
    runs.add("b")  # seen again: not moved, not duplicated
    runs.add("e")
    assert [s in runs for s in ("b", "c", "d", "e")] == [False, True, True, True]


@given(st.lists(st.sampled_from("abcdefgh"), max_size=60), st.integers(1, 5))
def test_matches_a_first_in_first_out_model(texts: list[str], size: int) -> None:
    runs, model = LongRuns(size=size), list[str]()
    for sql in texts:
        runs.add(sql)
        if sql not in model:
            model = [*model, sql][-size:]
        assert sql in runs  # the one just added is always kept
        assert len(runs) == len(model) <= size
        assert all((s in runs) == (s in model) for s in "abcdefgh")
