"""Logit targets: what an attribution graph explains at the last position."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import CircuitlabError


@dataclass
class LogitTarget:
    """A logit target: ``direction . final_norm(resid)[pos] + bias``.

    ``token`` is the vocabulary id for a single-token target (its demeaned logit), ``None``
    for a logit difference or a custom direction.
    """

    label: str
    direction: torch.Tensor
    bias: float
    token: int | None
    prob: float



def logit_targets_of(rm, trace, logit_targets, max_logits: int, logit_prob: float) -> list[LogitTarget]:
    """The logit targets of an attribution (see ``attribute``'s ``logit_targets``): the
    most likely next tokens of ``trace`` until ``logit_prob`` (at most ``max_logits``), or
    the given token strings, ids, pairs ``(a, b)`` and directions."""
    W_U, b_U = rm.model.W_U.detach(), rm.model.b_U.detach()
    W_U_mean, b_U_mean = W_U.mean(1, dtype=torch.float32), b_U.float().mean()
    probs = torch.softmax(trace.logits[-1].double(), -1).float()

    def token_target(t: int) -> LogitTarget:
        t = rm.token_id(t)
        return LogitTarget(rm.token_str(t), W_U[:, t].float() - W_U_mean, float(b_U[t] - b_U_mean),
                           t, float(probs[t]))

    if logit_targets is None:
        order = torch.argsort(probs, descending=True)[:max_logits]
        cum = torch.cumsum(probs[order], 0)
        n = int((cum < logit_prob).sum()) + 1
        return [token_target(int(t)) for t in order[:min(n, max_logits)]]
    targets = []
    for spec in logit_targets:
        if isinstance(spec, (int, str)):
            targets.append(token_target(spec))
        elif isinstance(spec, tuple) and len(spec) == 2:  # logit difference (a, b)
            a, b = (token_target(s) for s in spec)
            targets.append(LogitTarget(f"{a.label} - {b.label}", a.direction - b.direction,
                                       a.bias - b.bias, None, a.prob))
        elif isinstance(spec, torch.Tensor) and spec.shape == (rm.d_model,):
            if not torch.isfinite(spec).all():
                raise CircuitlabError(f"Logit target direction {len(targets)} holds NaN or inf; "
                                      "pass a finite direction.")
            targets.append(LogitTarget(f"direction {len(targets)}", spec.float().to(W_U.device),
                                       0.0, None, 0.0))
        else:
            raise CircuitlabError(
                f"Unknown logit target {spec!r}: use a token string, a token id, a pair (a, b) "
                f"for the logit difference a - b, or a tensor of shape ({rm.d_model},) for a "
                "direction in the final-norm output space.")
    labels = [t.label for t in targets]
    if len(set(labels)) < len(labels):
        raise CircuitlabError(f"A logit target is listed twice in {labels}; list each once.")
    return targets


def check_logit_targets(logit_targets) -> None:
    """Refuse ``logit_targets`` that are not ``None`` or a non-empty list (or tuple).

    Raises:
        CircuitlabError: naming the value and the fix.
    """
    if logit_targets is None:
        return
    if isinstance(logit_targets, (str, int, torch.Tensor)) or not isinstance(logit_targets, (list, tuple)):
        raise CircuitlabError(
            f"logit_targets must be a list, e.g. [{logit_targets!r}], not {logit_targets!r}.")
    if not logit_targets:
        raise CircuitlabError("logit_targets=[] names no target; pass at least one, or None "
                              "for the most likely next tokens.")
