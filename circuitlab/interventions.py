"""Interventions: set, scale, ablate or add transcoder features and watch the output move.

An intervention edits feature activations ``(layer, pos, feature)`` and re-runs the model
in one of three modes:

- ``"free"``: the real model re-runs. At an intervened layer the MLP output moves by the
  decoded change of the edited features; everything downstream (attention, later MLPs
  and so their features) responds. With no edits the logits are the model's own.
- ``"frozen-attention"``: the same, with attention patterns kept from the clean run.
- ``"constrained"``: attention patterns, norm denominators and every feature outside the
  intervention are frozen at their clean values, and error terms are carried: the linear
  regime an attribution graph describes, where an edge weight is exactly the change of
  its target's input when its source is ablated.

Features are named by ``(layer, feature)`` (at every position, or the ``pos`` argument),
``(layer, pos, feature)``, a graph node id ``"L_F_P"``, a DataFrame with ``layer`` and
``feature`` columns (and optionally ``pos`` and ``activation``, as the search helpers
return), a supernode (a list of any of these) or a dict of supernodes.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import pandas as pd
import torch

from .loading import CircuitlabError

MODES = ("free", "frozen-attention", "constrained")
OPS = ("set", "scale", "add")
RELATIVE = (None, "prompt", "max")


@dataclass(frozen=True)
class Intervention:
    """One edit of one feature.

    Attributes:
        layer, feature: which feature.
        pos: an int (negative counts from the end), a list of ints, a slice, or ``"all"``.
        value: the new value (``op="set"``), factor (``"scale"``) or increment (``"add"``).
        op: ``"set"``, ``"scale"`` or ``"add"``.
        relative: ``None`` (``value`` is absolute), ``"prompt"`` (times the feature's
            activation on the prompt at that position) or ``"max"`` (times its maximum
            activation observed on held-out text, from the feature cards).
    """

    layer: int
    feature: int
    pos: int | slice | str = "all"
    value: float = 0.0
    op: str = "set"
    relative: str | None = None


# ---------------------------------------------------------------------- naming features


def feature_sites(features) -> list[tuple[int, int, int | None, float | None]]:
    """``[(layer, feature, pos or None, activation or None), ...]`` from any way of naming
    features (see the module docstring)."""
    if isinstance(features, pd.DataFrame):
        missing = {"layer", "feature"} - set(features.columns)
        if missing:
            raise CircuitlabError(
                f"The DataFrame of features lacks columns {sorted(missing)}; pass one with "
                "'layer' and 'feature' (and optionally 'pos', 'activation').")
        return [(int(r["layer"]), int(r["feature"]),
                 int(r["pos"]) if "pos" in r and not pd.isna(r["pos"]) else None,
                 float(r["activation"]) if "activation" in r and not pd.isna(r["activation"]) else None)
                for r in features.to_dict("records")]
    if isinstance(features, Mapping):
        return [s for group in features.values() for s in feature_sites(group)]
    if isinstance(features, str):
        parts = features.split("_")
        if len(parts) != 3 or not all(p.lstrip("-").isdigit() for p in parts) or parts[1] == "-1":
            raise CircuitlabError(
                f"{features!r} is not a feature node id; feature nodes are 'layer_feature_pos' "
                "(e.g. '12_345_6'). Error, embedding and logit nodes cannot be intervened on.")
        layer, feature, pos = map(int, parts)
        return [(layer, feature, pos, None)]
    if isinstance(features, tuple) and all(isinstance(v, int) for v in features):
        if len(features) == 2:
            return [(features[0], features[1], None, None)]
        if len(features) == 3:
            return [(features[0], features[2], features[1], None)]
    if isinstance(features, (list, tuple)):
        return [s for f in features for s in feature_sites(f)]
    raise CircuitlabError(
        f"Cannot read features from {features!r}: use (layer, feature), (layer, pos, feature), "
        "a node id 'layer_feature_pos', a DataFrame with layer/feature columns, or a list.")


def _edits(features, value, op, pos, relative) -> list[Intervention]:
    sites = feature_sites(features)
    if not sites:
        raise CircuitlabError("No features given; name at least one feature to intervene on.")
    return [Intervention(l, f, pos if pos is not None else ("all" if p is None else p),
                         float(value), op, relative) for l, f, p, _ in sites]


def set_to(features, value: float, pos=None, relative: str | None = None) -> list[Intervention]:
    """Set ``features`` to ``value`` (absolute, or relative to their activation on the
    prompt or their maximum activation). ``pos`` defaults to each feature's own position,
    else all positions."""
    return _edits(features, value, "set", pos, relative)


def scale(features, factor: float, pos=None) -> list[Intervention]:
    """Multiply the activations of ``features`` by ``factor``."""
    return _edits(features, factor, "scale", pos, None)


def ablate(features, pos=None) -> list[Intervention]:
    """Set ``features`` to zero."""
    return _edits(features, 0.0, "set", pos, None)


def add(features, value: float, pos=None, relative: str | None = None) -> list[Intervention]:
    """Add ``value`` (absolute or relative) to the activations of ``features``."""
    return _edits(features, value, "add", pos, relative)


# ---------------------------------------------------------------------- resolution


@dataclass
class _Edit:
    """Resolved edits at one layer: ``acts[pos, feature] (op)= value``."""

    pos: torch.Tensor
    feature: torch.Tensor
    op: str
    value: torch.Tensor


def positions(pos, P: int) -> list[int]:
    """Sorted positions of a ``P``-token prompt named by ``pos``: an int (negative from the
    end), a list of ints, a slice or ``"all"``.

    Raises:
        CircuitlabError: for a position out of range, or when ``pos`` selects none.
    """
    if isinstance(pos, str):
        if pos != "all":
            raise CircuitlabError(f'Position {pos!r} is not understood; use an int, a slice or "all".')
        found = list(range(P))
    elif isinstance(pos, slice):
        found = list(range(P))[pos]
    elif isinstance(pos, numbers.Integral) and not isinstance(pos, bool):
        if not -P <= pos < P:
            raise CircuitlabError(f"Position {pos} is out of range for a prompt of {P} tokens "
                                  f"(0..{P - 1}, or negative from the end).")
        found = [int(pos) % P]
    elif isinstance(pos, (list, tuple)):
        found = sorted({p for q in pos for p in positions(q, P)})
    else:
        raise CircuitlabError(f'Position {pos!r} is not understood; use an int, a slice or "all".')
    if not found:
        raise CircuitlabError(f"Positions {pos!r} select no token of a {P}-token prompt.")
    return found


def _as_interventions(interventions) -> list[Intervention]:
    out = []
    for iv in interventions:
        if isinstance(iv, Intervention):
            out.append(iv)
        elif isinstance(iv, (tuple, list)) and len(iv) == 4:
            layer, pos, feature, value = iv
            out.append(Intervention(layer, feature, pos, value, "set"))
        else:
            raise CircuitlabError(
                f"Cannot read intervention {iv!r}: use (layer, pos, feature, value) or the "
                "helpers set_to, scale, ablate and add.")
    return out


def resolve(rm, interventions, clean_acts: list[torch.Tensor], max_acts=None) -> dict[int, list[_Edit]]:
    """Check ``interventions`` against the model and prompt and turn them into per-layer
    edits with absolute values.

    Args:
        rm: the ReplacementModel.
        interventions: ``Intervention``s or ``(layer, pos, feature, value)`` tuples.
        clean_acts: per layer, the clean activations ``[P, d_sae]`` on the prompt.
        max_acts: callable ``(layer, feature) -> float`` for ``relative="max"``.
    """
    P = clean_acts[0].shape[0]
    edits: dict[int, list[_Edit]] = {}
    for iv in _as_interventions(interventions):
        if not 0 <= iv.layer < rm.n_layers:
            raise CircuitlabError(f"Layer {iv.layer} is out of range; the model has layers "
                                  f"0..{rm.n_layers - 1}.")
        if not 0 <= iv.feature < rm.d_sae(iv.layer):
            raise CircuitlabError(f"Feature {iv.feature} is out of range at layer {iv.layer}; "
                                  f"its transcoder has features 0..{rm.d_sae(iv.layer) - 1}.")
        if iv.op not in OPS:
            raise CircuitlabError(f"Unknown op {iv.op!r}; use one of {OPS}.")
        if iv.relative not in RELATIVE:
            raise CircuitlabError(f"Unknown relative {iv.relative!r}; use None, 'prompt' or 'max'.")
        value = float(iv.value)
        if not math.isfinite(value):
            raise CircuitlabError(f"The value for feature ({iv.layer}, {iv.feature}) is {value}; "
                                  "use a finite number.")
        pos = torch.tensor(positions(iv.pos, P), dtype=torch.long)
        values = torch.full((len(pos),), value)
        if iv.relative == "prompt":
            act = clean_acts[iv.layer][pos, iv.feature]
            if (act == 0).any():
                where = pos[act == 0].tolist()
                raise CircuitlabError(
                    f"Feature ({iv.layer}, {iv.feature}) is not active at positions {where}, so a "
                    "value relative to its activation there is undefined; use relative='max', an "
                    "absolute value, or the positions where it is active.")
            values = values * act
        elif iv.relative == "max":
            if max_acts is None:
                raise CircuitlabError("relative='max' needs the features' maximum activations; "
                                      "build feature cards with `circuitlab cards` first.")
            values = values * float(max_acts(iv.layer, iv.feature))
        edits.setdefault(iv.layer, []).append(
            _Edit(pos, torch.full_like(pos, iv.feature), iv.op, values))
    return edits


def apply_edits(acts: torch.Tensor, edits: list[_Edit]) -> torch.Tensor:
    """A copy of ``acts [P, d_sae]`` with ``edits`` applied in order."""
    acts = acts.clone()
    for e in edits:
        cur = acts[e.pos, e.feature]
        acts[e.pos, e.feature] = {"set": e.value, "scale": cur * e.value, "add": cur + e.value}[e.op]
    return acts


# ---------------------------------------------------------------------- runs


@dataclass
class _Outcome:
    logits: torch.Tensor  # [P, d_vocab]
    mlp_in: torch.Tensor  # [L, P, d]
    final: torch.Tensor  # [P, d] final-norm output


def dense_activations(rm, trace) -> list[torch.Tensor]:
    """Per layer, the clean activations ``[P, d_sae]`` recorded in ``trace``."""
    P = len(trace.tokens)
    out = []
    for l, (pos, feat, act) in enumerate(trace.features):
        dense = torch.zeros(P, rm.d_sae(l))
        dense[pos, feat] = act.float()
        out.append(dense)
    return out


def _unembed(rm, normed: torch.Tensor) -> torch.Tensor:
    logits = rm.model.unembed(normed[None])[0]
    cap = getattr(rm.cfg, "output_logits_soft_cap", 0.0) or 0.0
    return cap * torch.tanh(logits / cap) if cap > 0 else logits


def run_edited(rm, tokens: torch.Tensor, edits: dict[int, list[_Edit]], mode: str,
               trace=None, clean_acts=None) -> _Outcome:
    """Run ``tokens`` with ``edits`` in ``mode`` (``trace`` and ``clean_acts`` from the clean
    run are needed by the frozen modes)."""
    if mode not in MODES:
        raise CircuitlabError(f"Unknown mode {mode!r}; use one of {MODES}.")
    L = rm.n_layers
    if mode == "constrained":
        new = [apply_edits(clean_acts[l], edits.get(l, [])) for l in range(L)]
        mlp_in, resid = rm.frozen_run(
            trace, lambda l, x: rm.decode(l, new[l], x) + trace.errors[l])
        final = rm.final_normed(trace, resid)
        return _Outcome(_unembed(rm, final), mlp_in, final)

    xs, grabbed = {}, {}

    def grab_in(act, hook):
        layer = int(hook.name.split(".")[1])
        xs[layer] = rm.mlp_input(layer, act)[0]

    def grab_final(act, hook):
        ln = rm.model.ln_final
        grabbed["final"] = act[0] * ln.w + (ln.b if hasattr(ln, "b") else 0)

    def edit_out(act, hook):
        layer = int(hook.name.split(".")[1])
        x = xs[layer]
        acts = rm.encode(layer, x, tokens)
        delta = apply_edits(acts, edits[layer]) - acts
        return act + (delta @ rm.transcoders[layer].W_dec)[None]

    hooks = [(lambda n: n.endswith("ln2.hook_normalized"), grab_in),
             ("ln_final.hook_normalized", grab_final)]
    hooks += [(f"blocks.{l}.hook_mlp_out", edit_out) for l in sorted(edits)]
    if mode == "frozen-attention":
        hooks.append((lambda n: n.endswith("attn.hook_pattern"),
                      lambda act, hook: trace.patterns[int(hook.name.split(".")[1])][None]))
    with torch.no_grad():
        logits = rm.model.run_with_hooks(tokens[None], fwd_hooks=hooks)[0]
    return _Outcome(logits, torch.stack([xs[l] for l in range(L)]), grabbed["final"])


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
    return pd.DataFrame({"token": [rm.tokenizer.decode([i]) for i in ids], "id": ids,
                         "prob": probs[ids].tolist(), "logit": logits[ids].tolist(),
                         "other_prob": other_probs[ids].tolist()})


def compare_logits(rm, prompt: str, mode: str, clean: torch.Tensor, new: torch.Tensor,
                   tokens=None, top: int = 5) -> InterventionResult:
    """An ``InterventionResult`` from clean and intervened logits at one position."""
    ids = [rm.token_id(t) for t in (tokens or [])]
    pc, pn = (torch.softmax(v.double(), -1) for v in (clean, new))
    table = pd.DataFrame({
        "token": [rm.tokenizer.decode([i]) for i in ids], "id": ids,
        "clean_prob": pc[ids].tolist(), "prob": pn[ids].tolist(),
        "delta_prob": (pn[ids] - pc[ids]).tolist(), "clean_logit": clean[ids].tolist(),
        "logit": new[ids].tolist(), "delta_logit": (new[ids] - clean[ids]).tolist()})
    return InterventionResult(prompt, mode, _top(rm, clean, new, top), _top(rm, new, clean, top),
                              table, clean, new)


# ---------------------------------------------------------------------- the API


def _max_activation(rm):
    """``(layer, feature) -> max activation`` on held-out text, from the feature cards."""
    def lookup(layer: int, feature: int) -> float:
        from .features import find_examples

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
    """
    ids = rm.tokenize(prompt)
    positions(pos, len(ids))
    trace = rm.run(ids)
    clean_acts = dense_activations(rm, trace)
    edits = resolve(rm, interventions, clean_acts, _max_activation(rm))
    out = run_edited(rm, ids, edits, mode, trace, clean_acts)
    return compare_logits(rm, prompt, mode, trace.logits[pos], out.logits[pos], tokens, top)


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
    if not (isinstance(temperature, (int, float)) and temperature >= 0):
        raise CircuitlabError(f"temperature={temperature!r}; use 0 (greedy) or a positive number.")
    if max_new_tokens < 1:
        raise CircuitlabError(f"max_new_tokens={max_new_tokens}; generate at least one token.")
    ids = rm.tokenize(prompt)
    P0 = len(ids)
    if P0 + max_new_tokens > rm.cfg.n_ctx:
        raise CircuitlabError(f"{P0} prompt tokens + {max_new_tokens} new ones exceed the "
                              f"model's context of {rm.cfg.n_ctx}; generate fewer tokens.")
    edits = resolve(rm, interventions, dense_activations(rm, rm.run(ids)), _max_activation(rm))
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for _ in range(max_new_tokens):
        step = _extend(edits, P0, len(ids)) if new_positions else edits
        logits = run_edited(rm, ids, step, "free").logits[-1].double()
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            if top_k is not None:
                logits[logits < logits.topk(top_k).values[-1]] = -math.inf
            nxt = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=gen))
        ids = torch.cat([ids, torch.tensor([nxt])])
        if stop_at_eos and nxt == rm.tokenizer.eos_token_id:
            break
    return rm.tokenizer.decode(ids[P0:].tolist())


