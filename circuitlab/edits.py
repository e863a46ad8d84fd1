"""The language of feature edits: which features, where, and how.

Features are named by ``(layer, feature)`` (at every position, or the ``pos`` argument),
``(layer, pos, feature)``, a graph node id ``"L_F_P"``, a DataFrame with ``layer`` and
``feature`` columns (and optionally ``pos`` and ``activation``, as the search helpers
return), a supernode (a list of any of these) or a dict of supernodes. ``set_to``,
``scale``, ``ablate`` and ``add`` turn them into ``Intervention``s; ``resolve`` checks
them against a prompt and groups them by layer for the runs in ``circuitlab.interventions``.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import pandas as pd
import torch

from . import checks
from .errors import CircuitlabError

__all__ = ["Intervention", "Edit", "build", "set_to", "scale", "ablate", "add", "positions", "feature_sites",
           "resolve", "apply_edits"]

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
        return [(_cell(r, "layer"), _cell(r, "feature"),
                 None if pd.isna(r.get("pos")) else _cell(r, "pos"),
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


def _cell(row: dict, column: str) -> int:
    """The integer in ``column`` of a row of a DataFrame of features.

    Raises:
        CircuitlabError: for a missing, non-integer or non-finite value (NaN, inf, 1.5, text).
    """
    value = row[column]
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value).is_integer():
        return int(value)
    raise CircuitlabError(
        f"The DataFrame of features has {column}={value!r} in a row; every {column} must be a "
        "whole number. Drop or fix that row (e.g. df.dropna(subset=['layer', 'feature'])).")


def build(features, value, op, pos, relative) -> list[Intervention]:
    """One ``Intervention`` (``op`` with ``value``, at ``pos``, ``relative`` to nothing, the
    prompt or the maximum) per feature named by ``features``.

    Raises:
        CircuitlabError: when no feature is named, or ``value`` is not a finite number.
    """
    sites = feature_sites(features)
    if not sites:
        raise CircuitlabError("No features given; name at least one feature to intervene on.")
    value = _number(value, op)
    return [Intervention(l, f, pos if pos is not None else ("all" if p is None else p),
                         value, op, relative) for l, f, p, _ in sites]


def _number(value, op: str) -> float:
    """``value`` (a real number, or a one-element tensor or array) as a finite float."""
    name = "factor" if op == "scale" else "value"
    try:
        number = None if isinstance(value, (str, bytes)) else float(value)
    except (TypeError, ValueError, RuntimeError):  # not a number, or a tensor of several
        number = None
    if number is None:
        raise CircuitlabError(f"{name}={value!r} is not a number; pass a finite number (e.g. "
                              "2.0, or 0 to ablate).")
    return checks.number(name, number)


def set_to(features, value: float, pos=None, relative: str | None = None) -> list[Intervention]:
    """Set ``features`` to ``value`` (absolute, or relative to their activation on the
    prompt or their maximum activation). ``pos`` defaults to each feature's own position,
    else all positions."""
    return build(features, value, "set", pos, relative)


def scale(features, factor: float, pos=None) -> list[Intervention]:
    """Multiply the activations of ``features`` by ``factor``."""
    return build(features, factor, "scale", pos, None)


def ablate(features, pos=None) -> list[Intervention]:
    """Set ``features`` to zero."""
    return build(features, 0.0, "set", pos, None)


def add(features, value: float, pos=None, relative: str | None = None) -> list[Intervention]:
    """Add ``value`` (absolute or relative) to the activations of ``features``."""
    return build(features, value, "add", pos, relative)


# ---------------------------------------------------------------------- resolution


@dataclass
class Edit:
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
        if pos.step == 0:
            raise CircuitlabError(f"Positions {pos!r} have step 0; use a slice with a nonzero "
                                  "step (e.g. slice(0, None, 2)), a list or \"all\".")
        try:
            found = list(range(P))[pos]
        except TypeError as err:
            raise CircuitlabError(f"Positions {pos!r} are not understood; a slice takes whole "
                                  "numbers (or None).") from err
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
    if isinstance(interventions, (Intervention, str)) or not isinstance(interventions, (list, tuple)):
        raise CircuitlabError(
            f"Interventions must be a list (e.g. ablate(...) or [(layer, pos, feature, value)]), "
            f"not {interventions!r}.")
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


def resolve(rm, interventions, clean_acts: list[torch.Tensor], max_acts=None) -> dict[int, list[Edit]]:
    """Check ``interventions`` against the model and prompt and turn them into per-layer
    edits with absolute values.

    Args:
        rm: the ReplacementModel.
        interventions: ``Intervention``s or ``(layer, pos, feature, value)`` tuples.
        clean_acts: per layer, the clean activations ``[P, d_sae]`` on the prompt.
        max_acts: callable ``(layer, feature) -> float`` for ``relative="max"``.
    """
    P, device = clean_acts[0].shape[0], clean_acts[0].device
    edits: dict[int, list[Edit]] = {}
    for iv in _as_interventions(interventions):
        checks.integer("layer", iv.layer, 0)
        checks.integer("feature", iv.feature, 0)
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
        value = checks.number(f"The value for feature ({iv.layer}, {iv.feature})", iv.value)
        pos = torch.tensor(positions(iv.pos, P), dtype=torch.long, device=device)
        values = torch.full((len(pos),), value, device=device)
        if iv.relative == "prompt":
            act = clean_acts[iv.layer][pos, iv.feature]
            if (act == 0).any():
                where = pos[act == 0].tolist()
                raise CircuitlabError(
                    f"Feature ({iv.layer}, {iv.feature}) is not active at positions {where}, so a "
                    "value relative to its activation there is undefined; use relative='max', an "
                    "absolute value, or the positions where it is active.")
            values = values * act.float()
        elif iv.relative == "max":
            if max_acts is None:
                raise CircuitlabError("relative='max' needs the features' maximum activations; "
                                      "build feature cards with `circuitlab cards` first.")
            values = values * float(max_acts(iv.layer, iv.feature))
        edits.setdefault(iv.layer, []).append(
            Edit(pos, torch.full_like(pos, iv.feature), iv.op, values))
    return edits


def apply_edits(acts: torch.Tensor, edits: list[Edit]) -> torch.Tensor:
    """A copy of ``acts [P, d_sae]`` with ``edits`` applied in order (values in float32, the
    result in ``acts``' dtype)."""
    acts = acts.clone()
    for e in edits:
        cur = acts[e.pos, e.feature].float()
        new = {"set": e.value, "scale": cur * e.value, "add": cur + e.value}[e.op]
        acts[e.pos, e.feature] = new.to(acts.dtype)
    return acts
