"""Evaluate transcoders on held-out text: per-layer FVU, L0 and dead features, and the
next-token loss of the model with every MLP replaced by its transcoder (and, optionally,
with each layer's alone, which shows where the spliced-in loss comes from). A cross-layer
transcoder (``circuitlab.clt``) is evaluated the same way: each layer's reconstruction is
the sum of the writes of the features of that layer and every earlier one.

A corpus built by ``circuitlab corpus`` has two evaluation splits: ``heldout``, documents
of the training mix held out from training, and ``prose``, short factual and narrative
paragraphs in five languages from sources the training mix leaves out. Several splits
are evaluated one after the other and shown side by side.

Example::

    from circuitlab.train.evaluate import evaluate_transcoders, format_table
    df = evaluate_transcoders(model, transcoders, "~/.cache/circuitlab/corpus")
    print(format_table(df))
    both = evaluate_transcoders(model, transcoders, corpus, split=["heldout", "prose"])
    print(format_table(both))                  # a column group per split
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from sae_lens import SAE
from transformer_lens import HookedTransformer

from circuitlab.clt import CrossLayerTranscoder
from circuitlab.errors import CircuitlabError
from circuitlab.hooks import mlp_hooks
from circuitlab.replacement import ReplacementModel
from circuitlab.train.data import TokenRows

EVAL_BATCH_TOKENS = 512  # tokens per forward (the logits of a large vocabulary are big)


class _LayerStats:
    """Running sums for one layer's FVU, L0 and feature use (BOS positions excluded)."""

    def __init__(self, d_sae: int, d_out: int, device):
        self.sse = torch.zeros((), dtype=torch.float64, device=device)
        self.sum_y = torch.zeros(d_out, dtype=torch.float64, device=device)
        self.sum_y2 = torch.zeros((), dtype=torch.float64, device=device)
        self.active = torch.zeros((), dtype=torch.float64, device=device)
        self.fired = torch.zeros(d_sae, dtype=torch.bool, device=device)
        self.n = 0

    def add(self, acts: torch.Tensor, pred: torch.Tensor, y: torch.Tensor) -> None:
        """Add tokens: feature activations ``[N, d_sae]``, prediction and target ``[N, d]``."""
        y = y.double()
        self.sse += (pred.double() - y).pow(2).sum()
        self.sum_y += y.sum(0)
        self.sum_y2 += y.pow(2).sum()
        self.active += (acts != 0).sum()
        self.fired |= (acts != 0).any(0)
        self.n += len(y)

    def row(self) -> dict:
        variance = self.sum_y2 - self.sum_y.pow(2).sum() / self.n
        return {"fvu": float(self.sse / variance), "l0": float(self.active / self.n),
                "dead": float(1 - self.fired.double().mean())}


