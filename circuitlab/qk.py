"""QK attributions: why an attention head attends where it does.

With the norm denominators (the pre-attention norm, Gemma's q/k norms) and any soft-cap
frozen at their values on the prompt, a head's pre-softmax score from query ``q`` to key
``k`` is bilinear in the residual streams there. Each stream is the sum of its components
(the token embedding, the active features' writes, each layer's skip path and error, each
earlier head's output, the biases), so the score is a sum over pairs of a query-side and a
key-side component (see ``qk``).
"""

from __future__ import annotations

import pandas as pd
import torch

from .cards import find_examples
from .errors import CircuitlabError
from .graph import Graph
from .hooks import attention_io, scale_name


def attention_row(rm, prompt, layer: int, head: int, query_pos: int) -> pd.DataFrame:
    """Which key positions head ``(layer, head)`` attends to from ``query_pos``.

    Args:
        rm: the ``ReplacementModel``.
        prompt: the text, or a ``Graph`` (its tokens).
        layer, head: the attention head.
        query_pos: the query position (``-1``: the last).

    Returns:
        One row per key position up to the query: ``key_pos, token, score`` (the
        pre-softmax score) and ``probability``, strongest first.
    """
    tokens = _tokens(rm, prompt)
    q = _check_head(rm, tokens, layer, head, query_pos, None)[0]
    cache = attention_io(rm.model, tokens, layer)
    scores, pattern = cache["scores"][head, q, :q + 1], cache["pattern"][head, q, :q + 1]
    strs = rm.token_strs(tokens)
    out = pd.DataFrame({"key_pos": range(q + 1), "token": strs[:q + 1],
                        "score": scores.tolist(), "probability": pattern.tolist()})
    return out.sort_values("probability", ascending=False, ignore_index=True)


