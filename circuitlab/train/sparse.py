"""Sparse kernels of TopK and JumpReLU transcoders: which (token, feature) pairs are
active in a batch, and the products that touch only their decoder rows and encoder columns.

The training step (``topk.TopKTranscoders``) and the export (``export.to_jumprelu``) both
run on these: per token only the ``k`` selected features are decoded, and the gradients
of the encoder and decoder are scattered to the selected rows only.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F


class Active(NamedTuple):
    """The active (token, feature) pairs of a batch, in token-major (CSR) order.

    Attributes:
        crow: ``[B + 1]`` where each token's pairs start.
        toks, feats: ``[n]`` token and feature of each pair.
        pre: ``[n]`` their pre-activations (float32).
    """

    crow: torch.Tensor
    toks: torch.Tensor
    feats: torch.Tensor
    pre: torch.Tensor


def topk_active(pre: torch.Tensor, k: int) -> Active:
    """The ``k`` largest pre-activations of each row of ``pre [B, F]``."""
    vals, idx = pre.topk(k, dim=1, sorted=False)
    idx, order = idx.sort(dim=1, stable=True)
    B = len(pre)
    return Active(torch.arange(0, B * k + 1, k, device=pre.device),
                  torch.arange(B, device=pre.device).repeat_interleave(k), idx.reshape(-1),
                  vals.gather(1, order).reshape(-1).float())


def jump_active(pre: torch.Tensor, threshold: torch.Tensor) -> Active:
    """The pre-activations ``pre [B, F]`` above their feature's ``threshold [F]``."""
    toks, feats = (pre > threshold).nonzero(as_tuple=True)
    crow = torch.zeros(len(pre) + 1, dtype=torch.long, device=pre.device)
    crow[1:] = torch.bincount(toks, minlength=len(pre)).cumsum(0)
    return Active(crow, toks, feats, pre[toks, feats].float())


def decode(a: Active, acts: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """Per token, the sum of ``acts * W_dec[feat]`` over its pairs: ``[B, d]``."""
    return F.embedding_bag(a.feats, W_dec, a.crow[:-1], per_sample_weights=acts, mode="sum")


def gather_dot(a: Active, g: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``W[feat] . g[tok]`` for each pair: ``[n]`` (a sampled dense-dense product)."""
    mask = _csr(a.crow, a.feats, torch.zeros_like(a.pre), (len(g), len(W)))
    return torch.sparse.sampled_addmm(mask, g, W.T).values()


def scatter_rows(feats: torch.Tensor, toks: torch.Tensor, weights: torch.Tensor,
                  rows: torch.Tensor, n_out: int) -> torch.Tensor:
    """``out[f] = sum of weights[i] * rows[toks[i]] over i with feats[i] == f``: ``[n_out, d]``."""
    if feats.device.type != "cpu":  # CSR, feature-major, tokens sorted within each feature
        order = (feats * len(rows) + toks).argsort(stable=True)
        crow = torch.zeros(n_out + 1, dtype=torch.long, device=feats.device)
        crow[1:] = torch.bincount(feats, minlength=n_out).cumsum(0)
        return _csr(crow, toks[order], weights[order], (n_out, len(rows))) @ rows
    # On a CPU, a weighted sum of rows per feature (pairs sorted by feature) is 1.6x faster
    # than a COO product for a cross-layer transcoder's wide decoders, and the COO product
    # 1.1-2x faster than the CSR one (MKL).
    order = feats.argsort(stable=True)
    offsets = torch.zeros(n_out, dtype=torch.long)
    offsets[1:] = torch.bincount(feats, minlength=n_out).cumsum(0)[:-1]
    return F.embedding_bag(toks[order], rows, offsets, per_sample_weights=weights[order].to(rows.dtype),
                           mode="sum")


def _csr(crow, col, values, size) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


def matching_thresholds(pre: torch.Tensor, k: int, bins: int = 2048) -> tuple[torch.Tensor, Active]:
    """JumpReLU thresholds ``[F]`` that reproduce the TopK firing counts on ``pre [N, F]``.

    Feature ``f`` gets a threshold just below the ``c_f``-th largest value of
    ``pre[:, f]``, where ``c_f`` counts the tokens on which the TopK selected ``f`` with a
    positive value, so the JumpReLU fires on about as many of these tokens. The rank is
    found in a per-feature histogram of ``bins`` bins between 0 and the feature's
    largest value (several times faster than a sort on CPU); the values in the same bin
    may add a few firings (about 0.3% in all). Features never selected get their largest
    value (they never fire on ``pre``).

    Returns:
        The thresholds and the TopK's active pairs.
    """
    a = topk_active(pre, k)
    n_feats = pre.shape[1]
    counts = torch.bincount(a.feats[a.pre > 0], minlength=n_feats)
    top = pre.max(0).values.float().clamp(min=0)
    width = top.clamp(min=1e-30) / bins
    # Slot 0 holds the negative values, slots 1..bins the bins, slot bins + 1 the maximum.
    slot = (pre / width).floor_().clamp_(-1, bins).long() + 1
    slot += torch.arange(n_feats, device=pre.device) * (bins + 2)
    hist = torch.bincount(slot.view(-1), minlength=n_feats * (bins + 2)).view(n_feats, bins + 2)
    at_or_above = hist.flip(1).cumsum(1).flip(1)
    s = ((at_or_above >= counts[:, None]).sum(1) - 1).clamp(1, bins)
    return torch.where(counts > 0, (s - 1) * width, top), a

