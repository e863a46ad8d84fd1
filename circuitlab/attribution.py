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
node of their ``(layer, pos)``, which keeps every target's edges + constant exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import psutil
import torch
from tqdm.auto import tqdm

from .graph import Graph
from .loading import CircuitlabError
from .prune import node_influence
from .replacement import ReplacementModel, Trace


@dataclass
class LogitTarget:
    """A logit target: ``direction . final_norm(resid)[pos] + bias``.

    ``token`` is the vocabulary id for a single-token target (its demeaned logit), ``None``
    for a logit difference or a custom direction.
    """

    label: str
    direction: torch.Tensor
    bias: float
    token: int | None
    prob: float


def _norm_vjp(grad: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, center: bool):
    """VJP of a norm with a frozen denominator: y = (x [- mean x]) / scale * w [+ b]."""
    g = grad * (w / scale)
    return g - g.mean(-1, keepdim=True) if center else g


class _Backward:
    """The frozen replacement model's VJP for one prompt, with per-layer tensors cached."""

    def __init__(self, rm: ReplacementModel, trace: Trace, dtype: torch.dtype):
        cfg = rm.cfg
        self.rm, self.trace, self.dtype = rm, trace, dtype
        self.center = cfg.normalization_type == "LN"
        self.sandwich = bool(cfg.use_normalization_before_and_after)
        cast = lambda t: t.detach().to(dtype)  # noqa: E731
        self.layers = []
        for l, block in enumerate(rm.model.blocks):
            attn = block.attn
            n_kv = attn._W_V.shape[0] if hasattr(attn, "_W_V") else cfg.n_heads
            W_V = attn._W_V if hasattr(attn, "_W_V") else attn.W_V  # [n_kv, d, dh]
            skip = rm.skip_matrix(l)
            self.layers.append(dict(
                W_O=cast(attn.W_O.reshape(-1, cfg.d_model)),             # [H*dh, d]
                W_VT=cast(W_V.permute(0, 2, 1).reshape(-1, cfg.d_model)),  # [n_kv*dh, d]
                n_kv=n_kv,
                pattern=cast(trace.patterns[l]),                            # [H, P, P]
                ln1=(cast(block.ln1.w), cast(trace.scales[f"blocks.{l}.ln1.hook_scale"])),
                ln1_post=(cast(block.ln1_post.w),
                          cast(trace.scales[f"blocks.{l}.ln1_post.hook_scale"]))
                if self.sandwich else None,
                ln2=(cast(block.ln2.w), cast(trace.scales[f"blocks.{l}.ln2.hook_scale"])),
                skip=None if skip is None else cast(skip),                  # [d_out, d_in]
            ))

    def norm(self, grad, ln, upto):
        w, scale = ln
        return _norm_vjp(grad, w, scale[:upto], self.center)

    def mlp(self, g: torch.Tensor, l: int) -> torch.Tensor:
        """Grad wrt resid_post[l] -> grad wrt resid_mid[l] (residual + skip path)."""
        layer = self.layers[l]
        if layer["skip"] is None:
            return g
        return g + self.norm(g @ layer["skip"], layer["ln2"], g.shape[1])

    def attention(self, g: torch.Tensor, l: int) -> torch.Tensor:
        """Grad wrt resid_mid[l] -> grad wrt resid_pre[l] (residual + frozen attention)."""
        layer, (B, P, d) = self.layers[l], g.shape
        ga = self.norm(g, layer["ln1_post"], P) if self.sandwich else g
        H = layer["pattern"].shape[0]
        gz = (ga @ layer["W_O"].T).view(B, P, H, -1).transpose(1, 2)     # [B, H, P, dh]
        gv = layer["pattern"][:, :P, :P].transpose(-1, -2) @ gz          # [B, H, P, dh]
        n_kv = layer["n_kv"]
        gv = gv.view(B, n_kv, H // n_kv, P, -1).sum(2)                   # [B, n_kv, P, dh]
        gy = gv.transpose(1, 2).reshape(B, P, -1) @ layer["W_VT"]        # [B, P, d]
        return g + self.norm(gy, layer["ln1"], P)


class _Sources:
    """Column layout of the sources: active features, then errors (L x P), then embeddings."""

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
            slot = torch.arange(n) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
            dec = torch.zeros(P, kmax, rm.d_model, dtype=dtype)
            cols = torch.full((P, kmax), -1, dtype=torch.long)
            dec[p, slot] = (rm.transcoders[l].W_dec[f] * a[:, None]).to(dtype)
            cols[p, slot] = torch.arange(start, start + n)
            self.dec.append(dec), self.cols.append(cols)
            start += n

    def error_col(self, layer, pos):
        return self.error_offset + layer * self.P + pos


def _rows(bw: _Backward, src: _Sources, trace: Trace, targets: list, out: torch.Tensor) -> None:
    """Fill ``out [len(targets), n_cols]`` with the edges into each target.

    Each target is ``(layer, pos, vector)``: ``vector`` is d input / d resid at
    ``resid_mid[layer]`` (features) or at ``resid_post[L-1]`` for ``layer == L`` (logits).
    """
    L = src.L
    top = max(t[0] for t in targets)
    P = max(t[1] for t in targets) + 1
    B, d = len(targets), trace.embed.shape[-1]
    g = torch.zeros(B, P, d, dtype=bw.dtype)
    for b, (layer, pos, vec) in enumerate(targets):
        if layer == L:
            g[b, pos] += vec.to(bw.dtype)
    inject = {}
    for b, (layer, pos, vec) in enumerate(targets):
        if layer < L:
            inject.setdefault(layer, []).append((b, pos, vec))
    errors = trace.errors[:, :P].to(bw.dtype)
    for l in range(min(top, L - 1), -1, -1):
        if l < top:  # sources at layer l feed only targets above l
            dec, cols = src.dec[l][:P], src.cols[l][:P]
            if dec.shape[1]:
                e = torch.bmm(g.transpose(0, 1), dec.transpose(1, 2))    # [P, B, kmax]
                valid = cols >= 0
                out[:, cols[valid]] = e.permute(1, 0, 2)[:, valid].float()
            err = (g * errors[l]).sum(-1).float()                         # [B, P]
            out[:, src.error_col(l, 0):src.error_col(l, P)] = err
            g = bw.mlp(g, l)
        for b, pos, vec in inject.get(l, []):
            g[b, pos] += vec.to(bw.dtype)
        g = bw.attention(g, l)
    out[:, src.embed_offset:src.embed_offset + P] = (
        g * trace.embed[:P].to(bw.dtype)).sum(-1).float()


def _logit_targets(rm, trace, logit_targets, max_logits, logit_prob) -> list[LogitTarget]:
    W_U, b_U = rm.model.W_U.detach(), rm.model.b_U.detach()
    probs = torch.softmax(trace.logits[-1].double(), -1).float()
    tok_str = lambda t: rm.tokenizer.decode([t])  # noqa: E731

    def token_target(t: int) -> LogitTarget:
        if not 0 <= t < W_U.shape[1]:
            raise CircuitlabError(f"Logit target id {t} is outside the vocabulary (0..{W_U.shape[1] - 1}).")
        return LogitTarget(tok_str(t), W_U[:, t] - W_U.mean(1), float(b_U[t] - b_U.mean()),
                           t, float(probs[t]))

    def token_id(text: str) -> int:
        ids = rm.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise CircuitlabError(
                f"Logit target {text!r} is {len(ids)} tokens ({ids}); a target must be one token. "
                "Try it with or without a leading space, or pass a token id.")
        return ids[0]

    if logit_targets is None:
        order = torch.argsort(probs, descending=True)[:max_logits]
        cum = torch.cumsum(probs[order], 0)
        n = int((cum < logit_prob).sum()) + 1
        return [token_target(int(t)) for t in order[:min(n, max_logits)]]
    targets = []
    for spec in logit_targets:
        if isinstance(spec, int):
            targets.append(token_target(spec))
        elif isinstance(spec, str):
            targets.append(token_target(token_id(spec)))
        elif isinstance(spec, tuple) and len(spec) == 2:  # logit difference (a, b)
            a, b = (token_target(s if isinstance(s, int) else token_id(s)) for s in spec)
            targets.append(LogitTarget(f"{a.label} - {b.label}", a.direction - b.direction,
                                       a.bias - b.bias, None, a.prob))
        elif isinstance(spec, torch.Tensor) and spec.shape == (rm.d_model,):
            targets.append(LogitTarget(f"direction {len(targets)}", spec.float(), 0.0, None, 0.0))
        else:
            raise CircuitlabError(
                f"Unknown logit target {spec!r}: use a token string, a token id, a pair (a, b) "
                f"for the logit difference a - b, or a tensor of shape ({rm.d_model},) for a "
                "direction in the final-norm output space.")
    return targets


def estimate_memory(n_features: int, n_positions: int, n_layers: int, max_feature_nodes: int | None,
                    n_logits: int, d_model: int, batch_size: int) -> int:
    """Bytes an attribution needs at peak (rows over all sources + adjacency + batch)."""
    kept = n_features if max_feature_nodes is None else min(n_features, max_feature_nodes)
    cols = n_features + (n_layers + 1) * n_positions
    n_nodes = kept + (n_layers + 1) * n_positions + n_logits
    rows = 4 * (kept + n_logits) * cols
    adjacency = 4 * n_nodes * n_nodes
    backward = 4 * 8 * batch_size * n_positions * d_model
    return rows + 2 * adjacency + backward


def attribute(
    rm: ReplacementModel,
    prompt: str,
    *,
    logit_targets: list | None = None,
    max_logits: int = 10,
    logit_prob: float = 0.95,
    max_feature_nodes: int | None = 8192,
    batch_size: int = 128,
    dtype: torch.dtype = torch.float32,
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
            ``[d_model]`` tensors (directions in the final-norm output space).
        max_logits: cap on default logit targets.
        logit_prob: cumulative probability for default logit targets.
        max_feature_nodes: most feature nodes to keep (the most influential, see module
            docstring); ``None`` keeps every active feature.
        batch_size: targets per backward batch.
        dtype: dtype of the backward pass; ``torch.bfloat16`` is faster on CPUs with
            AVX-512 BF16 at ~1e-2 relative precision; float32 is exact to rounding.
        progress: show a progress bar.
        memory_limit: bytes the attribution may use (default: 80% of available memory).

    Returns:
        The ``Graph``.

    Raises:
        CircuitlabError: for bad prompts or targets, or when the graph would not fit in memory.
    """
    tokens = rm.tokenize(prompt)
    trace = rm.run(tokens)
    targets = _logit_targets(rm, trace, logit_targets, max_logits, logit_prob)
    src = _Sources(rm, trace, dtype)
    L, P, N = rm.n_layers, len(tokens), src.n_features
    need = estimate_memory(N, P, L, max_feature_nodes, len(targets), rm.d_model, batch_size)
    limit = memory_limit or int(0.8 * psutil.virtual_memory().available)
    if need > limit:
        raise CircuitlabError(
            f"This graph needs about {need / 2**30:.1f} GiB ({N} active features, {P} tokens) but "
            f"only {limit / 2**30:.1f} GiB is available. Lower max_feature_nodes, shorten the "
            "prompt, or free memory.")
    bw = _Backward(rm, trace, dtype)
    n_keep = N if max_feature_nodes is None else min(N, max_feature_nodes)

    # Target vectors: d input / d resid at their injection point.
    final_w, final_scale = rm.model.ln_final.w.detach(), trace.scales["ln_final.hook_scale"]
    logit_vecs = [(L, P - 1, _norm_vjp(t.direction, final_w, final_scale[-1], bw.center))
                  for t in targets]

    def feature_vec(i: int):
        l, p, f = int(src.layer[i]), int(src.pos[i]), int(src.feature[i])
        return (l, p, _norm_vjp(rm.transcoders[l].W_enc[:, f].detach(), rm.model.blocks[l].ln2.w.detach(),
                                trace.scales[f"blocks.{l}.ln2.hook_scale"][p], bw.center))

    logit_rows = torch.zeros(len(targets), src.n_cols)
    feat_rows = torch.zeros(n_keep, src.n_cols)
    visited = torch.zeros(N, dtype=torch.bool)
    order: list[int] = []
    bar = tqdm(total=len(targets) + n_keep, desc="Attribution", disable=not progress, unit="row")
    for i in range(0, len(targets), batch_size):
        _rows(bw, src, trace, logit_vecs[i:i + batch_size], logit_rows[i:i + batch_size])
        bar.update(len(logit_vecs[i:i + batch_size]))
    weights = torch.tensor([t.prob for t in targets])
    weights = weights / weights.sum() if weights.sum() > 0 else torch.full_like(weights, 1 / len(targets))
    chunk = 4 * batch_size
    while len(order) < n_keep:
        if n_keep == N:
            nxt = torch.arange(N)[~visited][:chunk]
        else:
            score = _feature_influence(logit_rows, feat_rows[:len(order)], order, weights, N)
            score[visited] = -1
            nxt = torch.topk(score, min(chunk, n_keep - len(order))).indices
        # Batch by (layer, pos) so each backward starts low and stays short.
        nxt = nxt[torch.argsort(src.layer[nxt] * P + src.pos[nxt])]
        for j in range(0, len(nxt), batch_size):
            ids = nxt[j:j + batch_size].tolist()
            start = len(order)
            _rows(bw, src, trace, [feature_vec(i) for i in ids], feat_rows[start:start + len(ids)])
            order += ids
            visited[ids] = True
            bar.update(len(ids))
    bar.close()
    return _assemble(rm, trace, src, targets, logit_rows, feat_rows, order, prompt)


def _feature_influence(logit_rows, feat_rows, order, weights, N, max_depth: int = 64):
    """Estimated influence on the logits of every active feature, from the rows so far."""
    def normalize(rows):
        a = rows[:, :N].abs()
        return a / rows.abs().sum(1, keepdim=True).clamp_min(1e-30)

    influence = weights @ normalize(logit_rows)
    if not order:
        return influence
    A = normalize(feat_rows)
    idx = torch.tensor(order)
    current = influence
    for _ in range(max_depth):
        current = current[idx] @ A
        influence = influence + current
        if current.sum() < 1e-6 * influence.sum():
            break
    return influence


def _assemble(rm, trace, src, targets, logit_rows, feat_rows, order, prompt) -> Graph:
    L, P = rm.n_layers, len(trace.tokens)
    kept = torch.tensor(sorted(order), dtype=torch.long)
    row_of = {c: r for r, c in enumerate(order)}
    kept_rows = feat_rows[[row_of[int(c)] for c in kept]] if len(kept) else feat_rows[:0]
    dropped = torch.ones(src.n_features, dtype=torch.bool)
    dropped[kept] = False
    dropped = dropped.nonzero()[:, 0]

    # Columns of the graph: kept features, errors (with dropped features folded in), embeddings.
    def columns(rows):
        cols = torch.cat([rows[:, kept], rows[:, src.error_offset:]], 1)
        err_idx = src.layer[dropped] * P + src.pos[dropped] + len(kept)
        return cols.index_add_(1, err_idx, rows[:, dropped])

    n_src = len(kept) + (L + 1) * P
    n = n_src + len(targets)
    adjacency = torch.zeros(n, n)
    adjacency[:len(kept), :n_src] = columns(kept_rows)
    adjacency[n_src:, :n_src] = columns(logit_rows)

    # Errors with the dropped features folded in, for the error nodes' activations.
    errors = trace.errors.clone()
    for i in dropped.tolist():
        l, p, f = int(src.layer[i]), int(src.pos[i]), int(src.feature[i])
        errors[l, p] += src.activation[i] * rm.transcoders[l].W_dec[f].detach()

    # Each target's input, and its constant part from the frozen model with all sources zero.
    zero = torch.zeros_like(trace.embed)
    x0, resid0 = rm.frozen_run(
        trace, lambda l, x: rm.decode(l, torch.zeros(rm.d_sae(l)), x), embed=zero)
    with torch.no_grad():
        feat_in, feat_const = [], []
        for i in kept.tolist():
            l, p, f = int(src.layer[i]), int(src.pos[i]), int(src.feature[i])
            feat_in.append(rm.pre_activations(l, trace.mlp_in[l, p])[f])
            feat_const.append(rm.pre_activations(l, x0[l, p])[f])
        normed, normed0 = rm.final_normed(trace, trace.resid_final)[-1], rm.final_normed(trace, resid0)[-1]
        logit_in = [normed @ t.direction + t.bias for t in targets]
        logit_const = [normed0 @ t.direction + t.bias for t in targets]
    inputs = torch.zeros(n)
    constants = torch.zeros(n)
    inputs[:len(kept)] = torch.tensor([float(v) for v in feat_in])
    constants[:len(kept)] = torch.tensor([float(v) for v in feat_const])
    inputs[n_src:] = torch.tensor([float(v) for v in logit_in])
    constants[n_src:] = torch.tensor([float(v) for v in logit_const])

    token_strs = [rm.tokenizer.decode([t]) for t in trace.tokens.tolist()]
    rows = []
    for i in kept.tolist():
        l, p, f = int(src.layer[i]), int(src.pos[i]), int(src.feature[i])
        rows.append(dict(node_id=f"{l}_{f}_{p}", kind="feature", layer=l, pos=p, feature=f,
                         activation=float(src.activation[i]), token=token_strs[p], prob=math.nan))
    for l in range(L):
        for p in range(P):
            rows.append(dict(node_id=f"{l}_-1_{p}", kind="error", layer=l, pos=p, feature=-1,
                             activation=float(errors[l, p].norm()), token=token_strs[p], prob=math.nan))
    for p, t in enumerate(trace.tokens.tolist()):
        rows.append(dict(node_id=f"E_{t}_{p}", kind="embedding", layer=-1, pos=p, feature=t,
                         activation=float(trace.embed[p].norm()), token=token_strs[p], prob=math.nan))
    for i, t in enumerate(targets):
        feature = t.token if t.token is not None else -2 - i
        rows.append(dict(node_id=f"{L + 1}_{feature}_{P - 1}", kind="logit", layer=L, pos=P - 1,
                         feature=feature, activation=float(inputs[n_src + i]), token=t.label, prob=t.prob))
    metadata = dict(model=rm.name, transcoders=rm.transcoder_source, n_layers=L,
                    n_active_features=src.n_features, max_feature_nodes=len(kept),
                    logit_directions=[t.direction.tolist() for t in targets])
    graph = Graph(prompt=prompt, tokens=trace.tokens.tolist(), token_strs=token_strs,
                  rows=rows, adjacency=adjacency, inputs=inputs, constants=constants,
                  metadata=metadata)
    graph.nodes["influence"] = node_influence(graph).numpy()
    return graph
