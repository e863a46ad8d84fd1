"""Feature search on a ``ReplacementModel``: which features to look at.

- ``features_for``: the features most active on a token or phrase of a prompt.
- ``features_by_output``: the features whose decoder direction most raises a token's logit.
- ``features_by_examples``: features selective for a concept, contrasted across prompts.

When feature cards are cached for the transcoders (``circuitlab.cards.find_examples``),
scores use each feature's held-out max activation as its scale and the results gain
``frequency`` and ``max_activation`` columns.
"""

from __future__ import annotations

import weakref

import pandas as pd
import torch

from .cards import find_examples
from .edits import positions
from .errors import CircuitlabError

__all__ = ["features_for", "features_by_output", "features_by_examples"]


def _ranked(rm, layers: list[int], score: torch.Tensor, top: int, keep: torch.Tensor | None = None,
            **columns: torch.Tensor) -> pd.DataFrame:
    """The ``top`` entries of ``score [len(layers), F]`` (where ``keep``) as a DataFrame with
    ``layer, feature, score``, the ``columns`` at the same entries, and, when examples are
    cached for ``rm``, each feature's held-out ``frequency`` and ``max_activation``. Works on
    CPU float32 copies (results are small; examples live on the CPU)."""
    score = score.float().cpu()
    columns = {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in columns.items()}
    keep = torch.ones_like(score, dtype=torch.bool) if keep is None else keep.cpu()
    flat = torch.where(keep, score, -torch.inf).flatten()
    n = int(min(top, keep.sum()))
    idx = flat.topk(n).indices
    rows, feats = idx // score.shape[1], idx % score.shape[1]
    layer_ids = torch.tensor(layers)[rows]  # host: indexes CPU results
    frame = {"layer": layer_ids.numpy(), "feature": feats.numpy(), "score": flat[idx].numpy()}
    frame.update({k: v.flatten()[idx].numpy() for k, v in columns.items()})
    examples, _ = find_examples(rm)
    if examples is not None:
        frame["frequency"] = examples.frequency()[layer_ids, feats].numpy()
        frame["max_activation"] = examples.max_act[layer_ids, feats].numpy()
    return pd.DataFrame(frame)


def _scale(rm, layers: list[int]) -> torch.Tensor | None:
    """``[len(layers), F]`` held-out max activations when cached (to compare features on a
    common scale), else ``None``. Features never seen firing take their layer's median."""
    examples, _ = find_examples(rm)
    if examples is None:
        return None
    top = examples.max_act[layers]
    median = top.masked_fill(top <= 0, float("nan")).nanmedian(1, keepdim=True).values
    return torch.where(top > 0, top, median.nan_to_num(1.0)).clamp_min(1e-6)


def features_for(rm, prompt, token_or_text: str | None = None, layer=None, pos=None,
                 top: int = 20) -> pd.DataFrame:
    """The features most active on a token or phrase of a prompt.

    Args:
        rm: the ``ReplacementModel``.
        prompt: the prompt (text or token ids; BOS is prepended to text).
        token_or_text: text in the prompt; its last occurrence is used, and every token
            overlapping it counts (a feature's activation is its max over them).
        layer: a layer, a list of layers, or ``None`` for all.
        pos: position(s) to use instead of ``token_or_text``; with neither, the last token.
        top: number of rows.

    Returns:
        DataFrame ``layer, feature, score, pos, token, activation, rel_activation, node_id``
        (plus ``frequency, max_activation`` when examples are cached), best first. ``score``
        is the activation relative to the feature's held-out max when examples are cached
        for these transcoders, else the raw activation. Only active features are listed.
    """
    tokens = rm.to_tokens(prompt)
    layers = rm.layers(layer)
    if pos is not None:
        at = positions(pos, len(tokens))
    else:
        at = [len(tokens) - 1] if token_or_text is None else rm.locate(tokens, token_or_text)
    acts, arg = rm.activations(tokens, layers)[:, at].float().cpu().max(1)
    where = torch.tensor(at)[arg]  # host: indexes CPU results
    scale = _scale(rm, layers)
    rel = acts / scale if scale is not None else torch.full_like(acts, float("nan"))
    df = _ranked(rm, layers, acts if scale is None else rel, top, acts > 0, pos=where,
                 activation=acts, rel_activation=rel)
    strs = rm.token_strs(tokens)
    df.insert(3, "token", [strs[p] for p in df["pos"]])
    df["node_id"] = [f"{l}_{f}_{p}" for l, f, p in zip(df["layer"], df["feature"], df["pos"])]
    return df


