"""Building the feature cards: ``build_examples`` (the ``circuitlab cards`` command).

Runs the model over the held-out split of a corpus built by ``circuitlab corpus`` and
writes, atomically, the examples file that ``circuitlab.cards`` reads at runtime: per
feature its top-activating contexts, contexts sampled from bands of its max activation,
an activation histogram and its max and summed activation, and its automatic label
(``circuitlab.labels``). ``relabel`` rebuilds only the labels of an existing file.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from circuitlab.cards import (FORMAT, N_BINS, N_TOP, Examples, bundle_name, cards_path, manifest_key,
                              read_examples, transcoder_key)
from circuitlab.errors import CircuitlabError
from circuitlab.files import atomic_file, cache_dir, sha256
from circuitlab.hooks import mlp_io
from circuitlab.labels import build_labels
from circuitlab.presets import BUNDLE_DIR
from circuitlab.train.corpus import iter_documents

#: Context window stored per example: tokens before the max, the max, tokens after.
LEFT, RIGHT = 11, 4
#: Contexts sampled per feature from each band of ``BANDS`` after its ``N_TOP`` top ones
#: (the default of ``build_examples``).
PER_BAND = 1
#: Size budget of a cards file stored beside a bundled transcoder set in ``data/``.
BUNDLED_MAX_BYTES = 12_000_000
BANDS = ((0.5, 0.75), (0.25, 0.5), (0.0, 0.25))
#: Roughly the bytes of one feature's automatic label in the file's JSON header.
LABEL_BYTES = 40


def held_out_sequences(tokenizer, corpus, n_tokens: int, context: int) -> list[torch.Tensor]:
    """Token sequences of held-out documents, in corpus order, up to ``n_tokens`` tokens.

    Each document is cut into pieces of ``context - 1`` tokens, each with BOS prepended;
    pieces never span documents.
    """
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
            mlp_in, _ = mlp_io(rm.model, tokens, read=rm.reads)
            for layer, files in enumerate(sinks):
                with torch.no_grad():
                    acts = rm.encode(layer, mlp_in[layer][valid].to(rm.encoder(layer)[0].dtype))
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
    per_feature = K * (4 + LEFT + 1 + RIGHT) + 4 * N_BINS + 8 + LABEL_BYTES
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
    meta = _metadata(rm, corpus, seqs, settings, command, time.perf_counter() - t0)
    _write(out, Examples(meta=meta, **tensors), rm)
    return out


def relabel(rm, path: str | os.PathLike | None = None) -> Path:
    """Rebuild the automatic labels of an existing cards file (no text is scanned again).

    Args:
        rm: the ``ReplacementModel`` whose transcoders the file was built for.
        path: the cards file (default ``cards_path(rm)``).

    Returns:
        The path written.
    """
    path = Path(path) if path is not None else cards_path(rm)
    if not path.exists():
        raise CircuitlabError(f"No cards file at {path}; build one with `circuitlab cards`.")
    examples = read_examples(path)
    if examples.meta["transcoder_sha256"] != transcoder_key(rm):
        raise CircuitlabError(f"{path} was built for other transcoders than {rm.transcoder_source}; "
                              "rebuild it with `circuitlab cards`.")
    _write(path, examples, rm)
    return path


def _write(out: Path, examples: Examples, rm) -> None:
    """Label ``examples`` and write them to ``out`` atomically."""
    labels, _ = build_labels(rm, examples)
    meta = {**examples.meta, "labels": labels}
    tensors = {k: getattr(examples, k).contiguous() for k in
               ("tokens", "starts", "centers", "acts", "max_act", "total", "hist")}
    with atomic_file(out) as tmp:
        save_file(tensors, tmp, metadata={"circuitlab": json.dumps(meta, ensure_ascii=False)})


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
    bundle = bundle_name(rm)
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
        "vocab": {str(t): rm.token_str(t) for t in torch.unique(flat).tolist()},
    }

