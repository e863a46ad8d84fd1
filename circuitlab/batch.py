"""Trace many prompts: one attribution graph per prompt, on Ray workers or in this process.

``trace_many`` gives each worker one loaded model and hands it prompts one at a time: the
driver passes the next prompt in the queue to whichever worker is free (pull-based), so a
long prompt never holds up the rest. The driver writes every file, so ``out`` need not be
shared by the machines of a cluster::

    out/<id>/pruned/       the pruned graph   (save="pruned" or "both")
    out/<id>/graph/        the full graph     (save="full" or "both")
    out/summary.parquet    one row per prompt (``COLUMNS``), rewritten atomically after
                           every prompt that ends

While a batch runs it holds an exclusive lock on ``out`` (``out/.trace-batch.lock``, which
names the holder's ``host:pid``): a second batch into the same ``out`` is refused rather
than overwriting the summary rows of the first. The system releases the lock when the
process ends, however it ends.

A re-run with the same ``out`` skips every prompt whose id has status ``ok`` in the summary
and whose graph folders exist, so an interrupted batch resumes where it stopped (the
attribution settings are not compared: use a new ``out`` for new settings). A prompt that
raises is retried ``retries`` times, unless the error is a ``CircuitlabError`` (a bad
prompt or logit target fails the same way every time); then it is recorded with its error
and the batch goes on. A Ray worker that dies is replaced and its prompt queued again (a
death counts as an attempt, so a prompt that kills every worker ends up recorded too).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from collections import deque
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from . import checks
from .attribution import attribute
from .errors import CircuitlabError
from .files import atomic_file
from .ray_engine import run_ray
from .tracing import SAVES, Outcome, Tracer, worker_name

__all__ = ["BatchResult", "COLUMNS", "read_prompts", "trace_many"]

ENGINES = ("ray", "local")
SUMMARY = "summary.parquet"
#: The lock file a running batch holds in its ``out`` (see ``locked``).
LOCK = ".trace-batch.lock"
#: The summary's columns. Counts and scores come in two versions: of the full graph and,
#: with the suffix ``_pruned``, of the pruned graph. ``top_features`` names the most
#: influential features of the full graph (user label, else automatic label, else
#: ``L{layer}/F{feature}``), ``top_nodes`` gives their node ids. ``worker`` is
#: ``host:pid``; ``finished`` an ISO time (UTC); ``seconds`` the worker's time on the prompt.
COLUMNS = ["id", "prompt", "status", "error", "attempts", "targets", "probs",
           "nodes", "edges", "features", "replacement", "completeness",
           "nodes_pruned", "edges_pruned", "features_pruned", "replacement_pruned",
           "completeness_pruned", "top_features", "top_nodes", "seconds", "worker", "finished"]
COUNTS = ["attempts", "nodes", "edges", "features", "nodes_pruned", "edges_pruned",
          "features_pruned"]
LISTS = ["targets", "probs", "top_features", "top_nodes"]


# ----------------------------------------------------------------------------- prompts


def slug(prompt: str, limit: int = 48) -> str:
    """A folder name for ``prompt``: its words, lower case, joined by dashes."""
    words = re.findall(r"\w+", prompt.lower())
    return "-".join(words)[:limit].strip("-") or "prompt"


def prompt_id(prompt: str) -> str:
    """The default id of a prompt: its words and a hash of its exact text, so that prompts
    differing only in spaces or quotes get different ids."""
    return f"{slug(prompt, 40)}-{hashlib.sha256(prompt.encode('utf-8')).hexdigest()[:8]}"


def _check_id(value) -> str:
    """``value`` as a prompt id that is safe as one folder name."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise CircuitlabError(f"Prompt id {value!r} must be text or an integer.")
    text = str(value)
    if (not text or text.startswith(".") or any(c in text for c in "/\\\0")
            or text != text.strip() or text == SUMMARY):
        raise CircuitlabError(
            f"Prompt id {text!r} cannot name a folder of the batch: use letters, digits, dashes "
            f"or underscores (no slashes, no leading dot, no surrounding spaces, not {SUMMARY}).")
    return text


