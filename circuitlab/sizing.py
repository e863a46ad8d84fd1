"""Will it fit? The memory of a model, its transcoders and an attribution, from shapes alone.

Nothing is read from the hub: model shapes come from ``MODEL_SHAPES``, transcoder shapes from
``TRANSCODER_SHAPES`` (both ``circuitlab.presets``) or a local folder's ``cfg.json`` files and
safetensors headers (the bundle). The attribution's share is ``memory_parts``, which
``attribute`` checks too, with ``tokens x layers x L0`` active features; the forward pass's is
``forward_parts``, which ``attribute`` checks before running it (``check_forward``), and the
trace it leaves for the attribution ``trace_bytes``. A refusal names the largest prompt (or node budget) that fits.
A device is a named machine (``DEVICE_SIZES``) or a torch device (what is free on this machine
now). On a GPU the graph's adjacency is built in host memory (the ``Graph`` lives on the
CPU); the rest of an attribution on the device.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checks
from .clt import CrossLayerTranscoder, open_weights, read_config
from .errors import CircuitlabError
from .memory import (FREE_SHARE, NAMED_SHARE, forward_parts, free_memory, memory_parts,
                     model_shape, pools, trace_bytes)
from .precision import check_device, check_dtype
from .presets import (ASSUMED_L0, BUNDLE_DIR, DEVICE_SIZES, PLAN_TRANSCODERS, TRANSCODER_SHAPES,
                      GiB, ModelShape, TranscoderShape)

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
            window = read_config(path / "config.yaml").get("window") if cross else None
            return TranscoderShape(width, skip in names, jumprelu, ASSUMED_L0, f"{path.name}, "
                                   f"{'CLT, ' if cross else ''}{width:,} wide", cross_layer=cross,
                                   window=window)
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
                               ASSUMED_L0, f"CLT, {source.d_sae:,} wide", cross_layer=True,
                               window=source.window)
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
    head = ["model", "transcoders"]
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

