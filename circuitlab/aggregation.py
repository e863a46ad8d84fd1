"""What recurs across the graphs of many prompts: features, supernodes, and how alike the
graphs are.

A feature is ``(layer, feature)`` regardless of position, as in ``circuitlab.compare``; its
influence in one graph is the sum of its nodes' influence there (each graph's influence
sums to at most 1 over all nodes, so graphs compare). Supernodes match by name.

Feature indices mean something only within one set of transcoders, so ``aggregate`` refuses
graphs of different models or transcoders (``graph.metadata["model"]`` and
``["transcoders"]``) unless asked to aggregate each set on its own (``separate=True``).
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from . import checks
from .batch import BatchResult, prompt_id, read_summary
from .cards import find_examples
from .comparison import compare, influence_of
from .errors import CircuitlabError
from .graph import Graph
from .presets import DEFAULT_BUNDLE

__all__ = ["Aggregate", "aggregate"]

FEATURE_COLUMNS = ["layer", "feature", "count", "share", "mean_influence", "max_influence",
                   "mean_activation", "label"]
SUPERNODE_COLUMNS = ["supernode", "count", "share", "mean_influence", "prompts"]


@dataclass
class Aggregate:
    """Features and supernodes across the graphs of many prompts.

    Attributes:
        features: one row per feature ``(layer, feature)`` found in any graph: ``count``
            (graphs it is in), ``share`` (of the graphs), ``mean_influence`` and
            ``max_influence`` over the graphs it is in, ``mean_activation`` (its largest
            activation in a graph, averaged over those graphs), ``label``; by count, then
            mean influence.
        matrix: prompt id x ``(layer, feature)`` influence (0 where absent), for the first
            ``top`` features of ``features`` that are in two or more graphs (all of them
            with ``top=None``; with a single graph, its first ``top`` features).
        supernodes: one row per supernode name found in any graph (``graph.supernodes``):
            ``count``, ``share``, ``mean_influence`` (its members' summed influence,
            averaged over the graphs it is in), ``prompts`` (ids); empty when none.
        similarity: prompt id x prompt id, ``circuitlab.compare(a, b).overlap``.
        missing: prompt id -> why its graph could not be read, for each prompt of a
            ``trace_many`` folder (traced ``ok`` by its summary) whose graph folder is gone
            or damaged; these prompts are left out of everything above. Empty for graphs
            passed in memory.
    """

    features: pd.DataFrame
    matrix: pd.DataFrame
    supernodes: pd.DataFrame
    similarity: pd.DataFrame
    missing: dict[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        recurring = int((self.features["count"] >= 2).sum())
        missing = f", {len(self.missing)} missing" if self.missing else ""
        return (f"Aggregate({len(self.similarity)} prompts, {len(self.features)} features, "
                f"{recurring} in two or more, {len(self.supernodes)} supernodes{missing})")

    def figure(self, what: str = "matrix"):
        """A Plotly heatmap of ``matrix`` (``what="matrix"``) or ``similarity``."""
        from .viz.aggregate import heatmap

        return heatmap(self, what)

    def show(self, what: str = "matrix") -> None:
        """Show ``figure(what)``."""
        self.figure(what).show()


def aggregate(graphs_or_dir, *, labels: bool = True, top: int | None = 40,
              separate: bool = False) -> Aggregate | dict[tuple, Aggregate]:
    """Aggregate graphs across prompts.

    A prompt of a ``trace_many`` folder (traced ``ok`` by its summary) whose graph folder
    is gone or cannot be read is left out with a warning that lists it, and named in
    ``Aggregate.missing`` (a re-run of the batch with the same ``out`` traces again the
    prompts whose graph folder is gone).

    Args:
        graphs_or_dir: a dict ``{prompt id: Graph}``, a list of graphs (ids made from their
            prompts), a ``BatchResult``, or a ``trace_many`` output folder (each traced
            prompt's ``<id>/pruned``, else ``<id>/graph``).
        labels: name features by the graphs' user labels, else their automatic labels
            (for the bundled transcoders), else ``L{layer}/F{feature}``; ``False`` names
            them all ``L{layer}/F{feature}``.
        top: most features in ``matrix`` (``None``: every recurring feature).
        separate: aggregate the graphs of each model and transcoder set on its own, and
            return ``{(model, transcoders): Aggregate}``; by default graphs of different
            models or transcoders are refused (their feature indices name unrelated
            features).

    Returns:
        An ``Aggregate``; with ``separate=True`` a dict of them, keyed by the graphs'
        ``(metadata["model"], metadata["transcoders"])``.

    Raises:
        CircuitlabError: for an input holding no graphs, or, without ``separate=True``,
            graphs of different models or transcoders.
    """
    checks.integer("top", top, 1, none=True)
    graphs, missing = _graphs(graphs_or_dir)
    groups = _groups(graphs)
    if separate:
        return {key: _aggregate(group, labels, top, missing) for key, group in groups.items()}
    if len(groups) > 1:
        sets = "; ".join(f"model {model!r} with transcoders {source!r} ({_some(group)})"
                         for (model, source), group in groups.items())
        raise CircuitlabError(
            f"The graphs come from different models or transcoders: {sets}. Feature indices "
            "of different transcoders name unrelated features; aggregate each set on its own, "
            "or pass separate=True for one Aggregate per model and transcoders.")
    return _aggregate(graphs, labels, top, missing)


def _aggregate(graphs: dict[str, Graph], labels: bool, top: int | None,
               missing: dict[str, str]) -> Aggregate:
    """The ``Aggregate`` of ``graphs`` (see ``aggregate``)."""
    long = pd.concat({pid: _features(g) for pid, g in graphs.items()}, names=["prompt"])
    features = long.groupby(["layer", "feature"]).agg(
        count=("influence", "size"), mean_influence=("influence", "mean"),
        max_influence=("influence", "max"), mean_activation=("activation", "mean"))
    features["share"] = features["count"] / len(graphs)
    features = features.sort_values(["count", "mean_influence"], ascending=False).reset_index()
    features["label"] = _labels(graphs, features, labels)
    features = features[FEATURE_COLUMNS]
    keep = features[features["count"] >= min(2, len(graphs))]
    keep = keep if top is None else keep.head(top)
    columns = pd.MultiIndex.from_frame(keep[["layer", "feature"]])
    matrix = (long["influence"].unstack(["layer", "feature"]).reindex(index=list(graphs),
                                                                      columns=columns).fillna(0.0))
    matrix.index.name = "prompt"
    return Aggregate(features, matrix, _supernodes(graphs), _similarity(graphs), missing)


def _groups(graphs: dict[str, Graph]) -> dict[tuple, dict[str, Graph]]:
    """``graphs`` by ``(model, transcoders)`` of their metadata, in order of appearance."""
    groups: dict[tuple, dict[str, Graph]] = {}
    for pid, graph in graphs.items():
        key = (graph.metadata.get("model"), graph.metadata.get("transcoders"))
        groups.setdefault(key, {})[pid] = graph
    return groups


def _some(ids, shown: int = 3) -> str:
    """The first ``shown`` of ``ids``, and how many more there are."""
    ids = list(ids)
    more = f" and {len(ids) - shown} more" if len(ids) > shown else ""
    return ", ".join(ids[:shown]) + more


def _graphs(source) -> tuple[dict[str, Graph], dict[str, str]]:
    """``source`` as ``{prompt id: Graph}``, and ``{prompt id: why}`` for the prompts of a
    folder whose graph could not be read (see ``aggregate``)."""
    missing = {}
    if isinstance(source, BatchResult):
        source = source.pruned or source.full
    elif isinstance(source, (str, os.PathLike)):
        source, missing = _load(Path(source))
    elif isinstance(source, (list, tuple)):
        ids = Counter()
        named = {}
        for graph in source:
            pid = prompt_id(getattr(graph, "prompt", ""))
            ids[pid] += 1
            named[pid if ids[pid] == 1 else f"{pid}-{ids[pid]}"] = graph
        source = named
    if not isinstance(source, dict) or not all(isinstance(g, Graph) for g in source.values()):
        raise CircuitlabError("aggregate takes a dict {id: Graph}, a list of graphs, a "
                              "BatchResult or a trace_many output folder.")
    if not source:
        raise CircuitlabError("There are no graphs to aggregate; trace some prompts first "
                              "(circuitlab.trace_many).")
    return {str(k): g for k, g in source.items()}, missing


def _load(folder: Path) -> tuple[dict[str, Graph], dict[str, str]]:
    """The graphs of a ``trace_many`` output folder: its prompts traced ``ok`` (every
    subfolder holding a graph when it has no summary); and, with a warning, why each of
    those prompts whose graph is gone or damaged is left out."""
    if not folder.is_dir():
        raise CircuitlabError(f"{folder} is not a folder; pass the out folder of trace_many.")
    rows = read_summary(folder)
    ids = ([pid for pid, r in rows.items() if r["status"] == "ok"] if rows
           else sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")))
    graphs, missing = {}, {}
    for pid in ids:
        path = next((folder / pid / name for name in ("pruned", "graph")
                     if (folder / pid / name / "graph.json").is_file()), None)
        if path is None:
            if rows:  # without a summary, a folder without a graph is no prompt
                missing[pid] = f"{folder / pid} holds no pruned/ or graph/ folder"
            continue
        try:
            graphs[pid] = Graph.load(path)
        except CircuitlabError as err:
            missing[pid] = str(err)
    if missing:
        warnings.warn(f"{len(missing)} traced prompts of {folder} have no readable graph and "
                      f"are left out: {_some(missing, 10)} (see Aggregate.missing for why); "
                      "run the batch again with the same out to trace those whose graph folder "
                      "is gone.", stacklevel=4)
    return graphs, missing


def _features(graph: Graph) -> pd.DataFrame:
    """Per ``(layer, feature)`` of a graph: its summed influence and largest activation."""
    nodes = graph.nodes.assign(influence=influence_of(graph).numpy())
    feats = nodes[nodes["kind"] == "feature"]
    return feats.groupby(["layer", "feature"]).agg(influence=("influence", "sum"),
                                                   activation=("activation", "max"))


def _labels(graphs: dict[str, Graph], features: pd.DataFrame, use: bool) -> list[str]:
    """Each feature's name: the user label most used for its nodes, else its automatic
    label (for graphs of the bundled transcoders), else ``L{layer}/F{feature}``."""
    user: dict[tuple, Counter] = {}
    examples = None
    if use:
        for graph in graphs.values():
            nodes = graph.nodes.set_index("node_id")
            for node, text in graph.labels.items():
                if node in nodes.index and nodes.at[node, "kind"] == "feature" and text:
                    key = (int(nodes.at[node, "layer"]), int(nodes.at[node, "feature"]))
                    user.setdefault(key, Counter())[text] += 1
        bundled = all(g.metadata.get("transcoders") in DEFAULT_BUNDLE.values()
                      for g in graphs.values())
        examples = find_examples()[0] if bundled else None
    names = []
    for layer, feature in zip(features["layer"], features["feature"]):
        key = (int(layer), int(feature))
        auto = examples.label(*key) if examples is not None else ""
        names.append(user[key].most_common(1)[0][0] if key in user
                     else auto or f"L{layer}/F{feature}")
    return names


def _supernodes(graphs: dict[str, Graph]) -> pd.DataFrame:
    """The supernodes of the graphs, matched by name (see ``Aggregate.supernodes``)."""
    found: dict[str, dict[str, float]] = {}
    for pid, graph in graphs.items():
        influence = dict(zip(graph.nodes["node_id"], influence_of(graph).tolist()))
        for name, members in graph.supernodes.items():
            found.setdefault(name, {})[pid] = sum(influence.get(m, 0.0) for m in members)
    rows = [{"supernode": name, "count": len(per), "share": len(per) / len(graphs),
             "mean_influence": sum(per.values()) / len(per), "prompts": list(per)}
            for name, per in found.items()]
    table = pd.DataFrame(rows, columns=SUPERNODE_COLUMNS)
    return table.sort_values(["count", "mean_influence"], ascending=False, ignore_index=True)


def _similarity(graphs: dict[str, Graph]) -> pd.DataFrame:
    """Pairwise ``compare(a, b).overlap`` of the graphs."""
    ids = list(graphs)
    table = pd.DataFrame(0.0, index=pd.Index(ids, name="prompt"), columns=ids)
    for i, a in enumerate(ids):
        for b in ids[i:]:
            table.loc[a, b] = table.loc[b, a] = compare(graphs[a], graphs[b]).overlap
    return table
