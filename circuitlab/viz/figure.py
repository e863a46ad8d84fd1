"""The Plotly figures: the graph (nodes per kind above binned link traces) and the
pinned subgraph. Every user-visible text is HTML-escaped, since Plotly renders some tags.
"""

from __future__ import annotations

import html

import numpy as np
import plotly.colors
import plotly.graph_objects as go

from ..graph import KINDS
from .links import N_BINS, bin_style, link_bin, segments, share_colour
from .state import ViewState

SYMBOLS = {"feature": "circle", "error": "diamond", "embedding": "square", "logit": "square"}
FILL = {"error": "#b0b0b0", "embedding": "#7f9cc0", "logit": "#e0904a"}
OPACITY = {"feature": 0.95, "error": 0.45, "embedding": 0.95, "logit": 0.95}
SELECTED, PINNED = "#111111", "#d4a017"


def plain(text: str) -> str:
    """``text`` escaped for Plotly, which renders some HTML tags in texts (quotes are safe)."""
    return html.escape(text, quote=False)
METRICS = ("influence", "activation")


def hover_texts(state: ViewState) -> list[str]:
    """Hover text per shown node: name, place, activation, influence, top output tokens."""
    nodes = state.shown.nodes
    member = {i: name for name, ids in state.supernodes.items() for i in ids}
    out = []
    for name, r in zip(state.names(), nodes.to_dict("records")):
        lines = [f"<b>{plain(name)}</b>"]
        if state.labels.get(r["node_id"]) and r["kind"] == "feature":
            lines.append(f"L{r['layer']}/F{r['feature']}")
        lines.append(f"{r['kind']} · pos {r['pos']} {plain(repr(str(r['token'])))}")
        lines.append(f"activation {r['activation']:.3g} · influence {r['influence']:.3g}")
        if r["kind"] == "logit":
            lines.append(f"probability {r['prob']:.3f}")
        if r["node_id"] in state.outputs:
            lines.append("top tokens: " + plain(", ".join(map(repr, state.outputs[r["node_id"]]))))
        if r["node_id"] in member:
            lines.append(f"supernode: {plain(member[r['node_id']])}")
        out.append("<br>".join(lines))
    return out


def node_style(state: ViewState, size_by: str = "influence", colour_by: str = "influence") -> dict:
    """Per shown node: ``size``, ``colour``, ``line_width`` and ``line_colour`` arrays."""
    nodes = state.shown.nodes
    kind = nodes["kind"].to_numpy()
    feature = kind == "feature"

    def scaled(metric):
        v = np.nan_to_num(nodes[metric].to_numpy(dtype=float)).clip(min=0)
        top = v[feature].max() if feature.any() else 1.0
        return np.sqrt(v / top).clip(max=1) if top > 0 else np.zeros_like(v)

    size = np.where(feature, 5 + 13 * scaled(size_by), np.where(kind == "error", 8, 12))
    fill = plotly.colors.sample_colorscale("Oranges", list(0.25 + 0.75 * scaled(colour_by)))
    colour = np.array([fill[i] if k == "feature" else FILL[k] for i, k in enumerate(kind)], dtype=object)
    for j, share in state.neighbour_shares().items():
        colour[j] = share_colour(share)
    line_width = np.full(len(kind), 0.5)
    line_colour = np.full(len(kind), "#555555", dtype=object)
    for i in state.focus():
        selected = state.ids[i] == state.selected
        line_width[i], line_colour[i] = 3.0, SELECTED if selected else PINNED
    return {"size": size, "colour": colour, "line_width": line_width, "line_colour": line_colour}


def node_updates(state: ViewState, size_by: str, colour_by: str) -> list[dict]:
    """Per kind (``KINDS`` order), the marker of its node trace."""
    style = node_style(state, size_by, colour_by)
    kind = state.shown.nodes["kind"].to_numpy()
    out = []
    for k in KINDS:
        rows = np.flatnonzero(kind == k)
        out.append({"size": style["size"][rows].tolist(), "color": style["colour"][rows].tolist(),
                    "line": {"width": style["line_width"][rows].tolist(),
                             "color": style["line_colour"][rows].tolist()}})
    return out


