"""Automatic feature labels (``circuitlab.labels``): checked against a brute-force reading
of the cards on the tiny model, and for concepts on the embedded model's bundled cards."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import tiny_transcoders

import circuitlab
from circuitlab.cards import cards_path, feature_card, find_examples, read_examples
from circuitlab.labels import MIN_COUNT, MIN_Z, N_OUTPUTS, WORD, build_labels, label, script, shown, writes
from circuitlab.replacement import ReplacementModel
from circuitlab.train.build_cards import relabel
from circuitlab.viz.state import node_name


def test_label_parts():
    assert script(" cat") == "latin" and script("小") == "han" and script("«") == ""
    assert shown(" small") == '"small"' and shown("\n") == "↵" and shown(" ") == "␣"
    assert writes([" big", " Big", "big", " large"], [9, 8, 7, 6]) == [" big", " large"]
    assert writes([" big", " large"], [MIN_Z + 1, MIN_Z - 0.1]) == [" big"]
    assert label([" small", " little"], [" big", " large"]) == '"small" "little" → say big/large'
    assert label([" small"], []) == '"small"' and label([], [" big"]) == "→ say big"


def test_labels_match_brute_force(tiny_rm, cached):
    """Each live feature's label names its most common top-context tokens and its top output
    tokens among the held-out text's words, recomputed here from scratch."""
    labels, outputs = build_labels(tiny_rm, cached)
    assert labels == cached.meta["labels"]
    counts = Counter(cached.tokens.tolist())
    W_U = (tiny_rm.model.W_U * tiny_rm.model.ln_final.w[:, None]).float()
    checked = 0
    for layer in range(tiny_rm.n_layers):
        for feature in range(tiny_rm.d_sae(layer)):
            text = cached.label(layer, feature)
            if cached.max_act[layer, feature] <= 0:
                assert text == "" and outputs[str(layer)][feature] == []
                continue
            centres = Counter(c["tokens"][c["center"]] for c in cached.contexts(layer, feature)
                              if c["quantile"] == "top")
            top_read = centres.most_common(1)[0][0]
            assert text.startswith(shown(top_read)), (layer, feature, text)
            read_script = script("".join(t for t, k in centres.items()))
            words = [i for i, k in counts.items() if k >= MIN_COUNT and WORD.match(cached.token_str(i))]
            same = [i for i in words if script(cached.token_str(i)) == read_script] or words
            effect = tiny_rm.transcoders[layer].W_dec[feature].float() @ W_U[:, same]
            best = [cached.token_str(same[i]) for i in effect.topk(min(N_OUTPUTS, len(same))).indices]
            assert outputs[str(layer)][feature] == best, (layer, feature)
            checked += 1
    assert checked > 10


def test_user_labels_win_and_relabel_is_guarded(tiny, tiny_rm, cached, tmp_path):
    layer, feature = divmod(int(cached.max_act.argmax()), tiny_rm.d_sae(0))
    auto = cached.label(layer, feature)
    assert auto and feature_card(tiny_rm, layer, feature).label == auto
    assert feature_card(tiny_rm, layer, feature, label="mine").label == "mine"
    row = {"node_id": "n", "kind": "feature", "layer": layer, "feature": feature, "token": "x"}
    assert node_name(row, {}, cached) == auto and node_name(row, {"n": "mine"}, cached) == "mine"
    assert node_name(row, {}, None) == f"L{layer}/F{feature}"
    relabelled = read_examples(relabel(tiny_rm))
    assert relabelled.meta["labels"] == cached.meta["labels"]
    assert torch.equal(relabelled.centers, cached.centers)
    other = ReplacementModel(tiny, tiny_transcoders(tiny, "jumprelu_skip_transcoder", seed=1))
    with pytest.raises(circuitlab.CircuitlabError, match="other transcoders"):
        relabel(other, cards_path(tiny_rm))
    with pytest.raises(circuitlab.CircuitlabError, match="circuitlab cards"):
        relabel(tiny_rm, tmp_path / "none.safetensors")


@pytest.mark.slow
def test_bundled_labels_name_concepts(gemma):
    """On the embedded model, among the features that fire hardest on ' small', ' big' and
    ' king' in a prompt (3 per layer), at least three carry labels that name the word."""
    examples, why = find_examples(gemma)
    assert why is None and "labels" in examples.meta
    live = int((examples.max_act > 0).sum())
    named = sum(bool(t) for layer in examples.meta["labels"].values() for t in layer)
    assert named == live
    for prompt, word in (('The opposite of "small" is "', "small"), ("The house is very big", "big"),
                         ("The king and the", "king")):
        tokens = gemma.tokenize(prompt)
        pos = [i for i, t in enumerate(tokens.tolist()) if gemma.tokenizer.decode([t]).strip() == word][-1]
        acts = gemma.activations(tokens, list(range(gemma.n_layers)))[:, pos]
        hits = sum(f'"{word}"'.lower() in examples.label(layer, feature).lower()
                   for layer in range(gemma.n_layers) for feature in acts[layer].topk(3).indices.tolist())
        assert hits >= 3, (word, hits)
