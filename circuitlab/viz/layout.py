"""Where nodes sit: token positions across, layers up.

Embeddings form the bottom row, logits the top row, and layer ``l`` the row ``l + 1``.
Each token position is a column whose width grows with the widest of its cells above
the embeddings (the sum of their nodes' diameters), so crowded positions get room and positions without features
shrink to ``MIN_WIDTH``. Within a cell, nodes sit side by side, each given room in
proportion to its diameter, strongest first (left): markers drawn at ``diameter *
min(1, room * pixels per x unit)`` never cover each other (``marker_sizes``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

MIN_WIDTH = 1.0
GAP = 0.6
#: Nominal marker diameters in pixels; one x unit holds ``UNIT`` pixels of diameters.
FEATURE_SIZE, FIXED_SIZE, UNIT = (6.0, 20.0), {"error": 8.0, "embedding": 12.0, "logit": 12.0,
                                          "direction": 12.0}, 12.0
VISIBLE = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"}


def visible(token: str) -> str:
    """``token`` with whitespace made visible (``"␣"`` for a space, ``"↵"`` for a newline)."""
    if token == "":
        return "∅"
    return "".join(VISIBLE.get(c, c) for c in token)


@dataclass
class Layout:
    """Node positions and the token axis.

    Attributes:
        x, y: per node, aligned with the nodes table.
        size: per node, the nominal marker diameter in pixels.
        room: per node, x units per pixel of nominal diameter in its cell.
        left, width: per token position, the column's left edge and width.
        ticks: per token position, the column centre.
        tick_text: per token position, the token with whitespace made visible.
        n_rows: rows from embeddings (0) to logits (``n_rows - 1``).
    """

    x: np.ndarray
    y: np.ndarray
    size: np.ndarray
    room: np.ndarray
    left: np.ndarray
    width: np.ndarray
    ticks: np.ndarray
    tick_text: list
    n_rows: int


def rows(nodes: pd.DataFrame, n_layers: int) -> np.ndarray:
    """Each node's row: 0 for embeddings, ``layer + 1`` inside, ``n_layers + 1`` for logits."""
    y = nodes["layer"].to_numpy() + 1
    y = np.where(nodes["kind"] == "embedding", 0, y)
    return np.where(nodes["kind"] == "logit", n_layers + 1, y).astype(float)


def scaled(nodes: pd.DataFrame, metric: str) -> np.ndarray:
    """``sqrt(metric / the largest feature's)`` per node, clipped to ``[0, 1]``."""
    feature = (nodes["kind"] == "feature").to_numpy()
    v = np.nan_to_num(nodes[metric].to_numpy(dtype=float)).clip(min=0)
    top = v[feature].max() if feature.any() else 1.0
    return np.sqrt(v / top).clip(max=1) if top > 0 else np.zeros_like(v)


def diameters(nodes: pd.DataFrame, metric: str = "influence") -> np.ndarray:
    """Nominal marker diameter per node: features from ``FEATURE_SIZE`` by ``scaled``
    ``metric``, other kinds ``FIXED_SIZE``."""
    lo, hi = FEATURE_SIZE
    fixed = nodes["kind"].map(FIXED_SIZE).to_numpy(dtype=float)
    return np.where(np.isnan(fixed), lo + (hi - lo) * scaled(nodes, metric), fixed)


def marker_sizes(lay: Layout, px_per_unit: float, px_per_row: float) -> np.ndarray:
    """Marker diameters in pixels that keep the nodes of a cell apart at this zoom."""
    return lay.size * np.minimum(1.0, np.minimum(lay.room * px_per_unit, 0.9 * px_per_row / FEATURE_SIZE[1]))


def layout(nodes: pd.DataFrame, token_strs: list, n_layers: int) -> Layout:
    """Positions for ``nodes`` (a graph's nodes table) over the prompt ``token_strs``."""
    y = rows(nodes, n_layers)
    P = len(token_strs)
    pos = nodes["pos"].to_numpy()
    size = diameters(nodes)
    # Within a cell: features by influence (strongest first), logits by probability, errors last.
    order = pd.DataFrame({"pos": pos, "y": y, "error": nodes["kind"].eq("error").to_numpy(),
                          "score": -nodes["influence"].fillna(0).to_numpy()
                          - nodes["prob"].fillna(0).to_numpy(), "size": size}, index=nodes.index)
    order = order.sort_values(["pos", "y", "error", "score"], kind="stable")
    cell = order.groupby(["pos", "y"])["size"]
    total = cell.transform("sum")
    inner = order["y"] > 0  # a lone embedding does not widen its column
    widest = (total[inner] / UNIT).groupby(order["pos"][inner]).max()
    width = MIN_WIDTH + widest.reindex(range(P), fill_value=0).to_numpy(dtype=float)
    left = np.concatenate([[0.0], np.cumsum(width + GAP)[:-1]])
    frac = ((cell.cumsum() - order["size"] / 2) / total).reindex(nodes.index).to_numpy()
    room = (width[order["pos"]] / total).reindex(nodes.index).to_numpy()
    return Layout(x=left[pos] + frac * width[pos], y=y, size=size, room=room, left=left,
                  width=width, ticks=left + width / 2, tick_text=[visible(t) for t in token_strs],
                  n_rows=n_layers + 2)
