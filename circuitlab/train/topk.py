"""TopK skip transcoders for several layers, trained by hand with sparse kernels.

Each transcoder maps the MLP input ``x`` to the MLP output ``y``::

    y_hat = W_dec^T topk_k(W_enc x + b_enc) + W_skip x + b_dec

trained with Adam on the normalized MSE plus Gao et al.'s (2024) AuxK loss, which lets the
top ``aux_k`` dead latents (not fired in the last ``dead_tokens`` tokens) reconstruct the
residual error so they come back to life. Gradients are computed by hand with the sparse
kernels of ``sparse`` (only the k selected decoder rows and encoder columns are touched
per token), and the dense encoder and skip products run in bfloat16 when asked.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from circuitlab.quantize import read_weights
from circuitlab.train.checkpoints import adam_tensors, restore_adam
from circuitlab.train.sparse import (decode, gather_dot, jump_active, matching_thresholds,
                                     scatter_rows, topk_active)

PARAMS = ("W_enc", "b_enc", "W_dec", "W_skip", "b_dec")
AUX_COEF = 1 / 32  # weight of the AuxK loss (Gao et al. 2024)
RIDGE = 1e-2  # ridge penalty of the initial skip fit, relative to the mean input variance


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
        self.params = {n: torch.nn.Parameter(v) for n, v in params.items()}
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
        scale_in, scale_out = scales(x, y)
        gen = torch.Generator().manual_seed(seed)
        pick = (torch.randperm(N, generator=gen)[:width] if N >= width
                else torch.randint(N, (width,), generator=gen)).to(x.device)
        noise = 0.1 * F.normalize(torch.randn(L, width, d, generator=gen), dim=-1).to(x.device)
        out = {n: [] for n in PARAMS}
        for l in range(L):  # one layer at a time: a float copy of the whole buffer is large
            xl, yl = x[l].float() / scale_in[l], y[l].float() / scale_out[l]
            W_skip, b_dec = ridge(xl, yl)
            resid = yl - xl @ W_skip.T - b_dec
            x_mean = xl.mean(0)
            W_enc = F.normalize(F.normalize(xl[pick] - x_mean, dim=-1) + noise[l], dim=-1)
            W_dec = F.normalize(resid[pick], dim=-1)
            a = topk_active(torch.addmm(-W_enc @ x_mean, xl, W_enc.T), k)
            recon = decode(a, a.pre.relu(), W_dec)
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
        any SAE-Lens skip transcoder folder with ``W_enc, b_enc, W_dec, W_skip, b_dec``, or
        its 8-bit twin).

        The normalizing scales come from the sample ``x, y [L, N, d]``; the weights are
        mapped into that normalized space (exactly the inverse of ``to_jumprelu``). The
        JumpReLU thresholds are dropped: training runs TopK until its JumpReLU phase.
        Adam's moments start at zero, so warm starts want a lower ``lr``.
        """
        scale_in, scale_out = scales(x, y)
        out = {n: [] for n in PARAMS}
        for l, layer in enumerate(layers):
            w = read_weights(folder / f"layer_{layer:02d}")
            w = {n: w[n].to(x.device) for n in PARAMS}
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
        err = decode(a, acts, W_dec) + skip + p["b_dec"][l] - y
        grad_out = err * (2 / (B * d))
        # Per group of pairs: pairs, activations, d(loss)/d(activation), d(loss)/d(output).
        groups = [(a, acts, gather_dot(a, grad_out, W_dec) * (acts > 0), grad_out)]
        n_aux = min(aux_k, int(dead.sum()))
        if n_aux:
            aux = topk_active(pre.masked_fill(~dead, -math.inf), n_aux)
            aux_acts = aux.pre.relu()
            denom = (err - err.mean(0)).pow(2).sum().clamp(min=1e-12)
            aux_grad_out = (decode(aux, aux_acts, W_dec) + err) * (2 * AUX_COEF / denom)
            groups.append((aux, aux_acts, gather_dot(aux, aux_grad_out, W_dec) * (aux_acts > 0),
                           aux_grad_out))
        feats = torch.cat([g[0].feats for g in groups])
        width = len(W_dec)
        grad_acts = torch.cat([g[2] for g in groups])
        p["W_enc"].grad[l] = scatter_rows(feats, torch.cat([g[0].toks for g in groups]),
                                           grad_acts, x, width)
        p["b_enc"].grad[l] = torch.bincount(feats, grad_acts, minlength=width)
        p["W_dec"].grad[l] = scatter_rows(
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
        params = {n: v for n, v in t.items() if not n.startswith("adam.")
                  and n not in ("scale_in", "scale_out", "since_fired")}
        state = cls(params, t["scale_in"], t["scale_out"], t["since_fired"], lr)
        restore_adam(state.opt, state.params, tensors, device)
        return state


def scales(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer ``scale_in`` (RMS of ``x``) and ``scale_out`` (RMS of ``y`` around its mean)
    of a sample ``x, y [L, N, d]``, one layer at a time."""
    scale_in = torch.stack([x[l].float().pow(2).mean().sqrt() for l in range(len(x))])
    scale_out = torch.stack([(y[l].float() - y[l].float().mean(0)).pow(2).mean().sqrt()
                             for l in range(len(y))])
    return scale_in, scale_out


def ridge(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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

