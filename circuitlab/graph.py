"""The attribution ``Graph``: nodes, a dense adjacency, save/load and exports.

Nodes come in a fixed order: features, error nodes (one per ``(layer, pos)``), token
embeddings (one per position), logit targets. Node ids follow Neuronpedia's scheme:
``"{layer}_{feature}_{pos}"`` for features, ``"{layer}_-1_{pos}"`` for error nodes,
``"E_{token_id}_{pos}"`` for embeddings and ``"{n_layers+1}_{token_id}_{pos}"`` for logits
(a logit difference or custom direction gets a negative id ``-2 - i``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import networkx as nx
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from .loading import CircuitlabError

NODE_COLUMNS = ["node_id", "kind", "layer", "pos", "feature", "activation", "token", "prob", "influence"]
KINDS = ("feature", "error", "embedding", "logit")


class Graph:
    """An attribution graph.

    Attributes:
        prompt: the traced text.
        tokens: token ids (BOS first).
        token_strs: the tokens as text.
        nodes: DataFrame with columns ``node_id, kind, layer, pos, feature, activation,
            token, prob, influence``. Embeddings have layer -1 and logits layer ``n_layers``.
        adjacency: ``[target, source]`` edge weights, ``[n_nodes, n_nodes]``.
        inputs: each target's input (feature pre-activation or demeaned logit); 0 otherwise.
        constants: each target's constant part: ``adjacency[t].sum() + constants[t] == inputs[t]``.
        metadata: model, transcoders and attribution settings.
        labels: node_id -> user label.
        supernodes: name -> node ids grouped under it.
        pinned: node ids pinned in the explorer.
        path: the folder the graph was loaded from or saved to (its ``labels.json``
            sidecar keeps labels, supernodes and pins), or ``None``.
    """

    def __init__(self, prompt, tokens, token_strs, rows, adjacency, inputs, constants, metadata):
        self.prompt = prompt
        self.tokens = list(tokens)
        self.token_strs = list(token_strs)
        nodes = pd.DataFrame(rows)
        if "influence" not in nodes:
            nodes["influence"] = float("nan")
        self.nodes = nodes[NODE_COLUMNS].reset_index(drop=True).astype(
            {"layer": "int64", "pos": "int64", "feature": "int64", "activation": "float64",
             "prob": "float64", "influence": "float64"})
        self.adjacency = adjacency
        self.inputs = inputs
        self.constants = constants
        self.metadata = dict(metadata)
        self.labels: dict[str, str] = {}
        self.supernodes: dict[str, list[str]] = {}
        self.pinned: list[str] = []
        self.path: Path | None = None

    def __repr__(self) -> str:
        counts = self.nodes["kind"].value_counts().to_dict()
        return (f"Graph({self.prompt!r}, {len(self.nodes)} nodes "
                f"({', '.join(f'{counts.get(k, 0)} {k}' for k in KINDS)}), "
                f"{self.n_edges} edges)")

    # ------------------------------------------------------------------ views

    @property
    def n_edges(self) -> int:
        return int((self.adjacency != 0).sum())

    def mask(self, kind: str) -> torch.Tensor:
        """Boolean mask of the nodes of ``kind``."""
        return torch.tensor((self.nodes["kind"] == kind).to_numpy())

    @property
    def logit_weights(self) -> torch.Tensor:
        """Per node, the normalized probability of logit targets (0 elsewhere)."""
        probs = torch.tensor(self.nodes["prob"].fillna(0).to_numpy(), dtype=torch.float32)
        probs = probs * self.mask("logit")
        if probs.sum() <= 0:  # custom targets only: weigh them equally
            probs = self.mask("logit").float()
        return probs / probs.sum()

    def index(self, node_id: str) -> int:
        """Row of ``node_id`` in ``nodes``."""
        hits = self.nodes.index[self.nodes["node_id"] == node_id]
        if len(hits) == 0:
            raise CircuitlabError(f"No node {node_id!r} in this graph; see graph.nodes.node_id.")
        return int(hits[0])

    def edges(self) -> pd.DataFrame:
        """Nonzero edges as a DataFrame with columns ``source, target, weight``."""
        t, s = self.adjacency.nonzero(as_tuple=True)
        ids = self.nodes["node_id"].to_numpy()
        return pd.DataFrame({"source": ids[s.numpy()], "target": ids[t.numpy()],
                             "weight": self.adjacency[t, s].numpy()})

    def to_networkx(self) -> nx.DiGraph:
        """A ``networkx.DiGraph`` with node attributes and ``weight`` on edges."""
        g = nx.DiGraph()
        for row in self.nodes.to_dict("records"):
            g.add_node(row["node_id"], **row)
        for row in self.edges().itertuples(index=False):
            g.add_edge(row.source, row.target, weight=float(row.weight))
        return g

    def subgraph(self, keep: torch.Tensor, adjacency: torch.Tensor | None = None, **metadata) -> "Graph":
        """The graph restricted to the nodes in boolean mask ``keep``."""
        idx = keep.nonzero()[:, 0]
        adj = self.adjacency if adjacency is None else adjacency
        nodes = self.nodes.iloc[idx.numpy()].to_dict("records")
        sub = Graph(self.prompt, self.tokens, self.token_strs, nodes, adj[idx][:, idx].clone(),
                    self.inputs[idx].clone(), self.constants[idx].clone(),
                    {**self.metadata, **metadata})
        sub.annotate(self.annotations())
        sub.path = self.path
        return sub

    # ------------------------------------------------------------------ annotations and viewing

    def annotations(self) -> dict:
        """Copies of ``labels``, ``supernodes`` and ``pinned`` (the sidecar's content)."""
        return {"labels": dict(self.labels), "pinned": list(self.pinned),
                "supernodes": {k: list(v) for k, v in self.supernodes.items()}}

    def annotate(self, annotations: dict) -> "Graph":
        """Set ``labels``, ``supernodes`` and ``pinned`` from a dict like ``annotations()``."""
        from .viz.sidecar import check

        doc = check(annotations, "the annotations")
        self.labels, self.supernodes, self.pinned = doc["labels"], doc["supernodes"], doc["pinned"]
        return self

    def show(self, rm=None, **kwargs):
        """The interactive explorer; see ``circuitlab.viz.explore``."""
        from .viz import explore

        return explore(self, rm, **kwargs)

    def to_html(self, path: str | os.PathLike, rm=None, **kwargs) -> Path:
        """A self-contained offline HTML viewer; see ``circuitlab.viz.to_html``."""
        from .viz import to_html

        return to_html(self, path, rm, **kwargs)

    @classmethod
    def from_neuronpedia(cls, doc: dict | str | os.PathLike) -> "Graph":
        """A graph from Neuronpedia graph JSON; see ``circuitlab.viz.from_neuronpedia``."""
        from .viz import from_neuronpedia

        return from_neuronpedia(doc)

    # ------------------------------------------------------------------ pruning and scores

    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> "Graph":
        """See ``circuitlab.prune.prune``."""
        from .prune import prune

        return prune(self, node_threshold, edge_threshold)

    def scores(self) -> dict:
        """See ``circuitlab.prune.scores``."""
        from .prune import scores

        return scores(self)

    def suggest_supernodes(self, rm=None, **kwargs) -> dict:
        """See ``circuitlab.features.suggest_supernodes``."""
        from .features import suggest_supernodes

        return suggest_supernodes(self, rm, **kwargs)

    def validate(self, rm, n: int = 20, seed: int = 0):
        """See ``circuitlab.interventions.validate``."""
        from .interventions import validate

        return validate(self, rm, n, seed)

    # ------------------------------------------------------------------ I/O

    def save(self, path: str | os.PathLike) -> Path:
        """Save to folder ``path`` (``graph.safetensors`` + ``graph.json``), atomically."""
        from .viz.sidecar import write as write_sidecar

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
        try:
            save_file({"adjacency": self.adjacency.contiguous(), "inputs": self.inputs,
                       "constants": self.constants}, tmp / "graph.safetensors")
            nodes = self.nodes.astype(object).where(self.nodes.notna(), None)
            doc = {"format": "circuitlab-graph/1", "prompt": self.prompt, "tokens": self.tokens,
                   "token_strs": self.token_strs, "metadata": self.metadata,
                   "nodes": nodes.to_dict("records")}
            (tmp / "graph.json").write_text(json.dumps(doc, default=float))
            for sidecar in path.glob("labels.json") if path.exists() else []:
                shutil.copy2(sidecar, tmp / sidecar.name)  # keep the user's labels
            if any(self.annotations().values()):
                write_sidecar(tmp, self.annotations(), merge=True)
            if path.exists():
                old = path.with_name(f".{path.name}.old")
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old)
            else:
                os.replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Graph":
        """Load a graph saved with ``save``, with the labels, supernodes and pins of its
        ``labels.json`` sidecar."""
        from .viz import sidecar

        path = Path(path)
        if not (path / "graph.json").exists() or not (path / "graph.safetensors").exists():
            raise CircuitlabError(
                f"{path} is not a saved graph (expected graph.json and graph.safetensors); "
                "save one with graph.save(path).")
        doc = json.loads((path / "graph.json").read_text())
        tensors = load_file(path / "graph.safetensors")
        rows = [{k: (float("nan") if v is None and k in ("prob", "influence") else v)
                 for k, v in r.items()} for r in doc["nodes"]]
        graph = cls(doc["prompt"], doc["tokens"], doc["token_strs"], rows, tensors["adjacency"],
                    tensors["inputs"], tensors["constants"], doc["metadata"])
        graph.annotate(sidecar.read(path))
        graph.path = path
        return graph

    def to_neuronpedia(self, path: str | os.PathLike | None = None, *, slug: str | None = None,
                       labels: dict | None = None, supernodes: list | None = None,
                       pinned: list | None = None) -> dict:
        """Neuronpedia's graph JSON (``metadata, qParams, nodes, links``).

        Args:
            path: where to write the JSON (atomically); ``None`` only returns it.
            slug: the graph's slug (default derived from the prompt).
            labels: node_id -> label ("clerp"); default ``self.labels``.
            supernodes: ``[[name, node_id, ...], ...]``; default ``self.supernodes``.
            pinned: node ids to pin; default ``self.pinned``.
        """
        from .loading import atomic_write_text

        labels = self.labels if labels is None else labels
        if supernodes is None:
            supernodes = [[name, *ids] for name, ids in self.supernodes.items()]
        pinned = self.pinned if pinned is None else pinned
        n_layers = int(self.metadata.get("n_layers", self.nodes["layer"].max()))
        slug = slug or "-".join(self.prompt.lower().split())[:60] or "graph"
        P = len(self.tokens)
        feature_type = {"feature": "cross layer transcoder", "error": "mlp reconstruction error",
                        "embedding": "embedding", "logit": "logit"}
        nodes = []
        for r in self.nodes.to_dict("records"):
            layer = {"embedding": "E", "logit": str(n_layers + 1)}.get(r["kind"], str(r["layer"]))
            node = {"node_id": r["node_id"], "jsNodeId": r["node_id"], "feature": int(r["feature"]),
                    "layer": layer, "ctx_idx": int(r["pos"]), "reverse_ctx_idx": P - 1 - int(r["pos"]),
                    "feature_type": feature_type[r["kind"]],
                    "influence": None if pd.isna(r["influence"]) else float(r["influence"]),
                    "activation": float(r["activation"]), "clerp": labels.get(r["node_id"], "")}
            if r["kind"] == "logit":
                node.update(token_prob=float(r["prob"]), is_target_logit=True,
                            clerp=labels.get(r["node_id"], f'Output "{r["token"]}" (p={r["prob"]:.3f})'))
            nodes.append(node)
        links = [{"source": s, "target": t, "weight": float(w)}
                 for s, t, w in self.edges().itertuples(index=False)]
        doc = {
            "metadata": {"slug": slug, "scan": self.metadata.get("transcoders") or "",
                         "transcoder_list": [], "prompt_tokens": self.token_strs,
                         "prompt": self.prompt, "schema_version": 1,
                         "node_threshold": self.metadata.get("node_threshold")},
            "qParams": {"pinnedIds": list(pinned or []), "supernodes": list(supernodes or []),
                        "linkType": "both", "clickedId": "", "sg_pos": ""},
            "nodes": nodes, "links": links,
        }
        if path is not None:
            atomic_write_text(Path(path), json.dumps(doc))
        return doc