def qk(rm, prompt, layer: int, head: int, query_pos: int, key_pos: int, *,
       top: int = 20) -> pd.DataFrame:
    """The QK attribution of head ``(layer, head)`` from ``query_pos`` to ``key_pos``.

    With the norm denominators (the pre-attention norm, Gemma's q/k norms) and any
    soft-cap frozen at their values on the prompt, the pre-softmax score is bilinear in the
    residual streams at the query and the key. Each stream is the sum of its components
    there: the token embedding, each active feature's write (a cross-layer feature's
    writes into every layer below ``layer``), each layer's skip path and error, each
    earlier attention head's output, and the biases. So::

        score = sum_{i, j} c * (R_q n_q (norm1_q(x_i) W_Q)) . (R_k n_k (norm1_k(y_j) W_K)) / s

    over query components ``x_i`` and key components ``y_j`` (the biases of both sides
    included as components), with ``R`` the rotary maps, ``n`` the q/k norms' frozen
    scales, ``s`` the attention scale and ``c`` the soft-cap's frozen factor (1 without).

    Args:
        rm: the ``ReplacementModel``.
        prompt: the text, or a ``Graph`` (its tokens).
        layer, head: the attention head.
        query_pos, key_pos: positions (``key_pos <= query_pos``; ``-1``: the last).
        top: pairs kept, by ``|contribution|``.

    Returns:
        The ``top`` pairs: ``query, key`` (component names), ``query_kind, key_kind``,
        ``query_node, key_node`` (the graph node id of an embedding, feature or error
        component, as ``Graph.nodes.node_id`` spells it; ``""`` for the others),
        ``contribution`` and ``share`` (of the score), strongest first. ``attrs`` holds
        ``score`` (the model's), ``probability`` (the head's attention from query to key),
        ``top_share`` (the share of the score the listed pairs carry) and ``n_pairs``.

    Raises:
        CircuitlabError: for a head or layer out of range, or a key after the query or
            outside the head's attention window.
    """
    tokens = _tokens(rm, prompt)
    q, k = _check_head(rm, tokens, layer, head, query_pos, key_pos)
    cache = attention_io(rm.model, tokens, layer)
    score = float(cache["scores"][head, q, k])
    if not torch.isfinite(torch.tensor(score)):
        raise CircuitlabError(f"Head {layer}.{head} cannot attend from position {q} to {k} "
                              "(outside its attention window); pick a key it attends to "
                              "(see attention_row).")
    trace = rm.run(tokens)
    names_q, comps_q = _components(rm, trace, cache, layer, q)
    names_k, comps_k = _components(rm, trace, cache, layer, k)
    Q = _project(rm, trace, cache, layer, head, q, comps_q, "Q")
    K = _project(rm, trace, cache, layer, head, k, comps_k, "K")
    names_q, names_k = names_q + [("bias", "query bias", "")], names_k + [("bias", "key bias", "")]
    attn = rm.model.blocks[layer].attn
    table = (Q @ K.T) / attn.attn_scale
    raw = float(table.sum())
    cap = getattr(rm.cfg, "attn_scores_soft_cap", -1.0) or -1.0
    if cap > 0:
        table = table * (score / raw if raw != 0 else 1.0)
    flat = table.flatten()
    order = flat.abs().argsort(descending=True)[:top]
    nk = len(names_k)
    columns = ["query", "key", "query_kind", "key_kind", "query_node", "key_node", "contribution"]
    rows = [(names_q[i // nk][1], names_k[i % nk][1], names_q[i // nk][0], names_k[i % nk][0],
             names_q[i // nk][2], names_k[i % nk][2], float(flat[i])) for i in order.tolist()]
    out = pd.DataFrame(rows, columns=columns)
    out["share"] = out["contribution"] / score if score != 0 else float("nan")
    out.attrs.update(score=score, probability=float(cache["pattern"][head, q, k]),
                     top_share=float(flat[order].sum() / score) if score != 0 else float("nan"),
                     n_pairs=len(flat), total=float(flat.sum()))
    return out


def _tokens(rm, prompt) -> torch.Tensor:
    if isinstance(prompt, Graph):
        return torch.tensor(prompt.tokens, device=rm.device)
    return rm.tokenize(prompt)


def _check_head(rm, tokens, layer, head, query_pos, key_pos) -> tuple[int, int | None]:
    """The query and key positions (negative ones counted from the end), checked."""
    L, H, P = rm.n_layers, rm.cfg.n_heads, len(tokens)
    if not isinstance(layer, int) or not 0 <= layer < L:
        raise CircuitlabError(f"layer={layer!r}: the model has layers 0 to {L - 1}.")
    if not isinstance(head, int) or not 0 <= head < H:
        raise CircuitlabError(f"head={head!r}: layer {layer} has heads 0 to {H - 1}.")
    pos = []
    for name, p in (("query_pos", query_pos), ("key_pos", key_pos)):
        if p is None:
            pos.append(None)
            continue
        if not isinstance(p, int) or not -P <= p < P:
            raise CircuitlabError(f"{name}={p!r}: the prompt has positions 0 to {P - 1}.")
        pos.append(p % P)
    if pos[1] is not None and pos[1] > pos[0]:
        raise CircuitlabError(f"key_pos={key_pos} comes after query_pos={query_pos}: a query "
                              "attends only to itself and earlier positions.")
    return pos[0], pos[1]


def _components(rm, trace, cache, layer: int, pos: int) -> tuple[list, torch.Tensor]:
    """The residual stream entering ``layer`` at ``pos`` as named components ``[n, d]``
    (kind, name, graph node id or ``""``) that sum to it."""
    L, d = rm.n_layers, rm.d_model
    token = int(trace.tokens[pos])
    examples = find_examples(rm)[0]
    names = [("embedding", f"Emb {rm.token_str(token)!r}", f"E_{token}_{pos}")]
    vecs = [trace.embed[pos].float()]
    features: dict = {}
    for l in range(layer):
        block = rm.model.blocks[l]
        attn = block.attn
        post = torch.ones(d)
        if rm.cfg.use_normalization_before_and_after:
            post = (block.ln1_post.w / trace.scales[scale_name("ln1_post", l)][pos]).float()
        W_O = attn.W_O.detach().float()  # [H, dh, d]
        for h in range(W_O.shape[0]):
            names.append(("head", f"head {l}.{h}", ""))
            vecs.append(post * (cache["z"][l][pos, h].float() @ W_O[h]))
        names.append(("bias", f"attention bias L{l}", ""))
        vecs.append(post * attn.b_O.detach().float())
        pos_f, feat, act = trace.features[l]
        here = pos_f == pos
        dec = rm.decoders(l).detach()
        for f, a in zip(feat[here].tolist(), act[here].tolist()):
            w = a * dec[f, :max(0, min(layer - l, dec.shape[1]))].float().sum(0)
            key = (l, f)
            features[key] = features.get(key, 0) + w
        x = trace.mlp_in[l][pos:pos + 1]  # without a skip path decode gives the bias alone
        skip = torch.broadcast_to(rm.decode(l, [None] * L, x), x.shape)[0].float()
        bias = torch.broadcast_to(rm.decode(l, [None] * L, torch.zeros_like(x)), x.shape)[0].float()
        names += [("skip", f"skip L{l}", ""), ("bias", f"decoder bias L{l}", ""),
                  ("error", f"error L{l}", f"{l}_-1_{pos}")]
        vecs += [skip - bias, bias, trace.errors[l, pos].float()]
    for (l, f), w in features.items():
        label = examples.label(l, f) if examples is not None else ""
        names.append(("feature", f"L{l}/F{f}" + (f" {label}" if label else ""), f"{l}_{f}_{pos}"))
        vecs.append(w)
    vecs = torch.stack(vecs)
    resid = cache["resid_pre"][pos].float()
    if not torch.allclose(vecs.sum(0), resid, atol=1e-3 * max(1.0, float(resid.abs().max()))):
        raise CircuitlabError(f"The components at layer {layer}, position {pos} do not add up "
                              "to the residual stream; this model's block layout is not "
                              "supported for QK attributions.")
    return names, vecs


def _project(rm, trace, cache, layer: int, head: int, pos: int, comps: torch.Tensor,
             side: str) -> torch.Tensor:
    """Each component's image ``[n + 1, d_head]`` on the query (``side="Q"``) or key side of
    the head at ``pos``, the last row the side's biases (the pre-attention norm's bias
    through ``W``, and ``b_Q`` or ``b_K``), through the frozen norms and the rotary map."""
    block = rm.model.blocks[layer]
    attn, ln1 = block.attn, block.ln1
    x = comps - comps.mean(-1, keepdim=True) if rm.cfg.normalization_type == "LN" else comps
    x = x / trace.scales[scale_name("ln1", layer)][pos].float() * ln1.w.detach().float()
    W = (attn.W_Q if side == "Q" else attn.W_K)[head].detach().float()
    b = (attn.b_Q if side == "Q" else attn.b_K)[head].detach().float()
    bias = (ln1.b.detach().float() @ W if hasattr(ln1, "b") else 0) + b
    Y = torch.cat([x @ W, bias[None]])
    norm = attn.q_norm if side == "Q" else attn.k_norm
    if getattr(rm.cfg, "use_qk_norm", False) and norm is not None:
        pre = cache["hook_q" if side == "Q" else "hook_k"][pos]
        pre = pre[head if pre.shape[0] == rm.cfg.n_heads else head * pre.shape[0] // rm.cfg.n_heads]
        Y = Y / (pre.float().pow(2).mean() + norm.eps).sqrt() * norm.w.detach().float()
    if rm.cfg.positional_embedding_type == "rotary":
        Y = attn.apply_rotary(Y[:, None, None], pos)[:, 0, 0].float()
    return Y
