"""Fine-tune transcoders end to end, so the model with all of them spliced in predicts like
the model.

``train_transcoders`` fits each layer's transcoder to its own MLP. Spliced in together,
their errors compound through the network (``evaluate_transcoders(per_layer=True)``
shows the single layers' costs summing to well under the joint one). This stage trains
the decoders of all layers at once on::

    loss = KL(p_model || p_spliced) + fvu_coef * mean_l FVU_l

- ``p_model``, ``p_spliced``: next-token distributions at ``kl_positions`` random positions
  of each row, of the model and of the model with every MLP output (BOS position kept)
  replaced by its transcoder's output;
- ``FVU_l``: layer ``l``'s reconstruction error on the model's own MLP inputs, the local
  faithfulness that attribution graphs rely on (their error nodes hold the rest).

Only ``W_dec``, ``W_skip`` and ``b_dec`` train. Encoders and thresholds stay as they are,
so every feature fires exactly where it did (its feature-card examples still hold) and
only what it writes moves. This is the decoder-only variant of end-to-end SAE training
(Braun et al., 2024), run briefly after layer-wise training.

Two kinds of folder are fine-tuned:

- one SAE-Lens transcoder per layer (``layer_XX/``): matrices are saved in bfloat16, and
  the forward pass already uses their bfloat16 roundings (straight-through gradients into
  float32 master weights), so the export is exactly the model that was trained;
- a cross-layer transcoder (``circuitlab.clt``): every decoder ``W_dec[s][:, t - s]`` from
  layer ``s``'s features into layer ``t`` trains, with ``b_dec`` and ``W_skip``; it is saved in
  float32, as trained.

Example::

    from circuitlab.loading import load_model
    from circuitlab.train.finetune import finetune_transcoders
    finetune_transcoders(load_model("gemma-3-270m"), "data/transcoders/gemma-3-270m-clt-skip-jumprelu",
                         "~/.cache/circuitlab/corpus", "out", tokens=100_000)
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from sae_lens import SAE
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.utilities.activation_functions import apply_softcap

from circuitlab import clt_sources
from circuitlab.clt import CrossLayerTranscoder, is_clt_folder
from circuitlab.errors import CircuitlabError
from circuitlab.loading import load_transcoders
from circuitlab.hooks import layer_of, mlp_hooks, reads_of
from circuitlab.presets import is_pack
from circuitlab.splice import check_splice
from circuitlab.train.checkpoints import (CHECKPOINT_FILE, adam_tensors, load_checkpoint,
                                          restore_adam, save_checkpoint)
from circuitlab.train.data import TokenRows
from circuitlab.train.export import HISTORY, export_clt, export_layers
from circuitlab.train.schedule import Budgets, lr_at

DECODER = ("W_dec", "W_skip", "b_dec")
EMA = 0.9  # smoothing of the loss figures shown and recorded


@dataclasses.dataclass(frozen=True)
class FinetuneSettings:
    """Everything a resumed fine-tuning run must share with its checkpoint."""

    model_name: str
    n_layers: int
    d_model: int
    init_from: str
    corpus: str
    context: int
    batch_rows: int
    kl_positions: int
    lr: float
    fvu_coef: float
    seed: int


def finetune_transcoders(
    model: HookedTransformer,
    transcoders,
    corpus,
    out_dir,
    *,
    tokens: int = 200_000,
    time_budget: float | None = None,
    context: int = 128,
    batch_rows: int = 4,
    kl_positions: int = 32,
    lr: float = 1e-5,
    fvu_coef: float = 1.0,
    device: str = "cpu",
    seed: int = 0,
    checkpoint_every: float = 600.0,
    resume: bool = True,
    progress: bool = True,
    command: str | None = None,
) -> Path:
    """Fine-tune the decoders of a replacement model's transcoders on the spliced-in KL and
    the FVU.

    Args:
        model: the HookedTransformer, on ``device`` (left unchanged).
        transcoders: a folder of ``layer_XX/`` SAE-Lens transcoders, one per layer of the
            model (the bundle, a ``train_transcoders`` output, an earlier fine-tune), or a
            cross-layer transcoder's folder over all the model's layers (a ``train_clt``
            output, 8-bit ones included; the fine-tuned one is written in float32).
        corpus: text for ``iter_documents`` (the train split of a built corpus). If the
            folder's ``manifest.json`` says how many tokens its training read from this
            corpus with this ``context``, fine-tuning reads on from there.
        out_dir: output folder: ``layer_XX/`` SAE-Lens folders and ``manifest.json``.
        tokens: budget of tokens (BOS positions not counted), over all resumed runs.
        time_budget: wall-clock budget in seconds over all resumed runs (None: no limit).
        context: row length in tokens, BOS included.
        batch_rows: rows per optimizer step.
        kl_positions: positions per row where the KL is taken (random, BOS excluded). The
            unembedding of a large vocabulary costs more than the layers, so a subset of
            positions makes steps cheaper; every position still carries the FVU.
        lr: peak Adam learning rate (linear warm-up over 2%, decay over the last 20%).
        fvu_coef: weight of the mean FVU against the KL.
        device: where the model and transcoders run.
        seed: seed of the KL positions.
        checkpoint_every: seconds between checkpoints (each also exports the folders).
        resume: continue from ``out_dir/checkpoint`` if there is one.
        progress: show a progress bar with tokens/s, the KL and the mean FVU.
        command: the command to record in the manifest.

    Returns:
        ``out_dir``.

    Raises:
        CircuitlabError: for bad arguments, transcoders that do not fit the model, a
            corpus without enough text, a checkpoint with other settings, or a full disk.
    """
    if is_pack(corpus):
        raise CircuitlabError(
            f"{corpus} is a pack: it holds the embedding rows of its own tokens only, so the "
            "next-token distribution the fine-tuning matches is not there. Fine-tune with the "
            "full model and a corpus (the default: circuitlab.load_model() and the built corpus).")
    folder = Path(transcoders).expanduser().resolve()
    if is_clt_folder(folder):
        clt = clt_sources.resolve(folder, model.cfg.model_name).load(device=device,
                                                                     dtype=torch.float32)
        check_splice(model, clt)
        decoders = _CLTDecoders(clt)
    else:
        decoders = _LayerDecoders(load_transcoders(folder, model.cfg.model_name,
                                                   model.cfg.n_layers, device=device))
    _check_args(model, decoders, folder, tokens, context, batch_rows, kl_positions, lr, fvu_coef)
    settings = FinetuneSettings(
        model_name=model.cfg.model_name, n_layers=model.cfg.n_layers, d_model=model.cfg.d_model,
        init_from=str(folder), corpus=str(Path(corpus).expanduser().resolve()), context=context,
        batch_rows=batch_rows, kl_positions=kl_positions, lr=lr, fvu_coef=fvu_coef, seed=seed)
    out_dir = Path(out_dir).expanduser()
    command = command or (
        f"finetune_transcoders({settings.model_name!r}, {settings.init_from!r}, "
        f"{settings.corpus!r}, {str(out_dir)!r}, tokens={tokens}, time_budget={time_budget}, "
        f"context={context}, batch_rows={batch_rows}, kl_positions={kl_positions}, lr={lr}, "
        f"fvu_coef={fvu_coef}, seed={seed})")
    manifest = folder / "manifest.json"
    earlier = json.loads(manifest.read_text()) if manifest.is_file() else {}
    run = _Finetune(model, decoders, settings, out_dir, device, tokens, time_budget, command, earlier)
    ckpt = out_dir / "checkpoint"
    if resume and (ckpt / CHECKPOINT_FILE).exists():
        run.restore(*load_checkpoint(ckpt, settings))
    elif earlier.get("settings", {}).get("corpus") == settings.corpus and \
            earlier["settings"].get("context") == context:
        run.read_on(earlier.get("tokens_read", 0))
    return run.train(progress, checkpoint_every)


def _check_args(model, decoders, folder: Path, tokens: int, context: int, batch_rows: int,
                kl_positions: int, lr: float, fvu_coef: float) -> None:
    n, d = model.cfg.n_layers, model.cfg.d_model
    problems = []
    if decoders.layers != list(range(n)):
        problems.append(f"{folder} holds transcoders for layers {decoders.layers}, "
                        f"not one for each of the model's {n} layers")
    if decoders.shapes - {(d, d)}:
        problems.append(f"the transcoders map d_in, d_out = {sorted(decoders.shapes)}, the "
                        f"model's d_model is {d}")
    if tokens < 1:
        problems.append(f"tokens={tokens} must be >= 1")
    if not 2 <= context <= model.cfg.n_ctx:
        problems.append(f"context={context} must be in 2..{model.cfg.n_ctx} (the model's n_ctx)")
    if batch_rows < 1:
        problems.append(f"batch_rows={batch_rows} must be >= 1")
    if not 1 <= kl_positions <= context - 1:
        problems.append(f"kl_positions={kl_positions} must be in 1..{context - 1} (context - 1)")
    if lr <= 0 or fvu_coef < 0:
        problems.append(f"need lr > 0 (got {lr}) and fvu_coef >= 0 (got {fvu_coef})")
    if problems:
        raise CircuitlabError("Cannot fine-tune: " + "; ".join(problems) + ".")


def bf16_straight_through(w: torch.Tensor) -> torch.Tensor:
    """``w`` rounded to bfloat16 in the forward pass, identity in the backward pass."""
    return w + (w.to(torch.bfloat16).to(w.dtype) - w).detach()


def _fvu(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared error of ``pred`` over the variance of ``y [B, P, d]`` around its mean."""
    return (pred - y).pow(2).sum() / (y - y.mean((0, 1))).pow(2).sum()


