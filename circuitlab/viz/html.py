"""``to_html``: one self-contained offline HTML file (Plotly's JavaScript inlined from the
installed ``plotly`` package, no CDN) with hover, click-to-select and connections, pins,
supernodes and labels as saved.

All data goes in as JSON inside ``<script type="application/json">`` with ``<``, ``>``,
``&`` and U+2028/U+2029 escaped, so no prompt or label can close the script or open a
comment; the viewer puts user text into the page only through ``textContent``.
"""

from __future__ import annotations

import html
import json
import os
import re
from importlib.resources import files
from pathlib import Path

import numpy as np
import plotly.offline
from plotly.utils import PlotlyJSONEncoder

from ..files import atomic_write_text
from .figure import graph_figure
from .links import N_BINS, bin_style, link_bin
from .state import ViewState, place

PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>%%TITLE%% · circuitlab</title>
<style>
body { font-family: system-ui, sans-serif; margin: 0; display: flex; flex-direction: column; height: 100vh; }
header { padding: 6px 12px; border-bottom: 1px solid #ddd; font-size: 14px; }
main { display: flex; flex: 1; min-height: 0; }
#cl-plot { flex: 1 1 68%; min-width: 0; }
aside { flex: 0 0 32%; overflow-y: auto; border-left: 1px solid #ddd; padding: 6px 10px; font-size: 12px; }
.cl-title { font-weight: bold; margin-top: 8px; } .cl-heading { font-weight: bold; font-size: 13px; }
.cl-row { font-family: monospace; white-space: pre; cursor: pointer; padding: 1px 2px; }
.cl-row:hover { background: #f0e6d8; }
</style></head><body>
<header><b>%%TITLE%%</b> · <span id="cl-counts" data-nodes="%%NODES%%" data-links="%%LINKS%%">%%NODES%% nodes · %%LINKS%% links</span>
 · <span id="cl-drawn"></span> · links <select id="cl-linktype"><option>both</option><option>input</option><option>output</option></select>
 <button id="cl-pin">pin / unpin selected</button> · %%SCORES%%</header>
<main><div id="cl-plot"></div>
<aside><div id="cl-connections"></div><div class="cl-title">Pinned</div><div id="cl-pinned"></div>
<div class="cl-title">Supernodes</div><div id="cl-supernodes"></div></aside></main>
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


def payload(state: ViewState) -> dict:
    """Everything the viewer needs: the figure, nodes, all shown links (with bins) and
    the saved pins and supernodes."""
    shown = state.shown
    t, s = shown.adjacency.nonzero(as_tuple=True)
    w = shown.adjacency[t, s].numpy()
    nodes = shown.nodes
    return {
        "figure": json.loads(graph_figure(state).update_layout(height=None, autosize=True).to_json()),
        "n_bins": N_BINS, "bin_colours": [bin_style(b)[0] for b in range(N_BINS)],
        "nodes": [{"id": i, "name": name, "place": place(kind, layer), "pos": int(pos)} for i, name, kind, layer, pos
                  in zip(state.ids, state.names(), nodes["kind"], nodes["layer"], nodes["pos"])],
        "x": np.round(state.layout.x, 3).tolist(), "y": state.layout.y.tolist(),
        "links": {"s": s.tolist(), "t": t.tolist(), "w": [float(f"{v:.4g}") for v in w],
                  "b": link_bin(state.share[t, s].numpy()).tolist()},
        "pinned": list(state.pinned), "supernodes": dict(state.supernodes),
    }


def to_html(graph, path: str | os.PathLike, rm=None, *, prune: bool = True) -> Path:
    """Write ``graph`` as a single self-contained HTML viewer that works offline.

    Args:
        graph: the ``Graph`` (its labels, supernodes and pins are included).
        path: the ``.html`` file to write (atomically).
        rm: optional ``ReplacementModel`` for top output tokens in the hovers.
        prune: prune an unpruned graph for display first (``graph.prune()`` defaults).

    Returns:
        The path written.
    """
    state = ViewState(graph, prune, rm)
    s = state.scores()["graph"]
    parts = {
        "TITLE": html.escape(graph.prompt).replace("\u2028", "&#8232;").replace("\u2029", "&#8233;"), "NODES": str(len(state.ids)), "LINKS": str(state.shown.n_edges),
        "SCORES": f"replacement {s['replacement']:.3f} · completeness {s['completeness']:.3f}",
        "PLOTLY": plotly.offline.get_plotlyjs(), "DATA": script_json(payload(state)),
        "VIEWER": (files(__package__) / "viewer.js").read_text(encoding="utf-8"),
    }
    path = Path(path)
    atomic_write_text(path, re.sub(r"%%(\w+)%%", lambda m: parts[m.group(1)], PAGE))
    return path
