"""Train one skip transcoder per layer of a TransformerLens model and export SAE-Lens folders.

Each transcoder maps the MLP input ``x`` (the pre-MLP norm output) to the MLP output ``y``
(``blocks.l.hook_mlp_out``). During training it is a TopK transcoder with an affine skip::

    y_hat = W_dec^T topk_k(W_enc x + b_enc) + W_skip x + b_dec

trained with Adam on the normalized MSE plus Gao et al.'s (2024) AuxK loss, which lets the
top ``aux_k`` dead latents (not fired in the last ``dead_tokens`` tokens) reconstruct the
residual error so they come back to life. Gradients are computed by hand with sparse
kernels (only the k selected decoder rows and encoder columns are touched per token), and
the dense encoder and skip products run in bfloat16 when ``bf16`` is set.

The data: documents are tokenized, packed into rows of ``context`` tokens that each start
with BOS, and run through the model once per batch for all layers (``mlp_io``); the
activation pairs (BOS positions dropped) go through a shuffled in-memory buffer and are
never written to disk.

At every checkpoint and at the end, each layer is converted to an SAE-Lens
``JumpReLUSkipTranscoder``: feature ``f``'s threshold is set so that, on a calibration
sample, the JumpReLU fires on exactly as many tokens as the TopK selected ``f``
(per-feature quantile matching). A JumpReLU lets the number of active features vary
from token to token, which costs a TopK-trained model some FVU, so the last
``jumprelu_share`` of training already runs these JumpReLUs (thresholds re-matched on
every buffer) and the weights adapt to them. Folders ``out_dir/layer_XX/`` hold ``cfg.json`` and
``sae_weights.safetensors`` (matrices in bfloat16, vectors in float32; SAE-Lens casts to
the cfg's float32 on load) and ``out_dir/manifest.json`` lists their sha256.

Example::

    from circuitlab.loading import load_model
    from circuitlab.train.trainer import train_transcoders
    train_transcoders(load_model("gemma-3-270m"), "~/.cache/circuitlab/corpus", "out")
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from sae_lens import SAE
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from circuitlab.loading import CircuitlabError, atomic_write_text, fast_bf16, is_pack, sha256
from circuitlab.replacement import mlp_io
from circuitlab.train.corpus import iter_documents

PARAMS = ("W_enc", "b_enc", "W_dec", "W_skip", "b_dec")
AUX_COEF = 1 / 32  # weight of the AuxK loss (Gao et al. 2024)
CALIBRATION_TOKENS = 16_384  # tokens used to set the JumpReLU thresholds
RIDGE = 1e-2  # ridge penalty of the initial skip fit, relative to the mean input variance
CHECKPOINT_FILE = "state.safetensors"


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a resumed run must share with its checkpoint."""

    model_name: str
    n_layers: int
    d_model: int
    layers: tuple[int, ...]
    width: int
    k: int
    aux_k: int
    dead_tokens: int
    context: int
    batch_tokens: int
    buffer_tokens: int
    passes: int
    lr: float
    jumprelu_share: float
    bf16: bool
    seed: int
    corpus: str
    init_from: str | None = None


# --------------------------------------------------------------------------- data


class TokenRows:
    """Packs a corpus into rows of ``context`` token ids, each starting with BOS.

    Documents are tokenized without special tokens and joined with EOS (when the tokenizer
    has one); each row is BOS followed by the next ``context - 1`` tokens of that stream.
    A ``circuitlab pack`` folder gives its documents' token ids and special ids instead.
    The position in the stream (documents read, tokens pending) can be saved and restored.

    Args:
        tokenizer: a Hugging Face tokenizer with a BOS token (unused for a pack).
        corpus: anything ``iter_documents`` reads, or a pack folder.
        context: row length, BOS included.
        split: corpus split.
        docs_done: documents to skip (already consumed by an earlier run).
        pending: tokens read from the stream but not yet placed in a row.
    """

    def __init__(self, tokenizer, corpus, context: int, split: str = "train",
                 docs_done: int = 0, pending: list[int] | None = None):
        if is_pack(corpus):
            from .pack import pack_documents, special_ids

            self.bos, eos = special_ids(corpus)
            docs = itertools.islice(pack_documents(corpus, split), docs_done, None)
        elif tokenizer is None or tokenizer.bos_token_id is None:
            raise CircuitlabError(
                "The model has no tokenizer with a BOS token; load it with its tokenizer "
                "(circuitlab.loading.load_model does)."
            )
        else:
            self.bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
            texts = itertools.islice(iter_documents(corpus, split), docs_done, None)
            docs = (tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts)
        self.context, self.eos, self._docs = context, [] if eos is None else [eos], docs
        self.docs_done, self.pending = docs_done, list(pending or [])

    def take(self, n_rows: int) -> torch.Tensor:
        """Up to ``n_rows`` rows ``[n, context]`` (fewer, or none, at the end of the corpus)."""
        width, rows = self.context - 1, []
        while len(rows) < n_rows:
            while len(self.pending) < width:
                ids = next(self._docs, None)
                if ids is None:
                    return self._stack(rows)
                self.pending += ids + self.eos
                self.docs_done += 1
            rows.append([self.bos] + self.pending[:width])
            self.pending = self.pending[width:]
        return self._stack(rows)

    def skip(self, n_rows: int) -> None:
        """Skip the next ``n_rows`` rows (e.g. those an earlier run read)."""
        while n_rows > 0 and len(self.take(min(n_rows, 1024))):
            n_rows -= 1024

    def _stack(self, rows: list[list[int]]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long).view(len(rows), self.context)


