"""Feature cards at runtime: what one transcoder feature does, read from the card store.

A card (``FeatureCard``, built by ``feature_card``) shows a feature's top-activating
contexts precomputed over held-out text, its output tokens through the unembedding, an
activation histogram and its activation on the current prompt.

The examples behind the cards are built once per transcoder set by
``circuitlab.train.build_cards.build_examples`` (the ``circuitlab cards`` command) and
stored as one safetensors file whose header holds the build's JSON metadata
(``read_examples``, ``find_examples``). The file is keyed to the transcoders (a sha256 of
their weights, and of the bundle manifest for the bundled set), so cards for other or
retrained transcoders say ``"no examples cached ..."`` instead of showing stale contexts.

The per-prompt helpers here (``activations``, ``locate``, ``token_strs``, ``unembedding``,
``output_tokens``) are shared with ``circuitlab.search``.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from .edits import positions
from .errors import CircuitlabError
from .files import cache_dir, sha256
from .hooks import mlp_io
from .loading import BUNDLE_DIR, DEFAULT_BUNDLE, EMBEDDED_MODEL

__all__ = [
    "N_TOP", "N_BINS", "FORMAT", "NO_EXAMPLES", "FeatureCard", "Examples", "transcoder_key",
    "manifest_key", "cards_path", "read_examples", "find_examples", "token_strs", "locate",
    "activations", "unembedding", "output_tokens", "feature_card",
]

#: Top contexts stored per feature by default (``build_examples`` then samples more from
#: bands of its max activation).
N_TOP = 10
#: Bins of the activation histogram (equal width from 0 to the feature's max).
N_BINS = 12
FORMAT = "circuitlab-cards/1"
NO_EXAMPLES = "no examples cached for these transcoders; run `circuitlab cards`"


@dataclass
class FeatureCard:
    """Everything the explorer shows about one feature ``(layer, feature)``.

    Attributes:
        layer, feature: which feature.
        label: the user's label if any, else the automatic label (see ``circuitlab.labels``).
        contexts: top-activating contexts, each a dict ``{"quantile": str, "tokens":
            [str, ...], "acts": [float, ...], "max": float}`` (``acts`` aligned with
            ``tokens``), grouped by activation quantile, strongest first.
        top_tokens / bottom_tokens: ``[(token, logit effect), ...]`` of the decoder
            direction through the unembedding (most raised / most lowered).
        histogram: ``(bin_edges, counts)`` of its nonzero activations on held-out text,
            or ``None``.
        prompt_activation: its activation on the current prompt (max over positions,
            or at the selected node's position), or ``None``.
        message: why something is missing, e.g. ``"no examples cached"``; ``None`` if
            nothing is.
        frequency: the share of held-out tokens it fires on, or ``None``.
        max_activation: its largest activation on held-out text, or ``None``.
    """

    layer: int
    feature: int
    label: str = ""
    contexts: list = field(default_factory=list)
    top_tokens: list = field(default_factory=list)
    bottom_tokens: list = field(default_factory=list)
    histogram: tuple | None = None
    prompt_activation: float | None = None
    message: str | None = None
    frequency: float | None = None
    max_activation: float | None = None


# ----------------------------------------------------------------------------- keys

_KEYS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def transcoder_key(rm) -> str:
    """sha256 of the transcoders' weights (all tensors, in layer order), cached per model."""
    if rm not in _KEYS:
        digest = hashlib.sha256()
        for tc in [rm.clt] if rm.clt is not None else rm.transcoders:
            for name, tensor in sorted(tc.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        _KEYS[rm] = digest.hexdigest()
    return _KEYS[rm]


def _bundle_name(rm) -> str | None:
    """The name of the bundled transcoder set ``rm`` uses, or ``None``."""
    source = rm.transcoder_source if rm is not None else DEFAULT_BUNDLE.get(EMBEDDED_MODEL)
    if source is None:
        return None
    if source in DEFAULT_BUNDLE.values():
        return source
    path = Path(source)
    return path.name if path.parent.resolve() == BUNDLE_DIR.resolve() else None


def manifest_key(bundle: str) -> str | None:
    """sha256 of a bundle's ``manifest.json`` (``None`` if it has none)."""
    manifest = BUNDLE_DIR / bundle / "manifest.json"
    return sha256(manifest) if manifest.exists() else None


def cards_path(rm) -> Path:
    """Where ``circuitlab cards`` writes the examples of ``rm``'s transcoders.

    The bundled set's go beside the bundle in ``data/transcoders/``; any other set's go to
    ``cache_dir()/cards/<key>.safetensors``.
    """
    bundle = _bundle_name(rm)
    if bundle is not None:
        return BUNDLE_DIR / f"{bundle}-cards.safetensors"
    return cache_dir() / "cards" / f"{transcoder_key(rm)[:32]}.safetensors"


# ----------------------------------------------------------------------------- the cache


@dataclass
class Examples:
    """Precomputed examples of every feature of a transcoder set (see ``build_examples``).

    Attributes:
        tokens: ``[N]`` token ids of the held-out sequences, back to back (BOS first in each).
        starts: ``[S + 1]`` offsets of the sequences in ``tokens``.
        centers: ``[L, F, K]`` index into ``tokens`` of each context's max (-1: none).
        acts: ``[L, F, K, W]`` the feature's activations in the window of ``W`` tokens
            around each center (``meta["window"]`` before and after it), in units of
            ``max_act / 255``.
        max_act, total: ``[L, F]`` largest and summed activation on held-out text.
        hist: ``[L, F, N_BINS]`` counts of nonzero activations in equal bins of ``[0, max_act]``.
        meta: the build's metadata (keys, command, corpus, token count, vocabulary).
    """

    tokens: torch.Tensor
    starts: torch.Tensor
    centers: torch.Tensor
    acts: torch.Tensor
    max_act: torch.Tensor
    total: torch.Tensor
    hist: torch.Tensor
    meta: dict

    @property
    def n_tokens(self) -> int:
        """Number of scored tokens (BOS excluded)."""
        return int(self.meta["n_tokens"])

    def frequency(self) -> torch.Tensor:
        """``[L, F]`` share of held-out tokens each feature fires on."""
        return self.hist.sum(-1) / self.n_tokens

    def mean_act(self) -> torch.Tensor:
        """``[L, F]`` mean activation per held-out token (zeros included)."""
        return self.total / self.n_tokens

    def groups(self) -> list[str]:
        """The quantile label of each of the ``K`` context slots."""
        return self.meta["groups"]

    def token_str(self, token_id: int) -> str:
        """The text of a token id that occurs in the stored sequences."""
        return self.meta["vocab"][str(int(token_id))]

    def context(self, layer: int, feature: int, slot: int) -> dict | None:
        """One context as the explorer shows it, or ``None`` for an empty slot."""
        center = int(self.centers[layer, feature, slot])
        if center < 0:
            return None
        seq = int(torch.searchsorted(self.starts, center, right=True)) - 1
        left, right = self.meta["window"]
        lo = max(center - left, int(self.starts[seq]) + 1)
        hi = min(center + right + 1, int(self.starts[seq + 1]))
        scale = float(self.max_act[layer, feature]) / 255
        q = self.acts[layer, feature, slot, lo - center + left: hi - center + left]
        return {"quantile": self.groups()[slot],
                "tokens": [self.token_str(t) for t in self.tokens[lo:hi].tolist()],
                "acts": [v * scale for v in q.tolist()],
                "max": int(self.acts[layer, feature, slot, left]) * scale,
                "center": center - lo}

    def contexts(self, layer: int, feature: int) -> list[dict]:
        """All stored contexts of a feature, strongest group first."""
        found = (self.context(layer, feature, k) for k in range(self.centers.shape[-1]))
        return [c for c in found if c is not None]

    def label(self, layer: int, feature: int) -> str:
        """The feature's automatic label (see ``circuitlab.labels``), ``""`` if none was built."""
        labels = self.meta.get("labels", {}).get(str(int(layer)))
        return labels[int(feature)] if labels and 0 <= int(feature) < len(labels) else ""

    def histogram(self, layer: int, feature: int) -> tuple[list, list] | None:
        """``(bin_edges, counts)`` of a feature's nonzero activations, ``None`` if it never fired."""
        counts = self.hist[layer, feature]
        if counts.sum() == 0:
            return None
        edges = torch.linspace(0, float(self.max_act[layer, feature]), N_BINS + 1)  # host: cards
        return edges.tolist(), counts.tolist()


_LOADED: dict = {}


def read_examples(path: str | os.PathLike) -> Examples:
    """Read an examples file written by ``build_examples`` (cached by path and mtime)."""
    path = Path(path)
    stamp = (str(path.resolve()), path.stat().st_mtime_ns)
    if stamp not in _LOADED:
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["circuitlab"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") != FORMAT:
            raise CircuitlabError(f"{path} is not a circuitlab cards file; rebuild it with `circuitlab cards`.")
        _LOADED.clear()
        _LOADED[stamp] = Examples(meta=meta, **tensors)
    return _LOADED[stamp]


def find_examples(rm=None) -> tuple[Examples | None, str | None]:
    """The cached examples for ``rm``'s transcoders, or ``(None, why)``.

    With ``rm=None`` the embedded model's bundled set is assumed; its cards are checked
    against the bundle's manifest instead of the weights.
    """
    bundle = _bundle_name(rm)
    candidates = [BUNDLE_DIR / f"{bundle}-cards.safetensors"] if bundle else []
    if rm is not None:
        candidates.append(cache_dir() / "cards" / f"{transcoder_key(rm)[:32]}.safetensors")
    for path in candidates:
        if not path.exists():
            continue
        examples = read_examples(path)
        if rm is None:
            fresh = examples.meta.get("manifest_sha256") == manifest_key(bundle)
        else:
            fresh = examples.meta["transcoder_sha256"] == transcoder_key(rm)
        if fresh:
            return examples, None
    return None, NO_EXAMPLES


# ----------------------------------------------------------------------------- validation


def _layers(rm, layer) -> list[int]:
    """``layer`` (an int, a list of ints or ``None`` for all) as a validated list."""
    layers = list(range(rm.n_layers)) if layer is None else (
        [layer] if isinstance(layer, (int, np.integer)) else list(layer))
    bad = [l for l in layers if not 0 <= l < rm.n_layers]
    if bad or not layers:
        raise CircuitlabError(
            f"Layer {bad or layer} is out of range: this model has {rm.n_layers} layers "
            f"(0-{rm.n_layers - 1}). Pass layer=None for all of them.")
    return [int(l) for l in layers]


def _check_feature(rm, layer: int, feature: int) -> None:
    """Raise a ``CircuitlabError`` unless ``(layer, feature)`` exists in ``rm``."""
    (layer,) = _layers(rm, layer)
    if not 0 <= feature < rm.d_sae(layer):
        raise CircuitlabError(
            f"Feature {feature} is out of range: layer {layer} has {rm.d_sae(layer)} features "
            f"(0-{rm.d_sae(layer) - 1}).")


# ----------------------------------------------------------------------------- activations


def token_strs(rm, tokens: torch.Tensor) -> list[str]:
    """Each token of ``tokens`` as text."""
    return [rm.tokenizer.decode([t]) for t in tokens.tolist()]


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


def activations(rm, tokens: torch.Tensor, layers: list[int]) -> torch.Tensor:
    """Feature activations ``[len(layers), P, d_sae]`` on one prompt (BOS gets none)."""
    mlp_in, _ = mlp_io(rm.model, tokens, layers, read=rm.reads)
    with torch.no_grad():
        return torch.stack([rm.encode(l, x[0].to(rm.encoder(l)[0].dtype), tokens)
                            for l, x in zip(layers, mlp_in)])


def _as_tokens(rm, prompt) -> torch.Tensor:
    """A prompt string or token tensor as ``[P]`` token ids."""
    return rm.tokenize(prompt) if isinstance(prompt, str) else torch.as_tensor(prompt, device=rm.device)


# ----------------------------------------------------------------------------- cards


def unembedding(rm, norm: bool = True) -> torch.Tensor:
    """``W_U [d, vocab]``, scaled row-wise by the final norm's weight when ``norm``."""
    W_U = rm.model.W_U
    w = getattr(rm.model.ln_final, "w", None) if norm else None
    return W_U if w is None else W_U * w[:, None].to(W_U.dtype)


def output_tokens(rm, layer: int, feature: int, k: int = 10, norm: bool = True) -> tuple[list, list]:
    """The ``k`` tokens whose logits feature ``(layer, feature)``'s decoder row raises most and
    lowers most (direct effect per unit activation: ``W_dec[f] @ W_U``, after the final norm's
    weight when ``norm``; a cross-layer feature's ``W_dec[f]`` is the sum of its writes)."""
    _check_feature(rm, layer, feature)
    row = rm.decoder(layer)[feature]
    effect = row.to(rm.model.W_U.dtype) @ unembedding(rm, norm)
    pairs = lambda idx: [(rm.tokenizer.decode([i]), float(effect[i])) for i in idx.tolist()]  # noqa: E731
    return pairs(effect.topk(k).indices), pairs((-effect).topk(k).indices)


def feature_card(rm, layer: int, feature: int, *, tokens=None, pos=None, label: str = "",
                 examples: Examples | None = None) -> FeatureCard:
    """Everything known about feature ``(layer, feature)``, for the explorer.

    Args:
        rm: the ``ReplacementModel``, or ``None`` to show only what is cached (the bundled
            transcoders of the embedded model).
        layer, feature: the feature.
        tokens: the current prompt (text or token ids), for ``prompt_activation``.
        pos: position of the selected node; ``None`` takes the max over positions.
        label: the user's label.
        examples: cached examples to use instead of looking them up.

    Returns:
        A ``FeatureCard``; what is not available is left empty and ``message`` says why
        (e.g. ``"no examples cached for these transcoders; run `circuitlab cards`"``).
    """
    if rm is not None:
        _check_feature(rm, layer, feature)
    why = None
    if examples is None:
        examples, why = find_examples(rm)
    card = FeatureCard(layer, feature, label=label, message=why)
    if examples is not None:
        L, n = examples.centers.shape[:2]
        if not (0 <= layer < L and 0 <= feature < n):
            raise CircuitlabError(f"No feature ({layer}, {feature}) in the cached examples: "
                                  f"they cover layers 0-{L - 1} and features 0-{n - 1}.")
        card.label = label or examples.label(layer, feature)
        card.contexts = examples.contexts(layer, feature)
        card.histogram = examples.histogram(layer, feature)
        card.frequency = float(examples.frequency()[layer, feature])
        card.max_activation = float(examples.max_act[layer, feature])
    if rm is not None:
        card.top_tokens, card.bottom_tokens = output_tokens(rm, layer, feature)
        if tokens is not None:
            ids = _as_tokens(rm, tokens)
            acts = activations(rm, ids, [layer])[0, :, feature]
            card.prompt_activation = float(acts.max() if pos is None else acts[positions(pos, len(ids))].max())
    return card

