"""Features: what a transcoder feature does, and how to find the ones you want.

Feature cards (top-activating contexts precomputed over held-out text, output tokens
through the unembedding, an activation histogram), feature search on a
``ReplacementModel``, ``compare`` of graphs and supernode suggestions.

The examples behind the cards are built once per transcoder set by ``build_examples`` (the
``circuitlab cards`` command) and stored as one safetensors file whose header holds the
build's JSON metadata. The file is keyed to the transcoders (a sha256 of their weights, and
of the bundle manifest for the bundled set), so cards for other or retrained transcoders
say ``"no examples cached ..."`` instead of showing stale contexts.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .loading import BUNDLE_DIR, DEFAULT_BUNDLE, EMBEDDED_MODEL, CircuitlabError, cache_dir, sha256
from .interventions import positions
from .replacement import mlp_io

#: Context window stored per example: tokens before the max, the max, tokens after.
LEFT, RIGHT = 11, 4
#: Top contexts per feature, then ``PER_BAND`` sampled from each band of its max activation
#: (the defaults of ``build_examples``).
N_TOP, PER_BAND = 10, 2
#: Size budget of a cards file stored beside a bundled transcoder set in ``data/``.
BUNDLED_MAX_BYTES = 12_000_000
BANDS = ((0.5, 0.75), (0.25, 0.5), (0.0, 0.25))
#: Bins of the activation histogram (equal width from 0 to the feature's max).
N_BINS = 12
FORMAT = "circuitlab-cards/1"
NO_EXAMPLES = "no examples cached for these transcoders; run `circuitlab cards`"


@dataclass
class FeatureCard:
    """Everything the explorer shows about one feature ``(layer, feature)``.

    Attributes:
        layer, feature: which feature.
        label: a user label, if any.
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
        for tc in rm.transcoders:
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

    def histogram(self, layer: int, feature: int) -> tuple[list, list] | None:
        """``(bin_edges, counts)`` of a feature's nonzero activations, ``None`` if it never fired."""
        counts = self.hist[layer, feature]
        if counts.sum() == 0:
            return None
        edges = torch.linspace(0, float(self.max_act[layer, feature]), N_BINS + 1)
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


# ----------------------------------------------------------------------------- building


def held_out_sequences(tokenizer, corpus, n_tokens: int, context: int) -> list[torch.Tensor]:
    """Token sequences of held-out documents, in corpus order, up to ``n_tokens`` tokens.

    Each document is cut into pieces of ``context - 1`` tokens, each with BOS prepended;
    pieces never span documents.
    """
    from .train.corpus import iter_documents

    seqs, total = [], 0
    for text in iter_documents(corpus, split="heldout"):
        ids = tokenizer.encode(text, add_special_tokens=False)
        for i in range(0, len(ids), context - 1):
            piece = ids[i:i + context - 1][: n_tokens - total]
            if len(piece) < 2:
                continue
            seqs.append(torch.tensor([tokenizer.bos_token_id] + piece))
            total += len(piece)
            if total >= n_tokens:
                return seqs
    return seqs


#: How ``_collect`` spills each layer's nonzero activations to disk: name and dtype.
SPILL = (("idx", np.int32), ("feat", np.int16), ("act", np.float16))


