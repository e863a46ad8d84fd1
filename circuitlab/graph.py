"""The attribution ``Graph``: nodes, a dense adjacency, save/load and exports.

Nodes come in a fixed order: features, error nodes (one per ``(layer, pos)``), token
embeddings (one per position), then the targets that feed nothing: logits, directions and
inactive features (``circuitlab.targets``). Node ids follow Neuronpedia's scheme:
``"{layer}_{feature}_{pos}"`` for features, ``"{layer}_-1_{pos}"`` for error nodes,
``"E_{token_id}_{pos}"`` for embeddings and ``"{n_layers+1}_{token_id}_{pos}"`` for logits
(a logit difference or custom direction gets a negative id ``-2 - i``); a direction target is
``"{layer}_D{i}_{pos}"``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import networkx as nx
import pandas as pd
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import sidecar
from . import neuronpedia, prune as pruning
from .errors import CircuitlabError
from .files import atomic_dir, atomic_write_text

#: The files a saved graph folder holds (besides the ``labels.json`` sidecar).
GRAPH_FILES = ("graph.json", "graph.safetensors")
FORMAT = "circuitlab-graph/1"

NODE_COLUMNS = ["node_id", "kind", "layer", "pos", "feature", "activation", "token", "prob", "influence"]
KINDS = ("feature", "error", "embedding", "logit", "direction")
#: Columns of head loadings (``Graph.loadings``, ``circuitlab.attention.head_loadings``).
LOADING_COLUMNS = ["source", "target", "edge", "kind", "layer", "head", "weight", "share"]
#: The parts an edge splits into (``kind`` of a loading row).
LOADING_KINDS = ("direct", "head", "other heads", "remainder")


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
        loadings: stored head loadings of some edges (``LOADING_COLUMNS``; see
            ``circuitlab.attention.head_loadings(..., store=True)``), or ``None``. They are
            saved with the graph and kept by ``subgraph`` and ``prune`` for the edges left.
    """

    def __init__(self, prompt, tokens, token_strs, rows, adjacency, inputs, constants, metadata,
                 loadings: pd.DataFrame | None = None):
        self.prompt = prompt
        self.tokens = list(tokens)
        self.token_strs = list(token_strs)
        self.nodes = _node_table(rows)
        self.adjacency = adjacency
        self.inputs = inputs
        self.constants = constants
        self.metadata = dict(metadata)
        self.labels: dict[str, str] = {}
        self.supernodes: dict[str, list[str]] = {}
        self.pinned: list[str] = []
        self.path: Path | None = None
        self.loadings = None if loadings is None else self.kept_loadings(loadings)

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
    def target_mask(self) -> torch.Tensor:
        """The targets the graph explains (``metadata["targets"]``; the logit nodes of a
        graph that does not list them)."""
        ids = self.metadata.get("targets")
        if ids is None:
            return self.mask("logit")
        return torch.tensor(self.nodes["node_id"].isin(set(ids)).to_numpy())

    @property
    def target_weights(self) -> torch.Tensor:
        """Per node, its weight as a target (0 elsewhere), summing to 1: the normalized
        probabilities of logit targets, or equal weights where a target is a feature (or no
        target has a probability)."""
        targets = self.target_mask
        probs = torch.tensor(self.nodes["prob"].fillna(0).to_numpy(), dtype=torch.float32)
        probs = probs * targets
        if bool((targets & ~self.mask("logit")).any()) or probs.sum() <= 0:
            probs = targets.float()
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
        if self.loadings is not None:
            sub.loadings = sub.kept_loadings(self.loadings)
        sub.annotate(self.annotations())
        sub.path = self.path
        return sub

    def kept_loadings(self, table: pd.DataFrame) -> pd.DataFrame:
        """The rows of a head-loading table whose edge is in this graph (both nodes, and a
        nonzero weight), with ``edge`` and ``share`` from this graph's adjacency."""
        ids = {n: i for i, n in enumerate(self.nodes["node_id"])}
        t, s = table["target"].map(ids), table["source"].map(ids)
        known = t.notna() & s.notna()
        table, t, s = table[known], t[known].astype(int).to_numpy(), s[known].astype(int).to_numpy()
        edge = self.adjacency[torch.tensor(t), torch.tensor(s)].double().numpy()
        table = table.assign(edge=edge)[edge != 0]
        table["share"] = table["weight"] / table["edge"]
        return table[LOADING_COLUMNS].reset_index(drop=True)

    # ------------------------------------------------------------------ annotations and viewing

    def annotations(self) -> dict:
        """Copies of ``labels``, ``supernodes`` and ``pinned`` (the sidecar's content)."""
        return {"labels": dict(self.labels), "pinned": list(self.pinned),
                "supernodes": {k: list(v) for k, v in self.supernodes.items()}}

    def annotate(self, annotations: dict) -> "Graph":
        """Set ``labels``, ``supernodes`` and ``pinned`` from a dict like ``annotations()``."""
        doc = sidecar.check(annotations, "the annotations")
        self.labels, self.supernodes, self.pinned = doc["labels"], doc["supernodes"], doc["pinned"]
        return self

    def show(self, rm=None, **kwargs):
        """The interactive explorer; see ``circuitlab.viz.explore``."""
        from .viz import explore

        return explore(self, rm, **kwargs)

    def head_loadings(self, rm=None, edges=None, **kwargs):
        """Each edge split by attention head; see ``circuitlab.attention.head_loadings``."""
        from .attention import head_loadings

        return head_loadings(rm, self, edges, **kwargs)

    def heads(self, rm, node_id: str, edges: int = 10):
        """The heads carrying ``node_id``'s strongest incoming edges; see
        ``circuitlab.attention.heads``."""
        from .attention import heads

        return heads(rm, self, node_id, edges)

    def to_html(self, path: str | os.PathLike, rm=None, **kwargs) -> Path:
        """A self-contained offline HTML viewer; see ``circuitlab.viz.to_html``."""
        from .viz import to_html

        return to_html(self, path, rm, **kwargs)

    @classmethod
    def from_neuronpedia(cls, doc: dict | str | os.PathLike) -> "Graph":
        """A graph from Neuronpedia graph JSON (a dict or a file), with its labels
        ("clerp"), supernodes and pinned ids; see ``circuitlab.neuronpedia``."""
        parts, annotations = neuronpedia.parse(doc)
        return cls(**parts).annotate(annotations)

    # ------------------------------------------------------------------ pruning and scores

    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> "Graph":
        """See ``circuitlab.prune.prune``."""
        return pruning.prune(self, node_threshold, edge_threshold)

    def scores(self, nodes: torch.Tensor | None = None) -> dict:
        """See ``circuitlab.prune.scores``."""
        return pruning.scores(self, nodes)

    def suggest_supernodes(self, rm=None, **kwargs) -> dict:
        """See ``circuitlab.comparison.suggest_supernodes``."""
        from .comparison import suggest_supernodes

        return suggest_supernodes(self, rm, **kwargs)

    def validate(self, rm, n: int = 20, seed: int = 0):
        """See ``circuitlab.validation.validate``."""
        from .validation import validate

        return validate(self, rm, n, seed)

    # ------------------------------------------------------------------ I/O

    def save(self, path: str | os.PathLike) -> Path:
        """Save to folder ``path`` (``graph.safetensors`` + ``graph.json``), atomically.

        An existing saved graph there is replaced; its ``labels.json`` and any other files
        beside it are kept. A folder that holds other files but no saved graph is refused,
        so nothing of the user's is ever replaced.

        Raises:
            CircuitlabError: if ``path`` is a file, or a non-empty folder that is not a
                saved graph.
        """
        path = Path(path).absolute()
        if path.exists() and not path.is_dir():
            raise CircuitlabError(f"Cannot save a graph to {path}: it is a file. Pass a folder "
                                  "path (a new one, or one that holds a saved graph).")
        if path.is_dir() and any(path.iterdir()) and not (path / "graph.json").is_file():
            raise CircuitlabError(
                f"{path} holds files but no saved graph; circuitlab will not replace them. "
                f"Save to a new folder, e.g. graph.save('{path / 'graph'}').")
        with atomic_dir(path, "the previous graph there is intact.",
                        carry_except=set(GRAPH_FILES)) as tmp:
            save_file({"adjacency": self.adjacency.contiguous(), "inputs": self.inputs,
                       "constants": self.constants, **_loading_tensors(self)},
                      tmp / "graph.safetensors")
            nodes = self.nodes.astype(object).where(self.nodes.notna(), None)
            doc = {"format": FORMAT, "prompt": self.prompt, "tokens": self.tokens,
                   "token_strs": self.token_strs, "metadata": self.metadata,
                   "nodes": nodes.to_dict("records")}
            (tmp / "graph.json").write_text(json.dumps(doc, default=float), encoding="utf-8")
            if any(self.annotations().values()):
                sidecar.write(tmp, self.annotations(), merge=True)
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Graph":
        """Load a graph saved with ``save``, with the labels, supernodes and pins of its
        ``labels.json`` sidecar.

        Raises:
            CircuitlabError: naming the file and what is wrong with it, if the folder holds
                no saved graph or a damaged one.
        """
        path = Path(path)
        if not all((path / f).is_file() for f in GRAPH_FILES):
            raise CircuitlabError(
                f"{path} is not a saved graph (expected graph.json and graph.safetensors); "
                "save one with graph.save(path).")
        fix = "the file is damaged or not written by circuitlab; save the graph again."
        try:
            doc = json.loads((path / "graph.json").read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CircuitlabError(f"{path / 'graph.json'} is not valid JSON ({err}); {fix}") from None
        try:
            tensors = load_file(path / "graph.safetensors")
        except (SafetensorError, OSError, ValueError) as err:
            raise CircuitlabError(f"{path / 'graph.safetensors'} cannot be read ({err}); {fix}") from None
        graph = cls(**_checked_parts(doc, tensors, path, fix))
        graph.loadings = _loading_table(graph, tensors, path, fix)
        graph.annotate(sidecar.read(path))
        graph.path = path
        return graph

    def to_neuronpedia(self, path: str | os.PathLike | None = None, *, slug: str | None = None,
                       labels: dict | None = None, supernodes: list | None = None,
                       pinned: list | None = None) -> dict:
        """Neuronpedia's graph JSON (``metadata, qParams, nodes, links``); see
        ``circuitlab.neuronpedia.document``.

        Args:
            path: where to write the JSON (atomically); ``None`` only returns it.
            slug: the graph's slug (default derived from the prompt).
            labels: node_id -> label ("clerp"); default ``self.labels``.
            supernodes: ``[[name, node_id, ...], ...]``; default ``self.supernodes``.
            pinned: node ids to pin; default ``self.pinned``.
        """
        doc = neuronpedia.document(self, slug=slug, labels=labels, supernodes=supernodes,
                                   pinned=pinned)
        if path is not None:
            atomic_write_text(Path(path), json.dumps(doc))
        return doc


def _checked_parts(doc, tensors: dict, path: Path, fix: str) -> dict:
    """The ``Graph`` arguments of a saved graph's ``doc`` and ``tensors``, checked for
    types and for agreement between the node table and the tensors."""
    where = path / "graph.json"
    if not isinstance(doc, dict):
        raise CircuitlabError(f"{where} must hold a JSON object; {fix}")
    missing = [k for k in ("prompt", "tokens", "token_strs", "metadata", "nodes") if k not in doc]
    missing += [f"graph.safetensors:{k}" for k in ("adjacency", "inputs", "constants")
                if k not in tensors]
    if missing:
        raise CircuitlabError(f"{path} lacks {', '.join(missing)}; {fix}")
    nodes = doc["nodes"]
    if not (isinstance(doc["prompt"], str) and isinstance(doc["metadata"], dict)
            and isinstance(nodes, list) and all(isinstance(r, dict) for r in nodes)
            and isinstance(doc["tokens"], list) and isinstance(doc["token_strs"], list)):
        raise CircuitlabError(f"{where} has fields of the wrong type (prompt: text, metadata: "
                              f"object, nodes: list of objects, tokens: list); {fix}")
    columns = set(NODE_COLUMNS) - {"influence"}
    bad = next((r for r in nodes if not columns <= set(r)), None)
    if bad is not None:
        raise CircuitlabError(f"A node in {where} lacks {sorted(columns - set(bad))}; {fix}")
    n = len(nodes)
    adjacency, inputs, constants = tensors["adjacency"], tensors["inputs"], tensors["constants"]
    if adjacency.shape != (n, n) or inputs.shape != (n,) or constants.shape != (n,):
        raise CircuitlabError(
            f"{path}: the node table has {n} nodes but the tensors have shapes "
            f"{tuple(adjacency.shape)}, {tuple(inputs.shape)}, {tuple(constants.shape)}; {fix}")
    rows = [{k: (float("nan") if v is None and k in ("prob", "influence") else v)
             for k, v in r.items()} for r in nodes]
    try:
        table = _node_table(rows)
    except (TypeError, ValueError, OverflowError) as err:
        raise CircuitlabError(f"{where} has a node with a value of the wrong type ({err}); {fix}") from None
    if not table["kind"].isin(KINDS).all() or not table["node_id"].map(type).eq(str).all():
        raise CircuitlabError(f"{where} has a node whose kind is not one of {KINDS} or whose id "
                              f"is not text; {fix}")
    if not table["pos"].between(0, len(doc["tokens"]) - 1).all():
        raise CircuitlabError(f"{where} has a node outside the prompt's {len(doc['tokens'])} "
                              f"positions; {fix}")
    return {"prompt": doc["prompt"], "tokens": doc["tokens"], "token_strs": doc["token_strs"],
            "rows": rows, "adjacency": adjacency, "inputs": inputs, "constants": constants,
            "metadata": doc["metadata"]}


def _node_table(rows) -> pd.DataFrame:
    """The node table of ``rows`` (dicts with ``NODE_COLUMNS``; ``influence`` optional)."""
    nodes = pd.DataFrame(rows)
    if "influence" not in nodes:
        nodes["influence"] = float("nan")
    return nodes[NODE_COLUMNS].reset_index(drop=True).astype(
        {"layer": "int64", "pos": "int64", "feature": "int64", "activation": "float64",
         "prob": "float64", "influence": "float64"})


def _loading_tensors(graph: Graph) -> dict:
    """The stored head loadings as tensors: node rows, part kind, layer, head and weight
    per row (empty without loadings)."""
    table = graph.loadings
    if table is None:
        return {}
    ids = {n: i for i, n in enumerate(graph.nodes["node_id"])}
    return {"loadings.source": torch.tensor(table["source"].map(ids).to_numpy(), dtype=torch.int32),
            "loadings.target": torch.tensor(table["target"].map(ids).to_numpy(), dtype=torch.int32),
            "loadings.kind": torch.tensor(table["kind"].map(LOADING_KINDS.index).to_numpy(),
                                          dtype=torch.int8),
            "loadings.layer": torch.tensor(table["layer"].to_numpy(), dtype=torch.int16),
            "loadings.head": torch.tensor(table["head"].to_numpy(), dtype=torch.int16),
            "loadings.weight": torch.tensor(table["weight"].to_numpy(), dtype=torch.float32)}


def _loading_table(graph: Graph, tensors: dict, path: Path, fix: str) -> pd.DataFrame | None:
    """The head-loading table of a saved graph's tensors (``None`` if it stored none)."""
    keys = ("source", "target", "kind", "layer", "head", "weight")
    if not any(f"loadings.{k}" in tensors for k in keys):
        return None
    parts = {k: tensors.get(f"loadings.{k}") for k in keys}
    n = len(graph.nodes)

    def within(v, high):
        return len(v) == 0 or (int(v.min()) >= 0 and int(v.max()) < high)

    if (any(v is None or v.dim() != 1 or len(v) != len(parts["weight"]) for v in parts.values())
            or not (within(parts["source"], n) and within(parts["target"], n)
                    and within(parts["kind"], len(LOADING_KINDS)))):
        raise CircuitlabError(f"{path / 'graph.safetensors'} holds damaged head loadings; {fix}")
    ids = graph.nodes["node_id"].to_numpy()
    table = pd.DataFrame({"source": ids[parts["source"].long().numpy()],
                          "target": ids[parts["target"].long().numpy()],
                          "edge": 0.0,
                          "kind": [LOADING_KINDS[k] for k in parts["kind"].tolist()],
                          "layer": parts["layer"].long().numpy(),
                          "head": parts["head"].long().numpy(),
                          "weight": parts["weight"].double().numpy(), "share": 0.0})
    return graph.kept_loadings(table)
