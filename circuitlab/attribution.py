"""Exact attribution graphs.

With attention patterns and norm denominators frozen at their values on the prompt, the
replacement model is linear from its sources (token embeddings, transcoder feature outputs,
error terms) to its targets (transcoder pre-activations and logits). The edge from source
``s`` to target ``t`` is ``s``'s signed contribution to ``t``'s input through the frozen
paths (residual stream, frozen attention's value/output path, transcoder skip connections)::

    edge(s -> t) = activation(s) * (decoder vector of s) . d input(t) / d resid

and for every target, the incoming edges plus a constant part (biases propagated through the
frozen model) equal the target's input exactly.

The backward pass is a hand-written vector-Jacobian product of the frozen model, batched over
targets, started at the highest layer in the batch and truncated to the positions that can
matter (a target at position ``p`` reads nothing after ``p``).

Node selection when ``max_feature_nodes`` is smaller than the number of active features:
rows are computed for the logit targets first; then, repeatedly, each unvisited feature's
influence on the logits is estimated from the rows computed so far (normalized absolute
edge weights, summed over all paths, weighted by target probability) and the most
influential unvisited features are visited next, until ``max_feature_nodes`` are visited.
The features that were never visited are not nodes: their outputs are folded into the error
node of their ``(layer, pos)``, which keeps every target's edges + constant exact. (With a
cross-layer transcoder, a feature's outputs are its writes into every layer it decodes to;
they fold whole into the error node of the layer it reads.)

A cross-layer transcoder's feature is one node: its edge to a target sums its contributions
through every layer it writes to.

Memory is bounded by the node budget, not by the number of active features (which grows
with the prompt): rows are computed whole a batch at a time and stored over a bounded set
of candidate columns (``selection.Rows``); the rows that miss a late node are recomputed
at the end (none when every active feature fits among the candidates).
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from .frozen import FrozenBackward
from .graph import Graph
from . import checks
from .memory import (candidate_slots, check_attribution, check_forward, fit_hint, forward_parts,
                     memory_parts, replacement_shape, spare_memory, trace_bytes)
from .precision import default_dtype
from .prune import annotate_influence
from .replacement import ReplacementModel, Trace
from .selection import Rows
from .targets import (completion_targets, direction_targets_of, feature_targets_of,
                      logit_targets_of, split_targets)


class _Sources:
    """Column layout of the sources: active features, then errors (L x P), then embeddings.

    ``dec[s]`` holds the activation-scaled writes of layer ``s``'s active features padded per
    position, ``[P, kmax, n, d]`` into layers ``s .. s + n - 1`` (``n = 1`` for per-layer
    transcoders, ``L - s`` for a cross-layer transcoder), and ``cols[s]`` their columns.
    """

    def __init__(self, rm: ReplacementModel, trace: Trace, dtype: torch.dtype):
        L, P = rm.n_layers, len(trace.tokens)
        self.L, self.P = L, P
        layer, pos, feat, act = [], [], [], []
        for l, (p, f, a) in enumerate(trace.features):
            order = torch.argsort(p * rm.d_sae(l) + f)
            layer.append(torch.full_like(p, l)), pos.append(p[order])
            feat.append(f[order]), act.append(a[order])
        self.layer, self.pos = torch.cat(layer), torch.cat(pos)
        self.feature, self.activation = torch.cat(feat), torch.cat(act)
        self.n_features = len(self.layer)
        self.error_offset = self.n_features
        self.embed_offset = self.n_features + L * P
        self.n_cols = self.embed_offset + P
        # Per layer, act-scaled decoder rows padded per position: [P, kmax, d] and columns.
        self.dec, self.cols = [], []
        start = 0
        for l in range(L):
            n = len(trace.features[l][0])
            p, f, a = self.pos[start:start + n], self.feature[start:start + n], self.activation[start:start + n]
            counts = torch.bincount(p, minlength=P)
            kmax = int(counts.max()) if n else 0
            dev = p.device
            slot = (torch.arange(n, device=dev)
                    - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts))
            writes = rm.decoders(l)
            dec = torch.zeros(P, kmax, writes.shape[1], rm.d_model, dtype=dtype, device=dev)
            cols = torch.full((P, kmax), -1, dtype=torch.long, device=dev)
            dec[p, slot] = writes[f].to(dtype) * a[:, None, None].to(dtype)
            cols[p, slot] = torch.arange(start, start + n, device=dev)
            self.dec.append(dec), self.cols.append(cols)
            start += n

    def error_col(self, layer, pos):
        return self.error_offset + layer * self.P + pos

    def writers(self, layer: int) -> list[int]:
        """The source layers whose features write into ``layer``'s MLP output."""
        return [s for s in range(layer + 1) if layer - s < self.dec[s].shape[2]]