def _collect(rm, seqs: list[torch.Tensor], batch_size: int, folder: Path, progress: bool) -> None:
    """Write every nonzero activation on ``seqs`` to ``folder``: per layer, the token index
    (into ``torch.cat(seqs)``), feature and activation, one file each (see ``SPILL``), so
    memory stays flat however many tokens are scanned. BOS positions and padding are skipped.
    """
    from contextlib import ExitStack

    from tqdm.auto import tqdm

    pad = rm.tokenizer.pad_token_id or 0
    offset = 0
    with ExitStack() as stack:
        sinks = [[stack.enter_context(open(folder / f"{l}.{name}", "wb")) for name, _ in SPILL]
                 for l in range(rm.n_layers)]
        for i in tqdm(range(0, len(seqs), batch_size), desc="cards", disable=not progress):
            batch = seqs[i:i + batch_size]
            lens = torch.tensor([len(s) for s in batch])
            tokens = torch.nn.utils.rnn.pad_sequence(batch, batch_first=True, padding_value=pad)
            valid = torch.arange(tokens.shape[1])[None] < lens[:, None]
            valid[:, 0] = False
            index = torch.cumsum(torch.cat([torch.tensor([0]), lens[:-1]]), 0)[:, None] + offset
            index = (index + torch.arange(tokens.shape[1])[None])[valid]
            mlp_in, _ = mlp_io(rm.model, tokens)
            for layer, files in enumerate(sinks):
                with torch.no_grad():
                    acts = rm.encode(layer, mlp_in[layer][valid].to(rm.transcoders[layer].W_enc.dtype))
                row, feat = acts.nonzero(as_tuple=True)
                for f, values, (_, dtype) in zip(files, (index[row], feat, acts[row, feat]), SPILL):
                    f.write(values.numpy().astype(dtype).tobytes())
            offset += int(lens.sum())


def _spilled(folder: Path, layer: int) -> list[torch.Tensor]:
    """One layer's ``(token index, feature, act)`` written by ``_collect``."""
    return [torch.from_numpy(np.fromfile(folder / f"{layer}.{name}", dtype=dtype))
            for name, dtype in SPILL]


def _rank_in_group(keys: torch.Tensor) -> torch.Tensor:
    """For keys grouped contiguously, each entry's rank within its group."""
    new = torch.ones_like(keys, dtype=torch.bool)
    new[1:] = keys[1:] != keys[:-1]
    start = torch.cummax(torch.where(new, torch.arange(len(keys)), 0), 0).values
    return torch.arange(len(keys)) - start