_UNEMBED_STATS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _unembed_stats(rm, norm: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(W_U, mean, cov)``: the (norm-scaled) unembedding, the mean of its columns and
    their covariance ``[d, d]``, cached per model."""
    stats = _UNEMBED_STATS.setdefault(rm, {})
    if norm not in stats:
        U = rm.unembedding(norm).detach().float()
        mean = U.mean(1)
        stats[norm] = (U, mean, U @ U.T / U.shape[1] - torch.outer(mean, mean))
    return stats[norm]


def features_by_output(rm, token, layer=None, top: int = 20, norm: bool = True) -> pd.DataFrame:
    """The features whose decoder direction most raises a token's logit.

    A feature's direct effect on the logits per unit activation is ``W_dec[f] @ W_U`` (with
    ``W_U`` scaled by the final norm's weight when ``norm``; paths through later layers are
    not included). Features are ranked by how far the token's effect stands above the
    feature's mean effect over the vocabulary, in standard deviations of that effect: a
    scale-free score, so large decoder norms (early layers) do not dominate, and a feature
    whose top output token is ``token`` ranks high.

    Args:
        rm: the ``ReplacementModel``.
        token: a string that is exactly one token (e.g. ``" Austin"``), or a token id.
        layer: a layer, a list of layers, or ``None`` for all.
        top: number of rows.
        norm: apply the final norm's weight.

    Returns:
        DataFrame ``layer, feature, score, token, logit_effect`` (``score`` is the
        standardized effect, ``logit_effect`` the raw one; plus ``frequency,
        max_activation`` when examples are cached), best first.
    """
    t = rm.token_id(token)
    layers = rm.layers(layer)
    U, mean, cov = _unembed_stats(rm, norm)
    effect, z = [], []
    for l in layers:
        d = rm.decoder(l).detach().float()
        effect.append(d @ U[:, t])
        z.append((effect[-1] - d @ mean) / ((d @ cov) * d).sum(1).clamp_min(1e-30).sqrt())
    df = _ranked(rm, layers, torch.stack(z), top, logit_effect=torch.stack(effect))
    df.insert(3, "token", rm.token_str(t))
    return df


def _concept_acts(rm, items: list, layers: list[int]) -> torch.Tensor:
    """``[len(items), len(layers), F]`` activations at each item's concept token(s)."""
    if isinstance(items, str) or not len(items):
        raise CircuitlabError(
            f"Expected a non-empty list of examples, got {items!r}; e.g. "
            "['Dallas', 'I flew to Houston', ('Austin, Texas', 'Austin')].")
    rows = []
    for item in items:
        prompt, text = item if isinstance(item, tuple) else (item, None)
        tokens = rm.tokenize(prompt)
        at = [len(tokens) - 1] if text is None else rm.locate(tokens, text)
        rows.append(rm.activations(tokens, layers)[:, at].max(1).values.float().cpu())
    return torch.stack(rows)


def features_by_examples(rm, examples: list, against: list | None = None, layer=None,
                         top: int = 20) -> pd.DataFrame:
    """Features selective for a concept, contrasted across prompts.

    Each example is a prompt whose **last token** is the concept token (a word alone,
    ``"Dallas"``, or a sentence ending in it, ``"I grew up in Dallas"``), or a pair
    ``(prompt, text)`` whose concept tokens are those overlapping the last occurrence of
    ``text``. A feature's activation on an example is its max over the concept tokens.

    The score is the mean activation on ``examples`` minus the mean on ``against`` (located
    the same way); without ``against``, minus the feature's mean activation per token on
    held-out text when examples are cached (else nothing). Activations are divided by each
    feature's held-out max when cached, so features of different scales compare.

    Args:
        rm: the ``ReplacementModel``.
        examples: prompts or ``(prompt, text)`` pairs showing the concept.
        against: prompts or pairs without it (e.g. other cities), or ``None``.
        layer: a layer, a list of layers, or ``None`` for all.
        top: number of rows.

    Returns:
        DataFrame ``layer, feature, score, hits, mean_act, min_act, against_mean,
        against_hits`` (plus ``frequency, max_activation`` when cached), best first; only
        features active on at least one example. ``hits`` counts the examples a feature
        fires on: ``df[df.hits == len(examples)]`` keeps features shared by all of them.
    """
    layers = rm.layers(layer)
    pos = _concept_acts(rm, examples, layers)
    scale = _scale(rm, layers)
    unit = torch.ones_like(pos[0]) if scale is None else scale
    if against is not None:
        neg = _concept_acts(rm, against, layers)
    elif scale is not None:
        neg = find_examples(rm)[0].mean_act()[layers][None]
    else:
        neg = torch.zeros_like(pos[:1])
    score = (pos / unit).mean(0) - (neg / unit).mean(0)
    return _ranked(rm, layers, score, top, (pos > 0).any(0), hits=(pos > 0).sum(0),
                   mean_act=pos.mean(0), min_act=pos.min(0).values, against_mean=neg.mean(0),
                   against_hits=(neg > 0).sum(0) if against is not None else torch.zeros_like(score))
