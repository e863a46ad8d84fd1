"""One worker's part of a batch (``circuitlab.batch``): a loaded model that traces
prompts into graphs and the fields of their summary rows."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field

import torch

from .attribution import attribute
from .cards import find_examples
from .errors import CircuitlabError
from .graph import Graph
from .loading import load
from .replacement import ReplacementModel

#: What each ``save`` keeps: the folder names of the graphs, ``graph`` (full) and ``pruned``.
SAVES = {"pruned": ("pruned",), "full": ("graph",), "both": ("graph", "pruned")}
#: Most influential features named per prompt in the summary.
N_TOP = 5


@dataclass
class Outcome:
    """What tracing one prompt gave: its summary fields, its graphs (by folder name,
    ``graph`` or ``pruned``) and whether a failure is worth another attempt."""

    row: dict
    graphs: dict = field(default_factory=dict)
    retry: bool = False


def worker_name() -> str:
    """``host:pid`` of this process."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Tracer:
    """One loaded model and the per-prompt work of both engines.

    Args:
        model: a model name for ``circuitlab.load`` or a loaded ``ReplacementModel``.
        transcoders, device: for ``circuitlab.load``.
        options: ``attribute``'s keyword arguments.
        save: what ``trace`` returns: ``"pruned"``, ``"full"`` or ``"both"``.
        thresholds: ``(node_threshold, edge_threshold)`` of the pruning.
        attribute_fn: called as ``attribute_fn(rm, prompt, **options)``.
        threads: torch's CPU threads in this process (``None`` leaves them).
    """

    def __init__(self, model, transcoders, device, options: dict, save: str, thresholds: tuple,
                 attribute_fn=attribute, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.rm = model if isinstance(model, ReplacementModel) else load(model, transcoders,
                                                                         device=device)
        self.examples = find_examples(self.rm)[0]
        self.options, self.save, self.thresholds = options, save, thresholds
        self.attribute_fn = attribute_fn

    def trace(self, item: dict) -> Outcome:
        """Attribute and prune ``item["prompt"]``; a failure comes back as an ``Outcome``."""
        start = time.perf_counter()
        options = dict(self.options)
        if item.get("logit_targets") is not None:
            options["logit_targets"] = item["logit_targets"]
        try:
            graph = self.attribute_fn(self.rm, item["prompt"], progress=False, **options)
            pruned = graph.prune(*self.thresholds)
            row = {"status": "ok", "error": None, **describe(graph, pruned, self.examples)}
        except Exception as err:  # noqa: BLE001 (recorded in the summary; the batch goes on)
            return Outcome(failure(f"{type(err).__name__}: {err}", time.perf_counter() - start),
                           retry=not isinstance(err, CircuitlabError))
        kept = {"graph": graph, "pruned": pruned}
        row.update(seconds=time.perf_counter() - start, worker=worker_name())
        return Outcome(row, {name: kept[name] for name in SAVES[self.save]})


def failure(error: str, seconds: float = float("nan"), worker: str | None = None) -> dict:
    """The summary fields of a failed attempt (by default in this process)."""
    return {"status": "failed", "error": error, "seconds": seconds,
            "worker": worker or worker_name()}


def describe(graph: Graph, pruned: Graph, examples=None) -> dict:
    """The summary fields of a traced prompt (see ``circuitlab.batch.COLUMNS``)."""
    from .viz.state import node_name  # the views load plotly; importing this module does not

    logits = graph.nodes[graph.nodes["kind"] == "logit"]
    top = graph.nodes[graph.nodes["kind"] == "feature"].nlargest(N_TOP, "influence")
    row = {"targets": logits["token"].astype(str).tolist(), "probs": logits["prob"].tolist(),
           "top_features": [node_name(r, graph.labels, examples) for r in top.to_dict("records")],
           "top_nodes": top["node_id"].tolist()}
    for g, suffix in ((graph, ""), (pruned, "_pruned")):
        row.update({f"nodes{suffix}": len(g.nodes), f"edges{suffix}": g.n_edges,
                    f"features{suffix}": int(g.mask("feature").sum())})
        row.update({f"{name}{suffix}": value for name, value in g.scores().items()})
    return row