def _first_per_group(keys: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the first ``n`` entries of each distinct key, in key order (ties keep
    their order, so sort the entries by priority first)."""
    order = torch.argsort(keys, stable=True)
    return order[_rank_in_group(keys[order]) < n]


def _summarize_layer(idx, feat, act, n_features: int, n_tokens: int, seed: int, n_top: int,
                     per_band: int) -> dict:
    """Max, sum, histogram and selected contexts of every feature of one layer."""
    feat, act, idx = feat.long(), act.float(), idx.long()
    max_act = torch.zeros(n_features).scatter_reduce(0, feat, act, "amax")
    total = torch.zeros(n_features).index_add_(0, feat, act)
    rel = act / max_act[feat]
    bins = (rel * N_BINS).long().clamp(max=N_BINS - 1)
    hist = torch.bincount(feat * N_BINS + bins, minlength=n_features * N_BINS).view(n_features, N_BINS)
    # One candidate per (feature, window-sized chunk of tokens): its largest activation.
    width = LEFT + 1 + RIGHT
    by_act = torch.argsort(act, descending=True, stable=True)
    cand = by_act[_first_per_group(feat[by_act] * (n_tokens // width + 1) + idx[by_act] // width, 1)]
    cand = cand[torch.argsort(act[cand], descending=True, stable=True)]
    top = _first_per_group(feat[cand], n_top)
    picks = [(feat[cand[top]], cand[top], 0)]
    rest = torch.ones(len(act), dtype=torch.bool)
    rest[cand[top]] = False
    g = torch.Generator().manual_seed(seed)
    for b, (lo, hi) in enumerate(BANDS):
        pool = cand[rest[cand] & (rel[cand] >= lo) & (rel[cand] < hi)]
        pool = pool[torch.randperm(len(pool), generator=g)]
        chosen = pool[_first_per_group(feat[pool], per_band)]
        picks.append((feat[chosen], chosen, n_top + b * per_band))
    K = n_top + per_band * len(BANDS)
    return {"max_act": max_act, "total": total, "hist": hist.int(),
            **_windows(picks, idx, feat, act, max_act, (n_features, K), n_tokens)}


def _windows(picks, idx, feat, act, max_act, shape: tuple[int, int], n_tokens: int) -> dict:
    """Centers ``[F, K]`` and quantised activation windows ``[F, K, W]`` of the picks."""
    centers = torch.full(shape, -1, dtype=torch.int32)
    windows = torch.zeros(*shape, LEFT + 1 + RIGHT, dtype=torch.uint8)
    key = feat * n_tokens + idx
    order = torch.argsort(key)
    sorted_key = key[order]
    for f, entry, first in picks:
        slot = first + _rank_in_group(f)
        centers[f, slot] = idx[entry].int()
        pos = idx[entry][:, None] + torch.arange(-LEFT, RIGHT + 1)[None]
        query = f[:, None] * n_tokens + pos
        at = torch.searchsorted(sorted_key, query).clamp(max=len(key) - 1)
        hit = (sorted_key[at] == query) & (pos >= 0) & (pos < n_tokens)
        values = torch.where(hit, act[order[at]], 0.0) / max_act[f][:, None]
        windows[f, slot] = (values * 255).round().clamp(0, 255).to(torch.uint8)
    return {"centers": centers, "acts": windows}


def estimate_bytes(rm, tokens: int, n_top: int = N_TOP, per_band: int = PER_BAND) -> int:
    """Roughly how large ``build_examples`` output is (the vocabulary text estimated)."""
    K = n_top + per_band * len(BANDS)
    per_feature = K * (4 + LEFT + 1 + RIGHT) + 4 * N_BINS + 8
    return sum(rm.d_sae(l) for l in range(rm.n_layers)) * per_feature + 6 * tokens


def build_examples(rm, corpus=None, *, tokens: int = 200_000, context: int = 128,
                   batch_size: int = 16, out: str | os.PathLike | None = None,
                   n_top: int = N_TOP, per_band: int = PER_BAND, seed: int = 0,
                   max_bytes: int | None = None, command: str | None = None,
                   progress: bool = True) -> Path:
    """Precompute feature-card examples over held-out text and write them atomically.

    Runs the model over the held-out split of ``corpus`` (stopping after the last
    transcoder layer) and stores, per feature: its ``n_top`` top-activating contexts (one
    per window-sized chunk of text), then ``per_band`` contexts sampled from each band of
    ``BANDS`` (shares of its max activation), each ``LEFT + 1 + RIGHT`` tokens around its
    max with the feature's activations quantised to uint8; a histogram of its nonzero
    activations; its max and summed activation. Token ids are stored once, with the text
    of each distinct id.

    Args:
        rm: the ``ReplacementModel`` (a bf16 model is fine; activations are encoded in the
            transcoders' dtype).
        corpus: a corpus built by ``circuitlab corpus`` (default ``cache_dir()/corpus``).
        tokens: held-out tokens to scan (BOS excluded).
        context: sequence length (BOS included).
        batch_size: sequences per forward pass.
        out: the file to write (default ``cards_path(rm)``).
        n_top, per_band: contexts per feature (see above).
        seed: seed of the band sampling.
        max_bytes: refuse settings whose output would be larger (default
            ``BUNDLED_MAX_BYTES`` for a file in ``data/``, else no limit).
        command: the command line to record.
        progress: show a progress bar.

    Returns:
        The path written.
    """
    corpus = Path(corpus) if corpus is not None else cache_dir() / "corpus"
    out = Path(out) if out is not None else cards_path(rm)
    if tokens < 1 or context < 2 or n_top < 1 or per_band < 0:
        raise CircuitlabError(f"Need tokens >= 1, context >= 2, n_top >= 1 and per_band >= 0 "
                              f"(got {tokens}, {context}, {n_top}, {per_band}).")
    _check_budget(rm, out, tokens, n_top, per_band, max_bytes)
    t0 = time.perf_counter()
    seqs = held_out_sequences(rm.tokenizer, corpus, tokens, context)
    flat = torch.cat(seqs)
    with tempfile.TemporaryDirectory(prefix="circuitlab-cards-") as tmp:
        _collect(rm, seqs, batch_size, Path(tmp), progress)
        parts = [_summarize_layer(*_spilled(Path(tmp), layer), rm.d_sae(layer), len(flat),
                                  seed + layer, n_top, per_band) for layer in range(rm.n_layers)]
    tensors = {k: torch.stack([p[k] for p in parts]).contiguous() for k in parts[0]}
    tensors["tokens"] = flat.int()
    tensors["starts"] = torch.cumsum(torch.tensor([0] + [len(s) for s in seqs]), 0).int()
    settings = {"seed": seed, "n_top": n_top, "per_band": per_band, "context": context}
    _atomic_save(tensors, _metadata(rm, corpus, seqs, settings, command, time.perf_counter() - t0), out)
    return out


def _check_budget(rm, out: Path, tokens: int, n_top: int, per_band: int, max_bytes) -> None:
    """Refuse settings whose output would exceed ``max_bytes`` (default: the ``data/`` budget
    for files stored there)."""
    in_data = out.resolve().is_relative_to(BUNDLE_DIR.parent.resolve())
    limit = max_bytes or (BUNDLED_MAX_BYTES if in_data else None)
    size = estimate_bytes(rm, tokens, n_top, per_band)
    if limit is not None and size > limit:
        raise CircuitlabError(
            f"The cards file would take about {size / 1e6:.1f} MB, over the {limit / 1e6:.0f} MB "
            "budget; lower --tokens, --top or --per-band, or write it elsewhere with --out.")


def _metadata(rm, corpus: Path, seqs, settings: dict, command, seconds: float) -> dict:
    """The JSON header of an examples file."""
    bundle = _bundle_name(rm)
    manifest = corpus / "manifest.json"
    flat = torch.cat(seqs)
    groups = ["top"] * settings["n_top"] + [
        f"{lo:.2f}-{hi:.2f} of max" for lo, hi in BANDS for _ in range(settings["per_band"])]
    return {
        "format": FORMAT, "model": rm.name, "transcoders": str(rm.transcoder_source),
        "transcoder_sha256": transcoder_key(rm),
        "manifest_sha256": manifest_key(bundle) if bundle else None,
        "command": command, "corpus": str(corpus), "split": "heldout",
        "corpus_manifest_sha256": sha256(manifest) if manifest.exists() else None,
        "n_tokens": int(len(flat) - len(seqs)), "n_sequences": len(seqs), **settings,
        "window": [LEFT, RIGHT], "groups": groups, "bands": BANDS, "seconds": round(seconds, 1),
        "vocab": {str(t): rm.tokenizer.decode([t]) for t in torch.unique(flat).tolist()},
    }


def _atomic_save(tensors: dict, meta: dict, out: Path) -> None:
    """``save_file`` to a temporary file beside ``out``, then rename it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"circuitlab": json.dumps(meta, ensure_ascii=False)})
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    mlp_in, _ = mlp_io(rm.model, tokens, layers)
    with torch.no_grad():
        return torch.stack([rm.encode(l, x[0].to(rm.transcoders[l].W_enc.dtype), tokens)
                            for l, x in zip(layers, mlp_in)])


