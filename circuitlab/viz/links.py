"""Links drawn as a few binned line traces, never one trace per edge.

A link is coloured on a purple-green diverging scale by its *share*: its weight divided
by the total absolute input of its target, so shares lie in ``[-1, 1]``. Links fall into
``2 * len(MAGNITUDES)`` bins (sign times magnitude); each bin is one Plotly line trace of
``None``-separated segments with one colour and one width, growing with ``|share|``.
"""

from __future__ import annotations

import numpy as np
import torch

MAGNITUDES = (0.0, 0.02, 0.06, 0.15, 0.35)  # lower edges of the |share| bins
NEGATIVE = ("#e7d4e8", "#c2a5cf", "#9970ab", "#762a83", "#40004b")  # PRGn, purple side
POSITIVE = ("#d9f0d3", "#a6dba0", "#5aae61", "#1b7837", "#00441b")  # PRGn, green side
WIDTHS = (0.6, 1.1, 1.8, 2.8, 4.0)
N_BINS = 2 * len(MAGNITUDES)


def shares(adjacency: torch.Tensor) -> torch.Tensor:
    """Each edge's signed share of its target's total absolute input."""
    return adjacency / adjacency.abs().sum(1, keepdim=True).clamp_min(1e-30)


def link_bin(share: np.ndarray) -> np.ndarray:
    """Bin of each share: ``0..n-1`` negative (weak to strong), ``n..2n-1`` positive."""
    share = np.asarray(share, dtype=float)
    magnitude = np.searchsorted(MAGNITUDES, np.abs(share), side="right") - 1
    return np.where(share < 0, 0, len(MAGNITUDES)) + magnitude


def bin_style(b: int) -> tuple[str, float]:
    """``(colour, width)`` of bin ``b``."""
    n = len(MAGNITUDES)
    return (NEGATIVE if b < n else POSITIVE)[b % n], WIDTHS[b % n]


def share_colour(share: float) -> str:
    """The link colour of ``share`` (used to recolour a selected node's neighbours)."""
    return bin_style(int(link_bin(np.array([share]))[0]))[0]


def segments(x: np.ndarray, y: np.ndarray, sources, targets, bins) -> list[tuple[list, list]]:
    """Per bin, the ``(xs, ys)`` of its links as ``None``-separated segments.

    Args:
        x, y: node positions.
        sources, targets: node indices of the links to draw.
        bins: each link's bin (``link_bin`` of its share).
    """
    sources, targets, bins = (np.asarray(a, dtype=int) for a in (sources, targets, bins))
    out = []
    for b in range(N_BINS):
        s, t = sources[bins == b], targets[bins == b]
        xs = np.stack([x[s], x[t], np.full(len(s), np.nan)], 1).ravel()
        ys = np.stack([y[s], y[t], np.full(len(s), np.nan)], 1).ravel()
        out.append(([None if np.isnan(v) else float(v) for v in xs],
                    [None if np.isnan(v) else float(v) for v in ys]))
    return out
