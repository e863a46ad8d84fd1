"""The guided notebooks: all present, a Colab badge and runtime up front, a papermill
parameters cell, an EXPECTED table of claims per setting, and no outputs in git. `make test`
also executes each one (nbmake)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from set_repository import colab_badge_target, repository  # noqa: E402

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
EXPECTED = ["00_quickstart", "01_multihop_dallas_austin", "02_rhyme_planning",
            "03_multilingual_concepts", "04_cot_backsolving", "05_probe_your_own_behaviour",
            "06_many_prompts", "07_attention_circuits"]


def test_the_notebooks_exist():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == EXPECTED


@pytest.mark.parametrize("name", EXPECTED)
def test_notebook_shape(name):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# ")
    assert f"]({colab_badge_target(repository(), name + '.ipynb')})" in first.source
    assert re.search(r"[Rr]untime", first.source)
    params = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1 and params[0].cell_type == "code"
    assert re.search(r"^MODEL\s*=", params[0].source, re.M)
    assert re.search(r"^TRANSCODERS\s*=", params[0].source, re.M)
    setup = [c for c in nb.cells if c.cell_type == "code" and "google.colab" in c.source]
    assert setup and f'"circuitlab @ git+{repository()}"' in setup[0].source
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    assert any(re.search(r"^\s*assert ", s, re.M) for s in code)
    # findings are named claims, asserted on the settings of the EXPECTED table, reported elsewhere
    assert any(re.search(r"^EXPECTED = ", s, re.M) for s in code)
    assert any("claims = circuitlab.Claims(EXPECTED, MODEL, TRANSCODERS)" in s for s in code)
    assert not any(re.search(r"^\s*(el)?if MODEL\b", s, re.M) for s in code), \
        f"{name}: put per-setting expectations in EXPECTED, not in if MODEL == ... branches"


@pytest.mark.parametrize("name", EXPECTED)
def test_outputs_are_stripped(name):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, \
                f"{name}: strip outputs before committing (cell {cell.source[:40]!r})"