def _as_tokens(rm, prompt) -> torch.Tensor:
    """A prompt string or token tensor as ``[P]`` token ids."""
    return rm.tokenize(prompt) if isinstance(prompt, str) else torch.as_tensor(prompt)


# ----------------------------------------------------------------------------- cards


def unembedding(rm, norm: bool = True) -> torch.Tensor:
    """``W_U [d, vocab]``, scaled row-wise by the final norm's weight when ``norm``."""
    W_U = rm.model.W_U
    w = getattr(rm.model.ln_final, "w", None) if norm else None
    return W_U if w is None else W_U * w[:, None].to(W_U.dtype)


def output_tokens(rm, layer: int, feature: int, k: int = 10, norm: bool = True) -> tuple[list, list]:
    """The ``k`` tokens whose logits feature ``(layer, feature)``'s decoder row raises most and
    lowers most (direct effect per unit activation: ``W_dec[f] @ W_U``, after the final norm's
    weight when ``norm``)."""
    _check_feature(rm, layer, feature)
    row = rm.transcoders[layer].W_dec[feature]
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


# ----------------------------------------------------------------------------- search


def _ranked(rm, layers: list[int], score: torch.Tensor, top: int, keep: torch.Tensor | None = None,
            **columns: torch.Tensor) -> pd.DataFrame:
    """The ``top`` entries of ``score [len(layers), F]`` (where ``keep``) as a DataFrame with
    ``layer, feature, score``, the ``columns`` at the same entries, and, when examples are
    cached for ``rm``, each feature's held-out ``frequency`` and ``max_activation``."""
    keep = torch.ones_like(score, dtype=torch.bool) if keep is None else keep
    flat = torch.where(keep, score, -torch.inf).flatten()
    n = int(min(top, keep.sum()))
    idx = flat.topk(n).indices
    rows, feats = idx // score.shape[1], idx % score.shape[1]
    layer_ids = torch.tensor(layers)[rows]
    frame = {"layer": layer_ids.numpy(), "feature": feats.numpy(), "score": flat[idx].numpy()}
    frame.update({k: v.flatten()[idx].numpy() for k, v in columns.items()})
    examples, _ = find_examples(rm)
    if examples is not None:
        frame["frequency"] = examples.frequency()[layer_ids, feats].numpy()
        frame["max_activation"] = examples.max_act[layer_ids, feats].numpy()
    return pd.DataFrame(frame)


