"""Feature cards: building the examples (``circuitlab.train.build_cards``), reading them
and the cards themselves (``circuitlab.cards``).

Exact checks on the tiny random model (its cards built by the ``cached`` fixture of
``conftest.py``); slow ones on the embedded model with its bundled transcoders and their
cached examples.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import DOCS, tiny_transcoders

import circuitlab
from circuitlab.cards import (N_BINS, N_TOP, NO_EXAMPLES, cards_path, feature_card, find_examples,
                              output_tokens, read_examples, transcoder_key)
from circuitlab.cli import main
from circuitlab.presets import BUNDLE_DIR
from circuitlab.replacement import ReplacementModel
from circuitlab.train.build_cards import LEFT, RIGHT, build_examples


def all_activations(rm, examples):
    """``[L, N, F]`` activations of every stored token, computed sequence by sequence."""
    out = torch.zeros(rm.n_layers, len(examples.tokens), rm.d_sae(0))
    for a, b in zip(examples.starts[:-1].tolist(), examples.starts[1:].tolist()):
        out[:, a:b] = rm.activations(examples.tokens[a:b].long(), list(range(rm.n_layers)))
    return out


def test_examples_match_brute_force(tiny_rm, cached):
    acts = all_activations(tiny_rm, cached)
    assert cached.n_tokens == 300
    assert cached.meta["transcoder_sha256"] == transcoder_key(tiny_rm)
    assert torch.allclose(cached.max_act, acts.max(1).values.abs(), rtol=1e-3)
    assert torch.allclose(cached.total, acts.sum(1), rtol=1e-3, atol=1e-3)
    assert torch.equal(cached.hist.sum(-1), (acts > 0).sum(1).int())
    layer, feature = divmod(int(cached.max_act.argmax()), tiny_rm.d_sae(0))
    assert int(cached.centers[layer, feature, 0]) == int(acts[layer, :, feature].argmax())
    assert (cached.centers[..., 0] >= 0).sum() == (cached.max_act > 0).sum()
    top = cached.max_act[..., None]
    centers = cached.acts[..., LEFT].float() * top / 255
    for slot, group in enumerate(cached.groups()):
        valid = cached.centers[..., slot] >= 0
        exact = acts.permute(0, 2, 1).gather(2, cached.centers[..., slot:slot + 1].clamp_min(0).long())[..., 0]
        assert torch.allclose(centers[..., slot][valid], exact[valid], atol=float(top.max()) / 250)
        if group != "top":
            lo, hi = map(float, group.split()[0].split("-"))
            rel = (exact / cached.max_act.clamp_min(1e-9))[valid]
            assert ((rel >= lo - 1e-3) & (rel < hi + 1e-3)).all()


def test_contexts_are_windows_of_the_corpus(tiny_rm, cached):
    layer, feature = divmod(int(cached.max_act.argmax()), tiny_rm.d_sae(0))
    contexts = cached.contexts(layer, feature)
    assert contexts[0]["quantile"] == "top" and contexts[0]["max"] == pytest.approx(
        float(cached.max_act[layer, feature]), rel=1e-2)
    text = "".join(DOCS)
    for c in contexts:
        assert len(c["tokens"]) == len(c["acts"]) <= LEFT + 1 + RIGHT
        assert "".join(c["tokens"]) in text
        assert c["acts"][c["center"]] == pytest.approx(c["max"])
    assert [c["max"] for c in contexts if c["quantile"] == "top"] == sorted(
        [c["max"] for c in contexts if c["quantile"] == "top"], reverse=True)


def test_card_from_cache_and_for_other_weights(tiny, tiny_rm, cached):
    layer, feature = divmod(int(cached.max_act.argmax()), tiny_rm.d_sae(0))
    card = feature_card(tiny_rm, layer, feature, tokens="the cat", label="cat")
    assert card.message is None and card.contexts and card.label == "cat"
    edges, counts = card.histogram
    assert len(edges) == N_BINS + 1 and sum(counts) == int(cached.hist[layer, feature].sum())
    acts = tiny_rm.activations(tiny_rm.tokenize("the cat"), [layer])[0, :, feature]
    assert card.prompt_activation == pytest.approx(float(acts.max()))
    at2 = feature_card(tiny_rm, layer, feature, tokens="the cat", pos=2).prompt_activation
    assert at2 == pytest.approx(float(acts[2]))
    other = ReplacementModel(tiny, tiny_transcoders(tiny, "jumprelu_skip_transcoder", seed=1))
    stale = feature_card(other, layer, feature)
    assert stale.message == NO_EXAMPLES and not stale.contexts and stale.histogram is None
    assert stale.top_tokens  # what needs no cache is still there


def test_output_tokens_brute_force(tiny_rm):
    W_U = tiny_rm.model.W_U * tiny_rm.model.ln_final.w[:, None]
    effect = tiny_rm.transcoders[1].W_dec[5] @ W_U
    top, bottom = output_tokens(tiny_rm, 1, 5, k=3)
    assert [t for t, _ in top] == [tiny_rm.tokenizer.decode([i]) for i in effect.topk(3).indices]
    assert [v for _, v in bottom] == pytest.approx(effect.sort().values[:3].tolist(), rel=1e-5)


def test_build_settings_and_budget(tiny_rm, heldout_corpus, tmp_path):
    out = tmp_path / "small.safetensors"
    build_examples(tiny_rm, heldout_corpus, tokens=100, context=16, out=out, n_top=3, per_band=1, progress=False)
    examples = read_examples(out)
    assert examples.centers.shape[-1] == 6 and examples.groups()[:4] == ["top"] * 3 + ["0.50-0.75 of max"]
    assert examples.n_tokens == 100 and examples.meta["context"] == 16
    with pytest.raises(circuitlab.CircuitlabError, match="budget"):
        build_examples(tiny_rm, heldout_corpus, out=out, max_bytes=1000)
    with pytest.raises(circuitlab.CircuitlabError, match="heldout"):
        build_examples(tiny_rm, tmp_path / "nowhere", out=out)


def test_card_without_cache_never_fails(tiny_rm, no_cache):
    card = feature_card(tiny_rm, 0, 3)
    assert card.message == NO_EXAMPLES and card.contexts == [] and len(card.top_tokens) == 10


def test_card_from_cache_only(tiny_rm, cached):
    layer, feature = divmod(int(cached.max_act.argmax()), tiny_rm.d_sae(0))
    card = feature_card(None, layer, feature, examples=cached)
    assert card.contexts == cached.contexts(layer, feature) and card.top_tokens == []
    with pytest.raises(circuitlab.CircuitlabError, match="cached examples"):
        feature_card(None, 3, 0, examples=cached)


@pytest.mark.slow
def test_bundled_cards_are_fresh_and_small(gemma):
    path = cards_path(gemma)
    assert path.parent == BUNDLE_DIR and path.stat().st_size <= 12_000_000
    examples, why = find_examples(gemma)
    assert why is None, "rebuild the bundled cards with `circuitlab cards`"
    assert examples.meta["command"].startswith("circuitlab cards") and examples.n_tokens >= 100_000
    layer, feature = 9, int(examples.frequency()[9].argmax())
    card = feature_card(gemma, layer, feature, tokens="I live in Dallas")
    assert card.message is None and len(card.contexts) >= N_TOP and card.prompt_activation is not None
    cached_only = feature_card(None, layer, feature)
    assert cached_only.contexts == card.contexts and cached_only.top_tokens == []


@pytest.mark.slow
def test_cards_command(tmp_path, capsys):
    """On a held-out corpus the test writes itself (a clean machine has no built corpus)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = [f"Document {i}: the river runs past the old mill, and the town sleeps. " * 3
            for i in range(20)]
    (corpus / "heldout.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "cards.safetensors"
    assert main(["cards", "--tokens", "300", "--context", "64", "--corpus", str(corpus),
                 "--out", str(out)]) == 0
    assert "Wrote" in capsys.readouterr().out
    examples = read_examples(out)
    assert examples.n_tokens == 300 and "--tokens 300" in examples.meta["command"]