def evaluate_transcoders(
    model: HookedTransformer,
    transcoders: list[SAE] | CrossLayerTranscoder,
    corpus,
    *,
    tokens: int = 50_000,
    context: int = 128,
    split: str | Sequence[str] = "heldout",
    device: str = "cpu",
    per_layer: bool = False,
) -> pd.DataFrame | dict[str, pd.DataFrame]:
    """Per-layer FVU, L0 and dead share, and the cross-entropy cost of splicing.

    Text is packed into rows of ``context`` tokens that start with BOS (as in training);
    BOS positions are left out of the statistics. The spliced model replaces every MLP
    output by its transcoder's (no error terms), except at BOS, which keeps the model's
    own MLP output (transcoders are not trained there).

    Args:
        model: the HookedTransformer, on ``device``.
        transcoders: one SAE-Lens transcoder per layer, in layer order, or a
            ``CrossLayerTranscoder``, on ``device``. With a CLT, a layer's features are
            those it reads (``l0``, ``dead``) and its FVU that of the writes of its and all
            earlier layers' features (plus its skip), as spliced in.
        corpus: text for ``iter_documents``.
        tokens: about how many tokens to evaluate (whole rows).
        context: row length, BOS included.
        split: corpus split ("heldout" and "prose" need a corpus built by
            ``build_corpus``), or several, as a sequence or comma-separated, e.g.
            ``"heldout,prose"``: each is evaluated on up to ``tokens`` tokens.
        device: where to put the tokens.
        per_layer: also measure the CE increase of splicing each layer alone (one more
            forward pass per layer and batch; for a CLT, that layer's MLP output replaced by
            what the features of it and every earlier layer write into it).

    Returns:
        One row per layer with columns ``layer``, ``fvu`` (squared error over the total
        variance of ``hook_mlp_out`` around its mean), ``l0`` (active features per token)
        and ``dead`` (share of features never active), and with ``per_layer``,
        ``ce_alone`` (nats per token added when only this layer's MLP is replaced).
        ``df.attrs`` holds ``ce_clean``, ``ce_spliced``, ``ce_increase`` (nats per token),
        ``kl`` (mean KL divergence of the spliced next-token distribution from the
        model's, BOS position excluded), ``tokens`` and ``split``. For several splits, a
        dict of such frames by split.

    Raises:
        CircuitlabError: if a split is missing or holds less than one row of text.
    """
    rm = ReplacementModel(model, transcoders)
    splits = [s.strip() for s in split.split(",")] if isinstance(split, str) else list(split)
    if isinstance(split, str) and len(splits) == 1:
        return _evaluate(rm, corpus, splits[0], tokens, context, device, per_layer)
    return {s: _evaluate(rm, corpus, s, tokens, context, device, per_layer) for s in splits}