def _rows(bw: FrozenBackward, src: _Sources, trace: Trace, layer: torch.Tensor, pos: torch.Tensor,
          grads: torch.Tensor, out: torch.Tensor) -> None:
    """Fill ``out [B, n_cols]`` with the edges into ``B`` targets.

    Target ``b`` injects ``grads[b]`` (d input / d resid) at position ``pos[b]`` of
    ``resid_mid[layer[b]]`` (feature targets) or of ``resid_post[L-1]`` if ``layer[b] == L``
    (logit targets).
    """
    L, B = src.L, len(layer)
    top, P = int(layer.max()), int(pos.max()) + 1
    g = torch.zeros(P, B, grads.shape[-1], dtype=bw.dtype, device=grads.device)  # [P, B, d]
    batch = torch.arange(B, device=grads.device)
    at_top = layer == L
    g[pos[at_top], batch[at_top]] = grads[at_top]
    errors = trace.errors[:, :P].to(bw.dtype)
    out.zero_()
    for l in range(min(top, L - 1), -1, -1):
        if l < top:  # what is written into layer l feeds only targets above l
            for s in src.writers(l):
                dec, cols = src.dec[s][:P, :, l - s], src.cols[s][:P]
                if dec.shape[1]:
                    e = torch.bmm(g, dec.transpose(1, 2))                   # [P, B, kmax]
                    valid = cols >= 0
                    out[:, cols[valid]] += e.transpose(0, 1)[:, valid].to(out.dtype)
            err = torch.einsum("pbd,pd->bp", g, errors[l])
            out[:, src.error_col(l, 0):src.error_col(l, P)] = err.to(out.dtype)
            g = bw.mlp(g, l)
        here = layer == l
        if here.any():
            g[pos[here], batch[here]] += grads[here]
        g = bw.attention(g, l)
    emb = torch.einsum("pbd,pd->bp", g, trace.embed[:P].to(bw.dtype))
    out[:, src.embed_offset:src.embed_offset + P] = emb.to(out.dtype)


def _check_args(max_logits, logit_prob, max_feature_nodes, batch_size, dtype,
                memory_limit) -> None:
    """Types, ranges and finiteness of ``attribute``'s options (see its docstring)."""
    checks.integer("max_logits", max_logits)
    checks.number("logit_prob", logit_prob, 0.0, 1.0, low_open=True)
    checks.integer("max_feature_nodes", max_feature_nodes, 1, none=True)
    checks.integer("batch_size", batch_size)
    checks.one_of("dtype", dtype, (None, torch.float32, torch.bfloat16, torch.float16, torch.float64))
    checks.integer("memory_limit", memory_limit, 1, none=True)


