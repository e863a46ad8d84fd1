"""Interventions: set, scale, ablate or add transcoder features and watch the output move.

An intervention edits feature activations ``(layer, pos, feature)`` (named as in
``circuitlab.edits``) and re-runs the model in one of three modes:

- ``"free"``: the real model re-runs. At an intervened layer the MLP output moves by the
  decoded change of the edited features (for a cross-layer transcoder, at that layer and
  every later one it writes to); everything downstream (attention, later MLPs and so
  their features) responds. With no edits the logits are the model's own.
- ``"frozen-attention"``: the same, with attention patterns kept from the clean run.
- ``"constrained"``: attention patterns, norm denominators and every feature outside the
  intervention are frozen at their clean values, and error terms are carried: the linear
  regime an attribution graph describes, where an edge weight is exactly the change of
  its target's input when its source is ablated.

An edit so large that the run overflows (non-finite logits, or a norm whose sum of squares
overflows, which zeroes its output and leaves logits that no longer depend on the prompt)
is refused with an error that names the largest value, rather than reported as a result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go
import torch

from . import checks
from .cards import find_examples
from .edits import (Edit, Intervention, ablate, add, apply_edits, build, feature_sites, positions,
                    resolve, scale, set_to)
from .errors import CircuitlabError
from .replacement import Outcome, ReplacementModel

__all__ = ["MODES", "Intervention", "InterventionResult", "set_to", "scale", "ablate", "add",
           "intervene", "generate", "sweep", "plot_sweep", "swap", "feature_sites"]

MODES = ("free", "frozen-attention", "constrained")

# ---------------------------------------------------------------------- runs


def dense_activations(rm, trace) -> list[torch.Tensor]:
    """Per layer, the clean activations ``[P, d_sae]`` recorded in ``trace`` (on the model's
    device, in the transcoders' dtype)."""
    P = len(trace.tokens)
    out = []
    for l, (pos, feat, act) in enumerate(trace.features):
        dense = act.new_zeros(P, rm.d_sae(l))
        dense[pos, feat] = act
        out.append(dense)
    return out


def run_edited(rm: ReplacementModel, tokens: torch.Tensor, edits: dict[int, list[Edit]],
               mode: str, trace=None, clean_acts=None) -> Outcome:
    """Run ``tokens`` with ``edits`` in ``mode`` (``trace`` and ``clean_acts`` from the clean
    run are needed by the frozen modes).

    Raises:
        CircuitlabError: for an unknown mode, or edits so large that the run overflows.
    """
    if mode not in MODES:
        raise CircuitlabError(f"Unknown mode {mode!r}; use one of {MODES}.")
    out = _run(rm, tokens, edits, mode, trace, clean_acts)
    if edits:
        _check_overflow(rm, out, edits)
    return out


def _run(rm, tokens, edits, mode, trace, clean_acts) -> Outcome:
    """``run_edited`` without its checks."""
    if mode == "constrained":
        new = [apply_edits(clean_acts[l], edits.get(l, [])) for l in range(rm.n_layers)]
        mlp_in, resid = rm.frozen_run(
            trace, lambda l, x: rm.decode(l, new, x) + trace.errors[l])
        final = rm.final_normed(trace, resid)
        return Outcome(rm.unembed(final), mlp_in, final)

    changes = [None] * rm.n_layers  # per layer, the edit's change of its activations

    def edit_out(layer, x, out):
        if layer in edits:
            acts = rm.encode(layer, x, tokens)
            changes[layer] = apply_edits(acts, edits[layer]) - acts
        written = rm.write(layer, changes)  # a cross-layer feature's change reaches every layer
        return None if isinstance(written, float) else out + written

    patterns = trace.patterns if mode == "frozen-attention" else None
    return rm.edited_run(tokens, edit_out, patterns=patterns)


def _check_overflow(rm, out: Outcome, edits: dict[int, list[Edit]]) -> None:
    """Refuse an edited run that overflowed: non-finite logits, or a position whose final
    norm output is non-finite or lost every input (all its normalized values zero, as when
    the sum of squares overflows to infinity)."""
    ln = rm.model.ln_final
    normed = out.final - (ln.b if hasattr(ln, "b") else 0)
    lost = (normed == 0).all(-1) | ~torch.isfinite(normed).all(-1)
    if torch.isfinite(out.logits).all() and not lost.any():
        return
    largest = max(float(e.value.abs().max()) for es in edits.values() for e in es)
    raise CircuitlabError(
        f"The intervention overflowed the model's {str(out.logits.dtype).removeprefix('torch.')} "
        f"arithmetic (its largest value is {largest:.3g}): the logits are non-finite or no "
        "longer depend on the prompt. The value is too large; use values on the scale of the "
        "features' activations (e.g. relative='max' with a factor of a few).")


# ---------------------------------------------------------------------- results


@dataclass
class InterventionResult:
    """What an intervention did to the next-token prediction.

    Attributes:
        prompt, mode: what was run.
        before / after: the top tokens of the clean and the intervened run (DataFrames
            with ``token, id, prob, logit`` and the other run's ``prob`` for comparison).
        tokens: the chosen tokens: ``token, id, clean_prob, prob, delta_prob, clean_logit,
            logit, delta_logit``.
        clean_logits / logits: ``[d_vocab]`` at the read position.
    """

    prompt: str
    mode: str
    before: pd.DataFrame
    after: pd.DataFrame
    tokens: pd.DataFrame
    clean_logits: torch.Tensor
    logits: torch.Tensor

    def prob(self, token) -> float:
        """Intervened probability of ``token``: an id, or a string listed in a table."""
        if isinstance(token, int):
            return float(torch.softmax(self.logits.double(), -1)[token])
        for df in (self.tokens, self.after, self.before):
            hit = df.loc[df["token"] == token, "id"]
            if len(hit):
                return self.prob(int(hit.iloc[0]))
        raise CircuitlabError(f"{token!r} is not in this result's tables; pass its id or list "
                              "it in tokens=[...].")

    def __repr__(self) -> str:
        fmt = lambda df: ", ".join(f"{t!r} {p:.3f}" for t, p in zip(df["token"], df["prob"]))  # noqa: E731
        lines = [f"InterventionResult({self.mode}) on {self.prompt!r}",
                 f"  before: {fmt(self.before)}", f"  after:  {fmt(self.after)}"]
        lines += [f"  {r.token!r}: {r.clean_prob:.3f} -> {r.prob:.3f} ({r.delta_prob:+.3f})"
                  for r in self.tokens.itertuples()]
        return "\n".join(lines)


def _top(rm, logits: torch.Tensor, other: torch.Tensor, k: int) -> pd.DataFrame:
    probs, other_probs = (torch.softmax(v.double(), -1) for v in (logits, other))
    ids = torch.argsort(probs, descending=True)[:k].tolist()
    return pd.DataFrame({"token": rm.token_strs(ids), "id": ids,
                         "prob": probs[ids].tolist(), "logit": logits[ids].tolist(),
                         "other_prob": other_probs[ids].tolist()})


def compare_logits(rm, prompt: str, mode: str, clean: torch.Tensor, new: torch.Tensor,
                   tokens=None, top: int = 5) -> InterventionResult:
    """An ``InterventionResult`` from clean and intervened logits at one position."""
    ids = [rm.token_id(t) for t in (tokens or [])]
    pc, pn = (torch.softmax(v.double(), -1) for v in (clean, new))
    table = pd.DataFrame({
        "token": rm.token_strs(ids), "id": ids,
        "clean_prob": pc[ids].tolist(), "prob": pn[ids].tolist(),
        "delta_prob": (pn[ids] - pc[ids]).tolist(), "clean_logit": clean[ids].tolist(),
        "logit": new[ids].tolist(), "delta_logit": (new[ids] - clean[ids]).tolist()})
    return InterventionResult(prompt, mode, _top(rm, clean, new, top), _top(rm, new, clean, top),
                              table, clean, new)


# ---------------------------------------------------------------------- the API


def _max_activation(rm):
    """``(layer, feature) -> max activation`` on held-out text, from the feature cards."""
    def lookup(layer: int, feature: int) -> float:
        examples, why = find_examples(rm)
        if examples is None:
            raise CircuitlabError(f"A value relative to a feature's maximum activation needs "
                                  f"the feature cards: {why}")
        return float(examples.max_act[layer, feature])

    return lookup


def intervene(rm, prompt: str, interventions, mode: str = "free", *, tokens=None,
              top: int = 5, pos: int = -1) -> InterventionResult:
    """Run ``prompt`` with feature ``interventions`` and compare the prediction at ``pos``.

    Args:
        rm: the ReplacementModel.
        prompt: the text.
        interventions: ``Intervention``s (from ``set_to``, ``scale``, ``ablate``, ``add``)
            or ``(layer, pos, feature, value)`` tuples that set activations. May be empty:
            then the logits equal the clean run's in every mode.
        mode: ``"free"``, ``"frozen-attention"`` or ``"constrained"`` (module docstring).
        tokens: tokens (strings or ids) whose change to report.
        top: how many top tokens to list before and after.
        pos: the position whose next-token prediction is read.

    Returns:
        An ``InterventionResult``.

    Raises:
        CircuitlabError: for interventions, values or positions that cannot be used, or
            values so large that the run overflows.
    """
    checks.integer("top", top)
    ids = rm.tokenize(prompt)
    read = positions(pos, len(ids))
    if len(read) != 1 or not isinstance(pos, int):
        raise CircuitlabError(f"pos={pos!r} must be one position (an int, negative from the end): "
                              "the prediction read after the intervention.")
    trace = rm.run(ids)
    clean_acts = dense_activations(rm, trace)
    edits = resolve(rm, interventions, clean_acts, _max_activation(rm))
    out = run_edited(rm, ids, edits, mode, trace, clean_acts)
    return compare_logits(rm, prompt, mode, trace.logits[read[0]], out.logits[read[0]], tokens, top)


def generate(rm, prompt: str, interventions=(), max_new_tokens: int = 20, *,
             new_positions: bool = False, temperature: float = 0.0, top_k: int | None = None,
             seed: int | None = None, stop_at_eos: bool = True) -> str:
    """Continue ``prompt`` with ``interventions`` applied (free mode).

    Args:
        rm: the ReplacementModel.
        prompt: the text.
        interventions: as for ``intervene``; applied at their prompt positions.
        max_new_tokens: how many tokens to generate at most.
        new_positions: also apply every intervention at each generated position (with
            the largest value it resolved to on the prompt).
        temperature: 0 for greedy decoding, else sampling temperature.
        top_k: sample from the ``top_k`` most likely tokens only.
        seed: seed of the sampler (sampling is deterministic given it).
        stop_at_eos: stop at the end-of-sequence token.

    Returns:
        The generated continuation (without the prompt).
    """
    checks.number("temperature", temperature, 0.0)
    checks.integer("max_new_tokens", max_new_tokens)
    checks.integer("top_k", top_k, none=True)
    ids = rm.tokenize(prompt)
    P0 = len(ids)
    if P0 + max_new_tokens > rm.cfg.n_ctx:
        raise CircuitlabError(f"{P0} prompt tokens + {max_new_tokens} new ones exceed the "
                              f"model's context of {rm.cfg.n_ctx}; generate fewer tokens.")
    edits = resolve(rm, interventions, dense_activations(rm, rm.run(ids)), _max_activation(rm))
    gen = torch.Generator().manual_seed(seed) if seed is not None else None  # samples on the CPU
    for _ in range(max_new_tokens):
        step = _extend(edits, P0, len(ids)) if new_positions else edits
        logits = run_edited(rm, ids, step, "free").logits[-1].double().cpu()
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            if top_k is not None:
                logits[logits < logits.topk(top_k).values[-1]] = -math.inf
            nxt = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen))
        ids = torch.cat([ids, torch.tensor([nxt], device=ids.device)])
        if stop_at_eos and nxt == rm.tokenizer.eos_token_id:
            break
    return rm.tokenizer.decode(ids[P0:].tolist())


