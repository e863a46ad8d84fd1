"""Memory: what a model's forward pass and an attribution need, from shapes alone, and what
is free on a device; the checks that refuse before anything runs, with the largest prompt
or node budget that fits. The known models' and transcoders' shapes live here too, as plain
data (``MODEL_SHAPES``, ``TRANSCODER_SHAPES``); ``plan`` resolves sources to them.
"""

from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch

from .errors import CircuitlabError

GiB = 2 ** 30

#: Named machines for planning: (size in bytes, torch device type). The usable share of a
#: named device is ``NAMED_SHARE`` (the rest: CUDA context, fragmentation, Python objects).
DEVICE_SIZES = {"t4": (15 * GiB, "cuda"), "cpu24": (24 * GiB, "cpu"), "h100": (80 * GiB, "cuda")}
NAMED_SHARE = 0.9
#: The share of the memory free right now that an allocation may take (as ``attribute``).
FREE_SHARE = 0.8


@dataclass(frozen=True)
class ModelShape:
    """The shapes that size a TransformerLens model (``HookedTransformer`` parameter layout)."""

    n_layers: int
    d_model: int
    d_mlp: int
    d_vocab: int
    n_heads: int
    d_head: int
    n_kv_heads: int
    n_ctx: int                    # TransformerLens' context (sizes the rotary tables)
    sandwich_norms: bool = False  # post-attention and post-MLP norms (Gemma 2 and 3)
    qk_norm: bool = False         # per-head query and key norms (Gemma 3, Qwen3)

    def n_params(self) -> int:
        """Parameters and buffers of the ``HookedTransformer``: untied W_E and W_U, b_U, the
        zero attention and MLP biases TransformerLens keeps, gated MLPs, RMS norm weights
        and each layer's rotary sin/cos tables (``min(n_ctx, 2048)`` rows of ``d_head``) and
        its scalar ``IGNORE`` buffer."""
        d, dh, H, kv = self.d_model, self.d_head, self.n_heads, self.n_kv_heads
        attn = 2 * H * d * dh + 2 * kv * d * dh + H * dh + 2 * kv * dh + d
        mlp = 3 * d * self.d_mlp + self.d_mlp + d
        norms = d * (4 if self.sandwich_norms else 2) + (2 * dh if self.qk_norm else 0)
        rotary = 2 * min(self.n_ctx, 2048) * dh + 1
        return 2 * self.d_vocab * d + self.d_vocab + d + self.n_layers * (attn + mlp + norms + rotary)

    def copied_params(self, skip: bool) -> int:
        """Parameters the attribution's backward copies in its own dtype (value and output
        matrices, transcoder skip matrices)."""
        d = self.d_model
        return self.n_layers * ((self.n_heads + self.n_kv_heads) * self.d_head * d + (d * d if skip else 0))


#: Preset model shapes. Sources: each model's published config.json (hidden_size,
#: intermediate_size, vocab_size, num_attention_heads, head_dim, num_key_value_heads,
#: num_hidden_layers); TransformerLens 3.9 ``loading_from_pretrained.py`` hard-codes the same
#: values for gemma-3-270m, gemma-2-2b and llama-3.2-1b (and n_ctx 8192, 8192 and 2048 there);
#: for Qwen3 it reads config.json and sets n_ctx 2048.
MODEL_SHAPES = {
    # google/gemma-3-270m config.json; TL: "google/gemma-3-270m" branch.
    "gemma-3-270m": ModelShape(18, 640, 2048, 262144, 4, 256, 1, 8192, sandwich_norms=True,
                               qk_norm=True),
    # google/gemma-2-2b config.json; TL: "google/gemma-2-2b" branch.
    "gemma-2-2b": ModelShape(26, 2304, 9216, 256000, 8, 256, 4, 8192, sandwich_norms=True),
    # Qwen/Qwen3-0.6B config.json (head_dim 128, 8 KV heads); TL: Qwen3ForCausalLM, n_ctx 2048.
    "qwen3-0.6b": ModelShape(28, 1024, 3072, 151936, 16, 128, 8, 2048, qk_norm=True),
    # meta-llama/Llama-3.2-1B config.json; TL: "Llama-3.2-1B" branch (n_ctx capped at 2048).
    "llama-3.2-1b": ModelShape(16, 2048, 8192, 128256, 32, 64, 8, 2048),
}


