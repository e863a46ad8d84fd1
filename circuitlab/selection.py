"""The visited targets' edges in bounded memory, and the influence estimate that picks nodes.

An attribution visits up to ``max_feature_nodes`` feature targets. A full row of edges spans
every active feature, so keeping full rows costs ``nodes x active features``, which grows
with the prompt. ``Rows`` keeps each visited row over a bounded number of *candidate*
columns instead (``memory.candidate_slots``: at least ``memory.CANDIDATES_PER_NODE`` per
node, more where memory is spare: the features most likely to become nodes, chosen as
attribution goes) and folds every other feature's edge into the error column of its
``(layer, pos)``, which keeps the row's sum exact. A feature that becomes a node after a row
was stored is missing from it; ``late`` says which rows miss which nodes, and attribution
recomputes just those rows.

The influence estimate needs each row's share of every feature, not only of the candidates:
the largest shares outside the candidates (``EXTRA_SHARE`` and up, ``memory.EXTRAS_PER_ROW``
per row) are kept as a sparse list. When every active feature fits among the candidates
(short prompts), rows are stored whole and nothing is folded, recomputed or approximated.

Stored row layout: ``[candidate slots | L x P error columns | P embedding columns]``.
``memory.memory_parts`` counts what an attribution holds in this layout (``plan`` and
``attribute`` check it).
"""

from __future__ import annotations

import torch

from . import memory

#: The least share of the row's absolute input that the influence estimate keeps outside
#: the candidates (at most ``memory.EXTRAS_PER_ROW`` a row).
EXTRA_SHARE = 1e-5