def _extend(edits: dict[int, list[Edit]], start: int, stop: int) -> dict[int, list[Edit]]:
    """``edits`` plus the same edits at positions ``start..stop-1``."""
    out = {}
    for layer, es in edits.items():
        out[layer] = list(es)
        for e in es:
            new = torch.arange(start, stop, device=e.pos.device)
            v = e.value[e.value.abs().argmax()]
            out[layer].append(Edit(new, e.feature[:1].expand(len(new)), e.op, v.expand(len(new))))
    return out


def sweep(rm, prompt: str, features, values, *, op: str = "scale", relative: str | None = None,
          pos=None, mode: str = "free", tokens=None, top: int = 3) -> pd.DataFrame:
    """Probabilities of chosen tokens as the intervention strength on ``features`` varies.

    Args:
        rm: the ReplacementModel.
        prompt: the text.
        features: features or a supernode (see the module docstring).
        values: the strengths: factors for ``op="scale"``, values for ``"set"``/``"add"``.
        op, relative, pos: as for ``set_to``/``scale``/``add``.
        mode: the intervention mode.
        tokens: tokens to follow; default the clean top ``top`` plus every token that
            becomes the most likely at some strength.

    Returns:
        A long DataFrame with columns ``value, token, id, prob, logit, clean_prob``.
    """
    ids = rm.tokenize(prompt)
    trace = rm.run(ids)
    clean_acts = dense_activations(rm, trace)
    runs = []
    values = list(values)
    if not values:
        raise CircuitlabError("values is empty; pass the strengths to sweep, e.g. [0, 0.5, 1, 2].")
    for v in values:
        edits = resolve(rm, build(features, v, op, pos, relative), clean_acts, _max_activation(rm))
        runs.append((float(v), run_edited(rm, ids, edits, mode, trace, clean_acts).logits[-1]))
    clean = torch.softmax(trace.logits[-1].double(), -1)
    if tokens is None:
        follow = torch.argsort(clean, descending=True)[:top].tolist()
        follow += [int(l.argmax()) for _, l in runs if int(l.argmax()) not in follow]
    else:
        follow = [rm.token_id(t) for t in tokens]
    rows = []
    for v, logits in runs:
        probs = torch.softmax(logits.double(), -1)
        rows += [dict(value=v, token=rm.token_str(t), id=t, prob=float(probs[t]),
                      logit=float(logits[t]), clean_prob=float(clean[t])) for t in follow]
    return pd.DataFrame(rows)


