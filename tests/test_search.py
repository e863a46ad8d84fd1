"""Feature search (``circuitlab.search``): brute-force checks on the tiny random model,
with and without cached cards, and a slow check on the embedded model.
"""

from __future__ import annotations

import pytest
import torch

import circuitlab
from circuitlab.cards import feature_card
from circuitlab.search import features_by_examples, features_by_output, features_for


def test_features_by_output_brute_force(tiny_rm, no_cache):
    t = tiny_rm.tokenizer.encode("q", add_special_tokens=False)[0]
    W_U = tiny_rm.model.W_U * tiny_rm.model.ln_final.w[:, None]
    effects = torch.stack([tc.W_dec @ W_U for tc in tiny_rm.transcoders])  # [L, F, vocab]
    z = (effects[..., t] - effects.mean(-1)) / effects.std(-1, unbiased=False)
    df = features_by_output(tiny_rm, "q", top=7)
    best = z.flatten().topk(7)
    assert list(zip(df.layer, df.feature)) == [divmod(int(i), z.shape[1]) for i in best.indices]
    assert df.score.tolist() == pytest.approx(best.values.tolist(), rel=1e-4)
    assert df.logit_effect.tolist() == pytest.approx(
        [float(effects[l, f, t]) for l, f in zip(df.layer, df.feature)], rel=1e-5)
    one = features_by_output(tiny_rm, t, layer=2, top=3)
    assert set(one.layer) == {2} and one.score.iloc[0] == pytest.approx(float(z[2].max()), rel=1e-4)


def test_features_for_matches_encode(tiny_rm, no_cache):
    prompt = "hello world"
    tokens = tiny_rm.tokenize(prompt)
    trace = tiny_rm.run(tokens)
    df = features_for(tiny_rm, prompt, "wor", top=10)
    assert set(df.pos) <= {7, 8, 9} and df.token.isin(["w", "o", "r"]).all()
    span = torch.stack([tiny_rm.encode(l, trace.mlp_in[l], tokens)[7:10] for l in range(3)])
    best = span.max(1).values
    assert df.activation.iloc[0] == pytest.approx(float(best.max()), rel=1e-5)
    for row in df.itertuples():
        full = tiny_rm.encode(row.layer, trace.mlp_in[row.layer], tokens)
        assert row.activation == pytest.approx(float(full[row.pos, row.feature]), rel=1e-5)
        assert row.node_id == f"{row.layer}_{row.feature}_{row.pos}"
    last = features_for(tiny_rm, prompt, layer=[0, 1], top=200)
    assert set(last.pos) == {len(tokens) - 1} and set(last.layer) <= {0, 1}
    assert len(last) == int((span.new_tensor(0) < torch.stack(
        [tiny_rm.encode(l, trace.mlp_in[l], tokens)[-1] for l in (0, 1)])).sum())


def test_features_by_examples_brute_force(tiny_rm, no_cache):
    examples, against = ["the cat", "a cat", ("cats are nice", "cat")], ["the dog", "a cow"]

    def at(prompt, text=None):
        acts = tiny_rm.activations(tiny_rm.tokenize(prompt), [0, 1, 2])
        span = [len(prompt)] if text is None else tiny_rm.locate(tiny_rm.tokenize(prompt), text)
        return acts[:, span].max(1).values

    pos = torch.stack([at(*e) if isinstance(e, tuple) else at(e) for e in examples])
    neg = torch.stack([at(e) for e in against])
    score = pos.mean(0) - neg.mean(0)
    df = features_by_examples(tiny_rm, examples, against, top=5)
    first = next(df.itertuples())
    assert first.score == pytest.approx(float(score[(pos > 0).any(0)].max()), rel=1e-5)
    assert first.hits == int((pos[:, first.layer, first.feature] > 0).sum())
    assert df.score.is_monotonic_decreasing


def test_bad_inputs(tiny_rm, no_cache):
    cases = [
        (lambda: features_for(tiny_rm, "the cat", "dog"), "not in the prompt"),
        (lambda: features_for(tiny_rm, "the cat", layer=3), "out of range"),
        (lambda: features_for(tiny_rm, "the cat", pos=40), "out of range"),
        (lambda: features_by_output(tiny_rm, "ab"), "tokenizes as ['a', 'b']"),
        (lambda: features_by_output(tiny_rm, 10_000), "outside the vocabulary"),
        (lambda: features_by_examples(tiny_rm, []), "non-empty list"),
        (lambda: features_by_examples(tiny_rm, "cat"), "non-empty list"),
        (lambda: feature_card(tiny_rm, 0, 48), "Feature 48 is out of range"),
        (lambda: feature_card(tiny_rm, -1, 0), "Layer [-1] is out of range"),
    ]
    for call, expected in cases:
        with pytest.raises(circuitlab.CircuitlabError, match=expected.replace("[", r"\[").replace("]", r"\]")):
            call()


@pytest.mark.slow
def test_search_on_embedded(gemma):
    df = features_for(gemma, "I moved to Dallas last year", " Dallas", layer=range(4, 14))
    assert (df.token == " Dallas").all() and df.layer.between(4, 13).all() and len(df) == 20
    out = features_by_output(gemma, " large", top=5)
    assert len(out) == 5 and (out.score > 3).all()


def test_search_with_cache_uses_held_out_scale(tiny_rm, cached):
    df = features_for(tiny_rm, "the cat sat", "cat", top=100)
    top = cached.max_act[df.layer.to_numpy(), df.feature.to_numpy()]
    alive = top > 0
    assert df.rel_activation.to_numpy()[alive.numpy()] == pytest.approx(
        (torch.tensor(df.activation.to_numpy())[alive] / top[alive]).tolist(), rel=1e-5)
    assert df.score.equals(df.rel_activation) and {"frequency", "max_activation"} <= set(df.columns)
    assert df.rel_activation.max() < 1e3  # features never seen on held-out text get a sane scale
