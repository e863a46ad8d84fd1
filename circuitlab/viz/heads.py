"""The explorer's attention views as the viewer's JSON: the head loadings of links (which
heads carry an edge) and the QK tables of heads (why a head attends where it does).

An HTML file carries them precomputed within a budget: the loadings of the display graph's
``HEAD_LINKS`` strongest links (by share of their target's input; every link whose loadings
the graph stores), each with its ``HEADS_PER_LINK`` strongest heads, and the QK tables of
the ``QK_TABLES`` strongest head paths among them (``QK_PAIRS`` pairs each, and the head's
attention row). That is a few hundred kilobytes at most. A notebook explorer with the model
computes what is missing when it is clicked.
"""

from __future__ import annotations

import math

import torch

from ..attention import head_loadings
from ..qk import attention_row, qk

#: The HTML file's budget (see the module docstring).
HEAD_LINKS = 150
HEADS_PER_LINK = 6
QK_TABLES = 12
QK_PAIRS = 10
ROW_KEYS = 8


def link_key(source: str, target: str) -> str:
    """The viewer's key of a link."""
    return f"{source}>{target}"


def qk_key(layer: int, head: int, query_pos: int, key_pos: int) -> str:
    """The viewer's key of a QK table."""
    return f"{layer}/{head}/{query_pos}/{key_pos}"


def loadings_data(table) -> dict:
    """``link key -> [[kind, layer, head, weight], ...]`` of a head-loading table."""
    out: dict = {}
    for s, t, kind, layer, head, w in zip(*(table[c].to_numpy() for c in
                                            ("source", "target", "kind", "layer", "head", "weight"))):
        out.setdefault(link_key(s, t), []).append([kind, int(layer), int(head), round(float(w), 6)])
    return out


def qk_data(rm, graph, layer: int, head: int, query_pos: int, key_pos: int) -> dict:
    """One QK table and the head's attention row from the query, as the viewer draws them."""
    table = qk(rm, graph, layer, head, query_pos, key_pos, top=QK_PAIRS)
    row = attention_row(rm, graph, layer, head, query_pos).head(ROW_KEYS)
    finite = lambda x: None if not math.isfinite(x) else round(float(x), 6)  # noqa: E731
    return {"layer": layer, "head": head, "q": query_pos, "k": key_pos,
            "score": finite(table.attrs["score"]), "probability": finite(table.attrs["probability"]),
            "top_share": finite(table.attrs["top_share"]),
            "pairs": [[r.query, r.query_node, r.key, r.key_node, round(r.contribution, 6)]
                      for r in table.itertuples()],
            "row": [[int(r.key_pos), r.token, finite(r.score), finite(r.probability)]
                    for r in row.itertuples()]}


def strongest_links(graph, n: int) -> list[tuple[str, str]]:
    """The ``n`` links with the largest share of their target's input (``|w| / sum |w|``),
    as ``(source_id, target_id)``."""
    adj = graph.adjacency.abs()
    share = adj / adj.sum(1, keepdim=True).clamp_min(1e-30)
    t, s = (adj != 0).nonzero(as_tuple=True)
    order = share[t, s].argsort(descending=True)[:n]
    ids = graph.nodes["node_id"].to_numpy()
    return [(ids[s[i]], ids[t[i]]) for i in order.tolist()]


def heads_payload(graph, rm=None) -> dict:
    """The precomputed attention views of ``graph`` (the display graph): its stored
    loadings, plus (with the model) those of its strongest links and the QK tables of
    their strongest head paths."""
    stored = graph.loadings
    out = {"loadings": {} if stored is None else loadings_data(stored), "qk": {},
           "budget": {"links": HEAD_LINKS, "heads": HEADS_PER_LINK, "qk": QK_TABLES}}
    if rm is None:
        return out
    have = set(out["loadings"])
    links = [e for e in strongest_links(graph, HEAD_LINKS) if link_key(*e) not in have]
    table = head_loadings(rm, graph, links, top=HEADS_PER_LINK) if links else None
    if table is not None:
        out["loadings"].update(loadings_data(table))
    pos = dict(zip(graph.nodes["node_id"], graph.nodes["pos"]))
    paths: dict = {}
    for key, rows in out["loadings"].items():
        source, target = key.split(">")
        for kind, layer, head, w in rows:
            if kind == "head":
                k = (layer, head, int(pos[target]), int(pos[source]))
                paths[k] = max(paths.get(k, 0.0), abs(w))
    for k in sorted(paths, key=paths.get, reverse=True)[:QK_TABLES]:
        with torch.no_grad():
            out["qk"][qk_key(*k)] = qk_data(rm, graph, *k)
    return out
