"""Labels, supernodes and pins kept in ``labels.json`` beside a saved graph.

The sidecar is ``{"format": "circuitlab-labels/1", "labels": {node_id: text},
"supernodes": {name: [node_id, ...]}, "pinned": [node_id, ...]}``. It is written
atomically, keys it does not know are kept, and a file that does not parse is never
overwritten.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import CircuitlabError
from .files import atomic_write_text

NAME = "labels.json"
FORMAT = "circuitlab-labels/1"


def empty() -> dict:
    """Annotations with nothing in them."""
    return {"labels": {}, "supernodes": {}, "pinned": []}


def check(doc, where: str) -> dict:
    """Validate annotations ``doc`` (from ``where``) and return its known parts, copied."""
    fix = f"fix or remove {where}"
    if not isinstance(doc, dict):
        raise CircuitlabError(f"{where} must hold a JSON object; {fix}.")
    labels, supernodes, pinned = (doc.get(k, empty()[k]) for k in ("labels", "supernodes", "pinned"))
    if not (isinstance(labels, dict) and all(isinstance(v, str) for v in labels.values())):
        raise CircuitlabError(f'"labels" in {where} must map node ids to strings; {fix}.')
    if not (isinstance(supernodes, dict) and all(
            isinstance(v, list) and v and all(isinstance(i, str) for i in v)
            for v in supernodes.values())):
        raise CircuitlabError(
            f'"supernodes" in {where} must map names to non-empty lists of node ids; {fix}.')
    if not (isinstance(pinned, list) and all(isinstance(i, str) for i in pinned)):
        raise CircuitlabError(f'"pinned" in {where} must be a list of node ids; {fix}.')
    return {"labels": dict(labels), "supernodes": {k: list(v) for k, v in supernodes.items()},
            "pinned": list(pinned)}


def _raw(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CircuitlabError(
            f"{path} is not valid JSON ({e}); fix or remove it (circuitlab will not overwrite "
            "it, so no label is lost).") from None
    check(doc, str(path))
    return doc


def read(folder: Path) -> dict:
    """The annotations in ``folder/labels.json`` (empty ones if there is no sidecar)."""
    path = Path(folder) / NAME
    return check(_raw(path), str(path)) if path.exists() else empty()


def write(folder: Path, annotations: dict, merge: bool = False) -> Path:
    """Write ``annotations`` to ``folder/labels.json`` atomically.

    Args:
        folder: the saved graph's folder.
        annotations: ``labels``, ``supernodes`` and ``pinned``.
        merge: keep labels and supernodes already in the file that ``annotations`` lacks
            (for saving a graph over a folder); otherwise ``annotations`` replace them.
    """
    path = Path(folder) / NAME
    new = check(annotations, "the annotations")
    doc = _raw(path) if path.exists() else {}
    if merge:
        old = check(doc, str(path))
        new["labels"] = {**old["labels"], **new["labels"]}
        new["supernodes"] = {**old["supernodes"], **new["supernodes"]}
    doc.update(format=FORMAT, **new)
    atomic_write_text(path, json.dumps(doc, indent=1, ensure_ascii=False))
    return path
