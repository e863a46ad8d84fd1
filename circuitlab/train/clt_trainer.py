"""Train a cross-layer transcoder (CLT) on a TransformerLens model and export it in
circuit-tracer's layout (``circuitlab.clt``).

The features of layer ``s`` read its MLP input ``x[s]`` and write into the MLP outputs of
layers ``s, s + 1, ...`` (all later layers, or the ``window`` layers from ``s`` on). During
training each layer's features are a TopK (the ``k`` largest per token and layer) and every
target layer has an affine skip::

    y_hat[t] = sum_{t - window < s <= t} topk_k(W_enc[s] x[s] + b_enc[s]) W_dec[s][:, t - s]
               + W_skip[t] x[t] + b_dec[t]

trained with Adam on the sum over target layers of the normalized MSE (each layer's FVU),
plus Gao et al.'s (2024) AuxK loss per source layer: the top ``aux_k`` dead features of
``s`` reconstruct the residual error of layer ``s`` (through their first decoder only,
which costs what a per-layer transcoder's AuxK does; once they fire, the loss trains
their writes into later layers too). Gradients are
computed by hand with the sparse kernels of ``sparse`` (per token only the ``k`` selected
decoders of each layer are read and updated), and the dense encoder and skip products
run in bfloat16 when ``bf16`` is set. A feature's decoders (all its target layers
together) are kept at unit norm.

A run can warm-start from per-layer skip transcoders of the same width (``init_from``, the
bundle): each feature's encoder, its first decoder (into its own layer) and each layer's
skip come from them, its later decoders start at zero. Its sparsity can be annealed:
``k_start`` active features per token and layer at the start, falling linearly to ``k``
over the first ``k_anneal_tokens`` training tokens (a warm start from transcoders trained
at a larger ``k`` starts there).

Everything else is ``trainer``'s: the activation buffer (all layers' MLP inputs and
outputs from one forward pass), budgets, checkpoints, resume and the JumpReLU phase at
the end. The export is a JumpReLU CLT whose thresholds are matched per feature to the
TopK firing counts on a calibration sample (as the per-layer export does), written with
``CrossLayerTranscoder.save`` plus a ``manifest.json`` of sha256, in one atomic swap of
``out_dir`` (its checkpoint folder is carried over).

Example::

    from circuitlab.loading import load_model
    from circuitlab.train.clt_trainer import train_clt
    train_clt(load_model("gemma-3-270m"), "~/.cache/circuitlab/corpus", "runs/clt",
              width=2048, k=16, time_budget=3600)
    clt = circuitlab.clt.load("runs/clt")
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from circuitlab.clt import CrossLayerTranscoder
from circuitlab.errors import CircuitlabError
from circuitlab.precision import fast_bf16
from circuitlab.train import CLT_K, CLT_WIDTH
from circuitlab.train.export import export_clt
from circuitlab.train.sparse import (Active, decode, gather_dot, jump_active,
                                     matching_thresholds, scatter_rows, topk_active)
from circuitlab.train.topk import AUX_COEF, TopKTranscoders, ridge, scales
from circuitlab.train.trainer import (Run, Settings, check_args, check_init_from, describe,
                                      start_run)

GAIN_TOKENS = 512  # tokens of the joint least-squares fit of the initial encoder gains
STATS_TOKENS = 4096  # calibration tokens the export's FVU is measured on


@dataclasses.dataclass(frozen=True)
class CLTSettings(Settings):
    """``Settings`` of a CLT run (a per-layer checkpoint does not resume as a CLT)."""

    clt: bool = True
    window: int | None = None
    k_start: int | None = None
    k_anneal_tokens: int = 0


def k_at(settings: CLTSettings, tokens_seen: int) -> int:
    """Active features per token and layer after ``tokens_seen`` training tokens: ``k_start``
    falling linearly to ``k`` over ``k_anneal_tokens`` (``k`` throughout without a start)."""
    if settings.k_start is None or tokens_seen >= settings.k_anneal_tokens:
        return settings.k
    share = tokens_seen / settings.k_anneal_tokens
    return round(settings.k_start + share * (settings.k - settings.k_start))


class TopKCLT(TopKTranscoders):
    """A TopK cross-layer transcoder with skips, in a normalized space, trained by hand.

    ``TopKTranscoders``' checkpoint tensors and JumpReLU calibration serve it as they are;
    its parameters, initialization, step and export are its own.

    Inputs and targets are divided by per-layer scales (``scale_in``: RMS of ``x[l]``;
    ``scale_out``: RMS of ``y[l]`` around its mean), so each target layer's MSE is its FVU.

    Attributes:
        params: ``W_enc [L, F, d]`` (one row per feature), ``b_enc [L, F]``,
            ``W_dec_<s> [F, n_s, d]`` (one per source layer; ``n_s = L - s``, or fewer with
            a write window), ``W_skip [L, d_out, d_in]``,
            ``b_dec [L, d]``.
        scale_in, scale_out: ``[L]``.
        since_fired: ``[L, F]`` tokens since each feature was last selected.
        threshold: ``[L, F]`` JumpReLU thresholds once ``calibrate`` ran, else None.
        opt: Adam over ``params``.
    """

    def __init__(self, params: dict, scale_in, scale_out, since_fired, lr: float):
        super().__init__(params, scale_in, scale_out, since_fired, lr)
        if self.params["W_enc"].device.type == "cpu":  # several times faster with big decoders
            self.opt = torch.optim.Adam(self.params.values(), lr=lr, fused=True)

    def dec(self, s: int) -> torch.Tensor:
        """The decoders of layer ``s``'s features as ``[F, n_s * d]`` (a view)."""
        W = self.params[f"W_dec_{s}"]
        return W.view(W.shape[0], -1)

    def n_out(self, s: int) -> int:
        """How many layers (``s`` and after) layer ``s``'s features write into."""
        return self.params[f"W_dec_{s}"].shape[1]

    @property
    def window(self) -> int | None:
        """The write window, or None when every feature writes into all later layers."""
        return None if self.n_out(0) == self.n_layers else self.n_out(0)

    @classmethod
    def init(cls, x: torch.Tensor, y: torch.Tensor, width: int, k: int, lr: float,
             seed: int, window: int | None = None) -> "TopKCLT":
        """Initialize from a sample ``x, y [L, N, d]`` of the first buffer (features write
        into the ``window`` layers from their own, or all later layers with None).

        ``W_skip, b_dec``: ridge fit of each ``y[t]`` on ``x[t]``. Each feature of layer
        ``s`` starts from a random token: its encoder row is the direction of ``x[s]`` there
        minus the mean input, its decoders the direction of the skips' residuals of layers
        ``s..L-1`` there. Each layer's encoder is then scaled so that the sum of all
        layers' initial reconstructions of the residuals is least-squares optimal.
        """
        L, N, d = x.shape
        n_out = [L - s if window is None else min(window, L - s) for s in range(L)]
        scale_in, scale_out = scales(x, y)
        gen = torch.Generator().manual_seed(seed)

        def inputs(l, rows=slice(None)):  # normalized inputs of layer l (one at a time: big)
            return x[l, rows].float() / scale_in[l]

        skips = [ridge(inputs(l), y[l].float() / scale_out[l]) for l in range(L)]

        def residual(rows, first, last=L):  # [len(rows), last - first, d] left by the skips
            return torch.stack([y[t, rows].float() / scale_out[t] - inputs(t, rows)
                                @ skips[t][0].T - skips[t][1] for t in range(first, last)], 1)

        fit = torch.arange(min(N, GAIN_TOKENS), device=x.device)
        params, recons = {"W_enc": [], "b_enc": []}, []
        for s in range(L):
            pick = (torch.randperm(N, generator=gen)[:width] if N >= width
                    else torch.randint(N, (width,), generator=gen)).to(x.device)
            noise = 0.1 * F.normalize(torch.randn(width, d, generator=gen), dim=-1).to(x.device)
            x_mean = inputs(s).mean(0)
            W_enc = F.normalize(F.normalize(inputs(s, pick) - x_mean, dim=-1) + noise, dim=-1)
            W_dec = F.normalize(residual(pick, s, s + n_out[s]).flatten(1), dim=-1)
            a = topk_active(torch.addmm(-W_enc @ x_mean, inputs(s, fit), W_enc.T), k)
            recon = decode(a, a.pre.relu(), W_dec)  # [len(fit), n_out[s] * d], padded to L - s
            recons.append(F.pad(recon, (0, (L - s - n_out[s]) * d)))
            params["W_enc"].append(W_enc)
            params["b_enc"].append(-W_enc @ x_mean)
            params[f"W_dec_{s}"] = W_dec.view(width, n_out[s], d)
        # One gain per layer, jointly: sum_s gain_s * recons[s] ~ residual (least squares);
        # the writes of layers s and s' overlap in layers max(s, s')..L-1.
        target = residual(fit, 0).flatten(1)
        gram = torch.tensor([[float((r[:, -min(r.shape[1], q.shape[1]):]
                                     * q[:, -min(r.shape[1], q.shape[1]):]).sum())
                              for q in recons] for r in recons], dtype=torch.float64)
        rhs = torch.tensor([[float((r * target[:, -r.shape[1]:]).sum())] for r in recons],
                           dtype=torch.float64)
        gains = torch.linalg.lstsq(gram, rhs).solution[:, 0].float().clamp(min=1e-3)
        gains = gains.to(x.device)
        params["W_enc"] = torch.stack(params["W_enc"]) * gains[:, None, None]
        params["b_enc"] = torch.stack(params["b_enc"]) * gains[:, None]
        params["W_skip"] = torch.stack([w for w, _ in skips])
        params["b_dec"] = torch.stack([b for _, b in skips])
        return cls(params, scale_in, scale_out,
                   torch.zeros(L, width, dtype=torch.long, device=x.device), lr)

    @classmethod
    def from_bundle(cls, folder: Path, x: torch.Tensor, y: torch.Tensor, lr: float,
                    window: int | None = None) -> "TopKCLT":
        """Warm start from per-layer skip transcoders ``folder/layer_XX/`` (all layers, of
        one width; SAE-Lens or 8-bit folders) and a sample ``x, y [L, N, d]``.

        Each feature keeps its encoder and writes into its own layer through its
        per-layer decoder (unit norm in the normalized space, the inverse of the per-layer
        export); its writes into later layers start at zero. Skips and ``b_dec`` are the
        per-layer ones. So the CLT starts as the per-layer set under TopK.
        """
        L, _, d = x.shape
        per_layer = TopKTranscoders.from_bundle(Path(folder), list(range(L)), x, y, lr)
        p = {n: v.detach() for n, v in per_layer.params.items()}
        params = {"W_enc": p["W_enc"], "b_enc": p["b_enc"], "W_skip": p["W_skip"],
                  "b_dec": p["b_dec"]}
        width = p["W_enc"].shape[1]
        for s in range(L):
            n = L - s if window is None else min(window, L - s)
            W = p["W_dec"].new_zeros(width, n, d)
            W[:, 0] = p["W_dec"][s]
            params[f"W_dec_{s}"] = W
        return cls(params, per_layer.scale_in, per_layer.scale_out,
                   torch.zeros(L, width, dtype=torch.long, device=x.device), lr)

    def active(self, s: int, pre: torch.Tensor, k: int) -> Active:
        """Layer ``s``'s active pairs: TopK, or JumpReLU once calibrated."""
        return topk_active(pre, k) if self.threshold is None else jump_active(
            pre, self.threshold[s])

    @torch.no_grad()
    def step(self, x: torch.Tensor, y: torch.Tensor, k: int, aux_k: int, dead_tokens: int,
             lr: float, dtype: torch.dtype) -> torch.Tensor:
        """One Adam step on raw activations ``x, y [L, B, d]``; returns each layer's FVU ``[L]``.

        In float32 the decoder products touch only the active pairs (``sparse``); in a
        lower ``dtype`` they run as dense matmuls in that dtype, which at a CLT's density
        (k of some thousand features, decoders several layers wide) are 2-4 times faster on
        a CPU with bfloat16 units than the sparse kernels."""
        p, L = self.params, self.n_layers
        _, B, d = x.shape
        x = x.float() / self.scale_in[:, None, None]
        x_c = x.to(dtype)
        skip = torch.bmm(x_c, p["W_skip"].to(dtype).transpose(1, 2)).float()
        y_hat = (skip + p["b_dec"][:, None]).transpose(0, 1).contiguous()  # [B, L, d]
        pres, actives, decs = [], [], [_Products(self.dec(s), dtype) for s in range(L)]
        for s in range(L):
            pres.append(self.pre(s, x[s], dtype))
            actives.append(self.active(s, pres[s], k))
            y_hat[:, s:s + self.n_out(s)] += decs[s].decode(
                actives[s], actives[s].pre.relu()).view(B, -1, d)
        err = y_hat.sub_((y.float() / self.scale_out[:, None, None]).transpose(0, 1))
        grad_out = err * (2 / (B * d))
        dead = self.since_fired >= dead_tokens
        p["W_enc"].grad = torch.empty_like(p["W_enc"])
        p["b_enc"].grad = torch.empty_like(p["b_enc"])
        for s in range(L):
            self._source_grads(s, x[s], pres[s], actives[s], decs[s], grad_out, err, aux_k,
                               dead[s])
        g = grad_out.transpose(0, 1).to(dtype)  # [L, B, d]
        p["W_skip"].grad = torch.bmm(g.transpose(1, 2), x_c).float()
        p["b_dec"].grad = grad_out.sum(0)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        for s in range(L):
            W = self.dec(s)
            W.copy_(F.normalize(W, dim=-1))
        return err.pow(2).sum((0, 2)).cpu() / (B * d)

    def _source_grads(self, s: int, x: torch.Tensor, pre: torch.Tensor, a: Active,
                      dec: "_Products", grad_out: torch.Tensor, err: torch.Tensor, aux_k: int,
                      dead: torch.Tensor) -> None:
        """Set the gradients of layer ``s``'s features (loss and AuxK) and update
        ``since_fired``; ``dec`` holds its decoders' products, ``grad_out`` and ``err``
        are ``[B, L, d]``.

        AuxK: the dead features reconstruct the error of layer ``s`` alone through their
        first decoder (the error of all later layers would cost ``L - s`` times as much per
        feature); once they fire, the loss trains their other decoders."""
        p = self.params
        B, width = len(x), dec.width
        acts = a.pre.relu()
        g = grad_out[:, s:s + self.n_out(s)].reshape(B, -1)
        grad_acts = dec.dot(a, g) * (acts > 0)
        grad_dec = dec.scatter(a, acts, g).view_as(p[f"W_dec_{s}"])
        feats, toks = a.feats, a.toks
        n_aux = min(aux_k, int(dead.sum()))
        if n_aux:
            aux = topk_active(pre.masked_fill(~dead, -math.inf), n_aux)
            aux_acts = aux.pre.relu()
            own = p[f"W_dec_{s}"][:, 0].contiguous()
            e = err[:, s]
            denom = (e - e.mean(0)).pow(2).sum().clamp(min=1e-12)
            aux_g = (decode(aux, aux_acts, own) + e) * (2 * AUX_COEF / denom)
            grad_dec[:, 0] += scatter_rows(aux.feats, aux.toks, aux_acts, aux_g, width)
            feats, toks = torch.cat([feats, aux.feats]), torch.cat([toks, aux.toks])
            grad_acts = torch.cat([grad_acts, gather_dot(aux, aux_g, own) * (aux_acts > 0)])
        p["W_enc"].grad[s] = dec.scatter_into(feats, toks, grad_acts, x)
        p["b_enc"].grad[s] = torch.bincount(feats, grad_acts, minlength=width)
        p[f"W_dec_{s}"].grad = grad_dec
        self.since_fired[s] += B
        self.since_fired[s, a.feats[acts > 0]] = 0

    @torch.no_grad()
    def to_clt(self, x: torch.Tensor, y: torch.Tensor, k: int,
               model_name: str) -> tuple[CrossLayerTranscoder, dict]:
        """The JumpReLU ``CrossLayerTranscoder`` (float32, CPU) in the model's units.

        A feature of layer ``s`` is scaled as a per-layer transcoder's (its activation
        times ``scale_out[s]``). Thresholds are matched to the TopK firing counts on the
        raw calibration activations ``x, y [L, N, d]``.

        Returns:
            The CLT and per-layer stats: ``fvu_topk`` and ``fvu_jumprelu`` (of the target
            layer, on up to ``STATS_TOKENS`` tokens), ``l0_jumprelu`` and ``dead_share``
            (features of the layer the JumpReLU never fires on the sample).
        """
        p = {n: v.detach().float().cpu() for n, v in self.params.items()}
        s_in, s_out = self.scale_in.float().cpu(), self.scale_out.float().cpu()
        L, width, d = p["W_enc"].shape
        clt = CrossLayerTranscoder(L, d, width, activation="jumprelu", skip=True,
                                   model_name=model_name, window=self.window)
        x, y = x.float().cpu(), y.float().cpu()
        n = min(STATS_TOKENS, x.shape[1])
        recon = {"topk": y.new_zeros(n, L, d), "jumprelu": y.new_zeros(n, L, d)}
        stats = {}
        for s in range(L):
            clt.W_enc[s] = p["W_enc"][s].T * (s_out[s] / s_in[s])
            clt.b_enc[s] = p["b_enc"][s] * s_out[s]
            n_s = self.n_out(s)
            clt.W_dec[s].copy_(p[f"W_dec_{s}"] * (s_out[s:s + n_s] / s_out[s])[None, :, None])
            clt.W_skip[s] = p["W_skip"][s] * (s_out[s] / s_in[s])
            clt.b_dec[s] = p["b_dec"][s] * s_out[s]
            pre = clt.pre_activations(s, x[s])
            clt.threshold[s], topk = matching_thresholds(pre, k)
            jump = jump_active(pre, clt.threshold[s])
            for kind, a in (("topk", topk_active(pre[:n], k)),
                            ("jumprelu", jump_active(pre[:n], clt.threshold[s]))):
                recon[kind][:, s:s + n_s] += decode(a, a.pre.relu(),
                                                    clt.W_dec[s].flatten(1)).view(n, -1, d)
            stats[s] = {"l0_jumprelu": len(jump.feats) / x.shape[1],
                        "dead_share": 1 - len(jump.feats.unique()) / width}
        for t in range(L):
            base = x[t, :n] @ clt.W_skip[t].T + clt.b_dec[t] - y[t, :n]
            variance = (y[t, :n] - y[t, :n].mean(0)).pow(2).sum()
            for kind, r in recon.items():
                stats[t][f"fvu_{kind}"] = float((r[:, t] + base).pow(2).sum() / variance)
        return clt, stats


