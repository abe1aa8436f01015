"""The run's schedule in steps and tokens: pure arithmetic over the config.

Step numbering: ``step`` counts completed optimizer updates. Step 0 is the freshly initialised model (always
checkpointed); update ``s`` (0-based) reads the batches ``batch_at(seed, s, micro)`` and produces step
``s + 1``. After step ``s`` the run has consumed ``s * tokens_per_step`` tokens.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from trainer.config import RunConfig
from trainer.errors import TrainerError

PLAN_MILESTONES = (Fraction(0), Fraction(1, 2), 1, 2, 4, 8, 12, 16, 20, 25)
"""The plan's checkpoints (0, 0.5M, 1M, 2M, 4M, 8M, 12M, 16M, 20M, 25M tokens) in 25ths of the budget."""


def tokens_per_step(cfg: RunConfig, world_size: int = 1) -> int:
    """Tokens consumed by one optimizer step: ``batch_size * seq_len * grad_accum * world_size``."""
    t = cfg.train
    return t.batch_size * t.seq_len * t.grad_accum * world_size


def total_steps_for(cfg: RunConfig, tokens_per_step: int) -> int:
    """Whole optimizer steps that fit in ``train.tokens``; raises :class:`TrainerError` if none does."""
    steps = cfg.train.tokens // tokens_per_step
    if steps <= 0:
        raise TrainerError(
            f"train.tokens={cfg.train.tokens} is less than one optimizer step of {tokens_per_step} tokens "
            "(batch_size * seq_len * grad_accum * processes); raise --tokens or lower train.batch_size"
        )
    return steps


def milestone_steps(cfg: RunConfig, tokens_per_step: int, total_steps: int) -> list[int]:
    """Optimizer steps at which analysis checkpoints are written, sorted and unique.

    Each token milestone ``m`` maps to the first step whose cumulative tokens reach it,
    ``ceil(m / tokens_per_step)``, capped at ``total_steps`` (the budget is rounded down to whole
    steps, so the last milestone can fall a fraction of a step past it). Step 0 and the final
    step are always included.

    ``train.milestones``:

    - ``plan``: (0, 0.5, 1, 2, 4, 8, 12, 16, 20, 25) / 25 of ``train.tokens`` (the source plan's
      0, 0.5M, ..., 25M tokens, scaled to the budget);
    - ``log``: step 0 and ``train.n_log_milestones`` steps log-spaced from 1 to ``total_steps``
      (rounded; duplicates at small step counts collapse);
    - ``plan+log``: the union of the two;
    - ``list``: ``train.milestone_tokens``; a value above ``train.tokens`` is an error.

    Examples
    --------
    >>> from trainer.config import RunConfig, TrainConfig
    >>> cfg = RunConfig(train=TrainConfig(tokens=25_000, batch_size=1, seq_len=100))
    >>> milestone_steps(cfg, tokens_per_step=100, total_steps=250)
    [0, 5, 10, 20, 40, 80, 120, 160, 200, 250]
    """
    t = cfg.train
    if total_steps <= 0 or tokens_per_step <= 0:
        raise TrainerError(
            f"need positive steps and tokens per step, got {total_steps} and {tokens_per_step}"
        )

    def first_step_reaching(tokens: Fraction | int) -> int:
        return min(math.ceil(Fraction(tokens) / tokens_per_step), total_steps)

    schedules = t.milestones.split("+")  # "plan+log" is the union of the two
    if t.milestones == "list":
        too_big = [m for m in t.milestone_tokens if m > t.tokens]
        if too_big:
            raise TrainerError(f"train.milestone_tokens {too_big} exceed the budget train.tokens={t.tokens}")
        steps = {first_step_reaching(m) for m in t.milestone_tokens}
    elif set(schedules) <= {"plan", "log"}:
        steps = set()
        if "plan" in schedules:
            steps |= {first_step_reaching(Fraction(t.tokens) * f / 25) for f in PLAN_MILESTONES}
        if "log" in schedules:
            if t.n_log_milestones < 1:
                raise TrainerError(f"train.n_log_milestones must be at least 1, got {t.n_log_milestones}")
            points = (
                np.geomspace(1, total_steps, t.n_log_milestones) if t.n_log_milestones > 1 else [total_steps]
            )
            steps |= {int(round(float(p))) for p in points}
    else:
        raise TrainerError(f"train.milestones: unknown schedule {t.milestones!r}")
    return sorted(steps | {0, total_steps})