def _scale(rm, layers: list[int]) -> torch.Tensor | None:
    """``[len(layers), F]`` held-out max activations when cached (to compare features on a
    common scale), else ``None``. Features never seen firing take their layer's median."""
    examples, _ = find_examples(rm)
    if examples is None:
        return None
    top = examples.max_act[layers]
    median = top.masked_fill(top <= 0, float("nan")).nanmedian(1, keepdim=True).values
    return torch.where(top > 0, top, median.nan_to_num(1.0)).clamp_min(1e-6)


def features_for(rm, prompt, token_or_text: str | None = None, layer=None, pos=None,
                 top: int = 20) -> pd.DataFrame:
    """The features most active on a token or phrase of a prompt.

    Args:
        rm: the ``ReplacementModel``.
        prompt: the prompt (text or token ids; BOS is prepended to text).
        token_or_text: text in the prompt; its last occurrence is used, and every token
            overlapping it counts (a feature's activation is its max over them).
        layer: a layer, a list of layers, or ``None`` for all.
        pos: position(s) to use instead of ``token_or_text``; with neither, the last token.
        top: number of rows.

    Returns:
        DataFrame ``layer, feature, score, pos, token, activation, rel_activation, node_id``
        (plus ``frequency, max_activation`` when examples are cached), best first. ``score``
        is the activation relative to the feature's held-out max when examples are cached
        for these transcoders, else the raw activation. Only active features are listed.
    """
    tokens = _as_tokens(rm, prompt)
    layers = _layers(rm, layer)
    if pos is not None:
        at = positions(pos, len(tokens))
    else:
        at = [len(tokens) - 1] if token_or_text is None else locate(rm, tokens, token_or_text)
    acts, arg = activations(rm, tokens, layers)[:, at].max(1)
    where = torch.tensor(at)[arg]
    scale = _scale(rm, layers)
    rel = acts / scale if scale is not None else torch.full_like(acts, float("nan"))
    df = _ranked(rm, layers, acts if scale is None else rel, top, acts > 0, pos=where,
                 activation=acts, rel_activation=rel)
    strs = token_strs(rm, tokens)
    df.insert(3, "token", [strs[p] for p in df["pos"]])
    df["node_id"] = [f"{l}_{f}_{p}" for l, f, p in zip(df["layer"], df["feature"], df["pos"])]
    return df