def attribute(
    rm: ReplacementModel,
    prompt: str,
    *,
    logit_targets: list | None = None,
    targets: list | None = None,
    completion: str | None = None,
    explain: list | None = None,
    max_logits: int = 10,
    logit_prob: float = 0.95,
    max_feature_nodes: int | None = 8192,
    batch_size: int = 128,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    memory_limit: int | None = None,
) -> Graph:
    """Compute the attribution graph of ``prompt``.

    Args:
        rm: the replacement model.
        prompt: the text (BOS is prepended).
        logit_targets: ``None`` for the top tokens at the last position until their
            cumulative probability reaches ``logit_prob`` (at most ``max_logits``); or a list
            of token strings, token ids, pairs ``(a, b)`` (the logit difference ``a - b``) and
            ``[d_model]`` tensors (directions in the final-norm output space), all at the
            last position.
        targets: instead of ``logit_targets``, targets of any kind and position, mixed:
            what ``logit_targets`` takes, ``circuitlab.Logit(what, pos)`` for a logit at
            another position, ``circuitlab.Feature(layer, pos, feature)`` for an active
            feature's pre-activation and ``circuitlab.Direction(layer, pos, vector)`` for a
            direction in a layer's MLP input (see ``circuitlab.targets``).
        completion: text that continues ``prompt``; the graph is of ``prompt +
            completion``, teacher-forced, and its logit targets are the completion's tokens,
            each at the position that predicts it (``explain`` picks which).
        explain: the completion's tokens to trace: their indices in the completion's tokens
            or their texts (default: every one). ``Feature`` targets may be added with
            ``targets``.
        max_logits: cap on default logit targets.
        logit_prob: cumulative probability for default logit targets.
        max_feature_nodes: most feature nodes to keep (the most influential, see module
            docstring); ``None`` keeps every active feature.
        batch_size: targets per backward batch.
        dtype: dtype of the backward pass and the edges. ``None`` picks bfloat16 on CPUs
            with native bf16 matrix units (about 6x faster there, edges to ~1e-2 relative)
            and float32 elsewhere; float32 is exact to rounding.
        progress: show a progress bar.
        memory_limit: bytes the attribution may use (default: 80% of available memory).
            What it does not need holds more candidate columns (fewer rows recomputed).

    Returns:
        The ``Graph``.

    Raises:
        CircuitlabError: for bad prompts or targets, or when the graph would not fit in memory.
    """
    _check_args(max_logits, logit_prob, max_feature_nodes, batch_size, dtype, memory_limit)
    logit_specs, feature_specs, direction_specs = split_targets(logit_targets, targets)
    if completion is not None:
        prompt, logit_specs = completion_targets(rm, prompt, completion, explain, logit_specs)
    tokens = rm.tokenize(prompt)
    dtype = dtype or default_dtype(rm.model.cfg.device)
    check_forward(rm, len(tokens), memory_limit)  # before the forward pass: from shapes alone
    trace = rm.run(tokens)
    targets = logit_targets_of(rm, trace, logit_specs, max_logits, logit_prob)
    features, inactive = feature_targets_of(rm, trace, feature_specs)
    directions = direction_targets_of(rm, trace, direction_specs) + inactive
    L, P = rm.n_layers, len(tokens)
    N = sum(len(f[0]) for f in trace.features)
    writes = sum(len(f[0]) * (rm.clt.n_out(s) if rm.clt is not None else 1)
                 for s, f in enumerate(trace.features)) / max(N, 1)
    shape, fwd = replacement_shape(rm)
    parts_at = lambda n, p, k: memory_parts(  # noqa: E731
        n, p, L, k, len(targets) + len(features) + len(directions), rm.d_model, batch_size, dtype, copied_params(rm),
        rm.cfg.n_heads, writes, trace_bytes(p, n, shape, fwd["itemsize"]))
    parts = parts_at(N, P, max_feature_nodes)
    check_attribution(parts, rm.device, memory_limit, f"{N} active features, {P} tokens",
                      lambda limits: fit_hint(parts_at, rm.device, limits, N, P, max_feature_nodes,
                                              lambda p: forward_parts(p, shape, **fwd)))
    src = _Sources(rm, trace, dtype)
    bw = FrozenBackward(rm, trace, dtype)
    n_keep = N if max_feature_nodes is None else max(min(N, max_feature_nodes), len(features))
    bar = tqdm(total=len(targets) + len(directions) + n_keep, desc="Attribution",
               disable=not progress, unit="row")

    # Every tensor below lives on the model's device; the Graph is assembled on the CPU.
    dev = rm.device
    # Logit rows: inject d logit / d resid at each target's position.
    logit_rows = torch.zeros(len(targets), src.n_cols, dtype=dtype, device=dev)
    for i in range(0, len(targets), batch_size):
        batch = targets[i:i + batch_size]
        pos = torch.tensor([t.pos for t in batch], device=dev)
        grads = bw.injection(None, pos, torch.stack([t.direction for t in batch]))
        _rows(bw, src, trace, torch.full_like(pos, L), pos, grads, logit_rows[i:i + batch_size])
        bar.update(len(grads))
    # Direction (and inactive feature) targets' rows: read through the pre-MLP norm of their
    # layer, like features.
    read_rows = torch.zeros(len(directions), src.n_cols, dtype=dtype, device=dev)
    for i, d in enumerate(directions):
        pos = torch.tensor([d.pos], device=dev)
        _rows(bw, src, trace, torch.tensor([d.layer], device=dev), pos,
              bw.injection(d.layer, pos, d.vector[None]), read_rows[i:i + 1])
        bar.update(1)
    # Feature targets' rows: they are visited first, whatever the node budget.
    ids = torch.tensor([int(((src.layer == l) & (src.pos == p) & (src.feature == f)).nonzero()[0, 0])
                        for l, p, f in features], dtype=torch.long, device=dev)
    target_rows = torch.zeros(len(ids), src.n_cols, dtype=dtype, device=dev)
    for j in range(0, len(ids), batch_size):
        part = ids[j:j + batch_size]
        _rows(bw, src, trace, src.layer[part], src.pos[part], _feature_grads(rm, bw, src, part),
              target_rows[j:j + batch_size])

    # Feature rows, visited in order of estimated influence on the targets (all of them if
    # n_keep == N), computed whole a batch at a time and stored over the candidate columns.
    weights = torch.tensor([t.prob for t in targets] + [0.0] * (len(directions) + len(ids)), device=dev)
    if len(ids) or directions or weights.sum() <= 0:  # feature or custom targets: equal weights
        weights = torch.full_like(weights, 1 / len(weights))
    direct = (weights / weights.sum()) @ _shares(torch.cat([logit_rows, read_rows, target_rows]), N).float()
    # No feature may fire at all (n_keep = 0): the graph then holds errors, embeddings, logits.
    spare = spare_memory(parts, dev, memory_limit) // 2 // (max(n_keep, 1) * dtype.itemsize)
    rows = Rows(src.layer, src.pos, L, P, n_keep, candidate_slots(N, n_keep, spare), dtype, dev)
    rows.add_candidates(torch.cat([ids, torch.argsort(direct, descending=True)[:rows.wanted(n_keep)]]))
    full = torch.empty(min(batch_size, n_keep), src.n_cols, dtype=dtype, device=dev)
    visited = torch.zeros(N, dtype=torch.bool, device=dev)
    rows.add(target_rows)
    order, visited[ids] = ids, True
    bar.update(len(ids))
    while len(order) < n_keep:
        if n_keep == N:
            nxt = (~visited).nonzero()[:, 0]
        else:
            score = rows.influence(direct, order)
            score[visited] = -1
            rows.add_candidates(torch.topk(score, rows.wanted(n_keep - len(order))).indices)
            chunk = max(4 * batch_size, len(order) // 2)
            nxt = torch.topk(score, min(chunk, n_keep - len(order))).indices
        # Batch by (layer, pos) so each backward starts low and stays short.
        nxt = nxt[torch.argsort(src.layer[nxt] * P + src.pos[nxt])]
        for j in range(0, len(nxt), batch_size):
            ids = nxt[j:j + batch_size]
            _rows(bw, src, trace, src.layer[ids], src.pos[ids], _feature_grads(rm, bw, src, ids),
                  full[:len(ids)])
            rows.add(full[:len(ids)])
            order = torch.cat([order, ids])
            visited[ids] = True
            bar.update(len(ids))
    bar.close()
    del full
    return _assemble(rm, trace, src, targets, torch.cat([logit_rows, read_rows]), rows, order,
                     prompt, bw, batch_size, features, directions)


def copied_params(rm) -> int:
    """Parameters ``FrozenBackward`` copies in its dtype: value and output matrices, skips."""
    blocks = rm.model.blocks
    return sum(b.attn.W_O.numel() + getattr(b.attn, "_W_V", b.attn.W_V).numel() for b in blocks) \
        + sum(s.numel() for s in map(rm.skip_matrix, range(rm.n_layers)) if s is not None)


def _feature_grads(rm, bw: FrozenBackward, src: _Sources, ids: torch.Tensor) -> torch.Tensor:
    """d pre-activation / d resid_mid for the features ``ids`` (encoder columns through ln2)."""
    grads = torch.empty(len(ids), rm.d_model, dtype=bw.dtype, device=ids.device)
    layers = src.layer[ids]
    for l in layers.unique().tolist():
        here = layers == l
        enc = rm.encoder(l)[0].detach()[:, src.feature[ids[here]]].T
        grads[here] = bw.injection(l, src.pos[ids[here]], enc)
    return grads


def _shares(rows: torch.Tensor, n_features: int) -> torch.Tensor:
    """Each row's absolute edges to features as a share of its total absolute input (bf16)."""
    a = rows.abs()
    return (a[:, :n_features] / a.float().sum(1, keepdim=True).clamp_min(1e-30)).to(torch.bfloat16)


def _columns(values: torch.Tensor, n: int, slot: torch.Tensor, where: torch.Tensor,
             kept: torch.Tensor, dropped: torch.Tensor, out: torch.Tensor,
             rank: torch.Tensor | None = None, chunk: int = 1024) -> None:
    """Write rows restricted to the graph's sources into ``out`` (float32, on the CPU; row
    ``rank[i]`` of ``values`` to ``out[i]``): kept features, then errors with the dropped
    features folded into their ``(layer, pos)`` (``where``), then embeddings.

    ``values`` holds feature ``f`` in column ``slot[f]`` when that is below ``n``, its
    number of feature columns (``Rows`` layout; full rows have ``slot = arange``); the other
    features are folded into the errors already. A kept feature without a column reads 0
    (``_complete`` fills it in). Done in chunks of rows to bound memory."""
    K = len(kept)
    k_slot, d_slot = slot[kept], slot[dropped]
    k_held, d_held = k_slot < n, d_slot < n
    k_cols, k_slot = k_held.nonzero()[:, 0], k_slot[k_held]
    d_where, d_slot = where[dropped[d_held]], d_slot[d_held]
    rank = torch.arange(len(values), device=values.device) if rank is None else rank
    for i in range(0, len(rank), chunk):
        r = values[rank[i:i + chunk]]
        out[i:i + chunk, k_cols.cpu()] = r[:, k_slot].float().cpu()
        tail = r[:, n:].float().T.contiguous()                               # [(L+1)P, b]
        tail.index_add_(0, d_where, r[:, d_slot].float().T.contiguous())
        out[i:i + chunk, K:] = tail.T.cpu()


def _feature_inputs(rm, src: _Sources, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Pre-activations of features ``ids`` given MLP inputs ``x [L, P, d]`` (float32, on the
    CPU)."""
    out = torch.empty(len(ids), device=ids.device)
    layers = src.layer[ids]
    for l in layers.unique().tolist():
        here = layers == l
        f, p = src.feature[ids[here]], src.pos[ids[here]]
        W_enc, b_enc = rm.encoder(l)
        out[here] = ((x[l, p].float() * W_enc.detach()[:, f].T.float()).sum(-1)
                     + b_enc.detach()[f].float())
    return out.cpu()


def _complete(rm, bw, src, trace, rows: Rows, kept, order, rank, out, batch_size) -> int:
    """Recompute the stored rows that miss kept features and move those edges out of the
    error columns into their own (``out`` as in ``_columns``). Returns the number of
    rows recomputed."""
    K, P = len(kept), src.P
    at = torch.full((src.n_features,), -1, dtype=torch.long, device=kept.device)
    at[kept] = torch.arange(K, device=kept.device)
    out_row = torch.empty_like(rank)
    out_row[rank] = torch.arange(len(rank), device=rank.device)
    layer, pos = src.layer[order], src.pos[order]
    n = 0
    for late, missed in rows.late(kept, layer, pos):
        full = torch.empty(min(batch_size, len(late)), src.n_cols, dtype=bw.dtype, device=kept.device)
        late = late[torch.argsort(layer[late] * P + pos[late])]
        for j in range(0, len(late), batch_size):
            ids = order[late[j:j + batch_size]]
            b = len(ids)
            _rows(bw, src, trace, src.layer[ids], src.pos[ids], _feature_grads(rm, bw, src, ids),
                  full[:b])
            edges = full[:b, missed].float().cpu()
            dest = out_row[late[j:j + batch_size]].cpu()[:, None].expand_as(edges)
            out[dest, at[missed].cpu().expand_as(edges)] = edges
            where = (K + rows.where[missed]).cpu().expand_as(edges)
            out.index_put_((dest, where), -edges, accumulate=True)
            n += b
    return n


def _assemble(rm, trace, src, targets, logit_rows, stored: Rows, order, prompt, bw,
              batch_size, features, reads) -> Graph:
    """The ``Graph``: kept features, error and embedding nodes, then the logit and direction
    targets (whose rows are ``logit_rows``, in that order)."""
    L, P = rm.n_layers, len(trace.tokens)
    kept, rank = torch.sort(order)
    dropped = torch.ones(src.n_features, dtype=torch.bool, device=order.device)
    dropped[kept] = False
    dropped = dropped.nonzero()[:, 0]
    K = len(kept)
    n_src = K + (L + 1) * P
    n = n_src + len(targets) + len(reads)
    adjacency = torch.zeros(n, n)  # host: the Graph's adjacency
    _columns(stored.values, stored.n_slots, stored.slot, stored.where, kept, dropped,
             adjacency[:K, :n_src], rank)
    recomputed = _complete(rm, bw, src, trace, stored, kept, order, rank, adjacency[:K, :n_src],
                           batch_size)
    N = src.n_features
    _columns(logit_rows, N, torch.arange(N, device=order.device), stored.where, kept, dropped,
             adjacency[n_src:, :n_src])

    # Errors with the dropped features folded in, for the error nodes' activations (a
    # cross-layer feature's node takes its writes into every layer: its total write).
    errors = trace.errors.clone()
    for l in src.layer[dropped].unique().tolist():
        ids = dropped[src.layer[dropped] == l]
        contrib = src.activation[ids, None] * rm.decoder(l).detach()[src.feature[ids]]
        errors[l].index_add_(0, src.pos[ids], contrib.to(errors.dtype))

    # Each target's input, and its constant part from the frozen model with all sources zero.
    zero = torch.zeros_like(trace.embed)
    x0, resid0 = rm.frozen_run(
        trace, lambda l, x: rm.decode(l, [None] * L, x), embed=zero)
    dev = trace.embed.device
    directions = (torch.stack([t.direction for t in targets]) if targets
                  else torch.zeros(0, rm.d_model, device=dev))
    bias = torch.tensor([t.bias for t in targets], device=directions.device)
    at = torch.tensor([t.pos for t in targets], dtype=torch.long, device=dev)
    inputs, constants = torch.zeros(n), torch.zeros(n)  # host: the Graph's
    with torch.no_grad():
        inputs[:K] = _feature_inputs(rm, src, kept, trace.mlp_in)
        constants[:K] = _feature_inputs(rm, src, kept, x0)
        final = rm.final_normed(trace, trace.resid_final)[at].float()
        inputs[n_src:n_src + len(targets)] = ((directions * final).sum(-1) + bias).cpu()
        final0 = rm.final_normed(trace, resid0)[at].float()
        constants[n_src:n_src + len(targets)] = ((directions * final0).sum(-1) + bias).cpu()
        for i, d in enumerate(reads):
            j = n_src + len(targets) + i
            inputs[j] = float(trace.mlp_in[d.layer][d.pos].float() @ d.vector) + d.bias
            constants[j] = float(x0[d.layer][d.pos].float() @ d.vector) + d.bias

    token_strs = rm.token_strs(trace.tokens)
    rows = [dict(node_id=f"{l}_{f}_{p}", kind="feature", layer=l, pos=p, feature=f, activation=a,
                 token=token_strs[p], prob=math.nan)
            for l, p, f, a in zip(src.layer[kept].tolist(), src.pos[kept].tolist(),
                                  src.feature[kept].tolist(), src.activation[kept].tolist())]
    for l in range(L):
        for p in range(P):
            rows.append(dict(node_id=f"{l}_-1_{p}", kind="error", layer=l, pos=p, feature=-1,
                             activation=float(errors[l, p].norm()), token=token_strs[p], prob=math.nan))
    for p, t in enumerate(trace.tokens.tolist()):
        rows.append(dict(node_id=f"E_{t}_{p}", kind="embedding", layer=-1, pos=p, feature=t,
                         activation=float(trace.embed[p].norm()), token=token_strs[p], prob=math.nan))
    for i, t in enumerate(targets):
        feature = t.token if t.token is not None else -2 - i
        rows.append(dict(node_id=f"{L + 1}_{feature}_{t.pos}", kind="logit", layer=L, pos=t.pos,
                         feature=feature, activation=float(inputs[n_src + i]), token=t.label, prob=t.prob))
    for i, d in enumerate(reads):  # an inactive feature's activation is 0
        activation = float(inputs[n_src + len(targets) + i]) if d.kind == "direction" else 0.0
        rows.append(dict(node_id=d.node_id, kind=d.kind, layer=d.layer, pos=d.pos,
                         feature=d.feature, activation=activation,
                         token=d.label if d.kind == "direction" else token_strs[d.pos], prob=math.nan))
    metadata = dict(model=rm.name, transcoders=rm.transcoder_source, n_layers=L,
                    cross_layer=rm.clt is not None,
                    n_active_features=src.n_features, max_feature_nodes=len(kept),
                    recomputed_rows=recomputed,
                    logit_directions=[t.direction.tolist() for t in targets],
                    read_directions=[d.vector.tolist() for d in reads if d.kind == "direction"],
                    targets=[f"{l}_{f}_{p}" for l, p, f in features] + [r["node_id"] for r in rows[n_src:]])
    if len(dropped):  # which features are nodes: the rest are folded into the error nodes
        metadata["kept_features"] = torch.stack(
            [src.layer[kept], src.pos[kept], src.feature[kept]], 1).tolist()
    graph = Graph(prompt=prompt, tokens=trace.tokens.tolist(), token_strs=token_strs,
                  rows=rows, adjacency=adjacency, inputs=inputs, constants=constants,
                  metadata=metadata)
    return annotate_influence(graph)
