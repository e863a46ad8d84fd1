"""The feature card: a ``circuitlab.cards.FeatureCard`` fetched lazily and rendered
to escaped HTML."""

from __future__ import annotations

import html

from ..cards import FeatureCard, feature_card
from ..loading import DEFAULT_BUNDLE


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


def _tokens(pairs) -> str:
    return " ".join(f"<code>{html.escape(repr(str(t)))}</code>&nbsp;{v:+.2f}" for t, v in pairs)


def _histogram(edges, counts, width: int = 260, height: int = 50) -> str:
    top = max(max(counts), 1)
    w = width / max(len(counts), 1)
    bars = "".join(f'<rect x="{i * w:.1f}" y="{height - height * c / top:.1f}" '
                   f'width="{max(w - 1, 1):.1f}" height="{height * c / top:.1f}" fill="#e0904a"/>'
                   for i, c in enumerate(counts))
    return (f'<svg width="{width}" height="{height}">{bars}</svg>'
            f"<div style='font-size:11px'>{edges[0]:.2g} … {edges[-1]:.2g}</div>")


def _context(ctx: dict) -> str:
    top = max(ctx.get("max") or max(ctx["acts"], default=0), 1e-9)
    spans = "".join(
        f'<span title="{a:.3g}" style="background:rgba(224,144,74,{min(max(a, 0) / top, 1):.2f})">'
        f"{html.escape(str(t)).replace(chr(10), '↵')}</span>"
        for t, a in zip(ctx["tokens"], ctx["acts"]))
    return f"<div style='font-family:monospace;font-size:12px;margin:2px 0'>{spans}</div>"


def render(card: FeatureCard) -> str:
    """``card`` as HTML (every text escaped)."""
    parts = [f"<b>L{card.layer}/F{card.feature}</b>"
             + (f" · {html.escape(card.label)}" if card.label else "")]
    if card.prompt_activation is not None:
        parts.append(f"activation on this prompt: {card.prompt_activation:.3g}")
    if card.message:
        parts.append(f"<i>{html.escape(card.message)}</i>")
    stats = [f"{name} {value:.3g}" for name, value in (
        ("fires on", getattr(card, "frequency", None)), ("max", getattr(card, "max_activation", None)))
        if value is not None]
    if stats:
        parts.append(" · ".join(stats))
    if card.top_tokens:
        parts.append("raises: " + _tokens(card.top_tokens))
    if card.bottom_tokens:
        parts.append("lowers: " + _tokens(card.bottom_tokens))
    if card.histogram is not None:
        parts.append(_histogram(*card.histogram))
    quantile = None
    for ctx in card.contexts:
        if ctx["quantile"] != quantile:
            quantile = ctx["quantile"]
            parts.append(f"<div style='margin-top:4px'><b>{html.escape(str(quantile))}</b></div>")
        parts.append(_context(ctx))
    return "<div class='cl-card'>" + "<br>".join(parts) + "</div>"
