"""The feature card of the explorer: a ``circuitlab.cards.FeatureCard`` fetched lazily
and packed as compact JSON for the viewer (which shows every text as text)."""

from __future__ import annotations

from ..cards import FeatureCard, feature_card
from ..presets import DEFAULT_BUNDLE


def fetch(rm, layer: int, feature: int, *, tokens=None, pos=None, label: str = "",
          activation: float | None = None, transcoders: str | None = None) -> FeatureCard:
    """The card of ``(layer, feature)``; says what is missing instead of failing.

    Args:
        rm: the ``ReplacementModel`` or ``None``; without it only the bundled
            transcoders' cached examples can be shown, so only when the graph's
            ``transcoders`` are the bundled ones.
        activation: the node's activation, shown when the card cannot compute it.
    """
    if rm is None and transcoders not in DEFAULT_BUNDLE.values():
        card = FeatureCard(layer, feature, label, message="no examples cached (no model given)")
    else:
        try:
            card = feature_card(rm, layer, feature, tokens=tokens if rm is not None else None,
                                pos=pos, label=label)
        except Exception as e:  # noqa: BLE001 - a card shows its problem rather than break the view
            card = FeatureCard(layer, feature, label, message=f"card unavailable: {e}")
    if card.prompt_activation is None:
        card.prompt_activation = activation
    return card


def card_data(card: FeatureCard, vocab: dict, n_top: int = 5) -> dict:
    """``card`` as compact JSON for the offline viewer: the first ``n_top`` contexts of
    the strongest group and the first of every other, their tokens as indices into
    ``vocab`` (token -> index, extended here), activations as integers in units of
    ``scale``; the histogram as ``[largest bin edge, counts]``."""
    groups = [c["quantile"] for c in card.contexts]
    contexts = [c for k, c in enumerate(card.contexts)
                if groups.index(c["quantile"]) == 0 and k < n_top or k == groups.index(c["quantile"]) > 0]
    top = max([card.max_activation or 0.0] + [max(c["acts"], default=0) for c in contexts])
    scale = top / 255 if top > 0 else 1.0
    index = lambda t: vocab.setdefault(str(t), len(vocab))  # noqa: E731
    return {
        "label": card.label, "message": card.message, "frequency": card.frequency,
        "max": card.max_activation, "scale": scale,
        "histogram": [card.histogram[0][-1], card.histogram[1]] if card.histogram else None,
        "raises": [[t, round(v, 3)] for t, v in card.top_tokens],
        "lowers": [[t, round(v, 3)] for t, v in card.bottom_tokens],
        "contexts": [[c["quantile"], [index(t) for t in c["tokens"]],
                      [max(0, round(a / scale)) for a in c["acts"]]] for c in contexts]}
