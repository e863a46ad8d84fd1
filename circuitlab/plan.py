"""Will it fit? The memory of a model, its transcoders and an attribution, from shapes alone.

Nothing is read from the hub: model shapes come from ``MODEL_SHAPES``, transcoder shapes from
``TRANSCODER_SHAPES`` or a local folder's ``cfg.json`` files and safetensors headers (the
bundle). The attribution's share is ``estimate_memory``, which ``attribute`` checks too, with
``tokens x layers x L0`` active features; the forward pass's is ``forward_parts``, which
``attribute`` checks before running it (``check_forward``), and the trace it leaves for the
attribution ``trace_bytes``. A refusal names the largest prompt (or node budget) that fits.
A device is a named machine (``DEVICE_SIZES``) or a torch device (what is free on this machine
now). On a GPU the graph's adjacency is built in host memory (the ``Graph`` lives on the
CPU); the rest of an attribution on the device.
"""

from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from . import checks
from .clt import CrossLayerTranscoder, open_weights
from .errors import CircuitlabError
from .files import BUNDLE_DIR
from .precision import check_device, check_dtype
from .selection import estimate_memory, memory_parts  # noqa: F401 (part of planning's face)

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


# --------------------------------------------------------------------------- sources


def _folder_shape(path: Path) -> TranscoderShape:
    """The shape of a folder of SAE-Lens transcoders (``*/cfg.json``), a circuit-tracer
    folder (``config.yaml``, per-layer safetensors) or a CLT folder (``W_enc_<layer>`` or Gemma
    Scope 2's ``params_layer_<layer>``): from cfg.json or one header, no weight read."""
    cfgs = sorted(path.glob("*/cfg.json"))
    if cfgs:
        docs = [json.loads(p.read_text()) for p in cfgs]
        arch = docs[0].get("architecture", "")
        l0s = [d.get("metadata", {}).get("training", {}).get("calibration", {}).get("l0_jumprelu")
               for d in docs]
        l0 = sum(l0s) / len(l0s) if all(isinstance(v, (int, float)) for v in l0s) else ASSUMED_L0
        return TranscoderShape(max(d["d_sae"] for d in docs), "skip" in arch, "jumprelu" in arch,
                               round(l0, 1), f"{path.name}, {max(d['d_sae'] for d in docs):,} wide")
    files = sorted(path.glob("*.safetensors")) if (path / "config.yaml").exists() else []
    for file, enc, skip, axis, cross in (
            (path / "W_enc_0.safetensors", "W_enc_0", "W_skip_0", 0, True),
            (path / "params_layer_0.safetensors", "w_enc", "affine_skip_connection", 1, True),
            *[(f, "W_enc", "W_skip", 0, False) for f in files[:1]]):
        if file.exists():
            with open_weights(file) as f:
                names = set(f.keys())
                width = f.get_slice(enc).get_shape()[axis]
            jumprelu = bool(names & {"threshold", "threshold_0", "activation_function.threshold"})
            return TranscoderShape(width, skip in names, jumprelu, ASSUMED_L0, f"{path.name}, "
                                   f"{'CLT, ' if cross else ''}{width:,} wide", cross_layer=cross)
    raise CircuitlabError(f"Cannot size the transcoders in {path}: it holds neither SAE-Lens "
                          "folders (*/cfg.json) nor a circuit-tracer config.yaml with local "
                          "safetensors. Pass transcoders=<features per layer> to plan.")


