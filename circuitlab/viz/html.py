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
from .layout import layout, rows
from .legend import LEGEND, MAX_LINKS, N_TEXT
from .links import MAGNITUDES, N_BINS, bin_style
from .state import ViewState, node_name, place

PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>%%TITLE%% · circuitlab</title>
<style>
body { font-family: system-ui, sans-serif; margin: 0; display: flex; flex-direction: column; height: 100vh; font-size: 13px; }
header { padding: 4px 10px; border-bottom: 1px solid #ddd; display: flex; flex-wrap: wrap; gap: 4px 14px; align-items: center; }
header label { white-space: nowrap; } header input[type=range] { width: 110px; vertical-align: middle; }
details.cl-legend-box { padding: 0 10px; border-bottom: 1px solid #ddd; } details.cl-legend-box summary { cursor: pointer; padding: 2px 0; }
main { display: flex; flex: 1; min-height: 0; }
#cl-wrap { flex: 1 1 66%; min-width: 0; position: relative; }
#cl-links { position: absolute; left: 0; top: 0; width: 100%; height: 100%; pointer-events: none; }
#cl-plot { position: absolute; left: 0; top: 0; width: 100%; height: 100%; }
aside { flex: 0 0 34%; overflow-y: auto; border-left: 1px solid #ddd; padding: 4px 10px; font-size: 12px; }
.cl-title { font-weight: bold; margin-top: 8px; } .cl-heading { font-weight: bold; font-size: 13px; }
.cl-row { font-family: monospace; white-space: pre; cursor: pointer; padding: 1px 2px; overflow: hidden; text-overflow: ellipsis; }
.cl-row:hover { background: #f0e6d8; } .cl-muted { color: #777; } .cl-error { color: #b00; }
.cl-ctx { font-family: monospace; font-size: 12px; margin: 2px 0; white-space: pre-wrap; }
#cl-search-results { max-height: 160px; overflow-y: auto; }
</style></head><body>
<header><b id="cl-title">%%TITLE%%</b>
<span id="cl-counts"></span><span id="cl-scores"></span>
<label>node threshold <input id="cl-node" type="range" min="0" step="1"> <span id="cl-node-value"></span></label>
<label>edge threshold <input id="cl-edge" type="range" min="0" step="1"> <span id="cl-edge-value"></span></label>
<label>links <select id="cl-linktype"><option>both</option><option>input</option><option>output</option></select></label>
<span id="cl-drawn"></span></header>
<details class="cl-legend-box"><summary>Legend: what the glyphs, sizes, colours and links mean</summary>%%LEGEND%%</details>
<main><div id="cl-wrap"><svg id="cl-links"></svg><div id="cl-plot"></div></div>
<aside><input id="cl-search" placeholder="search a label, token or node id" style="width:95%">
<div id="cl-search-results"></div><div id="cl-status"></div>
<div id="cl-selection"><i>hover a node for its links; click to select it (shift-click pins it)</i></div>
<div id="cl-node-tools" hidden><button id="cl-pin">pin / unpin</button>
<input id="cl-label" placeholder="label of the selected node"><button id="cl-set-label">set label</button></div>
<div id="cl-card"></div><div id="cl-connections"></div>
<div class="cl-title">Subgraph: pinned nodes and supernodes</div><div id="cl-pinned"></div>
<div><input id="cl-group-name" placeholder="supernode name"><button id="cl-group">group pinned</button></div>
<div id="cl-supernodes"></div><div id="cl-subscores"></div><div id="cl-subplot" style="height:260px"></div>
<button id="cl-download">download labels.json</button></aside></main>
<script>%%PLOTLY%%</script>
<script id="cl-data" type="application/json">%%DATA%%</script>
<script>%%VIEWER%%</script>
</body></html>
"""
UNSAFE = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


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
    logits = (base.nodes["kind"] == "logit").to_numpy()
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
            "scores": np.round(g.scores, 4).tolist(), "layouts": layouts}
    edges = {"offsets": np.searchsorted(g.targets, np.arange(len(base.nodes) + 1)).tolist(),
             "src": b64(g.sources.astype("<u2" if len(base.nodes) < 2 ** 16 else "<u4")),
             "src_bytes": 2 if len(base.nodes) < 2 ** 16 else 4, "w": b64(w),
             "code": b64(codes.astype("<u4").view(np.uint8).reshape(-1, 4)[:, :3])}
    return grid, edges


def payload(state: ViewState) -> dict:
    """Everything the viewer needs, for the display graph (``state`` at thresholds 1)."""
    nodes = state.shown.nodes
    records = nodes.to_dict("records")
    grid, edges = grid_data(state)
    layout_json = json.loads(graph_figure(state).to_json())["layout"]
    card_map, vocab = cards(state)
    return {
        "prompt": state.source.prompt, "format": FORMAT, "kinds": list(KINDS),
        "symbols": SYMBOLS, "opacity": OPACITY, "max_links": MAX_LINKS, "n_text": N_TEXT,
        "nodes": {"id": state.ids, "auto": [node_name(r, {}, state.examples) for r in records],
                  "kind": nodes["kind"].tolist(), "layer": nodes["layer"].tolist(),
                  "pos": nodes["pos"].tolist(), "feature": nodes["feature"].tolist(),
                  "place": [place(k, l) for k, l in zip(nodes["kind"], nodes["layer"])],
                  "influence": np.round(nodes["influence"].fillna(0).to_numpy(), 6).tolist(),
                  "activation": np.round(nodes["activation"].fillna(0).to_numpy(), 4).tolist(),
                  "y": rows(nodes, state.layout.n_rows - 2).tolist(),
                  "size": np.round(state.layout.size, 2).tolist(),
                  "fill": fill_colours(state).tolist(), "hover": hover_details(state)},
        "grid": grid, "edges": edges,
        "bins": {"magnitudes": MAGNITUDES, "colours": [bin_style(b)[0] for b in range(N_BINS)],
                 "widths": [bin_style(b)[1] for b in range(N_BINS)]},
        "layout": {k: layout_json[k] for k in ("xaxis", "yaxis", "margin", "hovermode", "dragmode")},
        "cards": card_map, "vocab": vocab,
        "labels": dict(state.labels), "pinned": list(state.pinned),
        "supernodes": {k: list(v) for k, v in state.supernodes.items()},
    }


def to_html(graph, path: str | os.PathLike, rm=None, *, prune: bool = True) -> Path:
    """Write ``graph`` as a single self-contained HTML viewer that works offline.

    Args:
        graph: the ``Graph`` (its labels, supernodes and pins are included).
        path: the ``.html`` file to write (atomically).
        rm: optional ``ReplacementModel`` for the features' output tokens (hovers, cards).
        prune: prune an unpruned graph for display first (``graph.prune()`` defaults); the
            sliders then prune that display graph further, starting at a few hundred
            features at most.

    Returns:
        The path written.
    """
    state = ViewState(graph, prune, rm)
    state.set_thresholds(1.0, 1.0)
    title = html.escape(graph.prompt).replace("\u2028", "&#8232;").replace("\u2029", "&#8233;")
    parts = {"TITLE": title, "LEGEND": LEGEND, "PLOTLY": plotly.offline.get_plotlyjs(),
             "DATA": script_json(payload(state)),
             "VIEWER": (files(__package__) / "viewer.js").read_text(encoding="utf-8")}
    path = Path(path)
    atomic_write_text(path, re.sub(r"%%(\w+)%%", lambda m: parts[m.group(1)], PAGE))
    return path
