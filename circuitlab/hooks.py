"""TransformerLens hook names and the plumbing around them: the one place that spells them.

The MLP input is the output of the pre-MLP norm. TransformerLens has no hook that carries
it, so it is computed as ``blocks.l.ln2.hook_normalized * ln2.w`` (plus ``ln2.b`` for
LayerNorm models); for Gemma 3 this equals HF's ``pre_feedforward_layernorm`` output.
The MLP output is ``blocks.l.hook_mlp_out``, which for Gemma includes the post-MLP norm.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import torch
from transformer_lens import HookedTransformer

from .errors import CircuitlabError

# Hook names that transcoder sets use for the MLP input (the output of the pre-MLP norm,
# HF ``pre_feedforward_layernorm.output`` for Gemma 3) and for the MLP output (after
# Gemma's post-MLP norm, HF ``post_feedforward_layernorm.output`` = TL ``hook_mlp_out``).
# SAE-Lens labels Gemma Scope 2 inputs ``hook_mlp_in`` although they read the ln2 output;
# GemmaScope uses ``ln2.hook_normalized``; circuit-tracer uses ``mlp.hook_in``.
MLP_IN_HOOKS = ("hook_mlp_in", "ln2.hook_normalized", "mlp.hook_in", "ln2.hook_out")
MLP_OUT_HOOKS = ("hook_mlp_out", "mlp.hook_out")
#: The residual stream before the pre-MLP norm, which some transcoders read instead of the
#: MLP input (circuit-tracer's cross-layer transcoders do): ``read="resid_mid"`` below.
RESID_MID_HOOKS = ("hook_resid_mid",)
READS = ("mlp_in", "resid_mid")


def reads_of(hook_in: str) -> str:
    """What a transcoder reading hook ``hook_in`` (``blocks.<l>.`` stripped or not) reads:
    ``"mlp_in"`` or ``"resid_mid"``."""
    return "resid_mid" if hook_in.rsplit(".", 1)[-1] in RESID_MID_HOOKS else "mlp_in"

#: Norm denominators frozen for attribution (q/k norms only shape the frozen patterns).
FROZEN_SCALES = ("ln1.hook_scale", "ln1_post.hook_scale", "ln2.hook_scale", "ln_final.hook_scale")


#: The residual stream entering layer 0 (the scaled token embeddings).
RESID_IN = "blocks.0.hook_resid_pre"
#: The final norm's output before its weight.
FINAL_NORMALIZED = "ln_final.hook_normalized"


def resid_out(n_layers: int) -> str:
    """The hook of the residual stream leaving the last layer."""
    return f"blocks.{n_layers - 1}.hook_resid_post"


def scale_name(norm: str, layer: int | None = None) -> str:
    """The hook of a norm's denominator: ``norm`` is ``ln1``, ``ln1_post`` or ``ln2`` at
    ``layer``, or ``ln_final``."""
    return f"{norm}.hook_scale" if layer is None else f"blocks.{layer}.{norm}.hook_scale"


def is_frozen(name: str) -> bool:
    """Whether hook ``name`` carries a norm denominator or an attention pattern, the values
    attribution freezes."""
    return is_scale(name) or name.endswith("attn.hook_pattern")


def is_scale(name: str) -> bool:
    """Whether hook ``name`` carries a norm denominator that attribution freezes."""
    return name.endswith(FROZEN_SCALES)


def attention_hook(layer: int, name: str) -> str:
    """The hook ``name`` (``hook_z``, ``hook_q``, ``hook_attn_scores``, ...) of the attention
    of ``layer``."""
    return f"blocks.{layer}.attn.{name}"


def resid_in(layer: int) -> str:
    """The hook of the residual stream entering ``layer``."""
    return f"blocks.{layer}.hook_resid_pre"


def pattern_name(layer: int) -> str:
    """The hook of the attention pattern at ``layer``."""
    return f"blocks.{layer}.attn.hook_pattern"


def mlp_input(model: HookedTransformer, layer: int, normalized: torch.Tensor) -> torch.Tensor:
    """The MLP input (pre-MLP norm output) at ``layer`` from ``blocks.layer.ln2.hook_normalized``.

    TransformerLens exposes the norm output only before its weight; Gemma Scope 2 and
    circuitlab transcoders read ``ln2.hook_normalized * ln2.w`` (+ ``ln2.b`` for LayerNorm),
    which equals HF Gemma 3's ``pre_feedforward_layernorm`` output. In a bf16 or fp16 model
    the hook holds float32 (TransformerLens normalizes in float32) and the norm rounds it to
    the model's dtype before the weight, as here.
    """
    ln2 = model.blocks[layer].ln2
    out = normalized.to(ln2.w.dtype) * ln2.w
    return out + ln2.b if hasattr(ln2, "b") else out


def layer_of(hook) -> int:
    """The layer of a TransformerLens hook: a ``HookPoint`` or a name ``blocks.<layer>.…``
    (as a transcoder's ``cfg.metadata.hook_name``).

    Raises:
        CircuitlabError: if the name holds no ``blocks.<layer>.`` part.
    """
    name = hook if isinstance(hook, str) or hook is None else hook.name
    m = re.match(r"blocks\.(\d+)\.", name or "")
    if m is None:
        raise CircuitlabError(
            f"Hook {name!r} names no layer; expected 'blocks.<layer>.<hook>' (for a "
            "transcoder, in its cfg.json metadata)."
        )
    return int(m.group(1))


def mlp_hooks(model: HookedTransformer, on_out: Callable, layers: Sequence[int] | None = None,
              read: str = "mlp_in"):
    """TransformerLens hooks that hand each layer's MLP input and output to ``on_out``.

    ``on_out(layer, x, out)`` gets the MLP input ``x`` (see ``mlp_input``; with
    ``read="resid_mid"`` the residual stream before the pre-MLP norm instead) and the value
    of ``blocks.layer.hook_mlp_out`` ``out``, both ``[B, P, d]``. A tensor it returns
    replaces the MLP output; ``None`` keeps it.

    Returns:
        ``fwd_hooks`` for ``model.run_with_hooks``.
    """
    layers = range(model.cfg.n_layers) if layers is None else layers
    xs: dict[int, torch.Tensor] = {}

    def grab(act, hook):
        layer = layer_of(hook)
        xs[layer] = act if read == "resid_mid" else mlp_input(model, layer, act)

    def out(act, hook):
        layer = layer_of(hook)
        return on_out(layer, xs.pop(layer), act)

    source = "hook_resid_mid" if read == "resid_mid" else "ln2.hook_normalized"
    return ([(f"blocks.{l}.{source}", grab) for l in layers]
            + [(f"blocks.{l}.hook_mlp_out", out) for l in layers])


def pattern_hooks(patterns: torch.Tensor):
    """Hooks that freeze attention: every layer's pattern becomes ``patterns[layer]``
    (``[L, H, P, P]``, from a ``Trace``)."""
    return [(lambda n: n.endswith("attn.hook_pattern"),
             lambda act, hook: patterns[layer_of(hook)][None])]


def mlp_io(model: HookedTransformer, tokens: torch.Tensor, layers: Sequence[int] | None = None,
           stop_early: bool = True, read: str = "mlp_in") -> tuple[torch.Tensor, torch.Tensor]:
    """MLP inputs and outputs (the transcoder training pairs) for a batch of token ids.

    Args:
        model: the HookedTransformer.
        tokens: ``[B, P]`` or ``[P]`` token ids.
        layers: layers to capture (default all).
        stop_early: stop the forward after the last requested layer (skips the unembedding).
        read: ``"mlp_in"``, or ``"resid_mid"`` for the residual before the pre-MLP norm.

    Returns:
        ``(mlp_in, mlp_out)``, each ``[len(layers), B, P, d_model]``: the pre-MLP norm output
        (or ``read``) and ``blocks.l.hook_mlp_out``.
    """
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    tokens = tokens if tokens.ndim == 2 else tokens[None]
    pairs = {}

    def keep(layer, x, out):
        pairs[layer] = (x, out)

    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=mlp_hooks(model, keep, layers, read),
                             stop_at_layer=max(layers) + 1 if stop_early else None)
    return (torch.stack([pairs[l][0] for l in layers]),
            torch.stack([pairs[l][1] for l in layers]))


def attention_io(model: HookedTransformer, tokens: torch.Tensor, layer: int) -> dict:
    """What ``layer``'s attention reads and computes on one prompt ``tokens [P]``, from a
    forward pass that stops after it: ``resid_pre`` (the residual entering the layer),
    ``hook_q`` and ``hook_k`` (before the q/k norms and rotary), ``scores`` (pre-softmax,
    masked) and ``pattern`` of every head, and ``z[l]`` (every head's output before ``W_O``)
    of each layer below."""
    names = {attention_hook(layer, n): n for n in ("hook_attn_scores", "hook_pattern",
                                                     "hook_q", "hook_k")}
    names[resid_in(layer)] = "resid_pre"
    names.update({attention_hook(l, "hook_z"): ("z", l) for l in range(layer)})
    cache: dict = {"z": {}}

    def keep(act, hook):
        key = names[hook.name]
        if isinstance(key, tuple):
            cache["z"][key[1]] = act[0].detach()
        else:
            cache[key] = act[0].detach()

    with torch.no_grad():
        model.run_with_hooks(tokens[None], fwd_hooks=[(lambda n: n in names, keep)],
                             stop_at_layer=layer + 1)
    cache["scores"], cache["pattern"] = cache.pop("hook_attn_scores"), cache.pop("hook_pattern")
    return cache