def transcoder_shape(source) -> TranscoderShape:
    """The shape of a transcoder source: a name in ``TRANSCODER_SHAPES``, a bundled set's
    name, a folder, an int (features per layer, ReLU, no skip), a list of SAE-Lens
    transcoders or a ``CrossLayerTranscoder``."""
    if isinstance(source, bool):
        raise CircuitlabError(f"transcoders={source!r} is not a transcoder source.")
    if isinstance(source, int):
        if source < 1:
            raise CircuitlabError(f"transcoders={source} features per layer must be at least 1.")
        return TranscoderShape(source, False, False, ASSUMED_L0, f"{source:,} wide")
    if isinstance(source, CrossLayerTranscoder):
        return TranscoderShape(source.d_sae, source.W_skip is not None, source.threshold is not None,
                               ASSUMED_L0, f"CLT, {source.d_sae:,} wide", cross_layer=True)
    if isinstance(source, (list, tuple)):
        if not source:
            raise CircuitlabError("transcoders=[] holds no transcoder.")
        tc = source[0]
        return TranscoderShape(tc.cfg.d_sae, hasattr(tc, "W_skip"), hasattr(tc, "threshold"),
                               ASSUMED_L0, f"{type(tc).__name__}, {tc.cfg.d_sae:,} wide")
    if isinstance(source, str) and source in TRANSCODER_SHAPES:
        return TRANSCODER_SHAPES[source]
    path = BUNDLE_DIR / source if isinstance(source, str) and (BUNDLE_DIR / source).is_dir() \
        else Path(source)
    if not path.is_dir():
        raise CircuitlabError(
            f"No shapes known for transcoders {str(source)!r}: not a folder and not one of "
            f"{', '.join(TRANSCODER_SHAPES)}. Pass transcoders=<features per layer>.")
    return _folder_shape(path)


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


def model_bytes(model, shape: ModelShape, dtype: torch.dtype) -> int:
    """Bytes of the model's weights in ``dtype``: from ``shape`` for a preset, counted for a
    ``HookedTransformer`` (parameters and buffers)."""
    if isinstance(model, str):
        return shape.n_params() * dtype.itemsize
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() for t in tensors if t.is_floating_point()) * dtype.itemsize


def capacity(device) -> tuple[int, str, str]:
    """``(usable bytes, device type, description)`` of a named device or a torch device."""
    if isinstance(device, str) and device.lower() in DEVICE_SIZES:
        size, kind = DEVICE_SIZES[device.lower()]
        return int(NAMED_SHARE * size), kind, f"{device.lower()} ({size / GiB:.0f} GiB)"
    dev = torch.device(check_device(device))
    free = free_memory(dev)
    return int(FREE_SHARE * free), dev.type, f"{dev} ({free / GiB:.1f} GiB free now)"


# --------------------------------------------------------------------------- plans


@dataclass
class Plan:
    """What a model, its transcoders and one attribution need on a device, and whether it
    fits. ``attribution`` holds bytes per pool (``pools``: on a GPU the adjacency is on
    ``"cpu"``); ``n_features`` is ``tokens x layers x L0``; ``usable`` the device's bytes;
    ``forward`` the forward pass's peak (``forward_parts``) and ``trace`` what it leaves for
    the attribution (``trace_bytes``), both on the device."""

    model: str
    transcoders: TranscoderShape
    device: str
    device_type: str
    dtype: torch.dtype
    attribution_dtype: torch.dtype
    tokens: int
    max_feature_nodes: int | None
    n_features: int
    model_bytes: int
    transcoder_bytes: int
    attribution: dict
    usable: int
    forward: int = 0
    trace: int = 0

    weights = property(lambda self: self.model_bytes + self.transcoder_bytes)

    @property
    def on_device(self) -> int:
        """Bytes on the device at the peak: the weights and the larger of the forward pass
        and the trace with the attribution's device share."""
        return self.weights + max(self.forward,
                                  self.trace + self.attribution.get(self.device_type, 0))

    fits_load = property(lambda self: self.weights <= self.usable)
    fits = property(lambda self: self.on_device <= self.usable)

    def fixes(self) -> str:
        """What to change when it does not fit."""
        return fixes(self.dtype, self.fits_load, self.device_type)

    def __str__(self) -> str:
        g = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
        host = (f" (+ {g(self.attribution['cpu'])} adjacency in host memory)"
                if self.device_type != "cpu" else "")
        return (f"{self.model} + {self.transcoders.label} on {self.device}, "
                f"{str(self.dtype).removeprefix('torch.')} weights: model {g(self.model_bytes)}, "
                f"transcoders {g(self.transcoder_bytes)}, attribution of {self.tokens} tokens "
                f"(~{self.n_features:,} active features, max_feature_nodes="
                f"{self.max_feature_nodes}) {g(self.attribution.get(self.device_type, 0))}{host} "
                f"after a forward pass that peaks at {g(self.forward)} and leaves "
                f"{g(self.trace)}; "
                f"{g(self.on_device)} of {g(self.usable)} usable: "
                f"{'fits' if self.fits else 'does not fit'}.")