def _extend(edits: dict[int, list[_Edit]], start: int, stop: int) -> dict[int, list[_Edit]]:
    """``edits`` plus the same edits at positions ``start..stop-1``."""
    new = torch.arange(start, stop)
    out = {}
    for layer, es in edits.items():
        out[layer] = list(es)
        for e in es:
            v = e.value[e.value.abs().argmax()]
            out[layer].append(_Edit(new, e.feature[:1].expand(len(new)), e.op, v.expand(len(new))))
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
    for v in values:
        edits = resolve(rm, _edits(features, v, op, pos, relative), clean_acts, _max_activation(rm))
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
        rows += [dict(value=v, token=rm.tokenizer.decode([t]), id=t, prob=float(probs[t]),
                      logit=float(logits[t]), clean_prob=float(clean[t])) for t in follow]
    return pd.DataFrame(rows)


def plot_sweep(df: pd.DataFrame, tokens=None, title: str | None = None):
    """A Plotly figure of probability against strength, one line per token of a ``sweep``."""
    import plotly.graph_objects as go

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


# ---------------------------------------------------------------------- faithfulness


@dataclass
class Validation:
    """How well a graph's edges predict interventions.

    Attributes:
        edges: one row per sampled edge: ``source, target, weight`` (the edge: the
            source's direct effect on the target's input), ``constrained`` (the measured
            effect of ablating the source in constrained mode: equals ``weight`` in the
            linear regime), ``total`` (the graph's prediction of the source's total effect
            through all its paths) and ``free`` (the measured effect in free mode).
        summary: ``constrained_max_error``, ``constrained_agreement`` (1 minus the
            relative error; 1.0 is exact), ``free_correlation`` (of ``total`` and ``free``),
            ``free_sign_agreement`` and ``free_relative_error``.
    """

    edges: pd.DataFrame
    summary: dict

    def __repr__(self) -> str:
        return "Validation(" + ", ".join(f"{k}={v:.4g}" for k, v in self.summary.items()) + \
            f"; {len(self.edges)} edges)"