class _Products:
    """The products of one source layer's decoders ``W [F, n * d]`` with its active pairs:
    sparse (``sparse``'s kernels) in float32, dense matmuls in a lower ``dtype``."""

    def __init__(self, W: torch.Tensor, dtype: torch.dtype):
        self.W, self.dtype, self.width = W, dtype, len(W)
        self.dense = dtype != torch.float32
        self.W_c = W.to(dtype) if self.dense else W

    def _matrix(self, feats, toks, values, B: int) -> torch.Tensor:
        """The pairs' ``values`` as a dense ``[B, F]`` matrix in ``dtype`` (summed where
        a pair repeats)."""
        out = torch.zeros(B, self.width, dtype=torch.float32, device=values.device)
        out.index_put_((toks, feats), values.float(), accumulate=True)
        return out.to(self.dtype)

    def decode(self, a: Active, acts: torch.Tensor) -> torch.Tensor:
        """Per token, the sum of ``acts * W[feat]``: ``[B, n * d]``."""
        if not self.dense:
            return decode(a, acts, self.W)
        return (self._matrix(a.feats, a.toks, acts, len(a.crow) - 1) @ self.W_c).float()

    def dot(self, a: Active, g: torch.Tensor) -> torch.Tensor:
        """``W[feat] . g[tok]`` per pair: ``[n]``."""
        if not self.dense:
            return gather_dot(a, g, self.W)
        return (g.to(self.dtype) @ self.W_c.T)[a.toks, a.feats].float()

    def scatter(self, a: Active, acts: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The decoders' gradient ``[F, n * d]``: per feature, the sum of ``acts * g[tok]``."""
        return self.scatter_into(a.feats, a.toks, acts, g)

    def scatter_into(self, feats, toks, weights, rows: torch.Tensor) -> torch.Tensor:
        """Per feature, the sum of ``weights * rows[tok]`` over its pairs: ``[F, rows' width]``."""
        if not self.dense:
            return scatter_rows(feats, toks, weights, rows, self.width)
        return (self._matrix(feats, toks, weights, len(rows)).T @ rows.to(self.dtype)).float()


class _CLTRun(Run):
    """A ``trainer`` run whose state is a ``TopKCLT`` and whose export is a CLT folder."""

    State = TopKCLT

    def new_state(self) -> TopKCLT:
        s = self.s
        if s.init_from is not None:
            return TopKCLT.from_bundle(Path(s.init_from), *self.sample, s.lr, s.window)
        return TopKCLT.init(*self.sample, s.width, s.k, s.lr, s.seed, s.window)

    def k_now(self) -> int:
        return k_at(self.s, self.counters["tokens_seen"])

    def export(self) -> None:
        """Write the CLT files and ``manifest.json`` into ``out_dir`` in one atomic swap
        (other entries, such as the checkpoint folder, are carried over)."""
        s, c = self.s, self.counters
        clt, stats = self.state.to_clt(*self.sample, s.k, s.model_name)
        export_clt(clt, self.out_dir, {
            "command": self.command, "tokens_seen": c["tokens_seen"],
            "tokens_read": c.get("tokens_read", 0), "steps": c["steps"],
            "seconds": round(c["seconds"], 1),
            "tokens_per_second": round(c["tokens_seen"] / max(c["seconds"], 1e-9), 1),
            "stopped": self.stopped, "settings": dataclasses.asdict(s),
            "calibration": {str(l): v for l, v in stats.items()}})

def train_clt(model, corpus, out_dir, *, width: int = CLT_WIDTH, k: int = CLT_K,
              tokens: int = 2_000_000, time_budget: float | None = None, context: int = 128,
              batch_tokens: int = 4096, buffer_tokens: int = 65_536, passes: int = 1,
              lr: float = 3e-3, aux_k: int = 64, dead_tokens: int = 50_000,
              jumprelu_share: float = 0.1, device: str = "cpu", bf16: bool | None = None,
              seed: int = 0, checkpoint_every: float = 600.0, checkpoint_dir=None,
              resume: bool = True, progress: bool = True, command: str | None = None,
              window: int | None = None, init_from=None, k_start: int | None = None,
              k_anneal_tokens: int = 0) -> Path:
    """Train a TopK cross-layer transcoder over all of ``model``'s layers and export it as a
    JumpReLU CLT folder (``circuitlab.clt.load`` reads it).

    The arguments are ``train_transcoders``' (see there), except that the CLT always spans
    every layer; ``width`` is the features per layer and ``k`` the active features per
    token and layer (a token has about ``k * n_layers`` in all). ``window``: the most layers
    a feature writes into (its own and the next ``window - 1``; None: all later layers).
    ``init_from``: per-layer skip transcoders of width ``width`` for every layer to start
    from (see ``TopKCLT.from_bundle``; Adam starts afresh, so use a lower ``lr``).
    ``k_start, k_anneal_tokens``: start at ``k_start`` active features and anneal to ``k``
    over that many training tokens.
    Size: the decoders hold ``width * n_layers * (n_layers + 1) / 2 * d_model`` floats
    without a window (224M for Gemma 3 270M at width 2048), trained in float32 with their gradients and
    Adam's two moments (3.6 GB there, besides the activation buffer's 46 kB per token in
    bfloat16); a checkpoint writes three copies (2.7 GB) and an export one (0.9 GB).

    Returns:
        ``out_dir``: the CLT files, ``manifest.json`` (their sha256, the run's counters
        and per-layer calibration stats) and ``checkpoint/``.

    Raises:
        CircuitlabError: for bad arguments, a corpus without usable text, a checkpoint
            with other settings, or a full disk.
    """
    L = model.cfg.n_layers
    bf16 = fast_bf16(device) if bf16 is None else bf16
    check_args(model, list(range(L)), width, k, aux_k, jumprelu_share, tokens, context,
               batch_tokens, buffer_tokens, passes)
    out_dir = Path(out_dir).expanduser()
    if out_dir.is_dir() and any((out_dir / n).exists() for n in ("layer_00", "cfg.json")):
        raise CircuitlabError(f"{out_dir} holds per-layer transcoders; write the cross-layer "
                              "transcoder to another folder.")
    if window is not None and not 1 <= window <= L:
        raise CircuitlabError(f"window={window}: the write window is 1 to {L} layers.")
    if k_start is not None and (k_start < k or k_anneal_tokens <= 0):
        raise CircuitlabError(f"k_start={k_start}, k_anneal_tokens={k_anneal_tokens}: the "
                              f"sparsity anneals down from k_start >= k={k} over a positive "
                              "number of tokens.")
    if init_from is not None:
        init_from = Path(init_from).expanduser().resolve()
        check_init_from(init_from, list(range(L)), width, model.cfg.d_model)
    ckpt_dir = out_dir / "checkpoint" if checkpoint_dir is None else Path(checkpoint_dir)
    settings = CLTSettings(
        model_name=model.cfg.model_name, n_layers=L, d_model=model.cfg.d_model,
        layers=tuple(range(L)), width=width, k=k, aux_k=aux_k, dead_tokens=dead_tokens,
        context=context, batch_tokens=batch_tokens, buffer_tokens=buffer_tokens, passes=passes,
        lr=lr, jumprelu_share=jumprelu_share, bf16=bf16, seed=seed,
        corpus=str(Path(corpus).expanduser().resolve()),
        init_from=None if init_from is None else str(init_from),
        window=None if window is None or window >= L else window, k_start=k_start,
        k_anneal_tokens=k_anneal_tokens if k_start is not None else 0)
    command = command or describe("train_clt", settings, out_dir, tokens, time_budget, device)
    run = start_run(_CLTRun, model, settings, out_dir, ckpt_dir, device, tokens, time_budget,
                    checkpoint_every, command, None, resume)
    return run.train(progress)
