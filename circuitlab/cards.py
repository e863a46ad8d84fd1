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
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .edits import positions
from .errors import CircuitlabError
from .files import cache_dir, sha256
from .presets import BUNDLE_DIR, DEFAULT_BUNDLE, EMBEDDED_MODEL, is_bundled

__all__ = [
    "N_TOP", "N_BINS", "FORMAT", "NO_EXAMPLES", "FeatureCard", "Examples", "transcoder_key",
    "bundle_name", "manifest_key", "cards_path", "read_examples", "find_examples",
    "output_tokens", "feature_card",
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


def bundle_name(rm) -> str | None:
    """The name of the bundled transcoder set ``rm`` uses (the embedded model's for ``None``),
    or ``None`` for other transcoders."""
    source = rm.transcoder_source if rm is not None else DEFAULT_BUNDLE.get(EMBEDDED_MODEL)
    return Path(source).name if is_bundled(source) else None


def manifest_key(bundle: str) -> str | None:
    """sha256 of a bundle's ``manifest.json`` (``None`` if it has none)."""
    manifest = BUNDLE_DIR / bundle / "manifest.json"
    return sha256(manifest) if manifest.exists() else None


def cards_path(rm) -> Path:
    """Where ``circuitlab cards`` writes the examples of ``rm``'s transcoders.

    The bundled set's go beside the bundle in ``data/transcoders/``; any other set's go to
    ``cache_dir()/cards/<key>.safetensors``.
    """
    bundle = bundle_name(rm)
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
    bundle = bundle_name(rm)
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


# ----------------------------------------------------------------------------- cards


def output_tokens(rm, layer: int, feature: int, k: int = 10, norm: bool = True) -> tuple[list, list]:
    """The ``k`` tokens whose logits feature ``(layer, feature)``'s decoder row raises most and
    lowers most (direct effect per unit activation: ``W_dec[f] @ W_U``, after the final norm's
    weight when ``norm``; a cross-layer feature's ``W_dec[f]`` is the sum of its writes)."""
    rm.check_feature(layer, feature)
    row = rm.decoder(layer)[feature]
    effect = row.to(rm.model.W_U.dtype) @ rm.unembedding(norm)
    pairs = lambda idx: [(rm.token_str(i), float(effect[i])) for i in idx.tolist()]  # noqa: E731
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
        rm.check_feature(layer, feature)
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
            ids = rm.to_tokens(tokens)
            acts = rm.activations(ids, [layer])[0, :, feature]
            card.prompt_activation = float(acts.max() if pos is None else acts[positions(pos, len(ids))].max())
    return card

