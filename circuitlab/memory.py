"""Memory: what a model's forward pass and an attribution need, from shapes alone, and what
is free on a device; the checks that refuse before anything runs, with the largest prompt
or node budget that fits. The known models' shapes are presets (``circuitlab.presets``).
"""

from __future__ import annotations

import psutil
import torch

from .errors import CircuitlabError
from .presets import ASSUMED_L0, MODEL_SHAPES, GiB, ModelShape

#: The usable share of a named device (``DEVICE_SIZES``); the rest: CUDA context,
#: fragmentation, Python objects.
NAMED_SHARE = 0.9
#: The share of the memory free right now that an allocation may take (as ``attribute``).
FREE_SHARE = 0.8


# --------------------------------------------------------------------------- attribution


#: Candidate columns per feature node in the rows an attribution stores (``selection.Rows``):
#: memory against recomputed rows.
CANDIDATES_PER_NODE = 4
#: Shares outside the candidates that the influence estimate keeps, per row, at most.
EXTRAS_PER_ROW = 1024


def candidate_slots(n_features: int, n_nodes: int, extra: int = 0) -> int:
    """Candidate columns for ``n_nodes`` nodes among ``n_features`` active features: at
    least ``CANDIDATES_PER_NODE`` per node, and ``extra`` more (the columns spare memory
    holds)."""
    return n_features if n_nodes >= n_features else min(n_features,
                                                        CANDIDATES_PER_NODE * n_nodes + extra)


def memory_parts(n_features: int, n_positions: int, n_layers: int, max_feature_nodes: int | None,
                 n_logits: int, d_model: int, batch_size: int, dtype: torch.dtype,
                 copied_params: int = 0, n_heads: int = 0,
                 writes_per_feature: float = 1.0, trace: int = 0) -> dict[str, int]:
    """Bytes an attribution holds at its peak: stored ``rows`` (visited features' over the
    candidate columns, logits' whole), a ``batch`` of whole rows, node ``selection``
    (shares among visited features, sparse shares outside the candidates), act-scaled
    ``decoders`` (``writes_per_feature`` layers each: 1 for per-layer transcoders, on average
    ``(L + 1) / 2`` for a cross-layer one), backward-dtype ``weights``, a ``backward`` batch,
    attention ``patterns`` (given ``n_heads``: the trace's float32 ones and the backward's
    copy), the float32 ``adjacency`` (host memory) with, while influence is annotated, the
    rows of the nodes with inputs copied and their absolute values (``prune.normalized``:
    two ``[kept + logits, nodes]`` copies alive together), and the ``trace`` the forward
    pass left (bytes, ``trace_bytes``; 0 leaves it out). Only decoders and patterns grow
    with the active features or the prompt's square."""
    kept = n_features if max_feature_nodes is None else min(n_features, max_feature_nodes)
    slots = candidate_slots(n_features, kept)
    cols = n_features + (n_layers + 1) * n_positions
    n_nodes = kept + (n_layers + 1) * n_positions + n_logits
    return {
        "rows": dtype.itemsize * (kept * (slots + (n_layers + 1) * n_positions) + n_logits * cols),
        "batch": dtype.itemsize * min(batch_size, kept) * cols,
        "selection": (4 * kept * kept + 40 * kept * EXTRAS_PER_ROW) if slots < n_features
        else (4 * kept * kept if kept < n_features else 0),
        "decoders": int(dtype.itemsize * n_features * writes_per_feature * d_model),
        "weights": dtype.itemsize * copied_params,
        "backward": 4 * 8 * batch_size * n_positions * d_model,
        "patterns": (4 + dtype.itemsize) * n_layers * n_heads * n_positions ** 2,
        "adjacency": 4 * n_nodes * n_nodes + 2 * 4 * (kept + n_logits) * n_nodes,
        "trace": trace,
    }


def estimate_memory(n_features: int, n_positions: int, n_layers: int, max_feature_nodes: int | None,
                    n_logits: int, d_model: int, batch_size: int, dtype: torch.dtype,
                    copied_params: int = 0, n_heads: int = 0,
                    writes_per_feature: float = 1.0, trace: int = 0) -> int:
    """Bytes an attribution needs at peak, in all (the sum of ``memory_parts``)."""
    return sum(memory_parts(n_features, n_positions, n_layers, max_feature_nodes, n_logits,
                            d_model, batch_size, dtype, copied_params, n_heads,
                            writes_per_feature, trace).values())


