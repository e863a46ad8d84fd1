"""The README's code runs: the Python blocks of its sections on the demo graph, in order,
in one namespace, on the embedded model (from an empty folder, so nothing is assumed)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
SECTIONS = ("The API in ten lines", "Explore", "Find features, test the story", "Many prompts")


def blocks(section: str) -> list[str]:
    text = README.read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, re.S)


def test_the_sections_have_code():
    assert all(blocks(s) for s in SECTIONS)


@pytest.mark.slow
def test_readme_snippets_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for section in SECTIONS:
        for code in blocks(section):
            exec(compile(code, f"README.md: {section}", "exec"), namespace)
    graph, view = namespace["graph"], namespace["view"]
    assert "say large" in view.supernodes and view.labels
    assert (tmp_path / "out" / "graph.html").is_file()
    assert namespace["graph_fr"].prompt.startswith("Le contraire")
    assert list(namespace["summary"].status) == ["ok"] * 3
    assert namespace["agg"].similarity.shape == (3, 3)
    assert len(graph.nodes) > 0