def plan(model="gemma-3-270m", transcoders=None, *, tokens: int = 30,
         max_feature_nodes: int | None = 8192, device="cpu", dtype=None,
         attribution_dtype=torch.float32, max_logits: int = 10, batch_size: int = 128) -> Plan:
    """The memory a model, its transcoders and an attribution need on ``device``, from
    shapes alone (nothing is downloaded or allocated).

    Args:
        model: a preset (``MODEL_SHAPES``) or a ``HookedTransformer``.
        transcoders: a release name, a bundled set, a folder, features per layer (an int) or
            a list of transcoders; ``None`` for ``PLAN_TRANSCODERS[model]``.
        tokens: prompt length (BOS included) of the attribution.
        max_feature_nodes: as for ``attribute``.
        device: ``"t4"``, ``"cpu24"``, ``"h100"`` (``DEVICE_SIZES``) or a torch device (then
            what is free on this machine now).
        dtype: the weights' dtype; default bfloat16 on CUDA, float32 on a CPU (as ``load``).
        attribution_dtype: the attribution rows' dtype (float32: ``attribute``'s default on
            CUDA and on CPUs without bf16 units).
        max_logits, batch_size: as for ``attribute``.

    Returns:
        A ``Plan``; ``print`` it, or read ``fits`` and ``fits_load``.
    """
    for name, value in (("tokens", tokens), ("max_logits", max_logits), ("batch_size", batch_size)):
        checks.integer(name, value)
    checks.integer("max_feature_nodes", max_feature_nodes, none=True)
    shape = model_shape(model)
    name = model if isinstance(model, str) else model.cfg.model_name
    if transcoders is None:
        if name not in PLAN_TRANSCODERS:
            raise CircuitlabError(f"Name the transcoders to plan for {name!r}: transcoders=...")
        transcoders = PLAN_TRANSCODERS[name]
    tc = transcoder_shape(transcoders)
    usable, kind, where = capacity(device)
    dtype = check_dtype(dtype, kind)
    attribution_dtype = check_dtype(attribution_dtype, kind, "attribution_dtype")
    n_features = int(tokens * shape.n_layers * tc.l0)
    parts = memory_parts(n_features, tokens, shape.n_layers, max_feature_nodes, max_logits,
                         shape.d_model, batch_size, attribution_dtype, shape.copied_params(tc.skip),
                         shape.n_heads)
    forward = forward_parts(tokens, shape, tc.width, dtype.itemsize, tc.l0,
                            shape.n_layers if tc.cross_layer else 0)
    return Plan(name, tc, where, kind, dtype, attribution_dtype, tokens, max_feature_nodes,
                n_features, model_bytes(model, shape, dtype),
                tc.n_params(shape.d_model, shape.n_layers) * dtype.itemsize,
                pools(parts, kind), usable, sum(forward.values()),
                trace_bytes(tokens, n_features, shape, dtype.itemsize))


def fixes(dtype: torch.dtype, weights_fit: bool, device_type: str) -> str:
    """What to change when weights in ``dtype`` (that fit or not) and an attribution do not
    fit a device of ``device_type``."""
    out = ["dtype=torch.bfloat16 (halves the weights)"] if dtype.itemsize > 2 else []
    if weights_fit:
        out.append("a lower max_feature_nodes or a shorter prompt (the attribution)")
    if device_type != "cpu":
        out.append("device='cpu' where the host has the memory (circuitlab keeps the "
                   "transcoders on the model's device; it does not offload them alone)")
    return "; ".join(out + ["a device with more memory"])