def _evaluate(rm: ReplacementModel, corpus, split: str, tokens: int, context: int, device: str,
              per_layer: bool) -> pd.DataFrame:
    """`evaluate_transcoders` on one split."""
    rows = TokenRows(rm.model.tokenizer, corpus, context, split=split).take(
        max(1, -(-tokens // (context - 1))))
    if not len(rows):
        raise CircuitlabError(f"The {split} split of {corpus} holds fewer than {context - 1} tokens: "
                              "nothing to evaluate.")
    stats = [_LayerStats(rm.d_sae(l), rm.d_model, device) for l in range(rm.n_layers)]
    ce_clean = ce_spliced = kl = 0.0
    ce_alone = torch.zeros(len(stats), dtype=torch.float64)
    for batch in rows.to(device).split(max(1, EVAL_BATCH_TOKENS // context)):
        clean, spliced = _run(rm, batch, stats)
        ce_clean += _next_token_loss(clean, batch) * len(batch)
        ce_spliced += _next_token_loss(spliced, batch) * len(batch)
        kl += _kl(clean, spliced) * len(batch)
        for layer in range(len(stats) if per_layer else 0):
            ce_alone[layer] += _next_token_loss(_splice(rm, batch, [layer]), batch) * len(batch)
    df = pd.DataFrame([{"layer": l, **s.row()} for l, s in enumerate(stats)])
    ce_clean, ce_spliced = ce_clean / len(rows), ce_spliced / len(rows)
    if per_layer:
        df["ce_alone"] = (ce_alone / len(rows) - ce_clean).tolist()
    df.attrs.update(ce_clean=ce_clean, ce_spliced=ce_spliced, ce_increase=ce_spliced - ce_clean,
                    kl=kl / len(rows), tokens=len(rows) * (context - 1), split=split)
    return df


def _run(rm: ReplacementModel, tokens: torch.Tensor, stats: list[_LayerStats]):
    """Clean and spliced logits ``[B, P, vocab]`` of ``tokens [B, P]``; accumulates ``stats``
    from the clean run's MLP inputs and outputs."""
    transcode = _transcoder(rm)

    def measure(layer, x, act):
        acts, pred = transcode(layer, x)
        stats[layer].add(acts[:, 1:].flatten(0, 1), pred[:, 1:].flatten(0, 1),
                         act[:, 1:].flatten(0, 1))

    with torch.no_grad():
        clean = rm.model.run_with_hooks(tokens,
                                        fwd_hooks=mlp_hooks(rm.model, measure, read=rm.reads))
    return clean, _splice(rm, tokens, range(len(stats)))


def _splice(rm: ReplacementModel, tokens: torch.Tensor, layers) -> torch.Tensor:
    """Logits with the MLP outputs of ``layers`` replaced by their transcoders' (BOS kept).
    Every layer is encoded: a cross-layer transcoder's features write into later layers."""
    layers, transcode = set(layers), _transcoder(rm)

    def splice(layer, x, act):
        pred = transcode(layer, x)[1].to(act.dtype)
        return torch.cat([act[:, :1], pred[:, 1:]], dim=1) if layer in layers else None

    with torch.no_grad():
        return rm.model.run_with_hooks(tokens,
                                       fwd_hooks=mlp_hooks(rm.model, splice, read=rm.reads))


def _transcoder(rm: ReplacementModel):
    """``transcode(layer, x)``: the feature activations of ``layer`` and the transcoders'
    output there for their inputs ``x`` (the MLP input, or the residual stream before the
    pre-MLP norm where they read that; in their dtype, whatever the model's),
    for the layers of one forward pass in order: it keeps each layer's activations for
    the cross-layer writes into later layers."""
    acts = [None] * rm.n_layers

    def transcode(layer: int, x: torch.Tensor):
        x = x.to(rm.encoder(layer)[0].dtype)
        acts[layer] = rm.encode(layer, x)
        return acts[layer], rm.decode(layer, acts, x)

    return transcode


def _next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> float:
    """Mean cross-entropy of predicting ``tokens[:, 1:]``."""
    return float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten()))


def _kl(clean: torch.Tensor, spliced: torch.Tensor) -> float:
    """Mean ``KL(p_clean || p_spliced)`` of next-token distributions, BOS position excluded."""
    logp, logq = clean[:, 1:].float().log_softmax(-1), spliced[:, 1:].float().log_softmax(-1)
    return float((logp.exp() * (logp - logq)).sum(-1).mean())


#: Columns of the table: name, header, format.
COLUMNS = (("fvu", "FVU", "{:.3f}"), ("l0", "L0", "{:.1f}"), ("dead", "dead", "{:.1%}"),
           ("ce_alone", "CE alone", "{:+.3f}"))


def format_table(result: pd.DataFrame | Mapping[str, pd.DataFrame]) -> str:
    """A markdown table of ``evaluate_transcoders`` output, with the mean and the CE line.

    For several splits, a column group per split, and a second table of the spliced-in
    cross-entropy and KL on each.
    """
    results = dict(result) if isinstance(result, Mapping) else {"": result}
    cols = [(split, c, (f"{head} ({split})" if split else head), fmt)
            for split, df in results.items() for c, head, fmt in COLUMNS if c in df]
    lines = ["| layer | " + " | ".join(head for _, _, head, _ in cols) + " |",
             "|---:|" + "---:|" * len(cols)]
    first = next(iter(results.values()))
    for i, layer in enumerate(first.layer):
        lines.append(f"| {int(layer)} | " + " | ".join(
            fmt.format(results[split][c].iloc[i]) for split, c, _, fmt in cols) + " |")
    lines.append("| mean | " + " | ".join(fmt.format(results[split][c].mean()) for split, c, _, fmt in cols) + " |")
    a = first.attrs
    if "ce_clean" not in a:
        return "\n".join(lines)
    if not isinstance(result, Mapping):
        lines.append(f"\nNext-token CE over {a['tokens']} tokens: clean {a['ce_clean']:.3f}, "
                     f"all MLPs spliced {a['ce_spliced']:.3f} (+{a['ce_increase']:.3f} nats); "
                     f"KL from the model {a['kl']:.3f} nats.")
        return "\n".join(lines)
    rows = (("tokens", "tokens", "{:,}"), ("ce_clean", "CE clean", "{:.3f}"),
            ("ce_spliced", "CE, all MLPs spliced", "{:.3f}"), ("ce_increase", "CE increase", "{:+.3f}"),
            ("kl", "KL from the model", "{:.3f}"))
    lines += ["", "| | " + " | ".join(results) + " |", "|---|" + "---:|" * len(results)]
    lines += [f"| {head} | " + " | ".join(fmt.format(df.attrs[key]) for df in results.values()) + " |"
              for key, head, fmt in rows]
    return "\n".join(lines)