_UNEMBED_STATS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _unembed_stats(rm, norm: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(W_U, mean, cov)``: the (norm-scaled) unembedding, the mean of its columns and
    their covariance ``[d, d]``, cached per model."""
    stats = _UNEMBED_STATS.setdefault(rm, {})
    if norm not in stats:
        U = unembedding(rm, norm).detach().float()
        mean = U.mean(1)
        stats[norm] = (U, mean, U @ U.T / U.shape[1] - torch.outer(mean, mean))
    return stats[norm]


def features_by_output(rm, token, layer=None, top: int = 20, norm: bool = True) -> pd.DataFrame:
    """The features whose decoder direction most raises a token's logit.

    A feature's direct effect on the logits per unit activation is ``W_dec[f] @ W_U`` (with
    ``W_U`` scaled by the final norm's weight when ``norm``; paths through later layers are
    not included). Features are ranked by how far the token's effect stands above the
    feature's mean effect over the vocabulary, in standard deviations of that effect: a
    scale-free score, so large decoder norms (early layers) do not dominate, and a feature
    whose top output token is ``token`` ranks high.

    Args:
        rm: the ``ReplacementModel``.
        token: a string that is exactly one token (e.g. ``" Austin"``), or a token id.
        layer: a layer, a list of layers, or ``None`` for all.
        top: number of rows.
        norm: apply the final norm's weight.

    Returns:
        DataFrame ``layer, feature, score, token, logit_effect`` (``score`` is the
        standardized effect, ``logit_effect`` the raw one; plus ``frequency,
        max_activation`` when examples are cached), best first.
    """
    t = rm.token_id(token)
    layers = _layers(rm, layer)
    U, mean, cov = _unembed_stats(rm, norm)
    effect, z = [], []
    for l in layers:
        d = rm.transcoders[l].W_dec.detach().float()
        effect.append(d @ U[:, t])
        z.append((effect[-1] - d @ mean) / ((d @ cov) * d).sum(1).clamp_min(1e-30).sqrt())
    df = _ranked(rm, layers, torch.stack(z), top, logit_effect=torch.stack(effect))
    df.insert(3, "token", rm.tokenizer.decode([t]))
    return df


def _concept_acts(rm, items: list, layers: list[int]) -> torch.Tensor:
    """``[len(items), len(layers), F]`` activations at each item's concept token(s)."""
    if isinstance(items, str) or not len(items):
        raise CircuitlabError(
            f"Expected a non-empty list of examples, got {items!r}; e.g. "
            "['Dallas', 'I flew to Houston', ('Austin, Texas', 'Austin')].")
    rows = []
    for item in items:
        prompt, text = item if isinstance(item, tuple) else (item, None)
        tokens = rm.tokenize(prompt)
        at = [len(tokens) - 1] if text is None else locate(rm, tokens, text)
        rows.append(activations(rm, tokens, layers)[:, at].max(1).values)
    return torch.stack(rows)


