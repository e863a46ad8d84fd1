"""``to_html``: one self-contained offline HTML file (Plotly's JavaScript inlined from the
installed ``plotly`` package, no CDN): prune sliders over a precomputed grid
(``grid.py``), links on hover, click-to-select with connections and feature cards, search,
pins, supernodes with an aggregated subgraph, labels, and a legend.

All data goes in as JSON inside ``<script type="application/json">`` with ``<``, ``>``,
``&`` and U+2028/U+2029 escaped, so no prompt or label can close the script or open a
comment; the viewer puts user text into the page only through ``textContent`` (and into
Plotly texts HTML-escaped). Edges travel as base64 typed arrays to keep the file small.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
from importlib.resources import files
from pathlib import Path

import numpy as np
import plotly.offline
from plotly.utils import PlotlyJSONEncoder

from ..cards import NO_EXAMPLES, FeatureCard, feature_card
from ..files import atomic_write_text
from ..graph import KINDS
from ..sidecar import FORMAT
from .card import card_data
from .figure import OPACITY, SYMBOLS, fill_colours, graph_figure, hover_details
from .grid import prune_grid
from .heads import heads_payload
from .layout import layout, rows
from .legend import BACKBONE_LINKS, LEGEND, MAX_LINKS, N_TEXT
from .links import MAGNITUDES, N_BINS, bin_style
from .state import ViewState, node_name, place

PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>%%TITLE%% · circuitlab</title>
<style>body { margin: 0; }
%%CSS%%</style></head><body>
<div id="cl-root"></div>
<script>%%PLOTLY%%</script>
<script id="cl-data" type="application/json">%%DATA%%</script>
<script>%%VIEWER%%
circuitlabViewer(document.getElementById("cl-root"), JSON.parse(document.getElementById("cl-data").textContent), null);</script>
</body></html>
"""
UNSAFE = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def front_end(name: str) -> str:
    """The text of one of the explorer's front-end files (``viewer.js``, ``viewer.css``)."""
    return (files(__package__) / name).read_text(encoding="utf-8")


def script_json(obj) -> str:
    """JSON that is safe inside a ``<script>`` element."""
    text = json.dumps(obj, cls=PlotlyJSONEncoder, separators=(",", ":"))
    return re.sub("[<>&\u2028\u2029]", lambda m: UNSAFE[m.group(0)], text)


def b64(array: np.ndarray) -> str:
    """A little-endian array's bytes in base64."""
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode()


def cards(state: ViewState) -> tuple[dict, list]:
    """Cards of the shown features, keyed ``"layer/feature"``, and the token table their
    contexts index into."""
    vocab: dict = {}
    out = {}
    feats = state.shown.nodes[state.shown.nodes["kind"] == "feature"]
    for r in feats.itertuples():
        key = f"{r.layer}/{r.feature}"
        if key in out:
            continue
        if state.examples is None:
            card = FeatureCard(r.layer, r.feature, message=NO_EXAMPLES)
        else:
            card = feature_card(None, int(r.layer), int(r.feature), examples=state.examples)
        tokens = state.outputs.get(r.node_id, {})
        card.top_tokens, card.bottom_tokens = tokens.get("raises", []), tokens.get("lowers", [])
        out[key] = card_data(card, vocab)
    return out, list(vocab)


def grid_data(state: ViewState) -> tuple[dict, dict]:
    """The prune grid (thresholds, counts, scores, a layout per node threshold) and the
    edges (rows, weights, grid codes) of the display graph."""
    base, g = state.shown, prune_grid(state.shown)
    n_layers = int(base.metadata.get("n_layers", base.nodes["layer"].max()))
    logits = base.target_mask.numpy()
    layouts = []
    for i in range(len(g.node)):
        shown = logits.copy()
        shown[g.sources[g.codes[:, i] < len(g.edge)]] = True
        lay = layout(base.nodes[shown], base.token_strs, n_layers)
        x, room = np.full(len(shown), np.nan), np.full(len(shown), np.nan)
        x[shown], room[shown] = lay.x, lay.room
        layouts.append({"x": np.round(x, 3).tolist(), "room": np.round(room, 5).tolist(),
                        "ticks": np.round(lay.ticks, 3).tolist(), "left": np.round(lay.left, 3).tolist(),
                        "right": float(lay.left[-1] + lay.width[-1])})
    codes = sum(g.codes[:, i].astype(np.uint32) << (3 * i) for i in range(len(g.node)))
    w = base.adjacency[g.targets, g.sources].numpy().astype("<f4")
    grid = {"node": g.node, "edge": g.edge, "default": g.default, "counts": g.counts.tolist(),
            "scores": np.round(g.scores, 6).tolist(), "layouts": layouts}
    edges = {"offsets": np.searchsorted(g.targets, np.arange(len(base.nodes) + 1)).tolist(),
             "src": b64(g.sources.astype("<u2" if len(base.nodes) < 2 ** 16 else "<u4")),
             "src_bytes": 2 if len(base.nodes) < 2 ** 16 else 4, "w": b64(w),
             "code": b64(codes.astype("<u4").view(np.uint8).reshape(-1, 4)[:, :3])}
    return grid, edges


