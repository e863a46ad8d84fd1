"""Head loadings: which attention heads carry each edge of an attribution graph (and
``qk``, beside it, why a head attends where it does).

An attribution graph freezes attention patterns and norm denominators, so the map from a
source's write at ``(layer_s, p)`` to a target's read at ``(layer_t, q)`` is linear: the
product, over the layers in between, of each attention layer's ``I + sum_h A_h`` and each
MLP layer's ``I + S`` (``S`` the transcoders' skip path, zero without skips). Head
``(j, h)`` maps the residual at key ``p`` to the residual at query ``q`` as::

    A_h x = pattern[j, h, q, p] * post_q( norm1_p(x) @ W_V[kv(h)] @ W_O[h] )

with ``norm1_p`` the frozen pre-attention norm at ``p`` and ``post_q`` the frozen
post-attention norm at ``q`` (Gemma's sandwich norms; the identity elsewhere). Expanding
the product by the number of heads a path goes through splits every edge exactly::

    edge = direct + sum_{j, h} loading(j, h) + remainder

* ``direct``: the paths through no head (residual and skips only); zero unless ``p == q``.
* ``loading(j, h) = pattern[j, h, q, p] * G_t[j] . post_q(norm1_p(x_s[j]) W_V W_O)``: the
  paths through exactly one head, ``(j, h)``. ``x_s[j]`` is what the source's writes become,
  through residual and skips only, by the input of layer ``j`` at ``p``; ``G_t[j]`` is the
  target's read brought down, through residual and skips only, to the output of layer
  ``j``'s attention at ``q``.
* ``remainder``: the paths through two heads or more (``edge - direct - sum loadings``).
  For a graph traced in a lower precision than the loadings, it also holds the graph's
  rounding.

An edge with one attention layer between its source and target has no remainder. A
cross-layer transcoder's feature writes into several layers; ``x_s[j]`` sums those below
``j``. An error node's write is its layer's error plus the active features that the
attribution folded into it (``metadata["kept_features"]`` says which were nodes).
"""

from __future__ import annotations

import pandas as pd
import torch

from .frozen import FrozenBackward
from .errors import CircuitlabError
from .graph import LOADING_COLUMNS as COLUMNS, Graph

#: Target-source pairs up to which each head's dot products are one matmul (a dense
#: ``[targets, sources]`` product per head); past it, edges in batches of ``CHUNK``.
DENSE = 2 ** 25
CHUNK = 16384


