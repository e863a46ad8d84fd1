"""Targets: what an attribution graph explains.

A target is a logit at any position (a token, a logit difference or a direction in the
final-norm output space), a transcoder feature's pre-activation at ``(layer, pos,
feature)``, or the projection of a layer's MLP input on a direction (a probe's, say).
Several, of every kind, go in one graph. A feature target is an ordinary feature
node of the graph (kept whatever the node budget), so a feature that is a target and also
feeds another target is one node.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import CircuitlabError


@dataclass(frozen=True)
class Logit:
    """A logit target at position ``pos`` (``-1``: the last): what the model predicts after
    that position.

    ``what``: a token string or id (its logit minus the mean logit), a pair ``(a, b)`` (the
    logit difference ``a - b``) or a ``[d_model]`` tensor (a direction in the final-norm
    output space)."""

    what: object
    pos: int = -1


@dataclass(frozen=True)
class Feature:
    """A feature target: the pre-activation of transcoder feature ``feature`` of layer
    ``layer`` at position ``pos`` (``-1``: the last). It must be active there, unless
    ``inactive=True``: then the graph explains why it stays below its threshold (it is a node
    that feeds nothing)."""

    layer: int
    pos: int
    feature: int
    inactive: bool = False


@dataclass(frozen=True)
class Direction:
    """A direction target: the projection on ``vector`` (``[d_model]``, e.g. a probe's
    direction) of the MLP input of layer ``layer`` at position ``pos`` (``-1``: the last),
    the normalized residual stream that the layer's transcoder reads. It is a node of kind
    ``"direction"``, named ``label``."""

    layer: int
    pos: int
    vector: object
    label: str = ""


@dataclass
class Read:
    """A resolved target read from a layer's MLP input: ``vector . mlp_in[layer][pos] +
    bias``, a ``Direction`` or an inactive ``Feature`` (a node of ``kind`` with ``node_id``)."""

    layer: int
    pos: int
    vector: torch.Tensor
    bias: float
    kind: str
    node_id: str
    feature: int
    label: str


@dataclass
class LogitTarget:
    """A resolved logit target: ``direction . final_norm(resid)[pos] + bias``.

    ``token`` is the vocabulary id for a single-token target (its demeaned logit), ``None``
    for a logit difference or a custom direction.
    """

    label: str
    direction: torch.Tensor
    bias: float
    token: int | None
    prob: float
    pos: int


def logit_targets_of(rm, trace, logit_targets, max_logits: int, logit_prob: float) -> list[LogitTarget]:
    """The logit targets of an attribution (see ``attribute``'s ``logit_targets`` and
    ``targets``): the most likely next tokens of ``trace`` until ``logit_prob`` (at most
    ``max_logits``), or the given token strings, ids, pairs ``(a, b)``, directions and
    ``Logit`` targets at any position."""
    W_U, b_U = rm.model.W_U.detach(), rm.model.b_U.detach()
    W_U_mean, b_U_mean = W_U.mean(1, dtype=torch.float32), b_U.float().mean()
    P = len(trace.tokens)

    def token_target(t, pos: int) -> LogitTarget:
        t = rm.token_id(t)
        prob = float(torch.softmax(trace.logits[pos].double(), -1)[t])
        return LogitTarget(rm.token_str(t), W_U[:, t].float() - W_U_mean,
                           float(b_U[t] - b_U_mean), t, prob, pos)

    if logit_targets is None:
        probs = torch.softmax(trace.logits[-1].double(), -1).float()
        order = torch.argsort(probs, descending=True)[:max_logits]
        cum = torch.cumsum(probs[order], 0)
        n = int((cum < logit_prob).sum()) + 1
        return [token_target(int(t), P - 1) for t in order[:min(n, max_logits)]]
    targets = []
    for spec in logit_targets:
        pos = P - 1
        if isinstance(spec, Logit):
            pos = check_position(spec.pos, P, "Logit target position")
            spec = spec.what
        if isinstance(spec, (int, str)):
            targets.append(token_target(spec, pos))
        elif isinstance(spec, tuple) and len(spec) == 2:  # logit difference (a, b)
            a, b = (token_target(s, pos) for s in spec)
            targets.append(LogitTarget(f"{a.label} - {b.label}", a.direction - b.direction,
                                       a.bias - b.bias, None, a.prob, pos))
        elif isinstance(spec, torch.Tensor) and spec.shape == (rm.d_model,):
            if not torch.isfinite(spec).all():
                raise CircuitlabError(f"Logit target direction {len(targets)} holds NaN or inf; "
                                      "pass a finite direction.")
            targets.append(LogitTarget(f"direction {len(targets)}", spec.float().to(W_U.device),
                                       0.0, None, 0.0, pos))
        else:
            raise CircuitlabError(
                f"Unknown logit target {spec!r}: use a token string, a token id, a pair (a, b) "
                f"for the logit difference a - b, or a tensor of shape ({rm.d_model},) for a "
                "direction in the final-norm output space (or circuitlab.Logit(that, pos) for "
                "another position).")
    labels = [(t.label, t.pos) for t in targets]
    if len(set(labels)) < len(labels):
        raise CircuitlabError(f"A logit target is listed twice in {[t.label for t in targets]}; "
                              "list each once.")
    return targets


def check_position(pos, n_positions: int, what: str) -> int:
    """``pos`` (negative: from the end) as a position of a prompt of ``n_positions`` tokens.

    Raises:
        CircuitlabError: for a position past the prompt.
    """
    if isinstance(pos, bool) or not isinstance(pos, int) or not -n_positions <= pos < n_positions:
        raise CircuitlabError(f"{what} {pos!r} is not a position of this prompt: it has "
                              f"{n_positions} tokens (BOS included), positions 0 to "
                              f"{n_positions - 1}, or -1 for the last.")
    return pos % n_positions


def feature_targets_of(rm, trace, specs) -> tuple[list[tuple[int, int, int]], list[Read]]:
    """The ``(layer, pos, feature)`` of the active ``Feature`` targets, checked against
    ``trace``, and the inactive ones that were asked for as reads of their encoder column.

    Raises:
        CircuitlabError: for a layer or feature out of range, a position past the prompt, or
            a feature that is not active there (naming its pre-activation) without
            ``inactive=True``.
    """
    out, reads = [], []
    P = len(trace.tokens)
    for spec in specs:
        rm.check_feature(spec.layer, spec.feature)
        pos = check_position(spec.pos, P, "Feature target position")
        p, f, _ = trace.features[spec.layer]
        key = (spec.layer, pos, spec.feature)
        if key in out or any(r.node_id == f"{spec.layer}_{spec.feature}_{pos}" for r in reads):
            raise CircuitlabError(f"Feature target {key} is listed twice; list each once.")
        if ((p == pos) & (f == spec.feature)).any():
            out.append(key)
            continue
        if not spec.inactive:
            pre = float(rm.pre_activations(spec.layer, trace.mlp_in[spec.layer][pos])[spec.feature])
            raise CircuitlabError(
                f"Feature {spec.feature} of layer {spec.layer} is not active at position {pos} "
                f"({rm.token_str(int(trace.tokens[pos]))!r}; pre-activation {pre:.3g}). Pick an "
                "active one (rm.features_for(prompt, pos=...)), or pass Feature(..., "
                "inactive=True) to explain why it stays off.")
        W_enc, b_enc = rm.encoder(spec.layer)
        reads.append(Read(spec.layer, pos, W_enc.detach()[:, spec.feature].float(),
                          float(b_enc.detach()[spec.feature]), "feature",
                          f"{spec.layer}_{spec.feature}_{pos}", spec.feature,
                          f"L{spec.layer}/F{spec.feature} (inactive)"))
    return out, reads


def direction_targets_of(rm, trace, specs) -> list[Read]:
    """``Direction`` targets as reads, with their positions resolved and vectors as float
    tensors (nodes ``"{layer}_D{i}_{pos}"`` of kind ``"direction"``).

    Raises:
        CircuitlabError: for a layer out of range, a position past the prompt, or a vector
            that is not a finite ``[d_model]`` tensor.
    """
    out = []
    for i, spec in enumerate(specs):
        if isinstance(spec.layer, bool) or not isinstance(spec.layer, int) or not 0 <= spec.layer < rm.n_layers:
            raise CircuitlabError(f"Direction target {i}: layer {spec.layer!r} is not a layer of "
                                  f"this model (0 to {rm.n_layers - 1}).")
        pos = check_position(spec.pos, len(trace.tokens), "Direction target position")
        vec = spec.vector
        if not (isinstance(vec, torch.Tensor) and vec.shape == (rm.d_model,)
                and torch.isfinite(vec).all()):
            raise CircuitlabError(f"Direction target {i}: the vector must be a finite tensor of "
                                  f"shape ({rm.d_model},), not {getattr(vec, 'shape', vec)!r}.")
        out.append(Read(spec.layer, pos, vec.detach().float().to(trace.embed.device), 0.0,
                        "direction", f"{spec.layer}_D{i}_{pos}", -2 - i,
                        spec.label or f"direction {i}"))
    return out


def split_targets(logit_targets, targets) -> tuple[list | None, list, list]:
    """``attribute``'s ``logit_targets`` and ``targets`` as logit specs (``None``: the
    default), ``Feature`` targets and ``Direction`` targets.

    Raises:
        CircuitlabError: for both arguments at once, or anything that is not a list.
    """
    check_logit_targets(logit_targets, "logit_targets")
    check_logit_targets(targets, "targets")
    if logit_targets is not None and targets is not None:
        raise CircuitlabError("Pass logit_targets or targets, not both: targets takes logit "
                              "targets too (token strings, ids, pairs, directions, "
                              "circuitlab.Logit) beside circuitlab.Feature targets.")
    if targets is None:
        return logit_targets, [], []
    return ([t for t in targets if not isinstance(t, (Feature, Direction))],
            [t for t in targets if isinstance(t, Feature)],
            [t for t in targets if isinstance(t, Direction)])


def check_logit_targets(logit_targets, name: str = "logit_targets") -> None:
    """Refuse ``logit_targets`` that are not ``None`` or a non-empty list (or tuple).

    Raises:
        CircuitlabError: naming the value and the fix.
    """
    if logit_targets is None:
        return
    if isinstance(logit_targets, (str, int, torch.Tensor, Logit, Feature, Direction)) or not isinstance(
            logit_targets, (list, tuple)):
        raise CircuitlabError(
            f"{name} must be a list, e.g. [{logit_targets!r}], not {logit_targets!r}.")
    if not logit_targets:
        raise CircuitlabError(f"{name}=[] names no target; pass at least one, or None "
                              "for the most likely next tokens.")


def completion_targets(rm, prompt: str, completion, explain, logit_specs) -> tuple[str, list]:
    """``prompt + completion`` and its logit targets: each explained completion token at the
    position that predicts it (teacher-forced). ``completion`` is text, or a number of
    tokens to generate greedily; ``explain`` the tokens to trace (indices among the
    completion's tokens, or their texts; ``None``: all); ``logit_specs`` what ``targets``
    held besides features (must be empty).

    Raises:
        CircuitlabError: for logit targets given as well, an empty completion, a completion
            that changes how the prompt tokenizes (naming the token that moved), or an
            ``explain`` entry that names no completion token.
    """
    if logit_specs:
        raise CircuitlabError("With a completion, explain picks the logit targets (the "
                              "completion's tokens); pass Feature targets only in targets.")
    base = rm.tokenize(prompt)
    if isinstance(completion, int) and not isinstance(completion, bool):
        completion = _greedy(rm, base, completion)
    if not isinstance(completion, str) or not completion:
        raise CircuitlabError(f"completion={completion!r}: pass the text that follows the "
                              "prompt, or a number of tokens to generate.")
    full = rm.tokenize(prompt + completion)
    moved = next((i for i in range(len(base)) if i >= len(full) or full[i] != base[i]), None)
    if moved is not None:
        was = rm.token_str(int(base[moved]))
        now = rm.token_str(int(full[moved])) if moved < len(full) else ""
        raise CircuitlabError(
            f"The completion {completion!r} changes how the prompt tokenizes: token {moved} "
            f"{was!r} becomes {now!r} in context. Move the boundary so the prompt ends on a "
            "whole token (e.g. start the completion with the space before its first word).")
    tokens = full[len(base):].tolist()
    if not tokens:
        raise CircuitlabError(f"completion={completion!r} adds no token to the prompt.")
    strs = rm.token_strs(tokens)
    chosen = []
    for item in (range(len(tokens)) if explain is None else explain):
        if isinstance(item, str):
            hits = [i for i, s in enumerate(strs) if s == item or s.strip() == item.strip()]
            if not hits:
                raise CircuitlabError(f"explain: {item!r} is not a token of the completion; its "
                                      f"tokens are {strs}.")
            chosen.append(hits[0])
        elif isinstance(item, int) and not isinstance(item, bool) and -len(tokens) <= item < len(tokens):
            chosen.append(item % len(tokens))
        else:
            raise CircuitlabError(f"explain: {item!r} names no completion token: pass indices "
                                  f"0 to {len(tokens) - 1} or token texts of {strs}.")
    specs = [Logit(tokens[i], len(base) + i - 1) for i in dict.fromkeys(chosen)]
    return prompt + completion, specs


def _greedy(rm, tokens: torch.Tensor, n: int) -> str:
    """The text of ``n`` greedily generated tokens after ``tokens``."""
    if n < 1:
        raise CircuitlabError(f"completion={n}: generate at least one token.")
    out = tokens
    with torch.no_grad():
        for _ in range(n):
            nxt = rm.model(out[None])[0, -1].argmax()
            out = torch.cat([out, nxt[None]])
    return rm.tokenizer.decode(out[len(tokens):].tolist())