def pools(parts: dict[str, int], device_type: str) -> dict[str, int]:
    """``parts`` summed per memory pool: ``{"cpu": bytes}`` on a CPU, else the device's
    share under ``device_type`` and the adjacency under ``"cpu"``."""
    if device_type == "cpu":
        return {"cpu": sum(parts.values())}
    return {device_type: sum(v for k, v in parts.items() if k != "adjacency"),
            "cpu": parts.get("adjacency", 0)}


def free_memory(device) -> int:
    """Bytes free now on ``device`` (a torch device): CUDA's free memory, or the host's
    available memory."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0]
    return psutil.virtual_memory().available


def spare_memory(parts: dict[str, int], device, memory_limit: int | None) -> int:
    """Bytes ``check_attribution`` allows in ``device``'s pool beyond what ``parts`` take."""
    dev = torch.device(device)
    if memory_limit is not None:
        return max(0, memory_limit - sum(parts.values()))
    return max(0, int(FREE_SHARE * free_memory(dev)) - pools(parts, dev.type)[dev.type])


def _gib(n: int) -> str:
    """``n`` bytes in GiB, to one decimal (two significant digits below 0.05 GiB)."""
    return f"{n / GiB:.1f}" if n >= GiB / 20 else f"{n / GiB:.2g}"


def memory_limits(device, memory_limit: int | None) -> dict[str, tuple[int, str]]:
    """What ``parts`` may take: ``{"all": (memory_limit, "")}``, else per pool (``pools``)
    ``FREE_SHARE`` of what is free on it now, with where that is (for messages)."""
    dev = torch.device(device)
    if memory_limit is not None:
        return {"all": (memory_limit, "")}
    out = {dev.type: (int(FREE_SHARE * free_memory(dev)),
                      "" if dev.type == "cpu" else f" on {dev}")}
    if dev.type != "cpu":
        out["cpu"] = (int(FREE_SHARE * free_memory("cpu")), " on the host")
    return out


def shortfalls(parts: dict[str, int], device, limits: dict) -> list[tuple[int, int, str]]:
    """``(need, limit, where)`` of each pool where ``parts`` exceed ``limits``
    (``memory_limits``); empty when they fit."""
    dev = torch.device(device)
    needs = {"all": sum(parts.values())} if "all" in limits else pools(parts, dev.type)
    return [(n, limits[pool][0], limits[pool][1]) for pool, n in needs.items()
            if n > limits[pool][0]]


def largest(fits, low: int, high: int) -> int:
    """The largest ``x`` in ``[low, high]`` with ``fits(x)`` (``fits`` true up to some
    point, false after), or ``low - 1`` if none."""
    if high < low or not fits(low):
        return low - 1
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def check_attribution(parts: dict[str, int], device, memory_limit: int | None, what: str,
                      hint=None) -> None:
    """Refuse an attribution whose ``parts`` do not fit: in all within ``memory_limit``, else
    each pool within ``FREE_SHARE`` of what is free on it. ``hint(limits)``, given, says
    what would fit (``fit_hint``).

    Raises:
        CircuitlabError: naming the need, what is available, what fits and the fixes.
    """
    limits = memory_limits(device, memory_limit)
    for n, limit, where in shortfalls(parts, device, limits)[:1]:
        fit = f" {hint(limits)}" if hint is not None else ""
        raise CircuitlabError(
            f"This graph needs about {_gib(n)} GiB{where} ({what}) but only "
            f"{_gib(limit)} GiB is available.{fit} Lower max_feature_nodes, shorten the "
            "prompt, pass dtype=torch.bfloat16 (half the rows), or free memory.")