def head_loadings(rm, graph: Graph, edges=None, *, top: int | None = None,
                  dtype: torch.dtype = torch.float32, store: bool = False) -> pd.DataFrame:
    """Split edges of ``graph`` into their direct part, one part per attention head, and the
    paths through several heads (see the module docstring).

    Args:
        rm: the ``ReplacementModel`` the graph was traced with; ``None`` reads the loadings
            stored with the graph (``graph.loadings``) instead of computing them.
        graph: the graph (pruned or not).
        edges: ``(source_id, target_id)`` pairs; ``None`` for every edge of the graph (or,
            without a model, every stored edge).
        top: keep the ``top`` heads of each edge by ``|weight|`` and sum the others into one
            ``"other heads"`` row (``None``: a row for every head with a nonzero part).
        dtype: dtype of the computation (float32: exact to rounding).
        store: also keep the result in ``graph.loadings`` (replacing earlier rows of the
            same edges), so that ``graph.save`` writes it, ``prune`` keeps it and the
            explorer shows it without the model. ``top=8`` keeps a saved graph small.

    Returns:
        One row per edge and part: ``source, target, edge`` (the edge's weight), ``kind``
        (``"direct"``, ``"head"``, ``"other heads"`` or ``"remainder"``), ``layer, head``
        (of a head row, -1 otherwise), ``weight`` and ``share`` (``weight / edge``). Each edge's weights sum
        to its edge weight.

    Raises:
        CircuitlabError: for a graph of another model or transcoders, unknown node ids, an
            error node whose folded features the graph does not record, or (without a
            model) edges whose loadings were not stored.
    """
    if rm is None and graph.loadings is not None:
        return _stored(graph, edges)
    _check_model(rm, graph)
    t_rows, s_rows = _edges(graph, edges)
    trace = rm.run(torch.tensor(graph.tokens, device=rm.device))
    fb = FrozenBackward(rm, trace, dtype)
    nodes = graph.nodes
    src_ids, src_index = torch.unique(s_rows, return_inverse=True)
    tgt_ids, tgt_index = torch.unique(t_rows, return_inverse=True)
    states = _source_states(rm, fb, trace, graph, src_ids.tolist(), dtype)  # [S, L+1, d]
    reads = _target_reads(rm, fb, graph, tgt_ids.tolist(), dtype)           # [T, L+1, d]
    L = rm.n_layers
    p = torch.tensor(nodes["pos"].to_numpy())[s_rows]
    q = torch.tensor(nodes["pos"].to_numpy())[t_rows]
    read_layer = _read_layer(nodes, t_rows, L)
    # Direct: the target's read vector applied to the source's residual-only state there.
    direct = torch.zeros(len(t_rows), dtype=dtype)
    same = (p == q).nonzero()[:, 0]  # no head: only within a position
    direct[same] = (reads[tgt_index[same], read_layer[same]]
                    * states[src_index[same], read_layer[same]]).sum(-1)
    heads = torch.zeros(len(t_rows), L, rm.cfg.n_heads, dtype=dtype)
    src_pos = torch.tensor(nodes["pos"].to_numpy())[src_ids]
    tgt_pos = torch.tensor(nodes["pos"].to_numpy())[tgt_ids]
    for j in range(L):  # per unique source and target, then one dot product per edge and head
        values = _values(fb, j, states[:, j], src_pos)           # [S, H, dh]
        outputs = _outputs(fb, j, reads[:, j], tgt_pos)          # [T, H, dh]
        pattern = fb.layers[j]["patternT"]                        # [H, Pk, Pq]
        if len(tgt_ids) * len(src_ids) <= DENSE:  # every target-source pair by matmul
            for h in range(heads.shape[2]):
                dots = outputs[:, h] @ values[:, h].T
                heads[:, j, h] = pattern[h, p, q] * dots[tgt_index, src_index]
            continue
        for c in range(0, len(t_rows), CHUNK):
            e = slice(c, c + CHUNK)
            dots = (values[src_index[e]] * outputs[tgt_index[e]]).sum(-1)   # [chunk, H]
            heads[e, j] = pattern[:, p[e], q[e]].T * dots
    edge = graph.adjacency[t_rows, s_rows].to(dtype)
    remainder = edge - direct - heads.sum((1, 2))
    table = _table(graph, t_rows, s_rows, edge, direct, heads, remainder, top)
    if store:
        graph.loadings = _merged(graph, table)
    return table


def heads(rm, graph: Graph, node_id: str, edges: int = 10) -> pd.DataFrame:
    """The attention heads that carry the strongest incoming edges of ``node_id``.

    Args:
        rm: the ``ReplacementModel`` the graph was traced with.
        graph: the graph.
        node_id: a feature or logit node.
        edges: how many of its incoming edges (the strongest by ``|weight|``) to split.

    Returns:
        One row per head: ``layer, head``, ``weight`` (its parts of those edges, summed) and
        ``share`` (of the edges' summed weight), strongest by ``|weight|`` first.
    """
    if node_id not in set(graph.nodes["node_id"]):
        raise CircuitlabError(f"Unknown node id {node_id!r}; see graph.nodes.node_id.")
    t = graph.index(node_id)
    weights = graph.adjacency[t]
    strongest = weights.abs().argsort(descending=True)[:edges]
    strongest = strongest[weights[strongest] != 0]
    ids = graph.nodes["node_id"].to_numpy()
    table = head_loadings(rm, graph, [(ids[s], node_id) for s in strongest.tolist()])
    per_head = (table[table.kind == "head"].groupby(["layer", "head"], as_index=False)["weight"]
                .sum())
    per_head["share"] = per_head["weight"] / float(weights[strongest].sum())
    order = per_head["weight"].abs().sort_values(ascending=False).index
    return per_head.loc[order].reset_index(drop=True)


