"""Notebook claims: asserted where measured, reported elsewhere."""

from __future__ import annotations

import pytest

from circuitlab import Claims

EXPECTED = {("m", None): {"p": (0.2, 0.5), "works": False}}


def test_measured_setting_asserts_ranges_and_findings():
    c = Claims(EXPECTED, "m", None)
    assert c.measured and c.range("p", 0.3, "P") == 0.3 and c.finding("works", False) is False
    with pytest.raises(AssertionError, match="expected"):
        c.range("p", 0.7, "P")
    with pytest.raises(AssertionError, match="works"):
        c.finding("works", True)
    c.finding("other", True, "not measured on this setting")  # reported only
    assert c.results["other"] == (True, None, None)


def test_other_settings_report_without_asserting(capsys):
    c = Claims(EXPECTED, "m", "hub transcoders")
    assert not c.measured
    c.range("p", 9.0, "P")
    c.finding("works", True)
    assert "[reported]" in capsys.readouterr().out and c.results["p"][2] is None
