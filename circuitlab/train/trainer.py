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
(per-feature quantile matching). Folders ``out_dir/layer_XX/`` hold ``cfg.json`` and
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
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from sae_lens import SAE
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from circuitlab.loading import CircuitlabError, atomic_write_text, sha256
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
    lr: float
    bf16: bool
    seed: int
    corpus: str


# --------------------------------------------------------------------------- data


class TokenRows:
    """Packs a corpus into rows of ``context`` token ids, each starting with BOS.

    Documents are tokenized without special tokens and joined with EOS (when the tokenizer
    has one); each row is BOS followed by the next ``context - 1`` tokens of that stream.
    The position in the stream (documents read, tokens pending) can be saved and restored.

    Args:
        tokenizer: a Hugging Face tokenizer with a BOS token.
        corpus: anything ``iter_documents`` reads.
        context: row length, BOS included.
        split: corpus split.
        docs_done: documents to skip (already consumed by an earlier run).
        pending: tokens read from the stream but not yet placed in a row.
    """

    def __init__(self, tokenizer, corpus, context: int, split: str = "train",
                 docs_done: int = 0, pending: list[int] | None = None):
        if tokenizer is None or tokenizer.bos_token_id is None:
            raise CircuitlabError(
                "The model has no tokenizer with a BOS token; load it with its tokenizer "
                "(circuitlab.loading.load_model does)."
            )
        self.tokenizer, self.context = tokenizer, context
        self.docs_done, self.pending = docs_done, list(pending or [])
        self._docs = itertools.islice(iter_documents(corpus, split), docs_done, None)

    def take(self, n_rows: int) -> torch.Tensor:
        """Up to ``n_rows`` rows ``[n, context]`` (fewer, or none, at the end of the corpus)."""
        width, rows = self.context - 1, []
        eos = [] if self.tokenizer.eos_token_id is None else [self.tokenizer.eos_token_id]
        while len(rows) < n_rows:
            while len(self.pending) < width:
                text = next(self._docs, None)
                if text is None:
                    return self._stack(rows)
                self.pending += self.tokenizer(text, add_special_tokens=False)["input_ids"] + eos
                self.docs_done += 1
            rows.append([self.tokenizer.bos_token_id] + self.pending[:width])
            self.pending = self.pending[width:]
        return self._stack(rows)

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


