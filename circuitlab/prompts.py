"""Per-prompt helpers of a replacement model: tokens in and out, layer and feature checks, a
prompt's feature activations and the unembedding the features write through.

``ReplacementModel`` exposes each as a method (``rm.tokenize``, ``rm.locate``,
``rm.activations``, ...); the functions take the model first.
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

from . import checks
from .errors import CircuitlabError
from .hooks import mlp_io

# ----------------------------------------------------------------------------- tokens


def tokenize(rm, prompt: str) -> torch.Tensor:
    """Token ids ``[P]`` of ``prompt`` with BOS prepended.

    Raises:
        CircuitlabError: for an empty or whitespace prompt or one longer than the
            model's context (``cfg.n_ctx``).
    """
    if isinstance(prompt, str):
        checks.text("The prompt", prompt)
    if not isinstance(prompt, str) or not prompt.strip():
        raise CircuitlabError(
            f"The prompt is empty or whitespace ({prompt!r}); pass some text to trace, "
            'e.g. \'The opposite of "small" is "\'.'
        )
    tokens = rm.model.to_tokens(prompt, prepend_bos=True, truncate=False)[0]
    limit = rm.cfg.n_ctx
    if len(tokens) > limit:
        raise CircuitlabError(
            f"The prompt has {len(tokens)} tokens; the limit is {limit}, the model's context. "
            "Shorten it to the part that matters for the behaviour you trace."
        )
    return tokens


def to_tokens(rm, prompt) -> torch.Tensor:
    """A prompt string (``tokenize``) or token ids as ``[P]`` token ids on the model's device."""
    return tokenize(rm, prompt) if isinstance(prompt, str) else torch.as_tensor(prompt, device=rm.device)


def token_id(rm, token) -> int:
    """The id of ``token``: an int id (range-checked), or a string that is exactly one token.

    Raises:
        CircuitlabError: if the string is not a single token (the message shows how it
            was tokenized) or the id is out of the vocabulary.
    """
    if isinstance(token, numbers.Integral) and not isinstance(token, bool):
        if not 0 <= token < rm.cfg.d_vocab:
            raise CircuitlabError(
                f"Token id {token} is outside the vocabulary (0..{rm.cfg.d_vocab - 1}).")
        return int(token)
    if not isinstance(token, str):
        raise CircuitlabError(f"A token must be a string or an int id, not {token!r}.")
    ids = rm.tokenizer.encode(checks.text("The token", token), add_special_tokens=False)
    if len(ids) != 1:
        raise CircuitlabError(
            f"{token!r} is not a single token: it tokenizes as {token_strs(rm, ids)}. Pass one "
            "of those pieces or a token id, and mind the leading space (' Austin' and 'Austin' "
            "are different tokens).")
    return ids[0]


def token_str(rm, token: int) -> str:
    """The text of one token id."""
    return rm.tokenizer.decode([int(token)])


def token_strs(rm, tokens) -> list[str]:
    """Each token of ``tokens`` (a tensor or a list of ids) as text."""
    return [token_str(rm, t) for t in (tokens.tolist() if torch.is_tensor(tokens) else tokens)]


def locate(rm, tokens: torch.Tensor, text: str) -> list[int]:
    """Positions of the tokens that overlap the last occurrence of ``text`` in the prompt.

    Raises:
        CircuitlabError: if ``text`` does not occur; the message lists the prompt's tokens.
    """
    strs = token_strs(rm, tokens)
    if tokens[0].item() == rm.tokenizer.bos_token_id:
        strs[0] = ""
    ends = np.cumsum([len(s) for s in strs])
    start = "".join(strs).rfind(text)
    if not text or start < 0:
        raise CircuitlabError(
            f"{text!r} is not in the prompt, which tokenizes as {strs[1:]}. Pass text that "
            "occurs in it (mind spaces and case) or pos=.")
    return [p for p in range(len(strs)) if ends[p] > start and ends[p] - len(strs[p]) < start + len(text)]


# ----------------------------------------------------------------------------- features


def layers(rm, layer=None) -> list[int]:
    """``layer`` (an int, a list of ints or ``None`` for all) as a validated list.

    Raises:
        CircuitlabError: for a layer the model does not have, or an empty list.
    """
    out = list(range(rm.n_layers)) if layer is None else (
        [layer] if isinstance(layer, (int, np.integer)) else list(layer))
    bad = [l for l in out if not 0 <= l < rm.n_layers]
    if bad or not out:
        raise CircuitlabError(
            f"Layer {bad or layer} is out of range: this model has {rm.n_layers} layers "
            f"(0-{rm.n_layers - 1}). Pass layer=None for all of them.")
    return [int(l) for l in out]


def check_feature(rm, layer: int, feature: int) -> None:
    """Check that feature ``(layer, feature)`` exists.

    Raises:
        CircuitlabError: for a layer or feature out of range.
    """
    (layer,) = layers(rm, layer)
    if not 0 <= feature < rm.d_sae(layer):
        raise CircuitlabError(
            f"Feature {feature} is out of range: layer {layer} has {rm.d_sae(layer)} features "
            f"(0-{rm.d_sae(layer) - 1}).")


def activations(rm, tokens: torch.Tensor, layers: list[int]) -> torch.Tensor:
    """Feature activations ``[len(layers), P, d_sae]`` on one prompt (BOS gets none)."""
    mlp_in, _ = mlp_io(rm.model, tokens, layers, read=rm.reads)
    with torch.no_grad():
        return torch.stack([rm.encode(l, x[0].to(rm.encoder(l)[0].dtype), tokens)
                            for l, x in zip(layers, mlp_in)])


def unembedding(rm, norm: bool = True) -> torch.Tensor:
    """``W_U [d, vocab]``, scaled row-wise by the final norm's weight when ``norm``."""
    W_U = rm.model.W_U
    w = getattr(rm.model.ln_final, "w", None) if norm else None
    return W_U if w is None else W_U * w[:, None].to(W_U.dtype)
