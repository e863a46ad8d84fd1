"""Training data: a corpus packed into rows of token ids, and the MLP activations of a
buffer of rows.

Documents are tokenized, packed into rows of ``context`` tokens that each start with BOS,
and run through the model once per batch for all layers (``mlp_io``); the activation
pairs (BOS positions dropped) go through a shuffled in-memory buffer and are never written
to disk.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch
from transformer_lens import HookedTransformer

from circuitlab.errors import CircuitlabError
from circuitlab.hooks import mlp_io
from circuitlab.presets import PACK_FILE, is_pack
from circuitlab.train.corpus import corpus_files, fingerprint, iter_documents
from circuitlab.train.pack import pack_documents, special_ids


def check_corpus(corpus) -> dict[str, list]:
    """Check that ``corpus`` (anything ``TokenRows`` reads) holds text before a run starts,
    and return the ``fingerprint`` of the files it reads (a pack: its ``pack.json`` and
    token shards).

    Raises:
        CircuitlabError: if ``corpus`` is missing, or holds no usable text or a damaged
            first ``.jsonl`` line (naming the file).
    """
    if is_pack(corpus):
        folder = Path(corpus)
        shards = json.loads((folder / PACK_FILE).read_text(encoding="utf-8"))["token_shards"]
        return fingerprint([folder / PACK_FILE, *(folder / name for name in shards)])
    documents = iter_documents(corpus)
    next(documents)  # raises if there is no text at all
    documents.close()
    return fingerprint(corpus_files(corpus))


class TokenRows:
    """Packs a corpus into rows of ``context`` token ids, each starting with BOS.

    Documents are tokenized without special tokens and joined with EOS (when the tokenizer
    has one); each row is BOS followed by the next ``context - 1`` tokens of that stream.
    A ``circuitlab pack`` folder gives its documents' token ids and special ids instead.
    The position in the stream (documents read, tokens pending) can be saved and restored.

    Args:
        tokenizer: a Hugging Face tokenizer with a BOS token (unused for a pack).
        corpus: anything ``iter_documents`` reads, or a pack folder.
        context: row length, BOS included.
        split: corpus split.
        docs_done: documents to skip (already consumed by an earlier run).
        pending: tokens read from the stream but not yet placed in a row.
    """

    def __init__(self, tokenizer, corpus, context: int, split: str = "train",
                 docs_done: int = 0, pending: list[int] | None = None):
        if is_pack(corpus):
            self.bos, eos = special_ids(corpus)
            docs = itertools.islice(pack_documents(corpus, split), docs_done, None)
        elif tokenizer is None or tokenizer.bos_token_id is None:
            raise CircuitlabError(
                "The model has no tokenizer with a BOS token; load it with its tokenizer "
                "(circuitlab.loading.load_model does)."
            )
        else:
            self.bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
            texts = itertools.islice(iter_documents(corpus, split), docs_done, None)
            docs = (tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts)
        self.context, self.eos, self._docs = context, [] if eos is None else [eos], docs
        self.docs_done, self.pending = docs_done, list(pending or [])

    def take(self, n_rows: int) -> torch.Tensor:
        """Up to ``n_rows`` rows ``[n, context]`` (fewer, or none, at the end of the corpus)."""
        width, rows = self.context - 1, []
        while len(rows) < n_rows:
            while len(self.pending) < width:
                ids = next(self._docs, None)
                if ids is None:
                    return self._stack(rows)
                self.pending += ids + self.eos
                self.docs_done += 1
            rows.append([self.bos] + self.pending[:width])
            self.pending = self.pending[width:]
        return self._stack(rows)

    def skip(self, n_rows: int) -> None:
        """Skip the next ``n_rows`` rows (e.g. those an earlier run read)."""
        while n_rows > 0 and len(self.take(min(n_rows, 1024))):
            n_rows -= 1024

    def _stack(self, rows: list[list[int]]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long).view(len(rows), self.context)


def activation_buffer(model: HookedTransformer, tokens: torch.Tensor, layers: list[int],
                      rows_per_forward: int, dtype: torch.dtype, device: str):
    """MLP inputs and outputs ``[L, N, d]`` of ``tokens [R, P]`` without the BOS positions."""
    R, P = tokens.shape
    x = torch.empty(len(layers), R * (P - 1), model.cfg.d_model, dtype=dtype, device=device)
    y = torch.empty_like(x)
    for start in range(0, R, rows_per_forward):
        batch = tokens[start:start + rows_per_forward].to(model.cfg.device)
        mlp_in, mlp_out = mlp_io(model, batch, layers)
        span = slice(start * (P - 1), (start + len(batch)) * (P - 1))
        x[:, span] = mlp_in[:, :, 1:].flatten(1, 2).to(device, dtype)
        y[:, span] = mlp_out[:, :, 1:].flatten(1, 2).to(device, dtype)
    return x, y