@contextmanager
def _frozen(model: HookedTransformer):
    """No gradients for the model's own parameters (restored afterwards)."""
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


class _LayerDecoders:
    """The trained decoders of one SAE-Lens transcoder per layer."""

    def __init__(self, tcs: list[SAE]):
        self.tcs = tcs
        self.layers = [layer_of(tc.cfg.metadata.hook_name) for tc in tcs]
        self.shapes = {(tc.cfg.d_in, tc.cfg.d_out) for tc in tcs}
        self.dtype, self.reads = tcs[0].W_enc.dtype, "mlp_in"
        for tc in tcs:
            tc.requires_grad_(False)
        self.params = {f"{name}.{l}": torch.nn.Parameter(getattr(tc, name).detach().float().clone())
                       for l, tc in enumerate(tcs) for name in self._trained(tc)}

    @staticmethod
    def _trained(tc: SAE) -> list[str]:
        """The decoder parameters of ``tc`` to train (``b_dec`` not where the encoder reads it)."""
        names = [n for n in DECODER if getattr(tc, n, None) is not None]
        return [n for n in names if not (n == "b_dec" and tc.cfg.apply_b_dec_to_input)]

    def encode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The (fixed) feature activations of ``layer`` for MLP inputs ``x``."""
        return self.tcs[layer].encode(x)

    def decode(self, layer: int, acts: list, x: torch.Tensor) -> torch.Tensor:
        """Layer ``layer``'s output from its activations ``acts[layer]`` and inputs ``x``."""
        tc = self.tcs[layer]
        p = {n: self.params.get(f"{n}.{layer}") for n in DECODER}
        b_dec = tc.b_dec if p["b_dec"] is None else p["b_dec"]
        out = acts[layer] @ bf16_straight_through(p["W_dec"]) + b_dec
        if p["W_skip"] is not None:
            out = out + x @ bf16_straight_through(p["W_skip"]).T
        return out

    def export(self, out_dir: Path, manifest: dict) -> None:
        """Write the trained decoders into the transcoders and export them with ``manifest``."""
        with torch.no_grad():
            for name, p in self.params.items():
                n, layer = name.rsplit(".", 1)
                getattr(self.tcs[int(layer)], n).copy_(p)
        for tc in self.tcs:
            tc.cfg.metadata.finetune = {"trainer": "circuitlab decoder KL fine-tuning",
                                        "tokens_seen": manifest["tokens_seen"],
                                        **manifest["finetune"]}
        export_layers(dict(enumerate(self.tcs)), out_dir, manifest)