def _target_inputs(rm, graph, out: _Outcome, targets: list[int]) -> torch.Tensor:
    """Inputs of graph nodes ``targets`` (feature pre-activations, demeaned logits) in ``out``."""
    nodes = graph.nodes
    directions = torch.tensor(graph.metadata["logit_directions"], dtype=torch.float32)
    logit_rows = nodes.index[nodes["kind"] == "logit"].tolist()
    vals = []
    for t in targets:
        r = nodes.iloc[t]
        if r["kind"] == "feature":
            x = out.mlp_in[r["layer"], r["pos"]]
            vals.append(rm.pre_activations(int(r["layer"]), x)[int(r["feature"])])
        else:
            vals.append(directions[logit_rows.index(t)] @ out.final[-1].float())
    return torch.stack(vals).double()


def _total_effects(graph, sources: list[int]) -> torch.Tensor:
    """``[n_nodes, len(sources)]``: each source's total effect on every node's input along
    the graph's paths, with features passing on changes of their input one to one (as
    (Jump)ReLU features do while active). Paths only go up the layers, so none returns to
    its source."""
    A = graph.adjacency.double()
    act = torch.tensor(graph.nodes["activation"].to_numpy(), dtype=torch.float64)
    feat = graph.mask("feature")
    W = torch.zeros_like(A)
    W[:, feat] = A[:, feat] / act[feat]
    direct = A[:, sources]
    total = direct.clone()
    for _ in range(int(graph.nodes["layer"].max()) + 2):  # paths are at most layers + 1 long
        total = direct + W @ total
    return total