def features_by_examples(rm, examples: list, against: list | None = None, layer=None,
                         top: int = 20) -> pd.DataFrame:
    """Features selective for a concept, contrasted across prompts.

    Each example is a prompt whose **last token** is the concept token (a word alone,
    ``"Dallas"``, or a sentence ending in it, ``"I grew up in Dallas"``), or a pair
    ``(prompt, text)`` whose concept tokens are those overlapping the last occurrence of
    ``text``. A feature's activation on an example is its max over the concept tokens.

    The score is the mean activation on ``examples`` minus the mean on ``against`` (located
    the same way); without ``against``, minus the feature's mean activation per token on
    held-out text when examples are cached (else nothing). Activations are divided by each
    feature's held-out max when cached, so features of different scales compare.

    Args:
        rm: the ``ReplacementModel``.
        examples: prompts or ``(prompt, text)`` pairs showing the concept.
        against: prompts or pairs without it (e.g. other cities), or ``None``.
        layer: a layer, a list of layers, or ``None`` for all.
        top: number of rows.

    Returns:
        DataFrame ``layer, feature, score, hits, mean_act, min_act, against_mean,
        against_hits`` (plus ``frequency, max_activation`` when cached), best first; only
        features active on at least one example. ``hits`` counts the examples a feature
        fires on: ``df[df.hits == len(examples)]`` keeps features shared by all of them.
    """
    layers = _layers(rm, layer)
    pos = _concept_acts(rm, examples, layers)
    scale = _scale(rm, layers)
    unit = torch.ones_like(pos[0]) if scale is None else scale
    if against is not None:
        neg = _concept_acts(rm, against, layers)
    elif scale is not None:
        neg = find_examples(rm)[0].mean_act()[layers][None]
    else:
        neg = torch.zeros_like(pos[:1])
    score = (pos / unit).mean(0) - (neg / unit).mean(0)
    return _ranked(rm, layers, score, top, (pos > 0).any(0), hits=(pos > 0).sum(0),
                   mean_act=pos.mean(0), min_act=pos.min(0).values, against_mean=neg.mean(0),
                   against_hits=(neg > 0).sum(0) if against is not None else torch.zeros_like(score))


# ----------------------------------------------------------------------------- graphs


def _influence(graph) -> torch.Tensor:
    """Each node's influence: ``graph.nodes["influence"]``, computed when missing."""
    from .prune import node_influence

    values = graph.nodes["influence"]
    if values.isna().any():
        return node_influence(graph).double()
    return torch.tensor(values.to_numpy())


def _feature_shares(graph) -> pd.DataFrame:
    """Per ``(layer, feature)`` of a graph: its share of the graph's feature influence
    (summed over positions) and its node ids."""
    nodes = graph.nodes.assign(influence=_influence(graph).numpy())
    feats = nodes[nodes["kind"] == "feature"]
    grouped = feats.groupby(["layer", "feature"]).agg(influence=("influence", "sum"),
                                                      nodes=("node_id", list))
    total = grouped["influence"].sum()
    grouped["share"] = grouped["influence"] / total if total > 0 else 0.0
    return grouped


@dataclass
class Comparison:
    """Features two graphs share, by ``(layer, feature)`` regardless of position.

    Attributes:
        shared: DataFrame ``layer, feature, share_a, share_b, nodes_a, nodes_b`` (shares of
            each graph's total feature influence), by ``min(share_a, share_b)``.
        only_a / only_b: DataFrames ``layer, feature, share, nodes`` of the others.
        overlap: influence-weighted overlap, ``sum over shared of min(share_a, share_b)``:
            1 for graphs with the same features in the same proportions, 0 for none shared.
        jaccard: unweighted ``|shared| / |union|``.
    """

    shared: pd.DataFrame
    only_a: pd.DataFrame
    only_b: pd.DataFrame
    overlap: float
    jaccard: float

    def __repr__(self) -> str:
        return (f"Comparison(overlap={self.overlap:.3f}, jaccard={self.jaccard:.3f}, "
                f"{len(self.shared)} shared, {len(self.only_a)} only in a, {len(self.only_b)} only in b)")


def compare(graph_a, graph_b) -> Comparison:
    """Shared and unique features of two graphs, and their influence-weighted overlap.

    Features are matched by ``(layer, feature)``, ignoring positions; each feature's weight
    is its share of its graph's total feature influence (``graph.nodes.influence``, computed
    if missing). Use it on graphs of the same transcoders, e.g. one prompt in two languages.
    """
    a, b = _feature_shares(graph_a), _feature_shares(graph_b)
    both = a.join(b, how="inner", lsuffix="_a", rsuffix="_b")
    both["weight"] = np.minimum(both["share_a"], both["share_b"])
    shared = both.sort_values("weight", ascending=False)[
        ["share_a", "share_b", "nodes_a", "nodes_b"]].reset_index()
    only = lambda x, y: x[~x.index.isin(y.index)].sort_values("share", ascending=False)[  # noqa: E731
        ["share", "nodes"]].reset_index()
    union = len(a.index.union(b.index))
    return Comparison(shared, only(a, b), only(b, a), float(both["weight"].sum()),
                      len(both) / union if union else 0.0)


