"""Compact training inputs for a machine with no registries and no hub.

A GPU host often has torch and transformers but no PyPI, no Hugging Face hub and room for
only tens of MB per transfer. ``pack_inputs`` writes what ``circuitlab train`` needs there
to train transcoders for the embedded model:

* the GGUF's non-embedding tensors, byte for byte (still quantized, 68 MB);
* the embedding rows of the packed tokens' vocabulary, nothing else of the 178 MB table;
* the corpus's first training documents as token ids, so no tokenizer is needed;
* the transformers and TransformerLens configs,

in shards of at most ``shard_mb`` MiB, with a sha256 manifest. ``circuitlab.load_model(PACK)``
(``loading.load_pack``) rebuilds the model there, and ``circuitlab train --model PACK``
trains on the packed tokens. Packing checks that the rebuilt model equals the cached one
bit for bit, except for the embedding rows (and tied unembedding columns) of tokens that
are not in the pack: MLP activations on the packed tokens are exact, logits are not, so a
pack serves ``train`` but not ``finetune`` or ``eval-transcoders``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import load_file, save_file
from tqdm.auto import tqdm
from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

from ..errors import CircuitlabError
from ..files import atomic_dir, atomic_write_text, sha256
from ..loading import embedded_cache, embedded_gguf, embedded_hf_model, load_model, load_pack
from ..presets import EMBEDDED_MODEL, MODEL_PRESETS, PACK_FILE
from .corpus import iter_documents

EMBEDDING = "token_embd.weight"


def pack_documents(folder, split: str = "train") -> Iterator[list[int]]:
    """Yield the token ids of each packed document (without EOS), in corpus order."""
    meta = json.loads((Path(folder) / PACK_FILE).read_text())
    if split != "train":
        raise CircuitlabError(f"The pack {folder} holds training documents only; evaluate on "
                              "the corpus itself (eval-transcoders --corpus DIR).")
    for shard in meta["token_shards"]:
        arrays = load_file(Path(folder) / shard)
        ids, offsets = arrays["ids"].tolist(), arrays["offsets"].tolist()
        for start, end in zip(offsets[:-1], offsets[1:]):
            yield ids[start:end]


def special_ids(folder) -> tuple[int, int | None]:
    """``(bos, eos)`` token ids of a pack."""
    meta = json.loads((Path(folder) / PACK_FILE).read_text())
    return meta["bos"], meta["eos"]


def _gguf_pieces(gguf_path: Path, hf_model, vocab: np.ndarray, shard_bytes: int):
    """``(pieces, tensors)``: the raw GGUF arrays to store under their keys, and for each
    GGUF tensor its transformers name, type, shape and the constant transformers adds."""
    names = get_gguf_hf_weights_map(hf_model, TensorProcessor())
    hf_state = hf_model.state_dict()
    pieces, tensors = {}, {}
    for t in GGUFReader(gguf_path).tensors:
        shape = [int(n) for n in reversed(t.shape)]
        raw = np.ascontiguousarray(t.data).view(np.uint8).reshape(int(np.prod(shape[:-1])), -1)
        hf_name = names.get(t.name)
        if hf_name not in hf_state:
            raise CircuitlabError(f"The GGUF tensor {t.name} has no counterpart in the model; "
                                  "this transformers version maps GGUF names otherwise.")
        # transformers loads Gemma norms as the GGUF value minus 1: find that constant.
        offset = hf_state[hf_name].numpy() - dequantize(raw, t.tensor_type).reshape(shape)
        add = float(offset.flat[0])
        if not np.all(offset == np.float32(add)):
            raise CircuitlabError(f"transformers does more to the GGUF tensor {t.name} than "
                                  "add a constant; the pack cannot reproduce it.")
        info = {"hf": hf_name, "type": int(t.tensor_type), "shape": shape, "add": add}
        if t.name == EMBEDDING:
            rows = raw[vocab]
            per_piece = max(1, shard_bytes // rows.shape[1])
            info.update(rows=len(vocab), pieces=-(-len(vocab) // per_piece))
            for i in range(info["pieces"]):
                part = slice(i * per_piece, (i + 1) * per_piece)
                pieces[f"{t.name}@{i}"] = rows[part]
                pieces[f"{t.name}@{i}.rows"] = vocab[part]
        else:
            pieces[t.name] = raw
        tensors[t.name] = info
    return pieces, tensors


def _shards(pieces: dict[str, np.ndarray], shard_bytes: int) -> list[dict[str, np.ndarray]]:
    """Group ``pieces`` in order into dicts of at most ``shard_bytes`` bytes each."""
    shards, current, size = [], {}, 0
    for key, array in pieces.items():
        if current and size + array.nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key], size = array, size + array.nbytes
    return shards + [current] if current else shards


def _token_shards(docs: list[list[int]], shard_bytes: int) -> list[dict[str, np.ndarray]]:
    """Documents as ``{"ids": int32, "offsets": int64}`` shards of at most ``shard_bytes``
    (a document longer than a shard gets one of its own)."""
    shards, start = [], 0
    while start < len(docs):
        end, size = start, 0
        while end < len(docs) and (end == start or size + 4 * len(docs[end]) <= shard_bytes):
            size += 4 * len(docs[end])
            end += 1
        lengths = [len(d) for d in docs[start:end]]
        shards.append({"ids": np.fromiter((i for d in docs[start:end] for i in d), np.int32,
                                          count=sum(lengths)),
                       "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)})
        start = end
    return shards


def pack_inputs(out_dir, corpus, *, tokens: int = 2_000_000, shard_mb: float = 48.0,
                verify: bool = True, progress: bool = True, command: str | None = None) -> Path:
    """Write a pack of the embedded model and the first ``tokens`` tokens of ``corpus``.

    Args:
        out_dir: the pack folder (replaced whole when the pack is complete).
        corpus: text for ``iter_documents``; its training documents are packed in order.
        tokens: stream tokens to pack (documents plus their EOS), rounded up to a whole
            document. ``circuitlab train`` reads ``context - 1`` of them per row.
        shard_mb: largest file of the pack in MiB (the embedding is split by rows to fit;
            a tensor larger than that, at most 1.1 MB here, gets a file of its own).
        verify: rebuild the model from the pack and compare it with the cached model.
        progress: show the steps.
        command: the command to record (default: a description of this call).

    Returns:
        ``out_dir``.

    Raises:
        CircuitlabError: for a bad budget, a corpus without usable text, a pack that does not
            reproduce the model, or a full disk.
    """
    if tokens < 1 or shard_mb <= 0:
        raise CircuitlabError(f"tokens must be >= 1 and shard_mb > 0 (got {tokens}, {shard_mb}): "
                              "pass a positive token budget and shard size.")
    out_dir, shard_bytes = Path(out_dir).expanduser(), int(shard_mb * 2**20)
    steps = tqdm(total=4, desc="Packing", disable=not progress)
    steps.set_postfix_str("tokenizing")
    hf_model, tokenizer = embedded_hf_model()
    docs, n = [], 0
    for text in iter_documents(corpus):
        docs.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        n += len(docs[-1]) + 1
        if n >= tokens:
            break
    special = [i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id) if i is not None]
    vocab = np.union1d(np.fromiter((i for d in docs for i in d), np.int64, count=n - len(docs)),
                       np.array(special, dtype=np.int64))
    steps.update()
    steps.set_postfix_str("slicing the GGUF")
    pieces, tensors = _gguf_pieces(embedded_gguf(), hf_model, vocab, shard_bytes)
    hf_config = {k: v for k, v in hf_model.config.to_dict().items() if k != "quantization_config"}
    del hf_model
    steps.update()
    steps.set_postfix_str("writing")
    corpus_path = Path(corpus).expanduser().resolve()
    if not (embedded_cache() / "tl_config.json").exists():
        load_model(EMBEDDED_MODEL)  # builds the cache, whose TransformerLens config we copy
    meta = {
        "model": MODEL_PRESETS[EMBEDDED_MODEL],
        "command": command or (f"pack_inputs({str(out_dir)!r}, {str(corpus_path)!r}, "
                               f"tokens={tokens}, shard_mb={shard_mb})"),
        "corpus": {"path": str(corpus_path), "manifest_sha256": sha256(corpus_path / "manifest.json")
                   if (corpus_path / "manifest.json").is_file() else None},
        "tokens": n, "documents": len(docs), "vocab": len(vocab),
        "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
        "hf_config": hf_config,
        "tl_config": json.loads((embedded_cache() / "tl_config.json").read_text()),
        "tensors": tensors,
    }
    with atomic_dir(out_dir, "an earlier pack there is intact.") as tmp:
        files = {}
        for key, prefix, shards in (
                ("weight_shards", "weights", _shards(pieces, shard_bytes)),
                ("token_shards", "tokens", _token_shards(docs, shard_bytes))):
            meta[key] = names = [f"{prefix}-{i:02d}.safetensors" for i in range(len(shards))]
            for name, shard in zip(names, shards):
                save_file(shard, tmp / name)
                files[name] = sha256(tmp / name)
        atomic_write_text(tmp / PACK_FILE, json.dumps(meta, indent=1))
        files[PACK_FILE] = sha256(tmp / PACK_FILE)
        atomic_write_text(tmp / "manifest.json", json.dumps({"sha256": files}, indent=1))
        steps.update()
        if verify:
            steps.set_postfix_str("checking the rebuilt model")
            _check_pack(tmp, vocab)
    steps.update()
    steps.close()
    return out_dir


def _check_pack(folder: Path, vocab: np.ndarray) -> None:
    """Raise unless the model rebuilt from the pack equals the cached embedded model in every
    weight, the embedding rows (and unembedding columns) of tokens outside ``vocab`` aside."""
    vocab = torch.as_tensor(vocab)
    packed, cached = load_pack(folder).state_dict(), load_model(EMBEDDED_MODEL).state_dict()
    wrong = []
    for name, value in cached.items():
        got = packed.get(name)
        if got is not None and name == "embed.W_E":
            value, got = value[vocab], got[vocab]
        elif got is not None and name == "unembed.W_U":
            value, got = value[:, vocab], got[:, vocab]
        if got is None or got.shape != value.shape or not torch.equal(got, value):
            wrong.append(name)
    if wrong:
        raise CircuitlabError(f"The model rebuilt from the pack differs from the cached one in "
                              f"{', '.join(wrong[:5])}{' …' if len(wrong) > 5 else ''}; this "
                              "transformers or TransformerLens version converts otherwise.")