def validate(graph, rm, n: int = 20, seed: int = 0) -> Validation:
    """Check ``n`` edges of ``graph``, sampled by weight, against interventions on ``rm``.

    Each sampled edge's source feature is ablated in constrained mode (where the change
    of the target's input must equal the edge) and in free mode (compared with the
    graph's total-effect prediction, the number that tells how far to trust the graph).
    """
    ids = torch.tensor(graph.tokens)
    if graph.tokens != rm.tokenize(graph.prompt).tolist():
        raise CircuitlabError("The graph's tokens differ from this model's tokenization of its "
                              "prompt; validate a graph with the model that traced it.")
    trace = rm.run(ids)
    clean_acts = dense_activations(rm, trace)
    nodes = graph.nodes
    feat = graph.mask("feature")
    for r in nodes[nodes["kind"] == "feature"].head(50).itertuples():
        if abs(clean_acts[r.layer][r.pos, r.feature] - r.activation) > 1e-2 * (1 + abs(r.activation)):
            raise CircuitlabError(f"Node {r.node_id} has activation {r.activation:.4g} in the graph "
                                  f"but {clean_acts[r.layer][r.pos, r.feature]:.4g} in this model; "
                                  "validate with the transcoders that traced the graph.")
    targets_ok = feat | graph.mask("logit")
    A = graph.adjacency.abs() * targets_ok[:, None] * feat[None, :]
    if A.sum() == 0:
        raise CircuitlabError("The graph has no feature-to-feature or feature-to-logit edges "
                              "to validate.")
    # Weighted sampling without replacement (Efraimidis-Spirakis keys), over nonzero edges.
    t_idx, s_idx = A.nonzero(as_tuple=True)
    gen = torch.Generator().manual_seed(seed)
    keys = torch.rand(len(t_idx), generator=gen, dtype=torch.float64).log() / A[t_idx, s_idx].double()
    picked = keys.topk(min(n, len(keys))).indices
    pairs = [(int(t_idx[i]), int(s_idx[i])) for i in picked]
    sources = sorted({s for _, s in pairs})
    total = _total_effects(graph, sources)
    clean = {m: run_edited(rm, ids, {}, m, trace, clean_acts) for m in ("constrained", "free")}
    rows = []
    for s in sources:
        r = nodes.iloc[s]
        edits = resolve(rm, [Intervention(int(r.layer), int(r.feature), int(r.pos), 0.0)], clean_acts)
        tgts = [t for t, s2 in pairs if s2 == s]
        effect = {}
        for m in ("constrained", "free"):
            out = run_edited(rm, ids, edits, m, trace, clean_acts)
            effect[m] = _target_inputs(rm, graph, clean[m], tgts) - _target_inputs(rm, graph, out, tgts)
        for i, t in enumerate(tgts):
            rows.append(dict(source=r.node_id, target=nodes.node_id.iloc[t],
                             weight=float(graph.adjacency[t, s]), constrained=float(effect["constrained"][i]),
                             total=float(total[t, sources.index(s)]), free=float(effect["free"][i])))
    df = pd.DataFrame(rows)
    w, c, tot, fr = (torch.tensor(df[k].to_numpy()) for k in ("weight", "constrained", "total", "free"))
    summary = dict(
        constrained_max_error=float((c - w).abs().max()),
        constrained_agreement=float(1 - (c - w).norm() / w.norm()),
        free_correlation=float(torch.corrcoef(torch.stack([tot, fr]))[0, 1]) if len(df) > 1 else math.nan,
        free_sign_agreement=float((torch.sign(tot) == torch.sign(fr)).double().mean()),
        free_relative_error=float((fr - tot).norm() / tot.norm()),
    )
    return Validation(df, summary)