def _stored(graph: Graph, edges) -> pd.DataFrame:
    """The stored loadings of ``edges`` (all stored ones for ``None``)."""
    table = graph.loadings
    if edges is None:
        return table.copy()
    pairs = [tuple(e) for e in edges]
    have = set(zip(table["source"], table["target"]))
    missing = [p for p in pairs if p not in have]
    if missing:
        raise CircuitlabError(f"The graph stores no head loadings for {len(missing)} of these "
                              f"edges (e.g. {missing[0]}); pass the model it was traced with "
                              "to compute them (graph.head_loadings(rm, edges)).")
    keep = pd.Series(list(zip(table["source"], table["target"])), dtype=object).isin(set(pairs)).to_numpy()
    return table[keep].reset_index(drop=True)


def _merged(graph: Graph, table: pd.DataFrame) -> pd.DataFrame:
    """``graph.loadings`` with the rows of ``table``'s edges replaced by ``table``."""
    old = graph.loadings
    if old is not None:
        new = set(zip(table["source"], table["target"]))
        old = old[~pd.Series(list(zip(old["source"], old["target"])), dtype=object)
                  .isin(new).to_numpy()]
    return graph.kept_loadings(pd.concat([old, table], ignore_index=True))


def _check_model(rm, graph: Graph) -> None:
    if rm is None:
        raise CircuitlabError("Head loadings need the model the graph was traced with, or "
                              "loadings stored with the graph: pass the model "
                              "(graph.head_loadings(rm) or circuitlab.attention.head_loadings(rm, "
                              "graph)), and store=True to keep them with the graph.")
    meta = graph.metadata
    mine = (rm.name, rm.transcoder_source)
    theirs = (meta.get("model"), meta.get("transcoders"))
    if any(t is not None and t != m for t, m in zip(theirs, mine)):
        raise CircuitlabError(f"This graph was traced with {theirs[0]!r} and transcoders "
                              f"{theirs[1]!r}, not {mine[0]!r} with {mine[1]!r}; load that model "
                              "with circuitlab.load(model, transcoders) and pass it.")


def _edges(graph: Graph, edges) -> tuple[torch.Tensor, torch.Tensor]:
    """Target and source rows of the requested edges (default: every nonzero edge)."""
    if edges is None:
        t, s = (graph.adjacency != 0).nonzero(as_tuple=True)
        return t, s
    ids = {n: i for i, n in enumerate(graph.nodes["node_id"])}
    pairs = [tuple(e) for e in edges]
    unknown = sorted({n for pair in pairs for n in pair if n not in ids})
    if unknown:
        raise CircuitlabError(f"Unknown node id(s) {unknown[:5]}; edges are (source_id, "
                              "target_id) pairs of graph.nodes.node_id.")
    return (torch.tensor([ids[t] for _, t in pairs], dtype=torch.long),
            torch.tensor([ids[s] for s, _ in pairs], dtype=torch.long))


def _read_layer(nodes: pd.DataFrame, rows: torch.Tensor, L: int) -> torch.Tensor:
    """Per target row, the residual index it reads: ``l`` (the input of layer ``l``'s MLP,
    after its attention) for a feature of layer ``l``, ``L`` (the final residual) for a
    logit. States and reads are indexed so: ``k`` for the residual after attention ``k``
    (``k < L``), ``L`` for the final one."""
    rows = rows.numpy()
    kind, layer = nodes["kind"].to_numpy()[rows], nodes["layer"].to_numpy()[rows]
    return torch.tensor([L if k == "logit" else int(l) for k, l in zip(kind, layer)])


