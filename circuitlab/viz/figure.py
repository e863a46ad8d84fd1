"""The static Plotly figure of a graph (nodes per kind above binned link traces, its
strongest links drawn), for where widgets cannot run, and the node styles the explorer's
payload shares with it. Every user-visible text is HTML-escaped, since Plotly renders some
tags.
"""

from __future__ import annotations

import html

import numpy as np
import plotly.colors
import plotly.graph_objects as go

from ..graph import KINDS
from .layout import diameters, marker_sizes, scaled, visible
from .legend import BACKBONE_LINKS, N_TEXT, error_text
from .links import N_BINS, bin_style, link_bin, segments
from .state import ViewState

SYMBOLS = {"feature": "circle", "error": "diamond", "embedding": "square", "logit": "square",
           "direction": "star"}
FILL = {"error": "#b0b0b0", "embedding": "#7f9cc0", "logit": "#e0904a", "direction": "#c0392b"}
OPACITY = {"feature": 0.95, "error": 0.45, "embedding": 0.95, "logit": 0.95, "direction": 0.95}
MARGIN = {"l": 50, "r": 10, "t": 10, "b": 90}


def plain(text: str) -> str:
    """``text`` escaped for Plotly, which renders some HTML tags in texts (quotes are safe)."""
    return html.escape(text, quote=False)


def short(text: str, n: int = 28) -> str:
    """``text`` cut to ``n`` characters (with an ellipsis)."""
    return text if len(text) <= n else text[:n - 1] + "…"


def hover_details(state: ViewState) -> list[str]:
    """Hover lines after the name per shown node (escaped): id, place, activation,
    influence, top output tokens, supernode; for error nodes what they are."""
    nodes = state.shown.nodes
    member = {i: name for name, ids in state.supernodes.items() for i in ids}
    out = []
    for r in nodes.to_dict("records"):
        lines = []
        if r["kind"] == "feature":
            lines.append(f"L{r['layer']}/F{r['feature']} · node {plain(r['node_id'])}")
        lines.append(f"{r['kind']} · pos {r['pos']} {plain(repr(str(r['token'])))}")
        lines.append(f"activation {r['activation']:.3g} · influence {r['influence']:.3g}")
        if r["kind"] == "logit":
            lines.append(f"probability {r['prob']:.3f}")
        if r["node_id"] in state.outputs:
            raises = [t for t, _ in state.outputs[r["node_id"]]["raises"][:3]]
            lines.append("top tokens: " + plain(", ".join(map(repr, raises))))
        if r["node_id"] in member:
            lines.append(f"supernode: {plain(member[r['node_id']])}")
        if r["kind"] == "error":
            lines.append("<i>" + plain(error_text(r["layer"], r["pos"])).replace("; ", ";<br>") + "</i>")
        out.append("<br>".join(lines))
    return out


def hover_texts(state: ViewState) -> list[str]:
    """Hover text per shown node: its name in bold, then ``hover_details``."""
    return [f"<b>{plain(name)}</b><br>{details}"
            for name, details in zip(state.names(), hover_details(state))]


def text_rows(state: ViewState) -> np.ndarray:
    """Rows of the shown nodes labelled beside their marker: the ``N_TEXT`` most
    influential features and every logit."""
    nodes = state.shown.nodes
    feats = nodes[nodes["kind"] == "feature"]["influence"].fillna(0)
    top = feats.nlargest(N_TEXT).index
    return np.flatnonzero(nodes.index.isin(top) | state.shown.target_mask.numpy())


def trace_rows(state: ViewState, kind: str) -> np.ndarray:
    """Rows of the shown nodes of ``kind``, weakest first (the strongest is drawn on top)."""
    nodes = state.shown.nodes
    rows = np.flatnonzero((nodes["kind"] == kind).to_numpy())
    return rows[np.argsort(nodes["influence"].fillna(0).to_numpy()[rows], kind="stable")]


def fill_colours(state: ViewState, colour_by: str = "influence") -> np.ndarray:
    """Per shown node, its fill: features shaded by ``colour_by``, other kinds by kind."""
    nodes = state.shown.nodes
    fill = plotly.colors.sample_colorscale("Oranges", list(0.25 + 0.75 * scaled(nodes, colour_by)))
    return np.array([fill[i] if k == "feature" else FILL[k] for i, k in enumerate(nodes["kind"])],
                    dtype=object)


def pixels(state: ViewState, width: int, height: int) -> tuple[float, float]:
    """Pixels per x unit and per row of a graph figure ``width`` by ``height`` pixels."""
    lay = state.layout
    right = float(lay.left[-1] + lay.width[-1])
    return ((width - MARGIN["l"] - MARGIN["r"]) / (right + 1),
            (height - MARGIN["t"] - MARGIN["b"]) / (lay.n_rows + 0.2))


