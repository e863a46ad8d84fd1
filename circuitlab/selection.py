"""The visited targets' edges in bounded memory, and the influence estimate that picks nodes.

An attribution visits up to ``max_feature_nodes`` feature targets. A full row of edges spans
every active feature, so keeping full rows costs ``nodes x active features``, which grows
with the prompt. ``Rows`` keeps each visited row over a bounded number of *candidate*
columns instead (at least ``CANDIDATES_PER_NODE`` per node, more where memory is spare: the
features most likely to become nodes, chosen as attribution goes) and folds every other
feature's edge into the error column of its ``(layer, pos)``, which keeps the row's sum
exact. A feature that becomes a node after a row was stored is missing from it; ``late``
says which rows miss which nodes, and attribution recomputes just those rows.

The influence estimate needs each row's share of every feature, not only of the candidates:
the largest shares outside the candidates (``EXTRA_SHARE`` and up, ``EXTRAS_PER_ROW`` per
row) are kept as a sparse list. When every active feature fits among the candidates (short
prompts), rows are stored whole and nothing is folded, recomputed or approximated.

Stored row layout: ``[candidate slots | L x P error columns | P embedding columns]``.
``memory_parts`` counts what an attribution holds in this layout (``plan`` and ``attribute``
check it).
"""

from __future__ import annotations

import torch

#: Candidate columns per feature node: memory against recomputed rows.
CANDIDATES_PER_NODE = 4
#: Shares outside the candidates that the influence estimate keeps, per row, at most ...
EXTRAS_PER_ROW = 1024
#: ... and at least this share of the row's absolute input.
EXTRA_SHARE = 1e-5


def candidate_slots(n_features: int, n_nodes: int, extra: int = 0) -> int:
    """Candidate columns for ``n_nodes`` nodes among ``n_features`` active features: at
    least ``CANDIDATES_PER_NODE`` per node, and ``extra`` more (the columns spare memory
    holds)."""
    return n_features if n_nodes >= n_features else min(n_features,
                                                        CANDIDATES_PER_NODE * n_nodes + extra)


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
            top, at = torch.topk(edges.abs(), min(EXTRAS_PER_ROW, len(others)), dim=1)
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


def memory_parts(n_features: int, n_positions: int, n_layers: int, max_feature_nodes: int | None,
                 n_logits: int, d_model: int, batch_size: int, dtype: torch.dtype,
                 copied_params: int = 0, n_heads: int = 0,
                 writes_per_feature: float = 1.0, trace: int = 0) -> dict[str, int]:
    """Bytes an attribution holds at its peak: stored ``rows`` (visited features' over the
    candidate columns, logits' whole), a ``batch`` of whole rows, node ``selection``
    (shares among visited features, sparse shares outside the candidates), act-scaled
    ``decoders`` (``writes_per_feature`` layers each: 1 for per-layer transcoders, on average
    ``(L + 1) / 2`` for a cross-layer one), backward-dtype ``weights``, a ``backward`` batch,
    attention ``patterns`` (given ``n_heads``: the trace's float32 ones and the backward's
    copy), the float32 ``adjacency`` (host memory) with, while influence is annotated, the
    rows of the nodes with inputs copied and their absolute values (``prune.normalized``:
    two ``[kept + logits, nodes]`` copies alive together), and the ``trace`` the forward
    pass left (bytes, ``plan.trace_bytes``; 0 leaves it out). Only decoders and patterns grow
    with the active features or the prompt's square."""
    kept = n_features if max_feature_nodes is None else min(n_features, max_feature_nodes)
    slots = candidate_slots(n_features, kept)
    cols = n_features + (n_layers + 1) * n_positions
    n_nodes = kept + (n_layers + 1) * n_positions + n_logits
    return {
        "rows": dtype.itemsize * (kept * (slots + (n_layers + 1) * n_positions) + n_logits * cols),
        "batch": dtype.itemsize * min(batch_size, kept) * cols,
        "selection": (4 * kept * kept + 40 * kept * EXTRAS_PER_ROW) if slots < n_features
        else (4 * kept * kept if kept < n_features else 0),
        "decoders": int(dtype.itemsize * n_features * writes_per_feature * d_model),
        "weights": dtype.itemsize * copied_params,
        "backward": 4 * 8 * batch_size * n_positions * d_model,
        "patterns": (4 + dtype.itemsize) * n_layers * n_heads * n_positions ** 2,
        "adjacency": 4 * n_nodes * n_nodes + 2 * 4 * (kept + n_logits) * n_nodes,
        "trace": trace,
    }


def estimate_memory(n_features: int, n_positions: int, n_layers: int, max_feature_nodes: int | None,
                    n_logits: int, d_model: int, batch_size: int, dtype: torch.dtype,
                    copied_params: int = 0, n_heads: int = 0,
                    writes_per_feature: float = 1.0, trace: int = 0) -> int:
    """Bytes an attribution needs at peak, in all (the sum of ``memory_parts``)."""
    return sum(memory_parts(n_features, n_positions, n_layers, max_feature_nodes, n_logits,
                            d_model, batch_size, dtype, copied_params, n_heads,
                            writes_per_feature, trace).values())
