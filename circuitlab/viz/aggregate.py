"""Heatmaps of an aggregate across prompts (``circuitlab.aggregate``): prompt x feature
influence, and prompt x prompt similarity."""

from __future__ import annotations

import plotly.graph_objects as go

from ..errors import CircuitlabError
from .figure import plain, short

WHAT = ("matrix", "similarity")


def heatmap(agg, what: str = "matrix") -> go.Figure:
    """A Plotly heatmap of ``agg.matrix`` (features named by their labels) or of
    ``agg.similarity``.

    Args:
        agg: an ``Aggregate``.
        what: ``"matrix"`` or ``"similarity"``.
    """
    if what not in WHAT:
        raise CircuitlabError(f"what={what!r} is not a heatmap of an aggregate; use one of {WHAT}.")
    prompts = [plain(str(p)) for p in agg.matrix.index]
    if what == "similarity":
        z, x = agg.similarity.to_numpy(), prompts
        hover = "%{y} · %{x}<br>overlap %{z:.3f}<extra></extra>"
        title, colour = "How alike the prompts' graphs are (influence-weighted overlap)", "overlap"
    else:
        names = agg.features.set_index(["layer", "feature"])["label"]
        keys = list(agg.matrix.columns)
        ids = [f"L{layer}/F{feature}" for layer, feature in keys]
        x = [plain(short(i if names[k] == i else f"{i} {names[k]}", 40)) for i, k in zip(ids, keys)]
        z = agg.matrix.to_numpy()
        hover = "%{y}<br>%{x}<br>influence %{z:.4f}<extra></extra>"
        title, colour = "Influence of the recurring features, per prompt", "influence"
    fig = go.Figure(go.Heatmap(z=z, x=x, y=prompts, colorscale="Blues", hovertemplate=hover,
                               colorbar={"title": colour}))
    fig.update_layout(title=title, xaxis={"tickangle": -45, "automargin": True},
                      yaxis={"automargin": True, "autorange": "reversed"},
                      height=max(300, 40 + 24 * len(prompts)))
    return fig