def node_markers(state: ViewState, px: tuple[float, float] = (8.0, 25.0)) -> list[dict]:
    """Per kind (``KINDS`` order), the marker of its node trace (``px``: pixels per x unit
    and per row, see ``pixels``): size by influence, fill by kind and influence."""
    size = diameters(state.shown.nodes, "influence") * marker_sizes(state.layout, *px) / state.layout.size
    colour = fill_colours(state)
    return [{"size": size[rows].tolist(), "color": colour[rows].tolist(),
             "line": {"width": 0.5, "color": "#555555"}}
            for rows in (trace_rows(state, k) for k in KINDS)]


def backbone_links(state: ViewState) -> list[tuple[list, list]]:
    """Per link bin, the ``(x, y)`` of the shown graph's ``BACKBONE_LINKS`` strongest links
    by their share of their target's input (what the explorer draws on open)."""
    t, s = state.shown.adjacency.nonzero(as_tuple=True)
    share = state.share[t, s]
    strongest = share.abs().argsort(descending=True)[:BACKBONE_LINKS]
    t, s, share = t[strongest].numpy(), s[strongest].numpy(), share[strongest].numpy()
    return segments(state.layout.x, state.layout.y, s, t, link_bin(share))


def link_traces() -> list[go.Scatter]:
    """One empty line trace per link bin."""
    traces = []
    for b in range(N_BINS):
        colour, width = bin_style(b)
        traces.append(go.Scatter(x=[], y=[], mode="lines", hoverinfo="skip", showlegend=False,
                                 line={"color": colour, "width": width}, name=f"links {b}"))
    return traces


def text_trace(state: ViewState) -> go.Scatter:
    """The labels beside the top features and logits (``text_rows``); no hover."""
    rows = text_rows(state)
    names = state.names()
    logit = (state.shown.nodes["kind"] == "logit").to_numpy()[rows]
    # Logits sit side by side: their tokens alternate above and below to stay apart.
    where = ["bottom center" if is_logit and k % 2 else "top center"
             for k, is_logit in zip(np.cumsum(logit) - 1, logit)]
    text = [visible(str(state.shown.nodes["token"].iat[r])) if is_logit else short(names[r])
            for r, is_logit in zip(rows, logit)]
    return go.Scatter(x=state.layout.x[rows].tolist(), y=state.layout.y[rows].tolist(),
                      mode="text", text=[plain(t) for t in text], textposition=where, textfont={"size": 10, "color": "#333333"},
                      hoverinfo="skip", showlegend=False, name="labels")


def graph_figure(state: ViewState, height: int = 560, width: int = 820) -> go.Figure:
    """The attribution graph: link traces first (the strongest links), one node trace per
    kind (``KINDS`` order), then the text labels."""
    lay = state.layout
    hover = np.array(hover_texts(state), dtype=object)
    traces = link_traces()
    markers = node_markers(state, pixels(state, width, height))
    for k, marker in zip(KINDS, markers):
        rows = trace_rows(state, k)
        traces.append(go.Scatter(
            x=lay.x[rows].tolist(), y=lay.y[rows].tolist(), mode="markers", name=k,
            customdata=rows.tolist(),
            hovertext=hover[rows].tolist(), hoverinfo="text", opacity=OPACITY[k],
            marker={**marker, "symbol": SYMBOLS[k]}, showlegend=False))
    traces.append(text_trace(state))
    for b, (x, y) in enumerate(backbone_links(state)):
        traces[b].x, traces[b].y = x, y
    L = lay.n_rows - 2
    layer_text = ["Emb"] + [f"L{i}" for i in range(L)] + ["Logit"]
    right = float(lay.left[-1] + lay.width[-1])
    shapes = [{"type": "line", "x0": x - 0.3, "x1": x - 0.3, "y0": -0.5, "y1": L + 1.5,
               "line": {"color": "#eeeeee", "width": 1}} for x in lay.left[1:]]
    fig = go.Figure(traces)
    fig.update_layout(
        height=height, width=width, margin=MARGIN, plot_bgcolor="white",
        hovermode="closest", clickmode="event", dragmode="pan", shapes=shapes,
        xaxis={"tickvals": lay.ticks.tolist(), "ticktext": [plain(t) for t in lay.tick_text],
               "tickangle": -50, "showgrid": False, "zeroline": False, "range": [-0.5, right + 0.5]},
        yaxis={"tickvals": list(range(L + 2)), "ticktext": layer_text, "showgrid": True,
               "gridcolor": "#f4f4f4", "zeroline": False, "range": [-0.6, L + 1.6]})
    return fig