class Rows:
    """Edges into the visited feature targets, in visiting order.

    Args:
        layer, pos: of every active feature (the sources' column order).
        n_layers, n_positions: the error and embedding columns: ``L x P`` and ``P``.
        n_rows: rows to hold (the node budget).
        n_slots: candidate columns; every feature is a candidate when it is the number of
            active features.
        dtype, device: of the stored edges.
    """

    def __init__(self, layer: torch.Tensor, pos: torch.Tensor, n_layers: int, n_positions: int,
                 n_rows: int, n_slots: int, dtype: torch.dtype, device):
        n = len(layer)
        self.n_features, self.n_slots, self.n_layers = n, n_slots, n_layers
        self.layer, self.pos = layer, pos
        self.where = layer * n_positions + pos          # each feature's error column
        self.n_error = n_layers * n_positions
        self.values = torch.zeros(n_rows, n_slots + self.n_error + n_positions, dtype=dtype,
                                  device=device)
        self.total = torch.zeros(n_rows, device=device)   # |row| summed over all columns
        self.feature_share = torch.zeros(n_rows, device=device)  # share of it from features
        self.width = torch.zeros(n_rows, dtype=torch.long, device=device)  # candidates then
        self.candidates = torch.empty(n_slots, dtype=torch.long, device=device)
        self.slot = torch.full((n,), n_slots, dtype=torch.long, device=device)
        self.n_candidates = 0
        self.n = 0
        self._others = None
        self.extra = [torch.empty(0, dtype=torch.long, device=device)] * 2 + [
            torch.empty(0, device=device)]  # rows, features, shares
        if n_slots == n:
            self.add_candidates(torch.arange(n, device=device))

    @property
    def complete(self) -> bool:
        """Every active feature is a candidate: rows are stored whole."""
        return self.n_candidates == self.n_features

    def wanted(self, n_to_visit: int) -> int:
        """How many of the best-ranked features to offer ``add_candidates`` while
        ``n_to_visit`` features remain to be visited: those, or half the free slots if more
        (early rows then hold more of the features that become nodes later)."""
        return min(self.n_features, max(n_to_visit, (self.n_slots - self.n_candidates) // 2))

    def add_candidates(self, features: torch.Tensor) -> None:
        """Make ``features`` candidates (in order, skipping those that are) while slots last."""
        new = features[self.slot[features] == self.n_slots]
        new = new[:self.n_slots - self.n_candidates]
        if not len(new):
            return
        self.candidates[self.n_candidates:self.n_candidates + len(new)] = new
        self.slot[new] = torch.arange(self.n_candidates, self.n_candidates + len(new),
                                      device=new.device)
        self.n_candidates += len(new)
        self._others = None

    def others(self) -> torch.Tensor:
        """The features that are not candidates."""
        if self._others is None:
            self._others = (self.slot == self.n_slots).nonzero()[:, 0]
        return self._others

    def add(self, full: torch.Tensor) -> None:
        """Store full rows ``[B, features + L x P errors + P embeddings]``."""
        b, i, n, c = len(full), self.n, self.n_features, self.n_candidates
        rows = slice(i, i + b)
        features = full[:, :n].abs().float().sum(1)
        total = (features + full[:, n:].abs().float().sum(1)).clamp_min(1e-30)
        self.total[rows] = total
        self.feature_share[rows] = features / total
        self.width[rows] = c
        self.values[rows, :c] = full[:, self.candidates[:c]]
        errors = full[:, n:n + self.n_error].clone()
        if not self.complete:
            others = self.others()
            edges = full[:, others]
            errors.index_add_(1, self.where[others], edges)
            top, at = torch.topk(edges.abs(), min(memory.EXTRAS_PER_ROW, len(others)), dim=1)
            share = top.float() / total[:, None]
            keep = share >= EXTRA_SHARE
            row = torch.arange(i, i + b, device=full.device)[:, None].expand_as(keep)
            self.extra = [torch.cat([self.extra[0], row[keep]]),
                          torch.cat([self.extra[1], others[at[keep]]]),
                          torch.cat([self.extra[2], share[keep]])]
        self.values[rows, self.n_slots:self.n_slots + self.n_error] = errors
        self.values[rows, self.n_slots + self.n_error:] = full[:, n + self.n_error:]
        self.n += b

    def _shares_among(self, order: torch.Tensor) -> torch.Tensor:
        """``[n, n]``: row ``v``'s share from visited feature ``order[u]``."""
        n = self.n
        A = torch.zeros(n, n, device=order.device)
        slots = self.slot[order]
        held = slots < self.n_slots
        A[:, held] = self.values[:n, slots[held]].abs().float() / self.total[:n, None]
        at = torch.full((self.n_features,), -1, dtype=torch.long, device=order.device)
        at[order] = torch.arange(n, device=order.device)
        rows, cols, shares = self.extra
        col = at[cols]
        hit = col >= 0
        A.index_put_((rows[hit], col[hit]), shares[hit], accumulate=True)
        return A

    def influence(self, direct: torch.Tensor, order: torch.Tensor, max_depth: int = 64,
                  chunk: int = 1024) -> torch.Tensor:
        """Estimated influence of every active feature on the logits: its direct share plus
        all paths through the visited features (``order``, the stored rows' features).

        The paths are summed among the visited features (``n x n``), then spread once to
        every feature through the stored shares.
        """
        n = self.n
        reach = torch.zeros(n, device=direct.device)  # path weight into each visited row
        current, total = direct[order].clone(), direct.sum()
        A = self._shares_among(order) if n else None
        for _ in range(max_depth if n else 0):
            reach += current
            step = current @ self.feature_share[:n]
            total += step
            if step < 1e-6 * total:
                break
            current = current @ A
        influence = direct.clone()
        c, weight = self.n_candidates, reach / self.total[:n]
        for i in range(0, n, chunk):
            j = min(i + chunk, n)
            influence[self.candidates[:c]] += weight[i:j] @ self.values[i:j, :c].abs().float()
        rows, cols, shares = self.extra
        influence.index_add_(0, cols, reach[rows] * shares)
        return influence

    def late(self, kept: torch.Tensor, layer: torch.Tensor, pos: torch.Tensor) -> list[tuple]:
        """Rows that miss some kept features as sources, grouped by what they miss:
        ``[(rows, missed features)]``. A feature at ``(l, p)`` feeds a row at ``(l', p')``
        only if ``l < l'`` and ``p <= p'``; ``layer``/``pos`` are the rows' targets'."""
        out = []
        for width in self.width[:self.n].unique().tolist():
            missed = kept[self.slot[kept] >= width]
            if not len(missed):
                continue
            rows = (self.width[:self.n] == width).nonzero()[:, 0]
            # The first position each layer's missed features start at, and below each layer.
            first = torch.full((self.n_layers + 1,), 1 << 62, dtype=torch.long, device=kept.device)
            first.scatter_reduce_(0, self.layer[missed] + 1, self.pos[missed], "amin")
            below = torch.cummin(first, 0).values
            feeds = pos[rows] >= below[layer[rows]]
            if feeds.any():
                out.append((rows[feeds], missed))
        return out
