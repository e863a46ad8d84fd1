"""Claims a notebook makes about a model, checked where they were measured.

A notebook states its findings as named claims and keeps, per setting (the
``(model, transcoders)`` pair it runs with), a table of what was measured there: a
``(low, high)`` range for a number, ``True``/``False`` for a yes/no finding. Where the
setting's table names a claim, a claim that does not match stops the notebook, so a re-run
that no longer shows what the text says fails. Everywhere else (another setting, or a
claim not measured on this one) the notebook runs to the end and reports what it found.

Example:
    >>> EXPECTED = {("gemma-3-270m", None): {"p_answer": (0.2, 0.5), "top_is_answer": True}}
    >>> claims = Claims(EXPECTED, MODEL, TRANSCODERS)
    >>> claims.range("p_answer", p_answer, "P(answer) on the clean run")
    >>> claims.finding("top_is_answer", top == ANSWER, "the model predicts the answer first")
"""

from __future__ import annotations

__all__ = ["Claims"]


class Claims:
    """The expectations of one notebook for the setting it runs with.

    Args:
        expected: ``{(model, transcoders): {name: expectation}}``, an expectation being a
            ``(low, high)`` range or a ``True``/``False`` finding.
        model, transcoders: the setting of this run.

    Attributes:
        setting: ``(model, transcoders)``.
        measured: whether the table lists this setting at all.
        results: ``{name: (value, expectation or None, matches)}`` in the order checked.
    """

    def __init__(self, expected: dict, model, transcoders):
        self.setting = (model, transcoders)
        self.measured = self.setting in expected
        self.expected = dict(expected.get(self.setting, {}))
        self.results: dict[str, tuple] = {}

    def __repr__(self) -> str:
        where = (f"{len(self.expected)} measured claims are asserted" if self.measured
                 else "not measured here: claims are reported, not asserted")
        return f"Claims({self.setting}: {where})"

    def _record(self, name: str, value, matches: bool | None, what: str) -> None:
        expectation = self.expected.get(name)
        self.results[name] = (value, expectation, matches)
        if matches is None:
            print(f"[reported] {what}: {value!r}")
            return
        print(f"[{'ok' if matches else 'FAILS'}] {what}: {value!r} (expected {expectation!r})")
        assert matches, (f"{name}: {what} is {value!r}, expected {expectation!r} on "
                         f"{self.setting}")

    def range(self, name: str, value: float, what: str = "") -> float:
        """Check that the number ``value`` lies in this setting's range ``name``.

        Raises:
            AssertionError: where a range is expected and ``value`` lies outside it.
        """
        expectation = self.expected.get(name)
        matches = None if expectation is None else expectation[0] < value < expectation[1]
        self._record(name, float(value), matches, what or name)
        return value

    def finding(self, name: str, holds: bool, what: str = "") -> bool:
        """Check that the yes/no finding ``holds`` is as this setting expects.

        Raises:
            AssertionError: where a finding is expected and ``holds`` differs from it.
        """
        holds = bool(holds)
        expectation = self.expected.get(name)
        matches = None if expectation is None else holds == expectation
        self._record(name, holds, matches, what or name)
        return holds