def _skip_forward(fb: FrozenBackward, l: int, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The skip path of layer ``l`` applied to residuals ``x [n, d]`` at positions ``pos``."""
    layer = fb.layers[l]
    if layer["skip"] is None:
        return torch.zeros_like(x)
    if layer["read"] is not None:
        x = x - x.mean(-1, keepdim=True) if fb.center else x
        x = x * layer["read"][pos]
    return x @ layer["skip"].T


def _source_states(rm, fb: FrozenBackward, trace, graph: Graph, rows: list[int],
                   dtype: torch.dtype) -> torch.Tensor:
    """``[S, L + 1, d]``: per source, what its writes add to the residual through residual
    and skip paths only, after attention ``k`` (index ``k``; the same as before it) and at
    the end (index ``L``)."""
    L, d = rm.n_layers, rm.d_model
    nodes = graph.nodes
    writes = torch.zeros(len(rows), L + 1, d, dtype=dtype)  # index l + 1: into layer l's output
    folded = _folded(rm, trace, graph)
    for i, r in enumerate(rows):
        kind, layer, pos, feat = (nodes[c].iat[r] for c in ("kind", "layer", "pos", "feature"))
        if kind == "embedding":
            writes[i, 0] = trace.embed[pos].to(dtype)
        elif kind == "feature":
            act = float(nodes["activation"].iat[r])
            dec = rm.decoders(int(layer))[int(feat)].detach().to(dtype)
            writes[i, layer + 1:layer + 1 + len(dec)] = act * dec[:L - layer]
        elif kind == "error":
            writes[i, layer + 1] = trace.errors[layer, pos].to(dtype)
            writes[i, layer + 1:] += folded.get((int(layer), int(pos)), 0)
        else:
            raise CircuitlabError(f"Node {nodes['node_id'].iat[r]!r} is a {kind} node, not a "
                                  "source; edges run from embeddings, features and errors.")
    pos = torch.tensor(nodes["pos"].to_numpy()[rows], dtype=torch.long)
    states = torch.zeros(len(rows), L + 1, d, dtype=dtype)
    x = writes[:, 0].clone()
    for l in range(L):
        states[:, l] = x  # after attention l, before MLP l (no head: the same as before)
        x = x + _skip_forward(fb, l, x, pos) + writes[:, l + 1]
    states[:, L] = x
    return states


def _folded(rm, trace, graph: Graph) -> dict:
    """``(layer, pos) -> [L - layer, d]``: the writes of the active features that the
    attribution folded into that error node (those that are not feature nodes)."""
    meta = graph.metadata
    n_active, n_kept = meta.get("n_active_features"), meta.get("max_feature_nodes")
    if n_active is None or n_active == n_kept:
        return {}
    if "kept_features" not in meta:
        raise CircuitlabError("This graph folded some active features into its error nodes but "
                              "does not record which (it predates head loadings); trace it "
                              "again to split its error nodes' edges by head.")
    kept = {tuple(k) for k in meta["kept_features"]}
    out: dict = {}
    for l, (pos, feat, act) in enumerate(trace.features):
        dec = rm.decoders(l).detach()
        for p, f, a in zip(pos.tolist(), feat.tolist(), act.tolist()):
            if (l, p, f) not in kept:
                w = a * dec[f].float()
                out[(l, p)] = out.get((l, p), 0) + torch.nn.functional.pad(
                    w, (0, 0, 0, rm.n_layers - l - len(w)))
    return out


def _target_reads(rm, fb: FrozenBackward, graph: Graph, rows: list[int],
                  dtype: torch.dtype) -> torch.Tensor:
    """``[T, L + 1, d]``: per target, its read vector brought down through residual and skip
    paths only, to the residual after attention ``k`` (index ``k``) and at the end (``L``);
    zero above the target's read."""
    L, nodes = rm.n_layers, graph.nodes
    directions = graph.metadata.get("logit_directions", [])
    logits = nodes.index[nodes["kind"] == "logit"].tolist()
    reads, probes = graph.metadata.get("read_directions", []), nodes.index[nodes["kind"] == "direction"].tolist()
    grads, layers, pos = [], [], []
    for r in rows:
        kind, layer, p, f = (nodes[c].iat[r] for c in ("kind", "layer", "pos", "feature"))
        if kind == "feature":
            enc = rm.encoder(int(layer))[0].detach()[:, int(f)]
            grads.append(fb.injection(int(layer), torch.tensor([p]), enc[None])[0])
            layers.append(int(layer))
        elif kind == "logit":
            direction = torch.tensor(directions[logits.index(r)], dtype=dtype)
            grads.append(fb.injection(None, torch.tensor([p]), direction[None])[0])
            layers.append(L)
        elif kind == "direction":
            direction = torch.tensor(reads[probes.index(r)], dtype=dtype)
            grads.append(fb.injection(int(layer), torch.tensor([p]), direction[None])[0])
            layers.append(int(layer))
        else:
            raise CircuitlabError(f"Node {nodes['node_id'].iat[r]!r} is a {kind} node, not a "
                                  "target; edges run into features, logits and directions.")
        pos.append(int(p))
    grads = torch.stack(grads).to(dtype)
    layers, pos = torch.tensor(layers), torch.tensor(pos)
    reads = torch.zeros(len(rows), L + 1, rm.d_model, dtype=dtype)
    g = torch.zeros_like(grads)
    for k in range(L, -1, -1):
        g = g + grads * (layers == k)[:, None]  # the read enters at its own index
        reads[:, k] = g
        if k > 0:  # down through MLP k - 1: its residual plus the skip's transpose
            g = g + _skip_backward(fb, k - 1, g, pos)
    return reads


def _skip_backward(fb: FrozenBackward, l: int, g: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The transpose of ``_skip_forward``: gradients ``g [n, d]`` at positions ``pos``."""
    layer = fb.layers[l]
    if layer["skip"] is None:
        return torch.zeros_like(g)
    y = g @ layer["skip"]
    if layer["read"] is not None:
        y = y * layer["read"][pos]
        y = y - y.mean(-1, keepdim=True) if fb.center else y
    return y


def _values(fb: FrozenBackward, j: int, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``[S, H, dh]``: what head ``h`` of layer ``j`` reads from source states ``x [S, d]``
    entering the layer at key positions ``p`` (frozen pre-attention norm, then ``W_V``)."""
    layer = fb.layers[j]
    a = x - x.mean(-1, keepdim=True) if fb.center else x
    a = a * layer["ln1"][p]
    H, n_kv = layer["patternT"].shape[0], layer["n_kv"]
    dh = layer["W_OT"].shape[1] // H
    v = (a @ layer["W_VT"].T).view(len(x), n_kv, dh)                # [S, n_kv, dh]
    return v[:, torch.arange(H) * n_kv // H]                        # each head's kv group


def _outputs(fb: FrozenBackward, j: int, g: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``[T, H, dh]``: target reads ``g [T, d]`` at the output of attention ``j`` at query
    positions ``q``, brought back through the frozen post-attention norm and ``W_O`` of
    each head."""
    layer = fb.layers[j]
    if layer["ln1_post"] is not None:  # the post-attention norm at the query, transposed
        g = g * layer["ln1_post"][q]
        g = g - g.mean(-1, keepdim=True) if fb.center else g
    H = layer["patternT"].shape[0]
    return (g @ layer["W_OT"]).view(len(g), H, -1)


def _table(graph: Graph, t_rows, s_rows, edge, direct, heads, remainder,
           top: int | None) -> pd.DataFrame:
    """The long table of ``head_loadings``: per edge its direct row, its head rows (the
    ``top`` strongest and an ``"other heads"`` row, or every nonzero one) and its remainder."""
    ids = graph.nodes["node_id"].to_numpy()
    E, L, H = heads.shape
    src, tgt, w = ids[s_rows.numpy()], ids[t_rows.numpy()], edge.numpy()

    def rows(e, kind, layer, head, weight):
        e = e.numpy()
        return pd.DataFrame({"source": src[e], "target": tgt[e], "edge": w[e], "kind": kind,
                             "layer": layer, "head": head, "weight": weight})

    flat = heads.reshape(E, L * H)
    keep = flat != 0
    if top is not None:
        rank = flat.abs().argsort(1, descending=True).argsort(1)
        keep &= rank < top
    e, k = keep.nonzero(as_tuple=True)
    every = torch.arange(E)
    parts = [rows(every, "direct", -1, -1, direct.numpy()),
             rows(e, "head", (k // H).numpy(), (k % H).numpy(), flat[e, k].numpy())]
    if top is not None:
        parts.append(rows(every, "other heads", -1, -1, (flat * ~keep).sum(1).numpy()))
    parts.append(rows(every, "remainder", -1, -1, remainder.numpy()))
    out = pd.concat(parts, ignore_index=True)
    out["share"] = out["weight"] / out["edge"].where(out["edge"] != 0)
    return out.sort_values(["target", "source"], kind="stable", ignore_index=True)[COLUMNS]