def fit_hint(parts_at, device, limits: dict, n_features: int, n_positions: int,
             max_feature_nodes: int | None, forward_at=None) -> str:
    """What fits where an attribution does not: the largest ``max_feature_nodes`` for this
    prompt, and the longest prompt (active features in proportion) with this
    ``max_feature_nodes``. ``parts_at(n_features, n_positions, max_feature_nodes)`` and
    ``forward_at(n_positions)`` (the forward pass, if given) give the parts."""
    ok = lambda parts: not shortfalls(parts, device, limits)  # noqa: E731
    kept = n_features if max_feature_nodes is None else min(n_features, max_feature_nodes)
    nodes = largest(lambda k: ok(parts_at(n_features, n_positions, k)), 1, kept - 1)
    per_token = n_features / max(n_positions, 1)
    tokens = largest(lambda p: ok(parts_at(int(per_token * p), p, max_feature_nodes))
                     and (forward_at is None or ok(forward_at(p))), 1, n_positions - 1)
    first = (f"At most max_feature_nodes={nodes:,} fits this prompt" if nodes else
             "No max_feature_nodes fits this prompt (what it needs besides the nodes does "
             "not fit)")
    then = (f"prompts of up to {tokens:,} token{'s' if tokens > 1 else ''} fit with "
            f"max_feature_nodes={max_feature_nodes}"
            if tokens else f"no shorter prompt fits with max_feature_nodes={max_feature_nodes}")
    return f"{first}; {then}."


# --------------------------------------------------------------------------- the forward pass

#: Bytes an active feature's ``(pos, feature, activation)`` take in a ``Trace``.
FEATURE_BYTES = 20


def _workspace(n_positions: int, shape: ModelShape, itemsize: int) -> int:
    """Bytes of one block's temporaries in the forward pass (freed, but resident in the
    host's heap or the GPU's cache after): a query's eight copies (projection, norm,
    rotary), the gated MLP's four ``[P, d_mlp]``, twelve residual-sized tensors and three
    ``[P, P]`` causal and local masks."""
    P = n_positions
    return (itemsize * P * (8 * shape.n_heads * shape.d_head + 4 * shape.d_mlp
                            + 12 * shape.d_model) + 3 * P * P)


def forward_parts(n_positions: int, shape: ModelShape, d_sae: int, itemsize: int = 4,
                  l0: float = ASSUMED_L0, clt_writes: int = 0, lazy_decoders: bool = False
                  ) -> dict[str, int]:
    """Bytes ``ReplacementModel.run`` holds beyond the weights at its peak, from shapes
    alone, for a prompt of ``n_positions`` tokens: the largest of its phases, each a sum of
    the tensors alive in it (``itemsize``: the model's dtype; ``d_sae``: features per layer;
    ``l0`` active features per token and layer; ``clt_writes``: the layers a cross-layer
    transcoder's layer-0 features write to, 0 for per-layer transcoders; ``lazy_decoders``:
    a lazy CLT reads its decoders from disk then).

    Throughout, once the blocks have run: the attention patterns of every layer
    ``[L, H, P, P]`` (kept for the trace), the MLP inputs and outputs the hooks keep
    (``2 [L, P, d]``) and the blocks' temporaries (``workspace``: queries with their norm
    and rotary copies, the gated MLP's four ``[P, d_mlp]``, a dozen residual-sized
    tensors, the causal and local masks). The phases add:

    * attention of the last layer: its scores, masked scores and softmax besides the
      pattern, and a NaN mask;
    * the logits ``[P, d_vocab]`` and ``isfinite`` of them (an ``abs`` copy and three
      ``[P, d_vocab]`` bool masks, alive together);
    * encoding: the stacked MLP inputs, outputs and errors ``3 [L, P, d]``, the active
      features, and per layer four dense ``[P, d_sae]`` activations (pre-activations, ReLU,
      JumpReLU mask, product) and a CLT's writes ``[n, P, d]``;
    * the trace: the patterns stacked into one tensor while the hooks' copies are alive.
    """
    P, L, d, H, m = n_positions, shape.n_layers, shape.d_model, shape.n_heads, itemsize
    pattern = m * H * P * P
    logits = m * P * shape.d_vocab
    workspace = _workspace(P, shape, m)
    kept = 2 * m * L * P * d
    stacks = 3 * m * L * P * d + int(FEATURE_BYTES * min(l0, d_sae) * L * P)
    writes = max(clt_writes, 1)
    encode = 4 * m * P * d_sae + m * writes * P * d + (
        m * d_sae * writes * d if lazy_decoders else 0)
    phases = [
        {"patterns": L * pattern, "activations": kept,
         "workspace": workspace + 3 * pattern + H * P * P},
        {"patterns": L * pattern, "activations": kept, "workspace": workspace,
         "logits": logits + (m + 3) * P * shape.d_vocab},
        {"patterns": L * pattern, "activations": kept + stacks, "workspace": workspace + encode,
         "logits": logits},
        {"patterns": 2 * L * pattern, "activations": kept + stacks, "workspace": workspace,
         "logits": logits},
    ]
    return max(phases, key=lambda p: sum(p.values()))


