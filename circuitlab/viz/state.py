"""What the explorer shows, without any widget: the display graph (pruned once for
display, then at the thresholds), node names and output tokens, and the annotations.
The interactive part (selection, links, connections, subgraph, scores at other
thresholds) is the front end's (``viewer.js``).

Annotations (labels, supernodes, pins) live on the source graph (``graph.labels``,
``graph.supernodes``, ``graph.pinned``) and are written to its ``labels.json`` sidecar
after every change when the graph has a folder (``graph.path``).
"""

from __future__ import annotations

import pandas as pd
import torch

from ..cards import Examples, find_examples
from ..presets import DEFAULT_BUNDLE
from ..prompts import unembedding
from ..graph import Graph
from ..errors import CircuitlabError
from .. import sidecar
from .grid import default_thresholds
from .layout import layout, visible
from .links import shares

def node_name(row: dict, labels: dict, examples: Examples | None = None) -> str:
    """A node's short name: the user's label, else a feature's automatic label (from
    ``examples``), else ``L{layer}/F{feature}`` and the like."""
    if labels.get(row["node_id"]):
        return labels[row["node_id"]]
    if row["kind"] == "feature" and examples is not None:
        auto = examples.label(row["layer"], row["feature"])
        if auto:
            return auto
    return {"feature": f"L{row['layer']}/F{row['feature']}",
            "error": f"Error L{row['layer']}",
            "embedding": f"Emb {visible(str(row['token']))}",
            "logit": f"Logit {visible(str(row['token']))}",
            "direction": f"Direction {row['token']}"}[row["kind"]]


def place(kind: str, layer: int) -> str:
    """Where a node sits, for lists: ``L{layer}``, ``Emb`` or ``Out``."""
    return {"embedding": "Emb", "logit": "Out"}.get(kind, f"L{layer}")


def output_tokens(rm, nodes: pd.DataFrame, k: int = 5, chunk: int = 128) -> dict:
    """Per feature node id, ``{"raises": [(token, effect), ...], "lowers": [...]}``: the
    ``k`` tokens its decoder direction raises and lowers most through the unembedding (as
    ``circuitlab.cards.output_tokens``), batched over features."""
    out = {}
    feats = nodes[nodes["kind"] == "feature"]
    W_U = unembedding(rm).detach().float()
    for layer, group in feats.groupby("layer"):
        W_dec = rm.decoder(int(layer)).detach().float()
        for start in range(0, len(group), chunk):
            part = group.iloc[start:start + chunk]
            effect = W_dec[torch.tensor(part["feature"].to_numpy())] @ W_U
            up, down = effect.topk(k), (-effect).topk(k)
            for n, node_id in enumerate(part["node_id"]):
                out[node_id] = {
                    "raises": [(rm.token_str(i), v) for i, v in zip(up.indices[n].tolist(), up.values[n].tolist())],
                    "lowers": [(rm.token_str(i), -v) for i, v in zip(down.indices[n].tolist(), down.values[n].tolist())]}
    return out