def _decode(idx: torch.Tensor, acts: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """``sum_j acts[t, j] W_dec[idx[t, j]]`` for each token ``t``: ``[B, d]``."""
    return F.embedding_bag(idx, W_dec, per_sample_weights=acts, mode="sum")


def _gather_dot(idx: torch.Tensor, g: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``W[idx[t, j]] . g[t]`` for each token ``t`` and slot ``j``: ``[B, k]``.

    ``idx`` must be sorted along its rows (CSR column order).
    """
    B, k = idx.shape
    crow = torch.arange(0, B * k + 1, k, device=idx.device)
    mask = _csr(crow, idx.reshape(-1), torch.zeros(B * k, device=idx.device), (B, W.shape[0]))
    return torch.sparse.sampled_addmm(mask, g, W.T).values().view(B, k)


def _scatter_rows(feats: torch.Tensor, toks: torch.Tensor, weights: torch.Tensor,
                  rows: torch.Tensor, n_out: int) -> torch.Tensor:
    """``out[f] = sum of weights[i] * rows[toks[i]] over i with feats[i] == f``: ``[n_out, d]``."""
    order = feats.argsort(stable=True)
    crow = torch.zeros(n_out + 1, dtype=torch.long, device=feats.device)
    crow[1:] = torch.bincount(feats, minlength=n_out).cumsum(0)
    return _csr(crow, toks[order], weights[order], (n_out, rows.shape[0])) @ rows


def _csr(crow, col, values, size) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


def _topk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k values (float32) and indices of each row, indices sorted within each row."""
    vals, idx = pre.topk(k, dim=1, sorted=False)
    idx, order = idx.sort(dim=1, stable=True)
    return vals.gather(1, order).float(), idx


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
        self.opt = torch.optim.Adam(self.params.values(), lr=lr)

    @classmethod
    def init(cls, x: torch.Tensor, y: torch.Tensor, width: int, k: int, lr: float,
             seed: int) -> "TopKTranscoders":
        """Initialize from a first buffer ``x, y [L, N, d]``.

        ``W_skip, b_dec``: ridge fit of ``y`` on ``x``. ``W_dec``: random unit rows;
        ``W_enc = W_dec``, scaled so that the initial reconstruction of the skip residual
        is least-squares optimal; ``b_enc`` centers the input.
        """
        x, y = x.float(), y.float()
        L, N, d = x.shape
        scale_in = x.pow(2).mean((1, 2)).sqrt()
        scale_out = (y - y.mean(1, keepdim=True)).pow(2).mean((1, 2)).sqrt()
        x, y = x / scale_in[:, None, None], y / scale_out[:, None, None]
        W_skip, b_dec = _ridge(x, y)
        resid = y - x @ W_skip.transpose(1, 2) - b_dec[:, None]
        gen = torch.Generator().manual_seed(seed)
        W_dec = F.normalize(torch.randn(L, width, d, generator=gen), dim=-1).to(x.device)
        b_enc = -torch.einsum("ld,lfd->lf", x.mean(1), W_dec)
        state = cls({"W_enc": W_dec.clone(), "b_enc": b_enc, "W_dec": W_dec,
                     "W_skip": W_skip, "b_dec": b_dec},
                    scale_in, scale_out,
                    torch.zeros(L, width, dtype=torch.long, device=x.device), lr)
        with torch.no_grad():
            for l in range(L):
                vals, idx = _topk(state.pre(l, x[l], torch.float32), k)
                recon = _decode(idx, vals.relu(), W_dec[l])
                gain = (recon * resid[l]).sum() / recon.pow(2).sum().clamp(min=1e-12)
                state.params["W_enc"][l] *= gain.clamp(min=1e-2)
                state.params["b_enc"][l] *= gain.clamp(min=1e-2)
        return state

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
        vals, idx = _topk(pre, k)
        acts = vals.relu()
        x_c = x.to(dtype)
        skip = (x_c @ p["W_skip"][l].to(dtype).T).float()
        err = _decode(idx, acts, W_dec) + skip + p["b_dec"][l] - y
        grad_out = err * (2 / (B * d))
        grad_acts = _gather_dot(idx, grad_out, W_dec) * (vals > 0)
        toks = torch.arange(B, device=x.device).repeat_interleave(k)
        feats, enc_toks, dec_toks = idx.reshape(-1), toks, toks
        enc_w, dec_w, dec_rows = grad_acts.reshape(-1), acts.reshape(-1), grad_out
        n_aux = min(aux_k, int(dead.sum()))
        if n_aux:
            aux_vals, aux_idx = _topk(pre.masked_fill(~dead, -math.inf), n_aux)
            aux_acts = aux_vals.relu()
            target = -err
            denom = (target - target.mean(0)).pow(2).sum().clamp(min=1e-12)
            aux_grad_out = (_decode(aux_idx, aux_acts, W_dec) - target) * (2 * AUX_COEF / denom)
            aux_grad_acts = _gather_dot(aux_idx, aux_grad_out, W_dec) * (aux_vals > 0)
            aux_toks = torch.arange(B, device=x.device).repeat_interleave(n_aux)
            feats = torch.cat([feats, aux_idx.reshape(-1)])
            enc_toks = torch.cat([enc_toks, aux_toks])
            dec_toks = torch.cat([dec_toks, aux_toks + B])
            enc_w = torch.cat([enc_w, aux_grad_acts.reshape(-1)])
            dec_w = torch.cat([dec_w, aux_acts.reshape(-1)])
            dec_rows = torch.cat([dec_rows, aux_grad_out])
        width = W_dec.shape[0]
        p["W_enc"].grad[l] = _scatter_rows(feats, enc_toks, enc_w, x, width)
        p["b_enc"].grad[l] = torch.bincount(feats, enc_w, minlength=width)
        p["W_dec"].grad[l] = _scatter_rows(feats, dec_toks, dec_w, dec_rows, width)
        p["W_skip"].grad[l] = (grad_out.T.to(dtype) @ x_c).float()
        p["b_dec"].grad[l] = grad_out.sum(0)
        self.since_fired[l] += B
        self.since_fired[l, idx[vals > 0]] = 0
        return float(err.pow(2).sum() / (B * d))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Parameters, Adam moments and counters, for a checkpoint."""
        out = {n: p.detach() for n, p in self.params.items()}
        for n, p in self.params.items():
            for key, value in self.opt.state.get(p, {}).items():
                out[f"adam.{n}.{key}"] = value
        out.update(scale_in=self.scale_in, scale_out=self.scale_out,
                   since_fired=self.since_fired)
        return {n: t.contiguous().cpu() for n, t in out.items()}

    @classmethod
    def from_state_tensors(cls, tensors: dict, lr: float, device: str) -> "TopKTranscoders":
        """Rebuild from ``state_tensors`` output."""
        t = {n: v.to(device) for n, v in tensors.items()}
        state = cls({n: t[n] for n in PARAMS}, t["scale_in"], t["scale_out"], t["since_fired"], lr)
        for n, p in state.params.items():
            moments = {key.rsplit(".", 1)[1]: v for key, v in tensors.items()
                       if key.startswith(f"adam.{n}.")}
            if moments:
                state.opt.state[p] = {key: v.to(device) if key != "step" else v
                                      for key, v in moments.items()}
        return state


def _ridge(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer, ``W [d_out, d_in], b [d_out]`` minimizing ``|y - x W^T - b|^2 + lam |W|^2``."""
    x, y = x.double(), y.double()
    x_mean, y_mean = x.mean(1, keepdim=True), y.mean(1, keepdim=True)
    xc, yc = x - x_mean, y - y_mean
    cov = xc.transpose(1, 2) @ xc
    lam = RIDGE * cov.diagonal(dim1=1, dim2=2).mean(1)
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    W = torch.linalg.solve(cov + lam[:, None, None] * eye, xc.transpose(1, 2) @ yc).transpose(1, 2)
    b = y_mean[:, 0] - (x_mean @ W.transpose(1, 2))[:, 0]
    return W.float(), b.float()


# --------------------------------------------------------------------------- export


def to_jumprelu(state: TopKTranscoders, i: int, x: torch.Tensor, y: torch.Tensor, k: int,
                metadata: dict) -> tuple[SAE, dict]:
    """Layer ``i`` of ``state`` as an SAE-Lens ``JumpReLUSkipTranscoder`` (float32, CPU).

    Weights are rounded to bfloat16 (as saved) before the thresholds are set, on the raw
    calibration activations ``x, y [N, d]``, so that each feature fires on as many tokens
    as the TopK selected it.

    Returns:
        The transcoder and calibration stats: ``fvu_topk``, ``fvu_jumprelu``,
        ``l0_jumprelu``, ``dead_share`` (features the TopK never selected).
    """
    p = {n: v[i].detach().float().cpu() for n, v in state.params.items()}
    s_in, s_out = float(state.scale_in[i]), float(state.scale_out[i])
    # Real space, activations scaled by s_out so decoder rows keep unit norm.
    weights = {"W_enc": p["W_enc"].T * (s_out / s_in), "b_enc": p["b_enc"] * s_out,
               "W_dec": p["W_dec"], "W_skip": p["W_skip"] * (s_out / s_in),
               "b_dec": p["b_dec"] * s_out}
    weights = {n: _bf16_round(w) if w.ndim == 2 else w for n, w in weights.items()}
    d_sae, d = weights["W_dec"].shape
    sae = SAE.from_dict({"architecture": "jumprelu_skip_transcoder", "d_in": d, "d_sae": d_sae,
                         "d_out": d, "dtype": "float32", "device": "cpu",
                         "apply_b_dec_to_input": False, "metadata": metadata})
    x, y = x.float().cpu(), y.float().cpu()
    pre = x @ weights["W_enc"] + weights["b_enc"]
    vals, idx = _topk(pre, k)
    acts = torch.zeros_like(pre).scatter_(1, idx, vals.relu())
    counts = torch.bincount(idx[vals > 0], minlength=d_sae)
    weights["threshold"] = _matching_thresholds(pre, counts)
    sae.load_state_dict({n: w.contiguous() for n, w in weights.items()})
    with torch.no_grad():
        jr_acts = sae.encode(x)
        fvu_topk = _fvu(sae.decode(acts) + x @ sae.W_skip.T, y)
        fvu_jr = _fvu(sae.decode(jr_acts) + x @ sae.W_skip.T, y)
    stats = {"fvu_topk": fvu_topk, "fvu_jumprelu": fvu_jr,
             "l0_jumprelu": float((jr_acts > 0).sum(1).float().mean()),
             "dead_share": float((counts == 0).float().mean())}
    return sae, stats


def _bf16_round(w: torch.Tensor) -> torch.Tensor:
    return w.to(torch.bfloat16).float()


def _matching_thresholds(pre: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per feature, a threshold that ``counts[f]`` of the values ``pre[:, f]`` exceed.

    It lies halfway between the ``counts[f]``-th and the next largest value; features
    never selected get the largest value (they do not fire on the sample). Clamped at 0.
    """
    desc = pre.sort(dim=0, descending=True).values
    n = pre.shape[0]
    upper = desc.gather(0, (counts - 1).clamp(min=0)[None])[0]
    lower = desc.gather(0, counts.clamp(max=n - 1)[None])[0]
    return torch.where(counts > 0, (upper + lower) / 2, desc[0]).clamp(min=0)


def _fvu(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float((pred - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


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


def save_checkpoint(folder: Path, state: TopKTranscoders, settings: Settings,
                    counters: dict) -> None:
    """Write ``folder/state.safetensors`` (tensors; settings and counters in its metadata)
    atomically, and ``folder/settings.json`` for people."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CHECKPOINT_FILE
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{CHECKPOINT_FILE}.")
    os.close(fd)
    meta = {"settings": json.dumps(dataclasses.asdict(settings)), "counters": json.dumps(counters)}
    with _disk_errors(path, "the previous checkpoint is intact."):
        try:
            save_file(state.state_tensors(), tmp, metadata=meta)
            Path(tmp).replace(path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    with _disk_errors(folder / "settings.json", "the checkpoint itself was written."):
        atomic_write_text(folder / "settings.json",
                          json.dumps({**dataclasses.asdict(settings), **counters}, indent=1))


def load_checkpoint(folder: Path, settings: Settings, device: str):
    """``(state, counters)`` from ``folder``; raises if its settings differ from ``settings``."""
    path = folder / CHECKPOINT_FILE
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    saved = json.loads(meta["settings"])
    ours = dataclasses.asdict(settings)
    saved["layers"] = tuple(saved["layers"])
    diff = [f"{n}: checkpoint {saved.get(n)!r}, now {v!r}" for n, v in ours.items()
            if saved.get(n) != v]
    if diff:
        raise CircuitlabError(
            f"The checkpoint in {folder} was trained with other settings ({'; '.join(diff)}). "
            "Pass the same settings to resume, or start afresh with another out_dir or "
            "resume=False."
        )
    return TopKTranscoders.from_state_tensors(tensors, settings.lr, device), json.loads(
        meta["counters"])


# --------------------------------------------------------------------------- training


def _check_args(model: HookedTransformer, layers: list[int], width: int, k: int, aux_k: int,
                tokens: int, context: int, batch_tokens: int, buffer_tokens: int) -> None:
    n = model.cfg.n_layers
    problems = []
    if not layers or any(not 0 <= l < n for l in layers) or len(set(layers)) != len(layers):
        problems.append(f"layers={layers} must be distinct layers of the model, 0..{n - 1}")
    if width < 1 or not 1 <= k < width:
        problems.append(f"width={width}, k={k}: need width >= 2 and 1 <= k < width")
    if aux_k < 0:
        problems.append(f"aux_k={aux_k} must be >= 0")
    if tokens < 1:
        problems.append(f"tokens={tokens} must be >= 1")
    if not 2 <= context <= model.cfg.n_ctx:
        problems.append(f"context={context} must be in 2..{model.cfg.n_ctx} (the model's n_ctx)")
    if batch_tokens < 1 or buffer_tokens < batch_tokens:
        problems.append(f"need 1 <= batch_tokens ({batch_tokens}) <= buffer_tokens "
                        f"({buffer_tokens})")
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
    lr: float = 1e-3,
    aux_k: int = 256,
    dead_tokens: int = 50_000,
    device: str = "cpu",
    bf16: bool = True,
    seed: int = 0,
    checkpoint_every: float = 600.0,
    checkpoint_dir=None,
    resume: bool = True,
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
        tokens: token budget (BOS positions not counted), over all resumed runs.
        time_budget: wall-clock budget in seconds over all resumed runs (None: no limit).
        context: row length in tokens, BOS included.
        batch_tokens: tokens per optimizer step.
        buffer_tokens: size of the shuffled activation buffer.
        lr: peak Adam learning rate.
        aux_k: dead features used by the AuxK loss per token (0 disables it).
        dead_tokens: a feature not selected in this many tokens counts as dead.
        device: where the transcoders train ("cpu", "cuda", ...).
        bf16: run the dense encoder and skip products in bfloat16 and keep the
            activation buffer in bfloat16 (master weights stay float32).
        seed: seed of the initialization and the shuffles.
        checkpoint_every: seconds between checkpoints (each also exports the bundle);
            checkpoints are taken when a buffer is used up.
        checkpoint_dir: checkpoint folder (default ``out_dir/checkpoint``).
        resume: continue from the checkpoint if there is one.
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
    _check_args(model, layers, width, k, aux_k, tokens, context, batch_tokens, buffer_tokens)
    out_dir = Path(out_dir).expanduser()
    ckpt_dir = out_dir / "checkpoint" if checkpoint_dir is None else Path(checkpoint_dir)
    settings = Settings(
        model_name=model.cfg.model_name, n_layers=model.cfg.n_layers, d_model=model.cfg.d_model,
        layers=tuple(layers), width=width, k=k, aux_k=aux_k, dead_tokens=dead_tokens,
        context=context, batch_tokens=batch_tokens, buffer_tokens=buffer_tokens, lr=lr,
        bf16=bf16, seed=seed, corpus=str(Path(corpus).expanduser().resolve()))
    command = command or (
        f"train_transcoders({settings.model_name!r}, {settings.corpus!r}, {str(out_dir)!r}, "
        f"tokens={tokens}, time_budget={time_budget}, device={device!r}, "
        + ", ".join(f"{n}={v!r}" for n, v in dataclasses.asdict(settings).items()
                    if n not in ("model_name", "n_layers", "d_model", "corpus")) + ")")
    state, counters = None, {"tokens_seen": 0, "steps": 0, "seconds": 0.0, "buffers": 0,
                             "docs_done": 0, "pending": []}
    if resume and (ckpt_dir / CHECKPOINT_FILE).exists():
        state, counters = load_checkpoint(ckpt_dir, settings, device)
    run = _Run(model, settings, state, counters, out_dir, ckpt_dir, device, tokens,
               time_budget, checkpoint_every, command)
    return run.train(progress)


class _Run:
    """One training session: the loop, its budgets, checkpoints and exports."""

    def __init__(self, model, settings: Settings, state, counters: dict, out_dir: Path,
                 ckpt_dir: Path, device: str, tokens: int, time_budget, checkpoint_every,
                 command: str):
        self.model, self.s, self.state, self.counters = model, settings, state, counters
        self.out_dir, self.ckpt_dir, self.device = out_dir, ckpt_dir, device
        self.tokens, self.time_budget, self.checkpoint_every = tokens, time_budget, checkpoint_every
        self.command = command
        self.dtype = torch.bfloat16 if settings.bf16 else torch.float32
        self.started = time.monotonic()
        self.seconds_before = counters["seconds"]
        self.rows = TokenRows(model.tokenizer, settings.corpus, settings.context,
                              docs_done=counters["docs_done"], pending=counters["pending"])
        self.sample = None
        self.stopped = None

    def seconds(self) -> float:
        return self.seconds_before + time.monotonic() - self.started

    def progress(self) -> float:
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
        """Buffer ``number``: ``x, y [L, N, d]`` from ``rows`` and its shuffle ``perm [N]``
        (None at the end of the corpus). Keeps a calibration sample of it."""
        s = self.s
        tokens = rows.take(max(1, s.buffer_tokens // (s.context - 1)))
        if not len(tokens):
            return None
        x, y = activation_buffer(self.model, tokens, list(s.layers),
                                 max(1, s.batch_tokens // s.context), self.dtype, self.device)
        gen = torch.Generator().manual_seed(s.seed * 1_000_003 + number)
        perm = torch.randperm(x.shape[1], generator=gen).to(x.device)
        self.sample = (x[:, perm[:CALIBRATION_TOKENS]], y[:, perm[:CALIBRATION_TOKENS]])
        return x, y, perm

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
        x, y, perm = filled
        c.update(docs_done=self.rows.docs_done, pending=self.rows.pending, buffers=c["buffers"] + 1)
        if self.state is None:
            self.state = TopKTranscoders.init(x, y, s.width, s.k, s.lr, s.seed)
        size = min(s.batch_tokens, len(perm))
        for start in range(0, len(perm) - size + 1, size):
            if self.budget_reached():
                break
            idx = perm[start:start + size]
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
        save_checkpoint(self.ckpt_dir, self.state, self.s, self.counters)

    def export(self) -> None:
        """Write ``layer_XX/`` folders (each swapped in whole) and then ``manifest.json``."""
        s, c = self.s, self.counters
        x, y = self.sample
        self.out_dir.mkdir(parents=True, exist_ok=True)
        files, stats = {}, {}
        for i, layer in enumerate(s.layers):
            meta = {"model_name": s.model_name,
                    "hook_name": f"blocks.{layer}.hook_mlp_in",
                    "hook_name_out": f"blocks.{layer}.hook_mlp_out",
                    "hf_hook_name": f"model.layers.{layer}.pre_feedforward_layernorm.output",
                    "hf_hook_name_out": f"model.layers.{layer}.post_feedforward_layernorm.output",
                    "training": {"trainer": "circuitlab TopK skip transcoder -> JumpReLU",
                                 "tokens_seen": c["tokens_seen"], "k": s.k, "width": s.width}}
            sae, stats[layer] = to_jumprelu(self.state, i, x[i], y[i], s.k, meta)
            sae.cfg.metadata.training.update(calibration=stats[layer])
            folder = self.out_dir / f"layer_{layer:02d}"
            tmp = Path(tempfile.mkdtemp(dir=self.out_dir, prefix=f".{folder.name}."))
            with _disk_errors(folder, "the previous export of this layer is intact."):
                try:
                    save_transcoder(sae, tmp)
                    _replace_dir(tmp, folder)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
            for f in sorted(folder.iterdir()):
                files[f"{folder.name}/{f.name}"] = sha256(f)
        manifest = {
            "sha256": files, "command": self.command, "tokens_seen": c["tokens_seen"],
            "steps": c["steps"], "seconds": round(c["seconds"], 1),
            "tokens_per_second": round(c["tokens_seen"] / max(c["seconds"], 1e-9), 1),
            "stopped": self.stopped, "settings": dataclasses.asdict(s),
            "calibration": {str(l): v for l, v in stats.items()},
        }
        with _disk_errors(self.out_dir / "manifest.json", "the previous manifest is intact."):
            atomic_write_text(self.out_dir / "manifest.json", json.dumps(manifest, indent=1))