def trace_bytes(n_positions: int, n_features: int, shape: ModelShape, itemsize: int = 4) -> int:
    """Bytes a ``Trace`` holds through the attribution besides its attention patterns
    (``memory_parts`` counts those): the logits ``[P, d_vocab]``, the MLP inputs, outputs
    and errors ``3 [L, P, d]``, the embeddings and final residual, the active features, and
    the forward pass's workspace (its heap stays resident on a CPU, cached on a GPU)."""
    P, d, m = n_positions, shape.d_model, itemsize
    return (m * P * shape.d_vocab + m * (3 * shape.n_layers + 2) * P * d
            + FEATURE_BYTES * n_features + _workspace(P, shape, m))


def model_shape(model) -> ModelShape:
    """The shape of a preset name, or of a ``HookedTransformer`` (from its config)."""
    cfg = getattr(model, "cfg", None)
    if cfg is not None:
        return ModelShape(cfg.n_layers, cfg.d_model, cfg.d_mlp, cfg.d_vocab, cfg.n_heads,
                          cfg.d_head, cfg.n_key_value_heads or cfg.n_heads, cfg.n_ctx,
                          bool(cfg.use_normalization_before_and_after), bool(cfg.use_qk_norm))
    if model not in MODEL_SHAPES:
        raise CircuitlabError(f"No shapes known for model {model!r}; plan knows "
                              f"{', '.join(MODEL_SHAPES)} (or pass a HookedTransformer).")
    return MODEL_SHAPES[model]


def replacement_shape(rm) -> tuple[ModelShape, dict]:
    """A ``ReplacementModel``'s model shape and its ``forward_parts`` keywords (features per
    layer, the model's dtype size, a CLT's writes and lazy decoders)."""
    shape = model_shape(rm.model)
    clt = rm.clt
    return shape, dict(d_sae=max(rm.d_sae(l) for l in range(shape.n_layers)),
                       itemsize=rm.model.W_E.dtype.itemsize,
                       clt_writes=0 if clt is None else clt.n_out(0),
                       lazy_decoders=clt is not None and clt.lazy_folder is not None)


def check_forward(rm, n_positions: int, memory_limit: int | None) -> None:
    """Refuse, before ``ReplacementModel.run``, a prompt of ``n_positions`` tokens whose
    forward pass (``forward_parts``) would not fit on the model's device: within
    ``memory_limit`` if given, else ``FREE_SHARE`` of what is free there now.

    Raises:
        CircuitlabError: naming the need, its largest parts, what is available and the
            longest prompt that fits.
    """
    shape, kw = replacement_shape(rm)
    parts = forward_parts(n_positions, shape, **kw)
    dev = torch.device(rm.device)
    need = sum(parts.values())
    if memory_limit is not None:
        limit, where = memory_limit, ""
    else:
        limit = int(FREE_SHARE * free_memory(dev))
        where = "" if dev.type == "cpu" else f" on {dev}"
    if need <= limit:
        return
    longest = largest(lambda p: sum(forward_parts(p, shape, **kw).values()) <= limit,
                      1, n_positions - 1)
    names = {"logits": f"logits over the {shape.d_vocab:,}-token vocabulary at every "
                       "position, with their finiteness check",
             "patterns": "the attention patterns of every layer",
             "activations": "MLP inputs, outputs and errors",
             "workspace": "the layers' temporaries"}
    largest_parts = ", ".join(f"{names[k]} {_gib(v)} GiB"
                              for k, v in sorted(parts.items(), key=lambda kv: -kv[1])[:2])
    fit = (f"Prompts of up to {longest:,} token{'s' if longest > 1 else ''} fit" if longest
           else "No prompt fits")
    raise CircuitlabError(
        f"The forward pass of this {n_positions:,}-token prompt needs about {_gib(need)} GiB"
        f"{where} ({largest_parts}) but only {_gib(limit)} GiB is available; nothing was "
        f"run. {fit}: shorten the prompt (max_feature_nodes does not lower this part), or "
        "free memory.")
