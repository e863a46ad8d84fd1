"""Whether transcoders can be spliced into a model: the checks ``ReplacementModel`` runs.

A model qualifies when its blocks are sequential and pre-norm with MLPs, and its norms are
RMS or LayerNorm (unfolded). Transcoders qualify when there is one per layer (or one
cross-layer transcoder spanning every layer), of the model's width, reading each layer's MLP
input (or, all of them, the residual stream before the pre-MLP norm) and writing its MLP
output (the hook names of ``circuitlab.hooks``).
"""

from __future__ import annotations

from typing import Sequence

from transformer_lens import HookedTransformer

from .clt import CrossLayerTranscoder
from .errors import CircuitlabError
from .hooks import MLP_IN_HOOKS, MLP_OUT_HOOKS, RESID_MID_HOOKS, reads_of

INPUT_HOOKS = MLP_IN_HOOKS + RESID_MID_HOOKS


def check_splice(model: HookedTransformer, transcoders: Sequence | CrossLayerTranscoder) -> str:
    """Refuse a model or transcoders that cannot be spliced together.

    Returns:
        What the transcoders read: ``"mlp_in"`` or ``"resid_mid"`` (``circuitlab.hooks``).

    Raises:
        CircuitlabError: naming what does not fit and what to pass instead.
    """
    cfg = model.cfg
    if cfg.parallel_attn_mlp or cfg.attn_only:
        raise CircuitlabError(
            f"{cfg.model_name} has parallel attention/MLP or no MLPs; circuitlab needs "
            "sequential pre-norm blocks with MLPs.")
    if cfg.normalization_type not in ("RMS", "LN"):
        raise CircuitlabError(
            f"{cfg.model_name} uses normalization {cfg.normalization_type!r}; load it "
            "unfolded (from_pretrained_no_processing) so norms are RMS or LN.")
    if isinstance(transcoders, CrossLayerTranscoder):
        _check_clt(cfg, transcoders)
        return reads_of(transcoders.hook_in)
    if len(transcoders) != cfg.n_layers:
        raise CircuitlabError(
            f"Got {len(transcoders)} transcoders for a model with {cfg.n_layers} layers; "
            "pass exactly one transcoder per layer, in layer order.")
    for layer, tc in enumerate(transcoders):
        d_in, d_out = tc.cfg.d_in, getattr(tc.cfg, "d_out", None)
        if d_out is None:
            raise CircuitlabError(
                f"Layer {layer}: {type(tc).__name__} is not a transcoder (no d_out); "
                "use SAE-Lens Transcoder classes.")
        if d_in != cfg.d_model or d_out != cfg.d_model:
            raise CircuitlabError(
                f"Layer {layer}: transcoder maps d_in={d_in} -> d_out={d_out}, but the model's "
                f"d_model is {cfg.d_model}. These transcoders belong to another model.")
        hook_in = tc.cfg.metadata.hook_name or ""
        hook_out = tc.cfg.metadata.hook_name_out or f"blocks.{layer}.{MLP_OUT_HOOKS[0]}"
        ok_in = any(hook_in == f"blocks.{layer}.{h}" for h in INPUT_HOOKS)
        ok_out = any(hook_out == f"blocks.{layer}.{h}" for h in MLP_OUT_HOOKS)
        if not (ok_in and ok_out):
            raise CircuitlabError(
                f"Transcoder #{layer} reads {hook_in!r} and writes {hook_out!r}; the "
                f"transcoder for layer {layer} must read the MLP input "
                f"(blocks.{layer}.{MLP_IN_HOOKS[0]} or one of {', '.join(INPUT_HOOKS[1:])}) and "
                f"write blocks.{layer}.hook_mlp_out. Check the layer order and the model.")
    reads = {reads_of(tc.cfg.metadata.hook_name) for tc in transcoders}
    if len(reads) > 1:
        raise CircuitlabError(
            "Some transcoders read the MLP input and others the residual before the pre-MLP "
            "norm; a replacement model needs one kind. Use one transcoder set.")
    return reads.pop()


def _check_clt(cfg, clt: CrossLayerTranscoder) -> None:
    if (clt.n_layers, clt.d_model) != (cfg.n_layers, cfg.d_model):
        raise CircuitlabError(
            f"The cross-layer transcoder spans {clt.n_layers} layers of width {clt.d_model}; "
            f"{cfg.model_name} has {cfg.n_layers} layers of width {cfg.d_model}. It belongs "
            "to another model.")
    if clt.hook_in not in INPUT_HOOKS or clt.hook_out not in MLP_OUT_HOOKS:
        raise CircuitlabError(
            f"The cross-layer transcoder reads {clt.hook_in!r} and writes {clt.hook_out!r}; "
            f"circuitlab needs CLTs that read the MLP input ({', '.join(MLP_IN_HOOKS)}) or the "
            f"residual before it ({', '.join(RESID_MID_HOOKS)}) and write the MLP output "
            f"({', '.join(MLP_OUT_HOOKS)}).")
