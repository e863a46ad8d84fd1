"""The interpretability sanity check (``circuitlab.train.sanity``): its helpers on the
tiny model's cards, and the check itself on the embedded model (slow).
"""

from __future__ import annotations

import re

import pytest

from circuitlab.cards import N_TOP
from circuitlab.train.sanity import middle_layers, occurrences, sanity, selectivity


@pytest.fixture(scope="module")
def sanity_report(gemma):
    return sanity(gemma)


TEXAS_XFAIL = pytest.mark.xfail(strict=False, reason=(
    "bundle of 3.5M training tokens (width 1536): the 200k scanned held-out tokens hold only "
    "16 Texas tokens, and the best candidate (L12/F765) is a US-state and Chinese-province "
    "feature (top contexts Texas, 浙江, Tennessee, California, Pennsylvania, 安徽...), 1 of 10 on "
    "Texas; no middle-layer candidate has more than that. Drop this mark when a retrained "
    "bundle passes."))


@pytest.mark.slow
@pytest.mark.parametrize("concept", [pytest.param("texas", marks=TEXAS_XFAIL), "small"])
def test_interpretability_sanity(sanity_report, concept):
    """A middle-layer feature, found by code, whose top held-out contexts are
    mostly the concept's tokens (for "small": one shared by small/petit/pequeño)."""
    result = sanity_report[concept]
    best = result["best"]
    assert result["passed"], f"no selective {concept} feature; best candidate: {best}"


def test_sanity_helpers(tiny_rm, cached):
    layer, feature = divmod(int(cached.max_act.argmax()), tiny_rm.d_sae(0))
    share, tokens = selectivity(cached, layer, feature, r".*")
    assert share == 1.0 and len(tokens) == min(N_TOP, len(cached.contexts(layer, feature)))
    first = tokens[0].strip()
    share_first, _ = selectivity(cached, layer, feature, re.escape(first))
    assert share_first == pytest.approx(sum(t.strip() == first for t in tokens) / len(tokens))
    t_id = tiny_rm.tokenizer.encode("t", add_special_tokens=False)[0]
    assert occurrences(cached, "t") == int((cached.tokens == t_id).sum())
    assert middle_layers(18) == list(range(4, 14))
