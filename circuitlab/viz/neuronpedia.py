"""Reading Neuronpedia graph JSON (``metadata, qParams, nodes, links``) back into a
``Graph`` for viewing. Inputs and constants are not part of the format and are left at 0."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from ..graph import Graph
from ..loading import CircuitlabError

KIND = {"cross layer transcoder": "feature", "transcoder": "feature", "lorsa": "feature",
        "mlp reconstruction error": "error", "embedding": "embedding", "logit": "logit"}
DEFAULT_CLERP = re.compile(r'^Output "(.*)" \(p=[0-9.]+\)$', re.S)


def _load(doc) -> dict:
    if isinstance(doc, dict):
        return doc
    try:
        return json.loads(Path(doc).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CircuitlabError(f"Cannot read Neuronpedia graph JSON {doc}: {e}.") from None


def from_neuronpedia(doc: dict | str | os.PathLike) -> Graph:
    """A ``Graph`` from Neuronpedia graph JSON (a dict or a file), with its labels
    ("clerp"), supernodes and pinned ids."""
    doc = _load(doc)
    if not all(k in doc for k in ("metadata", "nodes", "links")):
        raise CircuitlabError("Not Neuronpedia graph JSON: expected 'metadata', 'nodes' and "
                              "'links'; export one with graph.to_neuronpedia(path).")
    meta = doc["metadata"]
    token_strs = list(meta.get("prompt_tokens", []))
    logit_layers = [int(n["layer"]) for n in doc["nodes"] if n.get("feature_type") == "logit"]
    n_layers = max(logit_layers) - 1 if logit_layers else max(
        int(n["layer"]) for n in doc["nodes"] if n["layer"] != "E") + 1
    rows, labels, tokens = [], {}, [0] * len(token_strs)
    for n in doc["nodes"]:
        kind = KIND.get(n.get("feature_type"))
        if kind is None:
            raise CircuitlabError(f"Node {n.get('node_id')!r} has unknown feature_type "
                                  f"{n.get('feature_type')!r}; known: {sorted(KIND)}.")
        pos = int(n["ctx_idx"])
        layer = {"embedding": -1, "logit": n_layers}.get(kind)
        layer = int(n["layer"]) if layer is None else layer
        token = token_strs[pos] if pos < len(token_strs) else ""
        if kind == "embedding":
            tokens[pos] = int(n["node_id"].split("_")[1])
        output = DEFAULT_CLERP.match(n.get("clerp") or "")
        if kind == "logit":
            token = output.group(1) if output else ""
        rows.append({"node_id": n["node_id"], "kind": kind, "layer": layer, "pos": pos,
                     "feature": int(n.get("feature", -1)), "activation": float(n.get("activation") or 0),
                     "token": token, "prob": float(n.get("token_prob", "nan")) if kind == "logit" else float("nan"),
                     "influence": float("nan") if n.get("influence") is None else float(n["influence"])})
        clerp = n.get("clerp") or ""
        if clerp and not (kind == "logit" and output):
            labels[n["node_id"]] = clerp
    index = {r["node_id"]: i for i, r in enumerate(rows)}
    adjacency = torch.zeros(len(rows), len(rows))
    try:
        src = torch.tensor([index[link["source"]] for link in doc["links"]], dtype=torch.long)
        tgt = torch.tensor([index[link["target"]] for link in doc["links"]], dtype=torch.long)
    except KeyError as e:
        raise CircuitlabError(f"A link names node {e.args[0]!r}, which is not in 'nodes'.") from None
    adjacency[tgt, src] = torch.tensor([float(link["weight"]) for link in doc["links"]])
    zeros = torch.zeros(len(rows))
    graph = Graph(meta.get("prompt") or "".join(token_strs), tokens, token_strs, rows, adjacency,
                  zeros, zeros.clone(), {"n_layers": n_layers, "source": "neuronpedia",
                                         "slug": meta.get("slug"), "pruned": True})
    q = doc.get("qParams") or {}
    pinned = q.get("pinnedIds") or []
    pinned = pinned.split(",") if isinstance(pinned, str) else pinned
    supernodes = {s[0]: [i for i in s[1:] if i in index] for s in q.get("supernodes", []) if len(s) > 1}
    graph.annotate({"labels": labels, "pinned": [i for i in pinned if i in index],
                    "supernodes": {k: v for k, v in supernodes.items() if v}})
    return graph