def payload(state: ViewState, precompute: bool = True) -> dict:
    """Everything the viewer needs, for the display graph (``state`` at thresholds 1).

    ``precompute``: with the model, compute the head loadings and QK tables of the
    strongest links (``viz.heads``); without, only the loadings the graph stores."""
    nodes = state.shown.nodes
    records = nodes.to_dict("records")
    grid, edges = grid_data(state)
    layout_json = json.loads(graph_figure(state).to_json())["layout"]
    card_map, vocab = cards(state)
    return {
        "prompt": state.source.prompt, "tokens": list(state.shown.token_strs), "format": FORMAT,
        "kinds": list(KINDS),
        "symbols": SYMBOLS, "opacity": OPACITY, "max_links": MAX_LINKS, "n_text": N_TEXT,
        "nodes": {"id": state.ids, "auto": [node_name(r, {}, state.examples) for r in records],
                  "kind": nodes["kind"].tolist(), "layer": nodes["layer"].tolist(),
                  "pos": nodes["pos"].tolist(), "feature": nodes["feature"].tolist(),
                  "place": [place(k, l) for k, l in zip(nodes["kind"], nodes["layer"])],
                  "target": state.shown.target_mask.int().tolist(),
                  "influence": np.round(nodes["influence"].fillna(0).to_numpy(), 6).tolist(),
                  "activation": np.round(nodes["activation"].fillna(0).to_numpy(), 4).tolist(),
                  "y": rows(nodes, state.layout.n_rows - 2).tolist(),
                  "size": np.round(state.layout.size, 2).tolist(),
                  "fill": fill_colours(state).tolist(), "hover": hover_details(state)},
        "grid": grid, "edges": edges,
        "bins": {"magnitudes": MAGNITUDES, "colours": [bin_style(b)[0] for b in range(N_BINS)],
                 "widths": [bin_style(b)[1] for b in range(N_BINS)]},
        "layout": {k: layout_json[k] for k in ("xaxis", "yaxis", "margin", "hovermode", "dragmode")},
        "heads": heads_payload(state.shown, state.rm if precompute else None),
        "cards": card_map, "vocab": vocab, "legend": LEGEND, "backbone_links": BACKBONE_LINKS,
        "no_examples": NO_EXAMPLES,
        "labels": dict(state.labels), "pinned": list(state.pinned),
        "supernodes": {k: list(v) for k, v in state.supernodes.items()},
    }


def to_html(graph, path: str | os.PathLike, rm=None, *, prune: bool = True) -> Path:
    """Write ``graph`` as a single self-contained HTML viewer that works offline.

    Args:
        graph: the ``Graph`` (its labels, supernodes and pins are included).
        path: the ``.html`` file to write (atomically).
        rm: optional ``ReplacementModel``: the features' output tokens (hovers, cards), and
            the head loadings and QK tables of the strongest links (``viz.heads``; without
            it, the file shows the loadings the graph stores).
        prune: prune an unpruned graph for display first (``graph.prune()`` defaults); the
            sliders then prune that display graph further, starting at a few hundred
            features at most.

    Returns:
        The path written.
    """
    state = ViewState(graph, prune, rm)
    state.set_thresholds(1.0, 1.0)
    title = html.escape(graph.prompt).replace("\u2028", "&#8232;").replace("\u2029", "&#8233;")
    parts = {"TITLE": title, "CSS": front_end("viewer.css"), "PLOTLY": plotly.offline.get_plotlyjs(),
             "DATA": script_json(payload(state)), "VIEWER": front_end("viewer.js")}
    path = Path(path)
    atomic_write_text(path, re.sub(r"%%(\w+)%%", lambda m: parts[m.group(1)], PAGE))
    return path
