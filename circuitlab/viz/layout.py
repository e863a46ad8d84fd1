"""Where nodes sit: token positions across, layers up.

Embeddings form the bottom row, logits the top row, and layer ``l`` the row ``l + 1``.
Each token position is a column whose width grows with the most nodes any of its cells
holds, so crowded positions get room and positions without features shrink to
``MIN_WIDTH``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

MIN_WIDTH = 1.0
GAP = 0.6
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
        left, width: per token position, the column's left edge and width.
        ticks: per token position, the column centre.
        tick_text: per token position, the token with whitespace made visible.
        n_rows: rows from embeddings (0) to logits (``n_rows - 1``).
    """

    x: np.ndarray
    y: np.ndarray
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


def layout(nodes: pd.DataFrame, token_strs: list, n_layers: int) -> Layout:
    """Positions for ``nodes`` (a graph's nodes table) over the prompt ``token_strs``."""
    y = rows(nodes, n_layers)
    P = len(token_strs)
    pos = nodes["pos"].to_numpy()
    counted = nodes["kind"].isin(["feature", "logit"]).to_numpy()
    cells = pd.Series(1, index=pd.MultiIndex.from_arrays([pos[counted], y[counted]]))
    per_cell = cells.groupby(level=[0, 1]).sum().groupby(level=0).max()
    width = MIN_WIDTH + per_cell.reindex(range(P), fill_value=0).to_numpy(dtype=float)
    left = np.concatenate([[0.0], np.cumsum(width + GAP)[:-1]])
    # Within a cell: features by influence (strongest first), logits by probability, errors last.
    order = pd.DataFrame({"pos": pos, "y": y, "error": nodes["kind"].eq("error").to_numpy(),
                          "score": -nodes["influence"].fillna(0).to_numpy()
                          - nodes["prob"].fillna(0).to_numpy()})
    order = order.sort_values(["pos", "y", "error", "score"], kind="stable")
    rank = order.groupby(["pos", "y"]).cumcount()
    size = order.groupby(["pos", "y"])["error"].transform("size")
    frac = ((rank + 0.5) / size).reindex(nodes.index).to_numpy()
    x = left[pos] + frac * width[pos]
    return Layout(x=x, y=y, left=left, width=width, ticks=left + width / 2,
                  tick_text=[visible(t) for t in token_strs], n_rows=n_layers + 2)