def _effect_profiles(graph, rows: torch.Tensor) -> torch.Tensor:
    """Per node in ``rows``: its signed path effect on each logit target, then its direct
    share of every target's input; each part scaled to unit norm."""
    from .prune import influence

    adj = graph.adjacency.float()
    A = adj / adj.abs().sum(1, keepdim=True).clamp_min(1e-30)
    logits = graph.mask("logit").nonzero()[:, 0]
    paths = influence(A, torch.eye(len(A))[logits]).T[rows]
    direct = A[:, rows].T
    unit = lambda x: x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)  # noqa: E731
    return torch.cat([unit(paths), unit(direct)], 1) / 2 ** 0.5


def suggest_supernodes(graph, rm=None, *, top: int = 40, threshold: float = 0.5,
                       min_size: int = 2) -> dict[str, list[str]]:
    """Suggest supernodes: groups of a graph's most influential features with a shared role.

    Features are compared by their effect on targets (signed path effect on each logit and
    direct share of each node's input; cosine similarity) and, given ``rm``, by their
    decoder directions (cosine similarity, averaged with the first). Average-linkage
    clustering cuts at ``threshold``.

    Args:
        graph: the graph (pruned or not).
        rm: the ``ReplacementModel``, for decoder similarity and names from output tokens.
        top: how many of the most influential features to consider.
        threshold: the similarity a group's members need on average.
        min_size: the smallest group to suggest.

    Returns:
        ``{name: [node_id, ...]}`` as the explorer's ``view.supernodes``; names come from the
        group's top output tokens (with ``rm``) or its layers and token.
    """
    from scipy.cluster.hierarchy import fcluster, linkage

    feats = graph.mask("feature").nonzero()[:, 0]
    rows = feats[_influence(graph)[feats].argsort(descending=True)[:top]]
    if len(rows) < max(min_size, 2):
        return {}
    profiles = _effect_profiles(graph, rows)
    sim = profiles @ profiles.T
    nodes = graph.nodes.iloc[rows.numpy()]
    if rm is not None:
        dirs = _decoder_rows(rm, nodes)
        sim = (sim + dirs @ dirs.T) / 2
    dist = (1 - sim).clamp_min(0).double().numpy()
    labels = fcluster(linkage(dist[np.triu_indices(len(dist), 1)], "average"), 1 - threshold, "distance")
    groups = {}
    for label in np.unique(labels):
        members = nodes[labels == label]
        if len(members) >= min_size:
            name = _group_name(rm, graph, members, groups)
            groups[name] = members["node_id"].tolist()
    return groups


def _decoder_rows(rm, nodes: pd.DataFrame) -> torch.Tensor:
    """Unit decoder directions of the feature nodes."""
    rows = torch.stack([rm.transcoders[l].W_dec[f].detach().float()
                        for l, f in zip(nodes["layer"], nodes["feature"])])
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _group_name(rm, graph, members: pd.DataFrame, taken: dict) -> str:
    """A readable, unused name for a group of feature nodes."""
    if rm is not None:
        direction = _decoder_rows(rm, members).sum(0)
        effect = direction.to(rm.model.W_U.dtype) @ unembedding(rm)
        name = "/".join(rm.tokenizer.decode([i]).strip() or repr(rm.tokenizer.decode([i]))
                        for i in effect.topk(2).indices.tolist())
    else:
        token = graph.token_strs[int(members["pos"].mode()[0])]
        name = f"L{members['layer'].min()}-{members['layer'].max()} {token.strip() or repr(token)}"
    base, n = name, 2
    while name in taken:
        name, n = f"{base} ({n})", n + 1
    return name