def plot_sweep(df: pd.DataFrame, tokens=None, title: str | None = None):
    """A Plotly figure of probability against strength, one line per token of a ``sweep``."""
    fig = go.Figure()
    for token, part in df.groupby("token", sort=False):
        if tokens is None or token in tokens:
            fig.add_trace(go.Scatter(x=part["value"], y=part["prob"], mode="lines+markers",
                                     name=repr(token)))
    fig.update_layout(title=title or "Intervention sweep", xaxis_title="strength",
                      yaxis_title="probability", template="plotly_white")
    return fig


def swap(rm, prompt: str, remove, add, strength: float = 1.0, *, pos=None, mode: str = "free",
         tokens=None, top: int = 5) -> InterventionResult:
    """Swap one concept for another: ablate ``remove`` and switch on ``add``.

    The Texas -> California experiment in one call: scale the Texas features by
    ``1 - strength`` where they are active (``strength=1`` ablates them; more pushes them
    negative) and set the California features (found on another prompt) to ``strength``
    times their reference activation.

    Args:
        rm: the ReplacementModel.
        prompt: the text.
        remove: features or a supernode to ablate (at their own position if named with
            one, else wherever active).
        add: features or a supernode to switch on. Each needs a reference activation: the
            ``activation`` column of a search result (e.g. ``rm.features_for(other_prompt,
            "California")``), else its maximum activation from the feature cards.
        strength: how far to swap: 1 replaces one concept by the other, 2 overshoots.
        pos: positions for ``add``; default every position where a removed feature is
            active on ``prompt``.
        mode, tokens, top: as for ``intervene``.

    Returns:
        An ``InterventionResult`` (``before`` and ``after`` list the top tokens).
    """
    checks.number("strength", strength)
    ids = rm.tokenize(prompt)
    trace = rm.run(ids)
    clean_acts = dense_activations(rm, trace)
    removed, added = feature_sites(remove), feature_sites(add)
    if not removed or not added:
        raise CircuitlabError("swap needs features to remove and features to add; both lists "
                              "must be non-empty.")
    ivs = [Intervention(l, f, "all" if p is None else p, 1.0 - strength, "scale")
           for l, f, p, _ in removed]
    if pos is None:
        pos = sorted({p for iv in ivs for p in positions(iv.pos, len(ids))
                      if clean_acts[iv.layer][p, iv.feature] != 0})
        if not pos:
            raise CircuitlabError("None of the features to remove is active on this prompt, so "
                                  "there is nowhere to add the others; pass pos=...")
    maxima = _max_activation(rm)
    for l, f, _, ref in added:
        ivs.append(Intervention(l, f, pos, strength * (maxima(l, f) if ref is None else ref)))
    edits = resolve(rm, ivs, clean_acts)
    out = run_edited(rm, ids, edits, mode, trace, clean_acts)
    return compare_logits(rm, prompt, mode, trace.logits[-1], out.logits[-1], tokens, top)