def check_load(model, transcoders, device, dtype: torch.dtype,
               model_dtype: torch.dtype | None = None, lazy: bool = False) -> None:
    """Refuse, before anything is downloaded or allocated, a load whose weights (the model's
    in ``model_dtype``, default ``dtype``; a CLT's decoders unless ``lazy``) would not fit on
    ``device``. A model of unknown shapes is not checked; unknown transcoders count as zero,
    and so does a ``HookedTransformer`` already on ``device`` in ``model_dtype``.

    Raises:
        CircuitlabError: naming the need, the device and the fixes.
    """
    try:
        shape = model_shape(model)
    except CircuitlabError:
        return
    try:
        tc = None if transcoders is None else transcoder_shape(transcoders)
    except CircuitlabError:
        tc = None
    usable, kind, where = capacity(device)
    model_dtype = model_dtype or dtype
    weight = None if isinstance(model, str) else next(model.parameters())
    here = weight is not None and (weight.device, weight.dtype) == (torch.device(device), model_dtype)
    need = 0 if here else model_bytes(model, shape, model_dtype)
    tc_bytes = 0 if tc is None else tc.n_params(shape.d_model, shape.n_layers, lazy) * dtype.itemsize
    if need + tc_bytes > usable:
        name = model if isinstance(model, str) else model.cfg.model_name
        raise CircuitlabError(
            f"Loading {name} with {tc.label if tc else 'no'} transcoders in "
            f"{str(dtype).removeprefix('torch.')} needs about {(need + tc_bytes) / GiB:.1f} GiB "
            f"(model {need / GiB:.1f}, transcoders {tc_bytes / GiB:.1f}) but {where} has "
            f"{usable / GiB:.1f} GiB to use; nothing was downloaded or allocated. Use "
            f"{fixes(dtype, False, kind)}.")


# --------------------------------------------------------------------------- the README table

#: The table ``circuitlab plan --table`` prints (and the README shows).
TABLE_MODELS = ("gemma-3-270m", "gemma-2-2b", "qwen3-0.6b", "llama-3.2-1b")
TABLE_DEVICES = ("t4", "cpu24", "h100")


def table(models=TABLE_MODELS, devices=TABLE_DEVICES, tokens: int = 30,
          max_feature_nodes: int | None = 8192) -> str:
    """A markdown table of ``plan`` for ``models`` (with ``PLAN_TRANSCODERS``) on named
    ``devices``, each in ``load``'s default dtype for its kind, followed by its assumptions."""
    plans = {(m, d): plan(m, tokens=tokens, max_feature_nodes=max_feature_nodes, device=d)
             for m in models for d in devices}
    head = ["model", "transcoders (per layer)"]
    for d in devices:
        p = plans[models[0], d]
        head.append(f"{d} ({DEVICE_SIZES[d][0] / GiB:.0f} GiB, "
                    f"{str(p.dtype).removeprefix('torch.')})")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in models:
        p0 = plans[m, devices[0]]
        cells = [m, p0.transcoders.label]
        for d in devices:
            p = plans[m, d]
            cells.append(f"{'yes' if p.fits else '**no**'}: {p.model_bytes / GiB:.1f} + "
                         f"{p.transcoder_bytes / GiB:.1f} + "
                         f"{(p.on_device - p.weights) / GiB:.1f} = "
                         f"{p.on_device / GiB:.1f} GiB")
        lines.append("| " + " | ".join(cells) + " |")
    l0 = ", ".join(f"{m} {plans[m, devices[0]].transcoders.l0:g}" for m in models)
    lines += ["", f"Cells: model + transcoders + attribution (with the trace its forward pass "
              f"leaves, or that pass's peak where larger) = total GiB on the device, which "
              f"may use {NAMED_SHARE:.0%} of its size. The attribution: {tokens} tokens, "
              f"max_feature_nodes={max_feature_nodes}, float32 rows, active features = tokens x "
              f"layers x L0 per layer ({l0}; {ASSUMED_L0:g} where none is published). On a GPU "
              "the graph's adjacency is built in host memory and not counted."]
    return "\n".join(lines)


class _CallableModule(types.ModuleType):
    """``circuitlab.plan`` is this module and, called, its ``plan`` function: Python binds a
    package's submodule to the package attribute of the same name, so they are one object."""

    def __call__(self, *args, **kwargs) -> Plan:
        return plan(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