def link_updates(state: ViewState) -> list[tuple[list, list]]:
    """Per link bin, the ``(x, y)`` of the focused nodes' links."""
    s, t, share = state.links()
    return segments(state.layout.x, state.layout.y, s, t, link_bin(share))


def link_traces() -> list[go.Scatter]:
    """One empty line trace per link bin."""
    traces = []
    for b in range(N_BINS):
        colour, width = bin_style(b)
        traces.append(go.Scatter(x=[], y=[], mode="lines", hoverinfo="skip", showlegend=False,
                                 line={"color": colour, "width": width}, name=f"links {b}"))
    return traces


def graph_figure(state: ViewState, size_by: str = "influence", colour_by: str = "influence",
                 height: int = 560) -> go.Figure:
    """The attribution graph: link traces first, then one node trace per kind."""
    lay, nodes = state.layout, state.shown.nodes
    kind = nodes["kind"].to_numpy()
    hover = np.array(hover_texts(state), dtype=object)
    traces = link_traces()
    for k, marker in zip(KINDS, node_updates(state, size_by, colour_by)):
        rows = np.flatnonzero(kind == k)
        traces.append(go.Scatter(
            x=lay.x[rows].tolist(), y=lay.y[rows].tolist(), mode="markers", name=k,
            customdata=rows.tolist(),
            hovertext=hover[rows].tolist(), hoverinfo="text", opacity=OPACITY[k],
            marker={**marker, "symbol": SYMBOLS[k]}, showlegend=False))
    for b, (x, y) in enumerate(link_updates(state)):
        traces[b].x, traces[b].y = x, y
    L = lay.n_rows - 2
    layer_text = ["Emb"] + [f"L{i}" for i in range(L)] + ["Logit"]
    right = float(lay.left[-1] + lay.width[-1])
    shapes = [{"type": "line", "x0": x - 0.3, "x1": x - 0.3, "y0": -0.5, "y1": L + 1.5,
               "line": {"color": "#eeeeee", "width": 1}} for x in lay.left[1:]]
    fig = go.Figure(traces)
    fig.update_layout(
        height=height, margin={"l": 50, "r": 10, "t": 10, "b": 90}, plot_bgcolor="white",
        hovermode="closest", clickmode="event", dragmode="pan", shapes=shapes,
        xaxis={"tickvals": lay.ticks.tolist(), "ticktext": [plain(t) for t in lay.tick_text],
               "tickangle": -50, "showgrid": False, "zeroline": False, "range": [-0.5, right + 0.5]},
        yaxis={"tickvals": list(range(L + 2)), "ticktext": layer_text, "showgrid": True,
               "gridcolor": "#f4f4f4", "zeroline": False, "range": [-0.6, L + 1.6]})
    return fig


def subgraph_figure(state: ViewState, height: int = 320) -> go.Figure:
    """The pinned nodes (supernodes merged) in a layered layout with aggregated edges."""
    units, edges = state.subgraph()
    fig = go.Figure(link_traces())
    if units:
        # Layered: rows as in the graph; within a row, units ordered by x and spread evenly.
        ys = np.array([u["y"] for u in units])
        xs = np.zeros(len(units))
        for y in np.unique(ys):
            same = np.flatnonzero(ys == y)
            order = same[np.argsort([units[i]["x"] for i in same])]
            xs[order] = (np.arange(len(order)) + 1) / (len(order) + 1)
        bins = link_bin([e["share"] for e in edges])
        for b, (x, y) in enumerate(segments(xs, ys, [e["source"] for e in edges],
                                            [e["target"] for e in edges], bins)):
            fig.data[b].x, fig.data[b].y = x, y
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="markers+text", text=[plain(u["name"]) for u in units],
            textposition="top center", hoverinfo="text", showlegend=False,
            hovertext=[plain(f"{u['name']}: {len(u['members'])} node(s)") for u in units],
            marker={"size": [18 if u["supernode"] else 11 for u in units],
                    "symbol": ["hexagon" if u["supernode"] else "circle" for u in units],
                    "color": ["#8e6bbf" if u["supernode"] else "#e0904a" for u in units]}))
    fig.update_layout(height=height, margin={"l": 10, "r": 10, "t": 10, "b": 10},
                      plot_bgcolor="white", xaxis={"visible": False, "range": [0, 1]},
                      yaxis={"visible": False}, showlegend=False)
    return fig