class _CLTDecoders:
    """The trained decoders of a cross-layer transcoder: ``W_dec.{s}`` (as stored: the
    layers of ``s``'s write window), ``b_dec`` and ``W_skip`` (all layers)."""

    def __init__(self, clt: CrossLayerTranscoder):
        self.clt = clt
        self.layers = list(range(clt.n_layers))
        self.shapes = {(clt.d_model, clt.d_model)}
        self.dtype, self.reads = clt.W_enc.dtype, reads_of(clt.hook_in)
        clt.requires_grad_(False)
        params = {f"W_dec.{s}": clt.stored_decoders(s) for s in self.layers}
        params["b_dec"] = clt.b_dec
        if clt.W_skip is not None:
            params["W_skip"] = clt.W_skip
        self.params = {n: torch.nn.Parameter(w.detach().float().clone()) for n, w in params.items()}

    def encode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The (fixed) feature activations of ``layer`` for MLP inputs ``x``."""
        return self.clt.encode(layer, x)

    def decode(self, layer: int, acts: list, x: torch.Tensor) -> torch.Tensor:
        """Layer ``layer``'s output from the activations ``acts[s]`` of every ``s <= layer``
        and its inputs ``x``."""
        out = self.params["b_dec"][layer]
        for s in range(layer + 1):
            if layer - s < self.clt.n_out(s):
                out = out + acts[s] @ self.params[f"W_dec.{s}"][:, layer - s]
        if "W_skip" in self.params:
            out = out + x @ self.params["W_skip"][layer].T
        return out

    def export(self, out_dir: Path, manifest: dict) -> None:
        """Write the trained decoders into the CLT and export it with ``manifest``."""
        with torch.no_grad():
            for s in self.layers:
                self.clt.W_dec[s].copy_(self.params[f"W_dec.{s}"])
            self.clt.b_dec.copy_(self.params["b_dec"])
            if self.clt.W_skip is not None:
                self.clt.W_skip.copy_(self.params["W_skip"])
        export_clt(self.clt, out_dir, manifest)


class _Finetune(Budgets):
    """One fine-tuning run: decoder parameters, Adam, data, budgets and exports."""

    def __init__(self, model, decoders, settings: FinetuneSettings, out_dir: Path,
                 device: str, tokens: int, time_budget, command: str, earlier: dict):
        self.model, self.decoders, self.s, self.device = model, decoders, settings, device
        self.out_dir, self.command, self.earlier = out_dir, command, earlier
        self.tokens, self.time_budget = tokens, time_budget
        self.params = decoders.params
        self.opt = torch.optim.Adam(self.params.values(), lr=settings.lr)
        self.counters = {"tokens_seen": 0, "tokens_read": 0, "steps": 0, "seconds": 0.0,
                         "docs_done": 0, "pending": [], "kl": None, "fvu": None}
        self.rows = TokenRows(model.tokenizer, settings.corpus, settings.context)
        self.started, self.seconds_before, self.stopped = time.monotonic(), 0.0, None

    def read_on(self, tokens_read: int) -> None:
        """Skip the rows that ``tokens_read`` training tokens came from."""
        self.rows.skip(tokens_read // (self.s.context - 1))
        self.counters.update(tokens_read=tokens_read, docs_done=self.rows.docs_done,
                             pending=self.rows.pending)

    def restore(self, tensors: dict, counters: dict) -> None:
        """Continue from a checkpoint's tensors and counters."""
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(tensors[name].to(p.device))
        restore_adam(self.opt, self.params, tensors, self.device)
        self.counters = counters
        self.seconds_before = counters["seconds"]
        self.rows = TokenRows(self.model.tokenizer, self.s.corpus, self.s.context,
                              docs_done=counters["docs_done"], pending=counters["pending"])

    # ------------------------------------------------------------------ training

    def train(self, show: bool, checkpoint_every: float) -> Path:
        c = self.counters
        if self.budget_reached() and (self.out_dir / "manifest.json").exists():
            return self.out_dir
        bar = tqdm(total=self.tokens, initial=min(c["tokens_seen"], self.tokens), unit="tok",
                   unit_scale=True, disable=not show, desc="Fine-tuning transcoders")
        last_checkpoint = time.monotonic()
        with _frozen(self.model):
            while not self.budget_reached():
                batch = self.rows.take(self.s.batch_rows)
                if len(batch) < self.s.batch_rows:
                    self._corpus_ran_out()
                    break
                kl, fvu = self.step(batch.to(self.device))
                n = batch.shape[0] * (batch.shape[1] - 1)
                c.update(tokens_seen=c["tokens_seen"] + n, tokens_read=c["tokens_read"] + n,
                         steps=c["steps"] + 1, docs_done=self.rows.docs_done,
                         pending=self.rows.pending)
                for key, value in (("kl", kl), ("fvu", fvu)):
                    c[key] = value if c[key] is None else EMA * c[key] + (1 - EMA) * value
                bar.update(n)
                bar.set_postfix(kl=f"{c['kl']:.3f}", fvu=f"{c['fvu']:.3f}", refresh=False)
                if time.monotonic() - last_checkpoint >= checkpoint_every:
                    self.save()
                    last_checkpoint = time.monotonic()
        bar.close()
        self.save()
        return self.out_dir

    def _corpus_ran_out(self) -> None:
        if self.counters["steps"] == 0:
            raise CircuitlabError(
                f"The corpus {self.s.corpus} has fewer than {self.s.batch_rows} rows of "
                f"{self.s.context - 1} tokens after the {self.counters['docs_done']} documents "
                "already read; add text, or lower batch_rows or context."
            )
        self.stopped = "corpus"
        warnings.warn(f"The corpus ran out after {self.counters['tokens_seen']} tokens.")

    def step(self, tokens: torch.Tensor) -> tuple[float, float]:
        """One Adam step on rows ``tokens [B, P]``; returns its KL and mean FVU."""
        m, s = self.model, self.s
        gen = torch.Generator().manual_seed(s.seed * 1_000_003 + self.counters["steps"])
        pos = torch.rand(tokens.shape[0], tokens.shape[1] - 1, generator=gen).argsort(-1)
        pos = (pos[:, :s.kl_positions] + 1).to(tokens.device)
        xs, ys = {}, {}
        dec, n_layers = self.decoders, len(self.decoders.layers)

        def keep(layer, x, out):
            xs[layer], ys[layer] = x[:, 1:].to(dec.dtype), out[:, 1:].to(dec.dtype)

        with torch.no_grad():
            resid = m.run_with_hooks(tokens, stop_at_layer=m.cfg.n_layers,
                                     fwd_hooks=mlp_hooks(m, keep, read=dec.reads))
            logp = self._log_probs(resid, pos)
            acts = [dec.encode(l, xs[l]) for l in range(n_layers)]
        fvu = torch.stack([_fvu(dec.decode(l, acts, xs[l]), ys[l]) for l in range(n_layers)])
        acts = [None] * n_layers

        def splice(layer, x, act):
            x = x[:, 1:].to(dec.dtype)
            acts[layer] = dec.encode(layer, x)
            out = dec.decode(layer, acts, x).to(act.dtype)
            return torch.cat([act[:, :1], out], dim=1)

        resid = m.run_with_hooks(tokens, stop_at_layer=m.cfg.n_layers,
                                 fwd_hooks=mlp_hooks(m, splice, read=dec.reads))
        logq = self._log_probs(resid, pos)
        kl = (logp.exp() * (logp - logq)).sum(-1).mean()
        loss = kl + s.fvu_coef * fvu.mean()
        for group in self.opt.param_groups:
            group["lr"] = lr_at(s.lr, self.progress())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return float(kl.detach()), float(fvu.detach().mean())

    def _log_probs(self, resid: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Next-token log-probabilities ``[B, K, vocab]`` at positions ``pos [B, K]`` from the
        residual stream after the last block."""
        m = self.model
        picked = resid.gather(1, pos[..., None].expand(-1, -1, resid.shape[-1]))
        logits = apply_softcap(m.unembed(m.ln_final(picked)), m.cfg.output_logits_soft_cap)
        return logits.float().log_softmax(-1)

    # ------------------------------------------------------------------ saving

    def save(self) -> None:
        """Export the folders and the manifest, then write the checkpoint."""
        c = self.counters
        c["seconds"] = self.seconds()
        s = self.s
        manifest = {
            "command": self.command, "tokens_seen": c["tokens_seen"],
            "tokens_read": c["tokens_read"], "steps": c["steps"], "seconds": round(c["seconds"], 1),
            "tokens_per_second": round(c["tokens_seen"] / max(c["seconds"], 1e-9), 1),
            "stopped": self.stopped, "settings": dataclasses.asdict(s),
            "finetune": {"kl": c["kl"], "fvu": c["fvu"]},
            "init_from": {"path": s.init_from,
                          **{n: self.earlier[n] for n in HISTORY if n in self.earlier}},
        }
        self.decoders.export(self.out_dir, manifest)
        save_checkpoint(self.out_dir / "checkpoint", adam_tensors(self.opt, self.params), s, c)