class ViewState:
    """The display graph and its annotations, for the HTML export, the notebook explorer
    and the static figure.

    Args:
        graph: the graph to show (its annotations are edited in place).
        prune: prune an unpruned graph once for display (default thresholds); the
            thresholds then prune this display base further.
        rm: optional ``ReplacementModel`` for top output tokens and feature cards.

    With ``prune`` it starts at ``default_thresholds`` (a few hundred features at most),
    else at thresholds 1 (everything).
    """

    def __init__(self, graph: Graph, prune: bool = True, rm=None):
        self.source = graph
        self.rm = rm
        self.base = graph.prune() if prune and not graph.metadata.get("pruned") else graph
        self.outputs = output_tokens(rm, self.base.nodes) if rm is not None else {}
        bundled = graph.metadata.get("transcoders") in DEFAULT_BUNDLE.values()
        self.examples = find_examples(rm)[0] if rm is not None or bundled else None
        self.set_thresholds(*(default_thresholds(self.base) if prune else (1.0, 1.0)))

    # ------------------------------------------------------------------ display graph

    def set_thresholds(self, node_threshold: float, edge_threshold: float) -> None:
        """Prune the display base to these thresholds (1 and 1 show all of it)."""
        self.node_threshold, self.edge_threshold = float(node_threshold), float(edge_threshold)
        full = self.node_threshold >= 1 and self.edge_threshold >= 1
        self.shown = self.base if full else self.base.prune(self.node_threshold, self.edge_threshold)
        self.ids = self.shown.nodes["node_id"].tolist()
        self.row = {n: i for i, n in enumerate(self.ids)}
        n_layers = int(self.shown.metadata.get("n_layers", self.shown.nodes["layer"].max()))
        self.layout = layout(self.shown.nodes, self.shown.token_strs, n_layers)
        self.share = shares(self.shown.adjacency)

    def counts(self) -> dict:
        """Nodes and edges shown and in the display base."""
        return {"nodes": len(self.ids), "edges": self.shown.n_edges,
                "base_nodes": len(self.base.nodes), "base_edges": self.base.n_edges}

    # ------------------------------------------------------------------ pins

    def check_ids(self, ids) -> list[str]:
        """``ids`` (one id or several) as a list, each a node of the source graph."""
        ids = [ids] if isinstance(ids, str) else list(ids)
        known = set(self.source.nodes["node_id"])
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise CircuitlabError(f"Unknown node id(s) {unknown}; see graph.nodes.node_id.")
        return ids

    @property
    def pinned(self) -> list[str]:
        return self.source.pinned

    def pin(self, ids) -> None:
        """Pin nodes (they join the subgraph and show their links)."""
        self.source.pinned.extend(i for i in self.check_ids(ids) if i not in self.source.pinned)
        self.save()

    def unpin(self, ids) -> None:
        """Unpin nodes."""
        drop = set(self.check_ids(ids))
        self.source.pinned[:] = [i for i in self.source.pinned if i not in drop]
        self.save()

    # ------------------------------------------------------------------ supernodes and labels

    @property
    def supernodes(self) -> dict:
        return self.source.supernodes

    @property
    def labels(self) -> dict:
        return self.source.labels

    def group(self, ids, name: str) -> None:
        """Group nodes into the supernode ``name`` (they are pinned too)."""
        ids = list(dict.fromkeys(self.check_ids(ids)))
        if not ids:
            raise CircuitlabError("A supernode needs at least one node; pin some and group them.")
        if not isinstance(name, str) or not name.strip():
            raise CircuitlabError("A supernode needs a non-empty name.")
        if name in self.supernodes:
            raise CircuitlabError(f"A supernode {name!r} exists already; pick another name or "
                                  "ungroup it first.")
        taken = {i: s for s, members in self.supernodes.items() for i in members}
        if any(i in taken for i in ids):
            clash = {i: taken[i] for i in ids if i in taken}
            raise CircuitlabError(f"Nodes already in a supernode: {clash}; ungroup those first.")
        self.supernodes[name] = ids
        self.pin(ids)

    def rename(self, old: str, new: str) -> None:
        """Rename supernode ``old`` to ``new``."""
        members = self.ungroup(old)
        try:
            self.group(members, new)
        except CircuitlabError:
            self.supernodes[old] = members
            self.save()
            raise

    def ungroup(self, name: str) -> list[str]:
        """Dissolve supernode ``name`` (its nodes stay pinned); returns its members."""
        if name not in self.supernodes:
            raise CircuitlabError(f"No supernode {name!r}; supernodes: {sorted(self.supernodes)}.")
        members = self.supernodes.pop(name)
        self.save()
        return members

    def label(self, node_id: str, text: str) -> None:
        """Label a node (an empty text removes the label)."""
        self.check_ids(node_id)
        if text.strip():
            self.labels[node_id] = text.strip()
        else:
            self.labels.pop(node_id, None)
        self.save()

    def save(self) -> None:
        """Write the sidecar if the graph has a folder."""
        if self.source.path is not None:
            sidecar.write(self.source.path, self.source.annotations())

    # ------------------------------------------------------------------ names

    def names(self) -> list[str]:
        """Short names of the shown nodes."""
        return [node_name(r, self.labels, self.examples) for r in self.shown.nodes.to_dict("records")]
