"""How far along a training run is (token and time budgets over resumed runs) and its
learning rate at that point. Shared by ``train_transcoders`` and ``finetune_transcoders``.
"""

from __future__ import annotations

import time


def lr_at(lr: float, progress: float) -> float:
    """Linear warm-up over the first 2% of training, linear decay to 0 over the last 20%."""
    return lr * min(1.0, (progress + 1e-3) / 0.02, (1 - progress) / 0.2)


class Budgets:
    """Token and time budgets over resumed runs, for a run with ``counters["tokens_seen"]``,
    ``tokens``, ``time_budget``, ``seconds_before`` (earlier runs), ``started``
    (``time.monotonic()`` at this run's start) and ``stopped``."""

    def seconds(self) -> float:
        return self.seconds_before + time.monotonic() - self.started

    def progress(self) -> float:
        """The share of the budget used, by tokens or time, whichever is further along."""
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

