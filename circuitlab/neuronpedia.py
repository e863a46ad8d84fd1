"""Neuronpedia's graph JSON (``metadata, qParams, nodes, links``), both directions.

``document(graph)`` writes a graph in the format Neuronpedia's viewer reads; ``parse(doc)``
reads one back into the parts of a ``Graph`` (``Graph.from_neuronpedia`` assembles them).
Inputs and constants are not part of the format and are read back as 0. A feature's index
is read from its ``node_id`` (``layer_feature_pos``); in the ``feature`` field a graph of a
cross-layer transcoder writes the Cantor pairing of layer and feature, the one index space
over all layers that circuit-tracer writes for CLT features.

Targets: a logit target at any position is a ``"logit"`` node at its ``ctx_idx`` (with
``is_target_logit``). A feature target (``circuitlab.Feature``) is an ordinary feature node
there: the format has no other kind of target, so Neuronpedia's viewer shows it as a feature,
and what the viewer derives from targets follows the logit nodes alone (the ``influence``
each node carries is circuitlab's, over all the graph's targets). The target node ids go in
``metadata["circuitlab"]["targets"]`` (with ``n_layers``), a key Neuronpedia ignores, from
which ``parse`` restores the graph's ``metadata["targets"]``; a document without it (one of
Neuronpedia's own) has its logit nodes as targets. A direction target
(``circuitlab.Direction``) has no counterpart in the format: it is left out, with its edges.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

from typing import TYPE_CHECKING

import pandas as pd
import torch

from .errors import CircuitlabError

if TYPE_CHECKING:
    from .graph import Graph

KIND = {"cross layer transcoder": "feature", "transcoder": "feature", "lorsa": "feature",
        "mlp reconstruction error": "error", "embedding": "embedding", "logit": "logit"}
DEFAULT_CLERP = re.compile(r'^Output "(.*)" \(p=[0-9.]+\)$', re.S)


def _load(doc) -> dict:
    if not isinstance(doc, (dict, str, os.PathLike)):
        raise CircuitlabError(f"Expected Neuronpedia graph JSON (a dict or a file path), got "
                              f"{type(doc).__name__}.")
    if not isinstance(doc, dict):
        try:
            doc = json.loads(Path(doc).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CircuitlabError(f"Cannot read Neuronpedia graph JSON {doc}: {e}.") from None
    if not (isinstance(doc, dict) and all(k in doc for k in ("metadata", "nodes", "links"))):
        raise CircuitlabError("Not Neuronpedia graph JSON: expected an object with 'metadata', "
                              "'nodes' and 'links'; export one with graph.to_neuronpedia(path).")
    if not (isinstance(doc["nodes"], list) and doc["nodes"]):
        raise CircuitlabError("The Neuronpedia graph JSON has no nodes; export a graph with "
                              "graph.to_neuronpedia(path).")
    if not (isinstance(doc["metadata"], dict) and isinstance(doc["links"], list)):
        raise CircuitlabError("In Neuronpedia graph JSON 'metadata' must be an object and "
                              "'links' a list.")
    _check_unique_ids(doc["nodes"])
    return doc


def _check_unique_ids(nodes: list) -> None:
    """Refuse two nodes with one ``node_id``: links could not tell them apart."""
    counts = Counter(n["node_id"] for n in nodes
                     if isinstance(n, dict) and isinstance(n.get("node_id"), (str, int)))
    twice = [node_id for node_id, count in counts.items() if count > 1]
    if twice:
        more = f" (and {len(twice) - 1} more repeated ids)" if len(twice) > 1 else ""
        raise CircuitlabError(
            f"The Neuronpedia graph JSON has {counts[twice[0]]} nodes with node_id "
            f"{twice[0]!r}{more}; each node needs its own node_id. Remove or rename the "
            "duplicates, or export the graph again with graph.to_neuronpedia(path).")


def parse(doc: dict | str | os.PathLike) -> tuple[dict, dict]:
    """Read Neuronpedia graph JSON (a dict or a file).

    Returns:
        ``(parts, annotations)``: the ``Graph`` constructor's arguments by name, and its
        labels ("clerp"), supernodes and pinned ids.

    Raises:
        CircuitlabError: naming the node or link that is missing a field, holds a value of
            the wrong type or a position outside the prompt.
    """
    doc = _load(doc)
    try:
        return _parse(doc)
    except (KeyError, IndexError, ValueError, TypeError, AttributeError, OverflowError) as err:
        what = f"lacks the field {err}" if isinstance(err, KeyError) else f"is malformed ({err})"
        raise CircuitlabError(f"The Neuronpedia graph JSON {what}; it is damaged or not a "
                              "graph export. Export it again with graph.to_neuronpedia(path).") from None


def _parse(doc: dict) -> tuple[dict, dict]:
    meta = doc["metadata"]
    token_strs = list(meta.get("prompt_tokens", []))
    ours = meta.get("circuitlab") if isinstance(meta.get("circuitlab"), dict) else {}
    logit_layers = [int(n["layer"]) for n in doc["nodes"] if n.get("feature_type") == "logit"]
    if logit_layers:
        n_layers = max(logit_layers) - 1
    elif isinstance(ours.get("n_layers"), int) and not isinstance(ours["n_layers"], bool):
        n_layers = ours["n_layers"]  # no logit node (feature targets only): the export says
    else:
        n_layers = max(int(n["layer"]) for n in doc["nodes"] if n["layer"] != "E") + 1
    rows, labels, tokens = [], {}, [0] * len(token_strs)
    for n in doc["nodes"]:
        kind = KIND.get(n.get("feature_type"))
        if kind is None:
            raise CircuitlabError(f"Node {n.get('node_id')!r} has unknown feature_type "
                                  f"{n.get('feature_type')!r}; known: {sorted(KIND)}.")
        pos = int(n["ctx_idx"])
        if not 0 <= pos < max(len(token_strs), 1):
            raise CircuitlabError(f"Node {n['node_id']!r} sits at position {pos}, outside the "
                                  f"prompt's {len(token_strs)} tokens; the JSON is damaged.")
        layer = {"embedding": -1, "logit": n_layers}.get(kind)
        layer = int(n["layer"]) if layer is None else layer
        token = token_strs[pos] if pos < len(token_strs) else ""
        if kind == "embedding":
            tokens[pos] = int(n["node_id"].split("_")[1])
        output = DEFAULT_CLERP.match(n.get("clerp") or "")
        if kind == "logit":
            token = output.group(1) if output else ""
        feature = int(n["node_id"].split("_")[1]) if kind == "feature" else int(n.get("feature", -1))
        rows.append({"node_id": n["node_id"], "kind": kind, "layer": layer, "pos": pos,
                     "feature": feature, "activation": float(n.get("activation") or 0),
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
    weights = torch.tensor([float(link["weight"]) for link in doc["links"]], dtype=torch.float32)
    if not torch.isfinite(weights).all():
        raise CircuitlabError("A link of the Neuronpedia graph JSON has a NaN or infinite weight.")
    adjacency[tgt, src] = weights
    zeros = torch.zeros(len(rows))
    parts = {"prompt": meta.get("prompt") or "".join(token_strs), "tokens": tokens,
             "token_strs": token_strs, "rows": rows, "adjacency": adjacency, "inputs": zeros,
             "constants": zeros.clone(),
             "metadata": {"n_layers": n_layers, "source": "neuronpedia", "slug": meta.get("slug"),
                          "pruned": True}}
    targets = _targets(ours.get("targets"), index)
    if targets is not None:
        parts["metadata"]["targets"] = targets
    q = doc.get("qParams") or {}
    pinned = q.get("pinnedIds") or []
    pinned = pinned.split(",") if isinstance(pinned, str) else pinned
    supernodes = {s[0]: [i for i in s[1:] if i in index] for s in q.get("supernodes", []) if len(s) > 1}
    return parts, {"labels": labels, "pinned": [i for i in pinned if i in index],
                   "supernodes": {k: v for k, v in supernodes.items() if v}}


def _targets(ids, index: dict) -> list[str] | None:
    """The target node ids an export recorded (``metadata["circuitlab"]["targets"]``), those
    that name a node; ``None`` where it recorded none (or none of them is a node): then the
    logit nodes are the targets.

    Raises:
        CircuitlabError: where the record is not a list of node ids.
    """
    if ids is None:
        return None
    if not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
        raise CircuitlabError(f'metadata["circuitlab"]["targets"] must be a list of node ids, '
                              f"not {ids!r}; export the graph again with graph.to_neuronpedia(path).")
    return [i for i in ids if i in index] or None


def document(graph: Graph, *, slug: str | None = None, labels: dict | None = None,
             supernodes: list | None = None, pinned: list | None = None) -> dict:
    """Neuronpedia's graph JSON (``metadata, qParams, nodes, links``) of ``graph``.

    Args:
        slug: the graph's slug (default derived from the prompt).
        labels: node_id -> label ("clerp"); default ``graph.labels``.
        supernodes: ``[[name, node_id, ...], ...]``; default ``graph.supernodes``.
        pinned: node ids to pin; default ``graph.pinned``.
    """
    labels = graph.labels if labels is None else labels
    if supernodes is None:
        supernodes = [[name, *ids] for name, ids in graph.supernodes.items()]
    pinned = graph.pinned if pinned is None else pinned
    n_layers = int(graph.metadata.get("n_layers", graph.nodes["layer"].max()))
    slug = slug or "-".join(graph.prompt.lower().split())[:60] or "graph"
    P = len(graph.tokens)
    cross_layer = bool(graph.metadata.get("cross_layer"))
    feature_type = {"feature": "cross layer transcoder", "error": "mlp reconstruction error",
                    "embedding": "embedding", "logit": "logit"}
    targets = graph.nodes["node_id"][graph.target_mask.numpy()].tolist()
    target_set = set(targets)
    nodes = []
    records = [r for r in graph.nodes.to_dict("records") if r["kind"] != "direction"]
    exported = {r["node_id"] for r in records}
    for r in records:
        layer = {"embedding": "E", "logit": str(n_layers + 1)}.get(r["kind"], str(r["layer"]))
        feature = int(r["feature"])
        if cross_layer and r["kind"] == "feature":  # one index space over a CLT's layers
            feature = (r["layer"] + feature) * (r["layer"] + feature + 1) // 2 + feature
        node = {"node_id": r["node_id"], "jsNodeId": r["node_id"], "feature": feature,
                "layer": layer, "ctx_idx": int(r["pos"]), "reverse_ctx_idx": P - 1 - int(r["pos"]),
                "feature_type": feature_type[r["kind"]],
                "influence": None if pd.isna(r["influence"]) else float(r["influence"]),
                "activation": float(r["activation"]), "clerp": labels.get(r["node_id"], "")}
        if r["kind"] == "logit":
            node.update(token_prob=float(r["prob"]), is_target_logit=r["node_id"] in target_set,
                        clerp=labels.get(r["node_id"], f'Output "{r["token"]}" (p={r["prob"]:.3f})'))
        nodes.append(node)
    links = [{"source": s, "target": t, "weight": float(w)}
             for s, t, w in graph.edges().itertuples(index=False) if t in exported]
    doc = {
        "metadata": {"slug": slug, "scan": graph.metadata.get("transcoders") or "",
                     "transcoder_list": [], "prompt_tokens": graph.token_strs,
                     "prompt": graph.prompt, "schema_version": 1,
                     "node_threshold": graph.metadata.get("node_threshold"),
                     # Neuronpedia ignores this key; parse() restores the targets from it.
                     "circuitlab": {"targets": [t for t in targets if t in exported],
                                    "n_layers": n_layers}},
        "qParams": {"pinnedIds": list(pinned or []), "supernodes": list(supernodes or []),
                    "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": nodes, "links": links,
    }
    return doc