def activation_buffer(model: HookedTransformer, tokens: torch.Tensor, layers: list[int],
                      rows_per_forward: int, dtype: torch.dtype, device: str):
    """MLP inputs and outputs ``[L, N, d]`` of ``tokens [R, P]`` without the BOS positions."""
    R, P = tokens.shape
    x = torch.empty(len(layers), R * (P - 1), model.cfg.d_model, dtype=dtype, device=device)
    y = torch.empty_like(x)
    for start in range(0, R, rows_per_forward):
        batch = tokens[start:start + rows_per_forward].to(model.cfg.device)
        mlp_in, mlp_out = mlp_io(model, batch, layers)
        span = slice(start * (P - 1), (start + len(batch)) * (P - 1))
        x[:, span] = mlp_in[:, :, 1:].flatten(1, 2).to(device, dtype)
        y[:, span] = mlp_out[:, :, 1:].flatten(1, 2).to(device, dtype)
    return x, y


# --------------------------------------------------------------------------- sparse kernels


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


def _decode(a: Active, acts: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """Per token, the sum of ``acts * W_dec[feat]`` over its pairs: ``[B, d]``."""
    return F.embedding_bag(a.feats, W_dec, a.crow[:-1], per_sample_weights=acts, mode="sum")


def _gather_dot(a: Active, g: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``W[feat] . g[tok]`` for each pair: ``[n]`` (a sampled dense-dense product)."""
    mask = _csr(a.crow, a.feats, torch.zeros_like(a.pre), (len(g), len(W)))
    return torch.sparse.sampled_addmm(mask, g, W.T).values()


def _scatter_rows(feats: torch.Tensor, toks: torch.Tensor, weights: torch.Tensor,
                  rows: torch.Tensor, n_out: int) -> torch.Tensor:
    """``out[f] = sum of weights[i] * rows[toks[i]] over i with feats[i] == f``: ``[n_out, d]``."""
    # Feature-major, tokens sorted within each feature; a stable sort is much faster on CPU.
    order = (feats * len(rows) + toks).argsort(stable=True)
    crow = torch.zeros(n_out + 1, dtype=torch.long, device=feats.device)
    crow[1:] = torch.bincount(feats, minlength=n_out).cumsum(0)
    return _csr(crow, toks[order], weights[order], (n_out, len(rows))) @ rows


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


# --------------------------------------------------------------------------- model state


class TopKTranscoders:
    """TopK skip transcoders for several layers, in a normalized space, trained by hand.

    Inputs and targets are divided by per-layer scales (``scale_in``: RMS of ``x``;
    ``scale_out``: RMS of ``y`` around its mean), so the MSE of a batch is its FVU.
    Decoder rows are kept at unit norm.

    Attributes:
        params: ``W_enc [L, F, d]`` (one row per feature), ``b_enc [L, F]``,
            ``W_dec [L, F, d]``, ``W_skip [L, d_out, d_in]``, ``b_dec [L, d]``.
        scale_in, scale_out: ``[L]``.
        since_fired: ``[L, F]`` tokens since each feature was last selected.
        opt: Adam over ``params``.
    """

    def __init__(self, params: dict, scale_in, scale_out, since_fired, lr: float):
        self.params = {n: torch.nn.Parameter(params[n]) for n in PARAMS}
        self.scale_in, self.scale_out, self.since_fired = scale_in, scale_out, since_fired
        self.threshold = None
        self.opt = torch.optim.Adam(self.params.values(), lr=lr)

    @classmethod
    def init(cls, x: torch.Tensor, y: torch.Tensor, width: int, k: int, lr: float,
             seed: int) -> "TopKTranscoders":
        """Initialize from a sample ``x, y [L, N, d]`` of the first buffer (exemplar
        initialization).

        ``W_skip, b_dec``: ridge fit of ``y`` on ``x``. Each feature starts from a random
        token ``t`` of the sample: its encoder row is the direction of ``x_t`` minus the
        mean input (``b_enc`` centers the input), its decoder row the direction of the
        skip's residual at ``t``. The encoder is then scaled so the initial
        reconstruction of the residual is least-squares optimal. (Random tied
        encoder/decoder directions, as for SAEs, start with many dead features and learn
        slower, because a transcoder's input and output spaces differ.)
        """
        L, N, d = x.shape
        scale_in, scale_out = _scales(x, y)
        gen = torch.Generator().manual_seed(seed)
        pick = (torch.randperm(N, generator=gen)[:width] if N >= width
                else torch.randint(N, (width,), generator=gen)).to(x.device)
        noise = 0.1 * F.normalize(torch.randn(L, width, d, generator=gen), dim=-1).to(x.device)
        out = {n: [] for n in PARAMS}
        for l in range(L):  # one layer at a time: a float copy of the whole buffer is large
            xl, yl = x[l].float() / scale_in[l], y[l].float() / scale_out[l]
            W_skip, b_dec = _ridge(xl, yl)
            resid = yl - xl @ W_skip.T - b_dec
            x_mean = xl.mean(0)
            W_enc = F.normalize(F.normalize(xl[pick] - x_mean, dim=-1) + noise[l], dim=-1)
            W_dec = F.normalize(resid[pick], dim=-1)
            a = topk_active(torch.addmm(-W_enc @ x_mean, xl, W_enc.T), k)
            recon = _decode(a, a.pre.relu(), W_dec)
            gain = (recon * resid).sum() / recon.pow(2).sum().clamp(min=1e-12)
            W_enc *= gain.clamp(min=1e-3)
            for n, v in zip(PARAMS, (W_enc, -W_enc @ x_mean, W_dec, W_skip, b_dec)):
                out[n].append(v)
        return cls({n: torch.stack(v) for n, v in out.items()}, scale_in, scale_out,
                   torch.zeros(L, width, dtype=torch.long, device=x.device), lr)

    @classmethod
    def from_bundle(cls, folder: Path, layers: list[int], x: torch.Tensor, y: torch.Tensor,
                    lr: float) -> "TopKTranscoders":
        """Warm start from exported transcoders ``folder/layer_XX/`` (this module's export,
        or any SAE-Lens skip transcoder folder with ``W_enc, b_enc, W_dec, W_skip, b_dec``).

        The normalizing scales come from the sample ``x, y [L, N, d]``; the weights are
        mapped into that normalized space (exactly the inverse of ``to_jumprelu``). The
        JumpReLU thresholds are dropped: training runs TopK until its JumpReLU phase.
        Adam's moments start at zero, so warm starts want a lower ``lr``.
        """
        scale_in, scale_out = _scales(x, y)
        out = {n: [] for n in PARAMS}
        for l, layer in enumerate(layers):
            w = load_file(folder / f"layer_{layer:02d}" / "sae_weights.safetensors")
            w = {n: w[n].float().to(x.device) for n in PARAMS}
            ratio = scale_in[l] / scale_out[l]
            for n, v in zip(PARAMS, ((w["W_enc"] * ratio).T, w["b_enc"] / scale_out[l],
                                     F.normalize(w["W_dec"], dim=-1), w["W_skip"] * ratio,
                                     w["b_dec"] / scale_out[l])):
                out[n].append(v.contiguous())
        width = out["W_dec"][0].shape[0]
        return cls({n: torch.stack(v) for n, v in out.items()}, scale_in, scale_out,
                   torch.zeros(len(layers), width, dtype=torch.long, device=x.device), lr)

    @property
    def n_layers(self) -> int:
        return self.params["W_enc"].shape[0]

    def pre(self, l: int, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Pre-activations ``[B, F]`` of layer ``l`` for normalized inputs ``x [B, d]``."""
        p = self.params
        return torch.addmm(p["b_enc"][l].to(dtype), x.to(dtype), p["W_enc"][l].to(dtype).T)

    @torch.no_grad()
    def step(self, x: torch.Tensor, y: torch.Tensor, k: int, aux_k: int, dead_tokens: int,
             lr: float, dtype: torch.dtype) -> torch.Tensor:
        """One Adam step on raw activations ``x, y [L, B, d]``; returns each layer's FVU ``[L]``."""
        fvu = torch.empty(self.n_layers)
        for p in self.params.values():
            p.grad = torch.empty_like(p)
        for l in range(self.n_layers):
            xl = x[l].float() / self.scale_in[l]
            yl = y[l].float() / self.scale_out[l]
            fvu[l] = self._layer_grads(l, xl, yl, k, aux_k, self.since_fired[l] >= dead_tokens,
                                       dtype)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        self.params["W_dec"].copy_(F.normalize(self.params["W_dec"], dim=-1))
        return fvu

    def _layer_grads(self, l: int, x: torch.Tensor, y: torch.Tensor, k: int, aux_k: int,
                     dead: torch.Tensor, dtype: torch.dtype) -> float:
        """Set the gradients of layer ``l`` (MSE/variance + AuxK) and update ``since_fired``."""
        p = self.params
        W_dec = p["W_dec"][l]
        B, d = y.shape
        pre = self.pre(l, x, dtype)
        a = topk_active(pre, k) if self.threshold is None else jump_active(pre, self.threshold[l])
        acts = a.pre.relu()
        x_c = x.to(dtype)
        skip = (x_c @ p["W_skip"][l].to(dtype).T).float()
        err = _decode(a, acts, W_dec) + skip + p["b_dec"][l] - y
        grad_out = err * (2 / (B * d))
        # Per group of pairs: pairs, activations, d(loss)/d(activation), d(loss)/d(output).
        groups = [(a, acts, _gather_dot(a, grad_out, W_dec) * (acts > 0), grad_out)]
        n_aux = min(aux_k, int(dead.sum()))
        if n_aux:
            aux = topk_active(pre.masked_fill(~dead, -math.inf), n_aux)
            aux_acts = aux.pre.relu()
            denom = (err - err.mean(0)).pow(2).sum().clamp(min=1e-12)
            aux_grad_out = (_decode(aux, aux_acts, W_dec) + err) * (2 * AUX_COEF / denom)
            groups.append((aux, aux_acts, _gather_dot(aux, aux_grad_out, W_dec) * (aux_acts > 0),
                           aux_grad_out))
        feats = torch.cat([g[0].feats for g in groups])
        width = len(W_dec)
        grad_acts = torch.cat([g[2] for g in groups])
        p["W_enc"].grad[l] = _scatter_rows(feats, torch.cat([g[0].toks for g in groups]),
                                           grad_acts, x, width)
        p["b_enc"].grad[l] = torch.bincount(feats, grad_acts, minlength=width)
        p["W_dec"].grad[l] = _scatter_rows(
            feats, torch.cat([g[0].toks + i * B for i, g in enumerate(groups)]),
            torch.cat([g[1] for g in groups]), torch.cat([g[3] for g in groups]), width)
        p["W_skip"].grad[l] = (grad_out.T.to(dtype) @ x_c).float()
        p["b_dec"].grad[l] = grad_out.sum(0)
        self.since_fired[l] += B
        self.since_fired[l, a.feats[acts > 0]] = 0
        return float(err.pow(2).sum() / (B * d))

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, k: int, dtype: torch.dtype) -> None:
        """Switch to JumpReLU activations, with ``matching_thresholds`` on raw inputs
        ``x [L, N, d]``."""
        self.threshold = torch.stack([
            matching_thresholds(self.pre(l, x[l].float() / self.scale_in[l], dtype), k)[0]
            for l in range(self.n_layers)])

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Parameters, Adam moments and counters, for a checkpoint."""
        return {**adam_tensors(self.opt, self.params), "scale_in": self.scale_in,
                "scale_out": self.scale_out, "since_fired": self.since_fired}

    @classmethod
    def from_state_tensors(cls, tensors: dict, lr: float, device: str) -> "TopKTranscoders":
        """Rebuild from ``state_tensors`` output."""
        t = {n: v.to(device) for n, v in tensors.items()}
        state = cls({n: t[n] for n in PARAMS}, t["scale_in"], t["scale_out"], t["since_fired"], lr)
        restore_adam(state.opt, state.params, tensors, device)
        return state


def adam_tensors(opt: torch.optim.Adam, params: dict) -> dict[str, torch.Tensor]:
    """The named ``params`` and their Adam moments (``adam.<name>.<key>``), for a checkpoint."""
    out = {n: p.detach() for n, p in params.items()}
    for n, p in params.items():
        for key, value in opt.state.get(p, {}).items():
            out[f"adam.{n}.{key}"] = value
    return out


def restore_adam(opt: torch.optim.Adam, params: dict, tensors: dict, device: str) -> None:
    """Put the Adam moments of ``adam_tensors`` output back into ``opt``."""
    for n, p in params.items():
        moments = {key.rsplit(".", 1)[1]: v for key, v in tensors.items()
                   if key.startswith(f"adam.{n}.")}
        if moments:
            opt.state[p] = {key: v.to(device) if key != "step" else v
                            for key, v in moments.items()}


def _scales(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer ``scale_in`` (RMS of ``x``) and ``scale_out`` (RMS of ``y`` around its mean)
    of a sample ``x, y [L, N, d]``, one layer at a time."""
    scale_in = torch.stack([x[l].float().pow(2).mean().sqrt() for l in range(len(x))])
    scale_out = torch.stack([(y[l].float() - y[l].float().mean(0)).pow(2).mean().sqrt()
                             for l in range(len(y))])
    return scale_in, scale_out


def _ridge(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``W [d_out, d_in], b [d_out]`` minimizing ``|y - x W^T - b|^2 + lam |W|^2`` for
    ``x, y [N, d]``."""
    x, y = x.double(), y.double()
    x_mean, y_mean = x.mean(0), y.mean(0)
    xc, yc = x - x_mean, y - y_mean
    cov = xc.T @ xc
    lam = RIDGE * cov.diagonal().mean()
    eye = torch.eye(x.shape[-1], dtype=cov.dtype, device=x.device)
    W = torch.linalg.solve(cov + lam * eye, xc.T @ yc).T
    return W.float(), (y_mean - W @ x_mean).float()


# --------------------------------------------------------------------------- export


def to_jumprelu(state: TopKTranscoders, i: int, x: torch.Tensor, y: torch.Tensor, k: int,
                metadata: dict) -> tuple[SAE, dict]:
    """Layer ``i`` of ``state`` as an SAE-Lens ``JumpReLUSkipTranscoder`` (float32, CPU).

    Weights are rounded to bfloat16 (as saved) before the thresholds are set, on the raw
    calibration activations ``x, y [N, d]``, so that each feature fires on as many tokens
    as the TopK selected it.

    Returns:
        The transcoder and calibration stats: ``fvu_topk``, ``fvu_jumprelu``,
        ``l0_jumprelu``, ``dead_share`` (features the JumpReLU never fires on the sample).
    """
    p = {n: v[i].detach().float().cpu() for n, v in state.params.items()}
    s_in, s_out = float(state.scale_in[i]), float(state.scale_out[i])
    # Real space, activations scaled by s_out so decoder rows keep unit norm.
    w = {"W_enc": p["W_enc"].T * (s_out / s_in), "b_enc": p["b_enc"] * s_out,
         "W_dec": p["W_dec"], "W_skip": p["W_skip"] * (s_out / s_in), "b_dec": p["b_dec"] * s_out}
    w = {n: v.to(torch.bfloat16).float() if v.ndim == 2 else v for n, v in w.items()}
    x, y = x.float().cpu(), y.float().cpu()
    pre = x @ w["W_enc"] + w["b_enc"]
    w["threshold"], topk = matching_thresholds(pre, k)
    jump = jump_active(pre, w["threshold"])
    base = x @ w["W_skip"].T + w["b_dec"] - y
    variance = (y - y.mean(0)).pow(2).sum()

    def fvu(a: Active) -> float:
        return float((_decode(a, a.pre.relu(), w["W_dec"]) + base).pow(2).sum() / variance)

    d_sae, d = w["W_dec"].shape
    sae = SAE.from_dict({"architecture": "jumprelu_skip_transcoder", "d_in": d, "d_sae": d_sae,
                         "d_out": d, "dtype": "float32", "device": "cpu",
                         "apply_b_dec_to_input": False, "metadata": metadata})
    sae.load_state_dict({n: v.contiguous() for n, v in w.items()})
    stats = {"fvu_topk": fvu(topk), "fvu_jumprelu": fvu(jump),
             "l0_jumprelu": len(jump.feats) / len(x),
             "dead_share": 1 - len(jump.feats.unique()) / d_sae}
    return sae, stats


def save_transcoder(sae: SAE, folder: Path) -> None:
    """``sae.save_model(folder)`` with matrices stored in bfloat16 (cfg dtype stays float32)."""
    def to_bf16(state_dict):
        for name, value in state_dict.items():
            if value.ndim == 2:
                state_dict[name] = value.to(torch.bfloat16)

    sae.process_state_dict_for_saving = to_bf16
    sae.save_model(folder)


def _replace_dir(tmp: Path, dest: Path) -> None:
    """Move the folder ``tmp`` to ``dest``, replacing an existing ``dest``."""
    trash = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(trash, ignore_errors=True)
    if dest.exists():
        dest.rename(trash)
    tmp.rename(dest)
    shutil.rmtree(trash, ignore_errors=True)


@contextmanager
def _disk_errors(path: Path, keeps: str):
    """Turn a full disk while writing ``path`` into a CircuitlabError."""
    try:
        yield
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        raise CircuitlabError(
            f"No space left on the device while writing {path}. Free some space or pass another "
            f"out_dir/checkpoint_dir, then run again with resume=True; {keeps}"
        ) from err


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], settings,
                    counters: dict) -> None:
    """Write ``folder/state.safetensors`` (``tensors``; the ``settings`` dataclass and
    ``counters`` in its metadata) atomically, and ``folder/settings.json`` for people."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CHECKPOINT_FILE
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{CHECKPOINT_FILE}.")
    os.close(fd)
    meta = {"settings": json.dumps(dataclasses.asdict(settings)), "counters": json.dumps(counters)}
    with _disk_errors(path, "the previous checkpoint is intact."):
        try:
            save_file({n: t.contiguous().cpu() for n, t in tensors.items()}, tmp, metadata=meta)
            Path(tmp).replace(path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    with _disk_errors(folder / "settings.json", "the checkpoint itself was written."):
        atomic_write_text(folder / "settings.json",
                          json.dumps({**dataclasses.asdict(settings), **counters}, indent=1))


def load_checkpoint(folder: Path, settings) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, counters)`` from ``folder``; raises if the checkpoint's settings differ
    from the ``settings`` dataclass."""
    with safe_open(folder / CHECKPOINT_FILE, framework="pt") as f:
        meta = f.metadata()
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    saved = {n: tuple(v) if isinstance(v, list) else v
             for n, v in json.loads(meta["settings"]).items()}
    diff = [f"{n}: checkpoint {saved.get(n)!r}, now {v!r}"
            for n, v in dataclasses.asdict(settings).items() if saved.get(n) != v]
    if diff:
        raise CircuitlabError(
            f"The checkpoint in {folder} was made with other settings ({'; '.join(diff)}). "
            "Pass the same settings to resume, or start afresh with another out_dir or "
            "resume=False."
        )
    return tensors, json.loads(meta["counters"])


def export_layers(saes: dict[int, SAE], out_dir: Path) -> dict[str, str]:
    """Write each ``saes[layer]`` to ``out_dir/layer_XX/`` (``save_transcoder``; each folder
    swapped in whole, so an interrupted export leaves the previous one intact).

    Returns:
        ``{"layer_XX/file": sha256}`` for a manifest.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".layer_*"):  # left by an interrupted export
        shutil.rmtree(stale)
    files = {}
    for layer, sae in saes.items():
        folder = out_dir / f"layer_{layer:02d}"
        tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{folder.name}."))
        with _disk_errors(folder, "the previous export of this layer is intact."):
            try:
                save_transcoder(sae, tmp)
                _replace_dir(tmp, folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        for f in sorted(folder.iterdir()):
            files[f"{folder.name}/{f.name}"] = sha256(f)
    return files


def write_manifest(out_dir: Path, manifest: dict) -> None:
    """Write ``out_dir/manifest.json`` atomically (last, after the layer folders)."""
    with _disk_errors(out_dir / "manifest.json", "the previous manifest is intact."):
        atomic_write_text(out_dir / "manifest.json", json.dumps(manifest, indent=1))


# --------------------------------------------------------------------------- training


def _check_args(model: HookedTransformer, layers: list[int], width: int, k: int, aux_k: int,
                jumprelu_share: float, tokens: int, context: int, batch_tokens: int,
                buffer_tokens: int, passes: int) -> None:
    n = model.cfg.n_layers
    problems = []
    if not layers or any(not 0 <= l < n for l in layers) or len(set(layers)) != len(layers):
        problems.append(f"layers={layers} must be distinct layers of the model, 0..{n - 1}")
    if not 1 <= k < width:
        problems.append(f"width={width}, k={k}: need 1 <= k < width")
    if aux_k < 0:
        problems.append(f"aux_k={aux_k} must be >= 0")
    if not 0 <= jumprelu_share <= 1:
        problems.append(f"jumprelu_share={jumprelu_share} must be in [0, 1]")
    if tokens < 1:
        problems.append(f"tokens={tokens} must be >= 1")
    if not 2 <= context <= model.cfg.n_ctx:
        problems.append(f"context={context} must be in 2..{model.cfg.n_ctx} (the model's n_ctx)")
    if batch_tokens < 1 or buffer_tokens < batch_tokens:
        problems.append(f"need 1 <= batch_tokens ({batch_tokens}) <= buffer_tokens "
                        f"({buffer_tokens})")
    if passes < 1:
        problems.append(f"passes={passes} must be >= 1")
    if problems:
        raise CircuitlabError("Bad training arguments: " + "; ".join(problems) + ".")


def _lr_at(lr: float, progress: float) -> float:
    """Linear warm-up over the first 2% of training, linear decay to 0 over the last 20%."""
    return lr * min(1.0, (progress + 1e-3) / 0.02, (1 - progress) / 0.2)


def train_transcoders(
    model: HookedTransformer,
    corpus,
    out_dir,
    *,
    layers=None,
    width: int = 2048,
    k: int = 32,
    tokens: int = 2_000_000,
    time_budget: float | None = None,
    context: int = 128,
    batch_tokens: int = 4096,
    buffer_tokens: int = 65_536,
    passes: int = 1,
    lr: float = 3e-3,
    aux_k: int = 64,
    dead_tokens: int = 50_000,
    jumprelu_share: float = 0.1,
    device: str = "cpu",
    bf16: bool | None = None,
    seed: int = 0,
    checkpoint_every: float = 600.0,
    checkpoint_dir=None,
    resume: bool = True,
    init_from=None,
    progress: bool = True,
    command: str | None = None,
) -> Path:
    """Train TopK skip transcoders on ``model``'s MLPs and export SAE-Lens JumpReLU ones.

    Args:
        model: the HookedTransformer (on any device; left unchanged).
        corpus: text for ``iter_documents`` (a built corpus, .txt, .jsonl, a folder).
        out_dir: output folder: ``layer_XX/`` SAE-Lens folders and ``manifest.json``.
        layers: layers to train (default all).
        width: features per layer.
        k: features active per token (TopK).
        tokens: budget of training tokens (BOS positions not counted; a token trained on in
            two passes counts twice), over all resumed runs.
        time_budget: wall-clock budget in seconds over all resumed runs (None: no limit).
        context: row length in tokens, BOS included.
        batch_tokens: tokens per optimizer step.
        buffer_tokens: size of the shuffled activation buffer.
        passes: times each buffer is trained on (reshuffled each time). On a CPU the model
            forward costs about as much as a pass of training, so 2 passes nearly double
            the optimizer steps per hour, each token being seen twice.
        lr: peak Adam learning rate.
        aux_k: dead features used by the AuxK loss per token (0 disables it).
        dead_tokens: a feature not selected in this many tokens counts as dead.
        jumprelu_share: the last share of training (by tokens or time, whichever is
            further along) runs the JumpReLU that will be exported instead of the TopK,
            with thresholds re-matched to the TopK firing counts on every buffer, so the
            weights adapt to its variable number of active features per token.
        device: where the transcoders train ("cpu", "cuda", ...).
        bf16: run the dense encoder and skip products in bfloat16 and keep the
            activation buffer in bfloat16 (master weights stay float32). None: where
            bf16 is fast (``fast_bf16``); a CPU without AVX-512 BF16 emulates it at
            about a quarter of float32's speed.
        seed: seed of the initialization and the shuffles.
        checkpoint_every: seconds between checkpoints (each also exports the bundle);
            checkpoints are taken when a buffer is used up.
        checkpoint_dir: checkpoint folder (default ``out_dir/checkpoint``).
        resume: continue from the checkpoint if there is one.
        init_from: warm start from exported transcoders of the same width (a folder of
            ``layer_XX/`` SAE-Lens folders, e.g. an earlier ``out_dir`` or the bundle)
            instead of the exemplar initialization. If its ``manifest.json`` says how many
            tokens it read from the same corpus with the same ``context``, training goes
            on from there, so it sees new text. Adam starts afresh: pass a lower ``lr``.
            The new manifest keeps the earlier one's command and budgets.
        progress: show a progress bar with tokens/s and the mean FVU over layers.
        command: the command to record in the manifest (default: a description of
            this call).

    Returns:
        ``out_dir``.

    Raises:
        CircuitlabError: for bad arguments, a corpus without usable text, a checkpoint
            with other settings, or a full disk.
    """
    layers = list(range(model.cfg.n_layers)) if layers is None else [int(l) for l in layers]
    bf16 = fast_bf16(device) if bf16 is None else bf16
    _check_args(model, layers, width, k, aux_k, jumprelu_share, tokens, context, batch_tokens,
                buffer_tokens, passes)
    out_dir = Path(out_dir).expanduser()
    if init_from is not None:
        init_from = Path(init_from).expanduser().resolve()
        earlier = _check_init_from(init_from, layers, width, model.cfg.d_model)
    ckpt_dir = out_dir / "checkpoint" if checkpoint_dir is None else Path(checkpoint_dir)
    settings = Settings(
        model_name=model.cfg.model_name, n_layers=model.cfg.n_layers, d_model=model.cfg.d_model,
        layers=tuple(layers), width=width, k=k, aux_k=aux_k, dead_tokens=dead_tokens,
        context=context, batch_tokens=batch_tokens, buffer_tokens=buffer_tokens, passes=passes,
        lr=lr, jumprelu_share=jumprelu_share, bf16=bf16, seed=seed,
        corpus=str(Path(corpus).expanduser().resolve()),
        init_from=None if init_from is None else str(init_from))
    command = command or (
        f"train_transcoders({settings.model_name!r}, {settings.corpus!r}, {str(out_dir)!r}, "
        f"tokens={tokens}, time_budget={time_budget}, device={device!r}, "
        + ", ".join(f"{n}={v!r}" for n, v in dataclasses.asdict(settings).items()
                    if n not in ("model_name", "n_layers", "d_model", "corpus")) + ")")
    history = None
    if init_from is not None:
        history = {"path": str(init_from), **{n: earlier[n] for n in _HISTORY if n in earlier}}
    state, counters = None, {"tokens_seen": 0, "steps": 0, "seconds": 0.0, "buffers": 0,
                             "docs_done": 0, "pending": []}
    if resume and (ckpt_dir / CHECKPOINT_FILE).exists():
        tensors, counters = load_checkpoint(ckpt_dir, settings)
        state = TopKTranscoders.from_state_tensors(tensors, settings.lr, device)
    run = _Run(model, settings, state, counters, out_dir, ckpt_dir, device, tokens,
               time_budget, checkpoint_every, command, history)
    if state is None and history is not None and earlier.get("settings", {}).get(
            "corpus") == settings.corpus and earlier["settings"].get("context") == context:
        run.skip_rows(earlier.get("tokens_read", 0) // (context - 1))
    return run.train(progress)


_HISTORY = ("command", "tokens_seen", "tokens_read", "steps", "seconds", "init_from")


def _check_init_from(folder: Path, layers: list[int], width: int, d_model: int) -> dict:
    """Check that ``folder`` holds transcoders to warm-start ``layers`` at ``width``;
    return its ``manifest.json`` (empty if it has none)."""
    problems = []
    for layer in layers:
        cfg_path = folder / f"layer_{layer:02d}" / "cfg.json"
        if not cfg_path.is_file():
            problems.append(f"{cfg_path} is missing")
            continue
        cfg = json.loads(cfg_path.read_text())
        if (cfg.get("d_sae"), cfg.get("d_in")) != (width, d_model):
            problems.append(f"layer {layer} has d_sae={cfg.get('d_sae')}, d_in={cfg.get('d_in')}")
    if problems:
        raise CircuitlabError(
            f"Cannot warm-start from {folder}: {'; '.join(problems[:3])}. It needs one "
            f"layer_XX/ SAE-Lens folder per trained layer with d_sae={width} (pass its width) "
            f"and d_in={d_model} (the model's d_model)."
        )
    manifest = folder / "manifest.json"
    return json.loads(manifest.read_text()) if manifest.is_file() else {}


class Budgets:
    """Token and time budgets over resumed sessions, for a run with ``counters["tokens_seen"]``,
    ``tokens``, ``time_budget``, ``seconds_before`` (earlier sessions), ``started``
    (``time.monotonic()`` at this session's start) and ``stopped``."""

    def seconds(self) -> float:
        return self.seconds_before + time.monotonic() - self.started

    def progress(self) -> float:
        """The share of the budget used, by tokens or time, whichever is further along."""
        done = self.counters["tokens_seen"] / self.tokens
        if self.time_budget:
            done = max(done, self.seconds() / self.time_budget)
        return min(done, 1.0)

    def budget_reached(self) -> bool:
        """Whether the token or time budget is used up (then ``stopped`` says which)."""
        if self.counters["tokens_seen"] >= self.tokens:
            self.stopped = "tokens"
        elif self.time_budget is not None and self.seconds() >= self.time_budget:
            self.stopped = "time"
        return self.stopped is not None


class _Run(Budgets):
    """One training session: the loop, its budgets, checkpoints and exports."""

    def __init__(self, model, settings: Settings, state, counters: dict, out_dir: Path,
                 ckpt_dir: Path, device: str, tokens: int, time_budget, checkpoint_every,
                 command: str, history: dict | None):
        self.model, self.s, self.state, self.counters = model, settings, state, counters
        self.out_dir, self.ckpt_dir, self.device = out_dir, ckpt_dir, device
        self.tokens, self.time_budget, self.checkpoint_every = tokens, time_budget, checkpoint_every
        self.command, self.history = command, history
        self.dtype = torch.bfloat16 if settings.bf16 else torch.float32
        self.started = time.monotonic()
        self.seconds_before = counters["seconds"]
        self.rows = TokenRows(model.tokenizer, settings.corpus, settings.context,
                              docs_done=counters["docs_done"], pending=counters["pending"])
        self.sample = None
        self.stopped = None

    def skip_rows(self, n_rows: int) -> None:
        """Skip the first ``n_rows`` rows of the corpus (read by the run warm-started from)."""
        self.rows.skip(n_rows)
        self.counters.update(docs_done=self.rows.docs_done, pending=self.rows.pending)

    def train(self, show: bool) -> Path:
        if self.budget_reached() and (self.out_dir / "manifest.json").exists():
            return self.out_dir
        bar = tqdm(total=self.tokens, initial=min(self.counters["tokens_seen"], self.tokens),
                   unit="tok", unit_scale=True, disable=not show, desc="Training transcoders")
        last_checkpoint = time.monotonic()
        while (self.state is None or not self.budget_reached()) and self._train_buffer(bar):
            if time.monotonic() - last_checkpoint >= self.checkpoint_every:
                self.save()
                last_checkpoint = time.monotonic()
        bar.close()
        self.save()
        return self.out_dir

    def _fill(self, rows: TokenRows, number: int):
        """Buffer ``number``: ``x, y [L, N, d]`` from ``rows`` and one shuffle ``[N]`` per
        pass (None at the end of the corpus). Keeps a calibration sample of it."""
        s = self.s
        tokens = rows.take(max(1, s.buffer_tokens // (s.context - 1)))
        if not len(tokens):
            return None
        x, y = activation_buffer(self.model, tokens, list(s.layers),
                                 max(1, s.batch_tokens // s.context), self.dtype, self.device)
        gen = torch.Generator().manual_seed(s.seed * 1_000_003 + number)
        perms = [torch.randperm(x.shape[1], generator=gen).to(x.device) for _ in range(s.passes)]
        self.sample = (x[:, perms[0][:CALIBRATION_TOKENS]], y[:, perms[0][:CALIBRATION_TOKENS]])
        return x, y, perms

    def _train_buffer(self, bar) -> bool:
        """Fill the buffer and train on it; False when the corpus is used up."""
        s, c = self.s, self.counters
        filled = self._fill(self.rows, c["buffers"])
        if filled is None:
            if self.state is None:
                raise CircuitlabError(
                    f"The corpus {s.corpus} has fewer than {s.context - 1} tokens after the "
                    f"{c['docs_done']} documents already used; add text or lower context."
                )
            self.stopped = "corpus"
            warnings.warn(f"The corpus ran out after {c['tokens_seen']} training tokens.")
            return False
        x, y, perms = filled
        c.update(docs_done=self.rows.docs_done, pending=self.rows.pending, buffers=c["buffers"] + 1,
                 tokens_read=c.get("tokens_read", 0) + x.shape[1])
        if self.state is None and s.init_from is not None:
            self.state = TopKTranscoders.from_bundle(Path(s.init_from), list(s.layers),
                                                     *self.sample, s.lr)
        elif self.state is None:
            self.state = TopKTranscoders.init(*self.sample, s.width, s.k, s.lr, s.seed)
        if self.progress() >= 1 - s.jumprelu_share:
            self.state.calibrate(self.sample[0], s.k, self.dtype)
        size = min(s.batch_tokens, x.shape[1])
        batches = [perm[start:start + size] for perm in perms
                   for start in range(0, len(perm) - size + 1, size)]
        for idx in batches:
            if self.budget_reached():
                break
            fvu = self.state.step(x[:, idx], y[:, idx], s.k, s.aux_k, s.dead_tokens,
                                  _lr_at(s.lr, self.progress()), self.dtype)
            c["tokens_seen"] += size
            c["steps"] += 1
            dead = (self.state.since_fired >= s.dead_tokens).float().mean()
            bar.update(size)
            bar.set_postfix(fvu=f"{fvu.mean():.3f}", dead=f"{dead:.1%}", refresh=False)
        return True

    def save(self) -> None:
        """Export the bundle, then write the checkpoint."""
        if self.sample is None:  # nothing trained in this session: calibrate on the first rows
            self._fill(TokenRows(self.model.tokenizer, self.s.corpus, self.s.context), 0)
        self.counters["seconds"] = self.seconds()
        self.export()
        save_checkpoint(self.ckpt_dir, self.state.state_tensors(), self.s, self.counters)

    def export(self) -> None:
        """Write ``layer_XX/`` folders (each swapped in whole) and then ``manifest.json``."""
        s, c = self.s, self.counters
        x, y = self.sample
        saes, stats = {}, {}
        for i, layer in enumerate(s.layers):
            meta = {"model_name": s.model_name,
                    "hook_name": f"blocks.{layer}.hook_mlp_in",
                    "hook_name_out": f"blocks.{layer}.hook_mlp_out",
                    "hf_hook_name": f"model.layers.{layer}.pre_feedforward_layernorm.output",
                    "hf_hook_name_out": f"model.layers.{layer}.post_feedforward_layernorm.output",
                    "training": {"trainer": "circuitlab TopK skip transcoder -> JumpReLU",
                                 "tokens_seen": c["tokens_seen"], "k": s.k, "width": s.width}}
            saes[layer], stats[layer] = to_jumprelu(self.state, i, x[i], y[i], s.k, meta)
            saes[layer].cfg.metadata.training.update(calibration=stats[layer])
        files = export_layers(saes, self.out_dir)
        manifest = {
            "sha256": files, "command": self.command, "tokens_seen": c["tokens_seen"],
            "tokens_read": c.get("tokens_read", 0),
            "steps": c["steps"], "seconds": round(c["seconds"], 1),
            "tokens_per_second": round(c["tokens_seen"] / max(c["seconds"], 1e-9), 1),
            "stopped": self.stopped, "settings": dataclasses.asdict(s),
            "calibration": {str(l): v for l, v in stats.items()},
        }
        if self.history is not None:
            manifest["init_from"] = self.history
        write_manifest(self.out_dir, manifest)