def prompt_items(prompts) -> list[dict]:
    """``prompts`` (strings or dicts ``{"prompt", "id", "logit_targets"}``) as checked dicts
    with all three keys.

    Raises:
        CircuitlabError: for an empty list, a malformed entry or a duplicate id.
    """
    if isinstance(prompts, (str, dict)) or not hasattr(prompts, "__iter__"):
        raise CircuitlabError("prompts must be a list of strings or of dicts with a 'prompt'.")
    items = []
    for entry in prompts:
        if isinstance(entry, str):
            entry = {"prompt": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
            raise CircuitlabError(f"Each prompt must be a string or a dict with a 'prompt' string; "
                                  f"got {entry!r}.")
        unknown = set(entry) - {"id", "prompt", "logit_targets"}
        if unknown:
            raise CircuitlabError(f"Unknown keys {sorted(unknown)} in prompt {entry!r}; a prompt "
                                  "dict takes 'prompt', 'id' and 'logit_targets'.")
        text = checks.text("prompt", entry["prompt"])
        pid = _check_id(entry["id"]) if entry.get("id") is not None else prompt_id(text)
        items.append({"id": pid, "prompt": text, "logit_targets": entry.get("logit_targets")})
    if not items:
        raise CircuitlabError("prompts is empty; pass at least one prompt.")
    ids = pd.Series([item["id"] for item in items])
    if ids.duplicated().any():
        raise CircuitlabError(f"Duplicate prompt ids {sorted(set(ids[ids.duplicated()]))}; "
                              "give every prompt its own id (or drop the repeated prompts).")
    return items


def read_prompts(path: str | os.PathLike) -> list[dict]:
    """Prompts from a file: ``.txt`` holds one prompt per line (blank lines are skipped;
    only the line break is removed, so trailing spaces and quotes stay); ``.jsonl`` one
    JSON object per line with ``prompt`` and optional ``id`` and ``logit_targets``.

    Raises:
        CircuitlabError: for a missing file, another extension or a bad line.
    """
    path = Path(path)
    if path.suffix not in (".txt", ".jsonl"):
        raise CircuitlabError(f"{path}: pass a .txt file (one prompt per line) or a .jsonl file "
                              "(one {\"prompt\": ...} object per line).")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CircuitlabError(f"Cannot read the prompts in {path} ({err}).") from None
    lines = [(n, line.removesuffix("\r")) for n, line in enumerate(text.split("\n"), 1)]
    lines = [(n, line) for n, line in lines if line.strip()]
    if path.suffix == ".txt":
        return [{"prompt": line} for _, line in lines]
    entries = []
    for n, line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise CircuitlabError(f"{path}:{n} is not valid JSON ({err}).") from None
        if not isinstance(entry, dict) or "prompt" not in entry:
            raise CircuitlabError(f'{path}:{n} must be an object with a "prompt" key.')
        entries.append(entry)
    return entries


# ----------------------------------------------------------------------------- the driver


@dataclass
class BatchResult:
    """What ``trace_many`` returns when ``out`` is ``None``: the summary and the graphs.

    Attributes:
        summary: the summary DataFrame (``COLUMNS``), one row per prompt.
        pruned: prompt id -> pruned graph (with ``save="pruned"`` or ``"both"``).
        full: prompt id -> full graph (with ``save="full"`` or ``"both"``).
    """

    summary: pd.DataFrame
    pruned: dict = field(default_factory=dict)
    full: dict = field(default_factory=dict)


class Book:
    """The driver's record of a batch: the summary rows, the queue with its retries, the
    graphs (written under ``out``, or kept in memory) and the progress bar."""

    def __init__(self, items: list[dict], out: Path | None, save: str, retries: int,
                 progress: bool):
        self.out, self.save, self.retries = out, save, retries
        self.rows = read_summary(out) if out is not None else {}
        for item in items:
            old = self.rows.get(item["id"])
            if old is not None and old["status"] == "ok" and old["prompt"] != item["prompt"]:
                raise CircuitlabError(
                    f"Prompt id {item['id']!r} was traced in {out} for another prompt "
                    f"({old['prompt']!r}); give this prompt another id or use another out.")
        self.todo = deque(item for item in items if not self.done(item))
        self.attempts: dict[str, int] = {}
        self.result = BatchResult(summary_frame([]))
        self.failed = 0
        self.bar = tqdm(total=len(self.todo), desc="Tracing", unit="prompt", disable=not progress)

    def done(self, item: dict) -> bool:
        """Whether ``item`` is already traced in ``out``."""
        row = self.rows.get(item["id"])
        return (row is not None and row["status"] == "ok" and all(
            (self.out / item["id"] / name / "graph.json").is_file() for name in SAVES[self.save]))

    def started(self) -> None:
        """The workers are ready: start the progress bar's clock (its rate and time left
        leave out the start-up)."""
        self.bar.reset(total=len(self.todo))

    def record(self, item: dict, outcome: Outcome) -> None:
        """Note one attempt at ``item``: queue it again, or save it and its summary row."""
        pid = item["id"]
        self.attempts[pid] = self.attempts.get(pid, 0) + 1
        if outcome.row["status"] != "ok" and outcome.retry and self.attempts[pid] <= self.retries:
            self.todo.append(item)
            return
        for name, graph in outcome.graphs.items():
            if self.out is not None:
                graph.save(self.out / pid / name)
            else:
                (self.result.full if name == "graph" else self.result.pruned)[pid] = graph
        self.rows[pid] = {"id": pid, "prompt": item["prompt"], "attempts": self.attempts[pid],
                          **outcome.row,
                          "finished": datetime.now(timezone.utc).isoformat(timespec="microseconds")}
        if self.out is not None:
            write_summary(self.out, self.rows)
        self.failed += outcome.row["status"] != "ok"
        self.bar.set_postfix(failed=self.failed, refresh=False)
        self.bar.update(1)

    def summary(self, items: list[dict]) -> pd.DataFrame:
        """The summary rows of ``items``, in their order."""
        return summary_frame([self.rows[item["id"]] for item in items])


def read_summary(out: Path) -> dict[str, dict]:
    """The rows of ``out/summary.parquet`` by id (``{}`` when there is none)."""
    path = out / SUMMARY
    if not path.exists():
        return {}
    try:
        frame = pd.read_parquet(path)
    except Exception as err:  # noqa: BLE001 (pyarrow raises many kinds)
        raise CircuitlabError(f"{path} cannot be read ({err}); move it away to trace the "
                              "batch afresh.") from None
    if not {"id", "prompt", "status"} <= set(frame.columns):
        raise CircuitlabError(f"{path} is not a circuitlab batch summary; use another out.")
    rows = frame.to_dict("records")
    return {r["id"]: {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in r.items()}
            for r in rows}


def summary_frame(rows: list[dict]) -> pd.DataFrame:
    """``rows`` as a summary DataFrame: ``COLUMNS``, counts as integers, ``None`` for the
    lists and counts of a failed prompt (as the file reads back)."""
    frame = pd.DataFrame(rows, columns=COLUMNS).astype({c: "Int64" for c in COUNTS})
    for column in LISTS:
        frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
    return frame


def write_summary(out: Path, rows: dict[str, dict]) -> None:
    """Write ``rows`` to ``out/summary.parquet`` atomically."""
    with atomic_file(out / SUMMARY) as tmp:
        summary_frame(list(rows.values())).to_parquet(tmp, index=False)


@contextmanager
def locked(out: Path):
    """Hold an exclusive lock on the folder ``out`` (created if need be) while the block
    runs; the lock file records this process's ``host:pid``. The lock is released when the
    block ends or the process dies.

    Raises:
        CircuitlabError: when another process holds the lock (named by its ``host:pid``),
            or ``out`` cannot be written.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise CircuitlabError(f"Cannot write into out={str(out)!r} ({err}); pass a folder you "
                              "can write to.") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode("utf-8", "replace").strip() or "unknown"
            raise CircuitlabError(
                f"Another trace-batch is writing into {out} (process {holder}, which holds "
                f"{out / LOCK}); wait for it to finish, or pass another out (--out).") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, worker_name().encode("utf-8"), 0)
        yield
    finally:
        os.close(fd)


def run_local(book: Book, tracer_args: dict) -> None:
    """Trace ``book``'s queue in this process with one loaded model."""
    tracer = Tracer(**tracer_args)
    book.started()
    while book.todo:
        item = book.todo.popleft()
        book.record(item, tracer.trace(item))


def trace_many(prompts, model="gemma-3-270m", transcoders=None, *, out=None, engine: str = "ray",
               address: str | None = None, workers: int | None = None,
               gpus_per_worker: float = 0, save: str = "pruned", node_threshold: float = 0.8,
               edge_threshold: float = 0.98, device: str | None = None, progress: bool = True,
               retries: int = 1, attribute_fn=None, **attribute_options):
    """Trace many prompts: one attribution graph per prompt, with a summary table.

    Args:
        prompts: strings, or dicts ``{"prompt": ..., "id": ..., "logit_targets": [...]}``
            (``id`` and ``logit_targets`` optional). Ids name the output folders; by
            default the prompt's words and a hash of its text.
        model: a model name (each worker calls ``circuitlab.load(model, transcoders)``
            once) or a loaded ``ReplacementModel`` (used as it is; Ray workers get a copy).
        transcoders: as for ``circuitlab.load``.
        out: the output folder (see the module docstring); a re-run resumes there, and
            only one batch at a time writes into it. With ``None`` (local engine only)
            nothing is written and the graphs stay in memory.
        engine: ``"ray"`` (workers in Ray actors) or ``"local"`` (in this process).
        address: a Ray cluster to join (``HOST:PORT``, as printed by ``ray start --head``);
            ``None`` starts Ray on this machine and stops it at the end. A Ray runtime
            already initialized in this process is used as it is.
        workers: Ray workers (default: one per ``gpus_per_worker`` GPUs, else one per 4
            CPUs of the cluster; never more than the prompts to trace). Each gets its share
            of the cluster's CPUs and as many torch threads.
        gpus_per_worker: GPUs per Ray worker; above 0, ``device`` defaults to ``"cuda"``.
        save: which graphs to keep: ``"pruned"``, ``"full"`` or ``"both"``.
        node_threshold, edge_threshold: the pruning's (see ``Graph.prune``).
        device: torch device of each worker's model (default ``"cpu"``, or ``"cuda"`` with
            GPUs).
        progress: show a progress bar (prompts/s and time left).
        retries: attempts after the first for a prompt that raises an error other than a
            ``CircuitlabError``, or whose worker dies.
        attribute_fn: what traces one prompt, called as ``attribute_fn(rm, prompt,
            progress=False, **attribute_options)``; default ``circuitlab.attribute``. With
            Ray it must be picklable (a function of an importable module, or a closure).
        **attribute_options: passed to ``attribute`` (e.g. ``max_feature_nodes``, ``dtype``);
            a prompt's own ``logit_targets`` take precedence.

    Returns:
        The summary DataFrame (``circuitlab.batch.COLUMNS``), one row per prompt in the
        order given, prompts traced before included; with ``out=None`` a ``BatchResult``
        holding the summary and the graphs.

    Raises:
        CircuitlabError: for bad arguments, an ``out`` that is a file or that another batch
            is writing into, a missing Ray, an address that does not answer as a Ray
            cluster, or workers that cannot load the model.
    """
    items = prompt_items(prompts)
    checks.one_of("save", save, SAVES)
    checks.one_of("engine", engine, ENGINES)
    retries = checks.integer("retries", retries, 0)
    checks.integer("workers", workers, 1, none=True)
    checks.number("gpus_per_worker", gpus_per_worker, 0)
    thresholds = (checks.number("node_threshold", node_threshold, 0, 1, low_open=True),
                  checks.number("edge_threshold", edge_threshold, 0, 1, low_open=True))
    if engine == "local" and (address is not None or workers is not None or gpus_per_worker):
        raise CircuitlabError("address, workers and gpus_per_worker apply to engine='ray'; "
                              "leave them out with engine='local'.")
    if out is None and engine == "ray":
        raise CircuitlabError("engine='ray' writes its graphs to a folder: pass out=..., or use "
                              "engine='local' to keep the graphs in memory.")
    if out is not None:
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise CircuitlabError(f"out={str(out)!r} is a file; pass a folder (a new one, or the "
                                  "folder of an earlier batch to resume it).")
    tracer_args = dict(model=model, transcoders=transcoders,
                       device=device or ("cuda" if gpus_per_worker > 0 else None),
                       options=attribute_options, save=save, thresholds=thresholds,
                       attribute_fn=attribute_fn or attribute)
    with locked(out) if out is not None else nullcontext():
        book = Book(items, out, save, retries, progress)
        try:
            if book.todo and engine == "local":
                run_local(book, tracer_args)
            elif book.todo:
                run_ray(book, tracer_args, address, workers, gpus_per_worker)
        finally:
            book.bar.close()
    if out is not None:
        return book.summary(items)
    book.result.summary = book.summary(items)
    return book.result