@dataclass(frozen=True)
class TranscoderShape:
    """Transcoders of ``width`` features per layer (``cross_layer``: one CLT), a ``d x d`` skip
    matrix or not, a JumpReLU threshold or not, and ``l0``, the typical number of active
    features per token and layer that sizes an attribution."""

    width: int
    skip: bool
    jumprelu: bool
    l0: float
    label: str
    cross_layer: bool = False

    def n_params(self, d_model: int, n_layers: int = 1, lazy: bool = False) -> int:
        """Parameters over ``n_layers`` layers: per layer W_enc, b_enc, b_dec, threshold, W_skip;
        a decoder per layer, or for a CLT per layer and later or equal one (``L (L + 1) / 2``,
        none when ``lazy``: they stay on disk)."""
        per_layer = (d_model * self.width + self.width + d_model + (self.width if self.jumprelu else 0)
                     + (d_model * d_model if self.skip else 0))
        decoders = (0 if lazy else n_layers * (n_layers + 1) // 2) if self.cross_layer else n_layers
        return n_layers * per_layer + decoders * self.width * d_model


#: L0 assumed where a transcoder set publishes none.
ASSUMED_L0 = 64.0

#: Transcoder sets by name. Sources: SAE-Lens 6.54 ``pretrained_saes.yaml`` (ids, per-layer
#: L0) and its loaders (architecture), and the model cards named below.
TRANSCODER_SHAPES = {
    # Gemma Scope 2: ids layer_N_width_16k_l0_small_affine (16,384 features, JumpReLU, an
    # affine skip connection); pretrained_saes.yaml gives L0 10-20 per layer, 17.9 on average.
    "gemma-scope-2-270m-pt-transcoders-all": TranscoderShape(
        16384, True, True, 17.9, "Gemma Scope 2, 16,384 wide"),
    # Gemma Scope 2B transcoders: width_16k (16,384, JumpReLU, no skip); loading picks the L0
    # closest to 100 per layer, which pretrained_saes.yaml lists as 5-95, 39.2 on average.
    "gemma-scope-2b-pt-transcoders": TranscoderShape(
        16384, False, True, 39.2, "Gemma Scope, 16,384 wide"),
    # mwhanna/qwen3-0.6b-transcoders-lowl0: plain ReLU transcoders (SAE-Lens loads them as
    # "transcoder"), W_enc [163840, 1024] per layer file; no L0 published ("lowl0").
    "mwhanna-qwen3-0.6b-transcoders-lowl0": TranscoderShape(
        163840, False, False, ASSUMED_L0, "mwhanna lowl0, 163,840 wide"),
    # circuit-tracer's "llama" set, mntss/transcoder-Llama-3.2-1B: ReLU skip transcoders of
    # 131,072 features (16 layers of 2 x 131072 x 2048 bf16 weights: the repository's ~16 GiB);
    # no SAE-Lens release: load its downloaded folder (config.yaml). No L0 published.
    "mntss/transcoder-Llama-3.2-1B": TranscoderShape(
        131072, True, False, ASSUMED_L0, "circuit-tracer llama, 131,072 wide"),
    # CLTs (``loading.CLT_PRESETS``), no L0 published; mntss's: no W_skip (load_clt reads none).
    # 426k: 26 x 16,384 (SAE-Lens 6.54's mntss_clt_layer test), no threshold known; 2.5M: 98,304
    # a layer (its users); 524k: 16 x 32,768, headers W_enc_L, threshold_L, W_dec_L [., 16 - L, .].
    "mntss/clt-gemma-2-2b-426k": TranscoderShape(
        16384, False, False, ASSUMED_L0, "circuit-tracer CLT, 16,384 wide", cross_layer=True),
    "mntss/clt-gemma-2-2b-2.5M": TranscoderShape(
        98304, False, False, ASSUMED_L0, "circuit-tracer CLT, 98,304 wide", cross_layer=True),
    "mntss/clt-llama-3.2-1b-524k": TranscoderShape(
        32768, False, True, ASSUMED_L0, "circuit-tracer CLT, 32,768 wide", cross_layer=True),
    # Gemma Scope 2 (JumpReLU, "_affine" skip), estimated: 262144 // L a layer gives the 1b
    # (26 layers, d 1152, float32) the 30.37 GiB its width_262k folder is reported to hold.
    "google/gemma-scope-2-270m-pt/clt/width_262k_l0_medium_affine": TranscoderShape(
        262144 // 18, True, True, ASSUMED_L0, "Gemma Scope 2 CLT, ~14,563 wide", cross_layer=True),
    "google/gemma-scope-2-1b-pt/clt/width_262k_l0_medium_affine": TranscoderShape(
        262144 // 26, True, True, ASSUMED_L0, "Gemma Scope 2 CLT, ~10,082 wide", cross_layer=True),
}

#: The transcoders ``plan`` assumes for a model when none are named (the embedded model's
#: bundle; for the others the set named in the README).
PLAN_TRANSCODERS = {
    "gemma-3-270m": "gemma-3-270m-skip-jumprelu",
    "gemma-2-2b": "gemma-scope-2b-pt-transcoders",
    "qwen3-0.6b": "mwhanna-qwen3-0.6b-transcoders-lowl0",
    "llama-3.2-1b": "mntss/transcoder-Llama-3.2-1B",
}


# --------------------------------------------------------------------------- attribution


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
