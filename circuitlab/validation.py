"""Faithfulness: how well a graph's edges predict interventions on the model."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch

from . import checks
from .edits import Intervention, resolve
from .errors import CircuitlabError
from .interventions import dense_activations, run_edited
from .replacement import Outcome

__all__ = ["Validation", "validate"]

@dataclass
class Validation:
    """How well a graph's edges predict interventions.

    Attributes:
        edges: one row per sampled edge: ``source, target, weight`` (the edge: the
            source's direct effect on the target's input), ``constrained`` (the measured
            effect of ablating the source in constrained mode: equals ``weight`` in the
            linear regime), ``total`` (the graph's prediction of the source's total effect
            through all its paths) and ``free`` (the measured effect in free mode).
        summary: ``constrained_max_error``, ``constrained_agreement`` (1 minus the
            relative error; 1.0 is exact), ``free_correlation`` (of ``total`` and ``free``),
            ``free_sign_agreement`` and ``free_relative_error``.
    """

    edges: pd.DataFrame
    summary: dict

    def __repr__(self) -> str:
        return "Validation(" + ", ".join(f"{k}={v:.4g}" for k, v in self.summary.items()) + \
            f"; {len(self.edges)} edges)"


def _target_inputs(rm, graph, out: Outcome, targets: list[int]) -> torch.Tensor:
    """Inputs of graph nodes ``targets`` (feature pre-activations, demeaned logits) in ``out``."""
    nodes = graph.nodes
    directions = torch.tensor(graph.metadata["logit_directions"], dtype=torch.float32,
                              device=out.final.device)
    logit_rows = nodes.index[nodes["kind"] == "logit"].tolist()
    vals = []
    for t in targets:
        r = nodes.iloc[t]
        if r["kind"] == "feature":
            x = out.mlp_in[r["layer"], r["pos"]]
            vals.append(rm.pre_activations(int(r["layer"]), x)[int(r["feature"])].double())
        else:
            vals.append((directions[logit_rows.index(t)] @ out.final[-1].float()).double())
    return torch.stack(vals).cpu()


def _total_effects(graph, sources: list[int]) -> torch.Tensor:
    """``[n_nodes, len(sources)]``: each source's total effect on every node's input along
    the graph's paths, with features passing on changes of their input one to one (as
    (Jump)ReLU features do while active). Paths only go up the layers, so none returns to
    its source."""
    A = graph.adjacency.double()
    act = torch.tensor(graph.nodes["activation"].to_numpy(), dtype=torch.float64)  # host: graph
    feat = graph.mask("feature")
    W = torch.zeros_like(A)
    W[:, feat] = A[:, feat] / act[feat]
    direct = A[:, sources]
    total = direct.clone()
    for _ in range(int(graph.nodes["layer"].max()) + 2):  # paths are at most layers + 1 long
        total = direct + W @ total
    return total


def validate(graph, rm, n: int = 20, seed: int = 0) -> Validation:
    """Check ``n`` edges of ``graph``, sampled by weight, against interventions on ``rm``.

    Each sampled edge's source feature is ablated in constrained mode (where the change
    of the target's input must equal the edge) and in free mode (compared with the
    graph's total-effect prediction, the number that tells how far to trust the graph).
    """
    if "logit_directions" not in graph.metadata:
        raise CircuitlabError(
            "This graph records no logit directions (it was imported, e.g. from Neuronpedia "
            "JSON); validate a graph traced here with circuitlab.attribute(rm, prompt).")
    checks.integer("n", n)
    ids = torch.tensor(graph.tokens, device=rm.device)
    if graph.tokens != rm.tokenize(graph.prompt).tolist():
        raise CircuitlabError("The graph's tokens differ from this model's tokenization of its "
                              "prompt; validate a graph with the model that traced it.")
    trace = rm.run(ids)
    clean_acts = dense_activations(rm, trace)
    nodes = graph.nodes
    feat = graph.mask("feature")
    for r in nodes[nodes["kind"] == "feature"].head(50).itertuples():
        if abs(clean_acts[r.layer][r.pos, r.feature] - r.activation) > 1e-2 * (1 + abs(r.activation)):
            raise CircuitlabError(f"Node {r.node_id} has activation {r.activation:.4g} in the graph "
                                  f"but {clean_acts[r.layer][r.pos, r.feature]:.4g} in this model; "
                                  "validate with the transcoders that traced the graph.")
    targets_ok = feat | graph.mask("logit")
    A = graph.adjacency.abs() * targets_ok[:, None] * feat[None, :]
    if A.sum() == 0:
        raise CircuitlabError("The graph has no feature-to-feature or feature-to-logit edges "
                              "to validate.")
    # Weighted sampling without replacement (Efraimidis-Spirakis keys), over nonzero edges.
    t_idx, s_idx = A.nonzero(as_tuple=True)
    gen = torch.Generator().manual_seed(seed)
    keys = torch.rand(len(t_idx), generator=gen,  # host: sampling the graph's edges
                      dtype=torch.float64).log() / A[t_idx, s_idx].double()
    picked = keys.topk(min(n, len(keys))).indices
    pairs = [(int(t_idx[i]), int(s_idx[i])) for i in picked]
    sources = sorted({s for _, s in pairs})
    total = _total_effects(graph, sources)
    clean = {m: run_edited(rm, ids, {}, m, trace, clean_acts) for m in ("constrained", "free")}
    rows = []
    for s in sources:
        r = nodes.iloc[s]
        edits = resolve(rm, [Intervention(int(r.layer), int(r.feature), int(r.pos), 0.0)], clean_acts)
        tgts = [t for t, s2 in pairs if s2 == s]
        effect = {}
        for m in ("constrained", "free"):
            out = run_edited(rm, ids, edits, m, trace, clean_acts)
            effect[m] = _target_inputs(rm, graph, clean[m], tgts) - _target_inputs(rm, graph, out, tgts)
        for i, t in enumerate(tgts):
            rows.append(dict(source=r.node_id, target=nodes.node_id.iloc[t],
                             weight=float(graph.adjacency[t, s]), constrained=float(effect["constrained"][i]),
                             total=float(total[t, sources.index(s)]), free=float(effect["free"][i])))
    df = pd.DataFrame(rows)
    w, c, tot, fr = (torch.tensor(df[k].to_numpy())  # host: the table's columns
                     for k in ("weight", "constrained", "total", "free"))
    summary = dict(
        constrained_max_error=float((c - w).abs().max()),
        constrained_agreement=float(1 - (c - w).norm() / w.norm()),
        free_correlation=float(torch.corrcoef(torch.stack([tot, fr]))[0, 1]) if len(df) > 1 else math.nan,
        free_sign_agreement=float((torch.sign(tot) == torch.sign(fr)).double().mean()),
        free_relative_error=float((fr - tot).norm() / tot.norm()),
    )
    return Validation(df, summary)
