"""Learning-rate schedules as pure functions of progress (no optimizer state, no side effects).

Shared by pretraining and the transfer stage (linear probe: :func:`step_lr`; detection:
:func:`warmup_multistep_lr`)."""
from __future__ import annotations

import math
from typing import Sequence


def step_lr(base: float, epoch: float, steps: Sequence[int], gamma: float = 0.1) -> float:
    """MoCo v1: lr x0.1 at each epoch in ``steps`` (120 and 160 of 200, Sec. 4)."""
    return base * gamma ** sum(epoch >= s for s in steps)


def warmup_multistep_lr(it: int, base_lr: float, steps: Sequence[int], gamma: float = 0.1,
                        warmup_iters: int = 0, warmup_factor: float = 0.001) -> float:
    """Detectron2's ``WarmupMultiStepLR`` (the transfer stage's detection schedule): :func:`step_lr` over
    0-based iterations, times a linear warmup factor ``warmup_factor * (1 - a) + a``, ``a = it / warmup_iters``,
    during the first ``warmup_iters`` iterations."""
    lr = step_lr(base_lr, it, steps, gamma)
    if it < warmup_iters:
        alpha = it / warmup_iters
        lr *= warmup_factor * (1 - alpha) + alpha
    return lr


def cosine_lr(base: float, progress: float) -> float:
    """MoCo v2: half-period cosine from ``base`` to 0; ``progress`` in [0, 1] (epoch / total epochs)."""
    return base * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def exp_step_lr(base: float, iteration: int, every: int, gamma: float = 0.9) -> float:
    """IG-1B recipe: lr x``gamma`` every ``every`` iterations (0.9 every 62.5k, Sec. 4.1)."""
    return base * gamma ** (iteration // every)


def lr_at(schedule: str, base: float, *, epoch: int, epochs: int, iteration: int, iterations: int,
          steps: Sequence[int], gamma: float, step_period: int) -> float:
    """Dispatch on the config's schedule name.

    Epoch-based runs step the lr once per epoch, as the official ``adjust_learning_rate``; iteration-based
    runs (``iterations > 0``) read progress from the iteration counter.
    """
    if schedule == "step":
        if iterations > 0:  # steps are then in iterations
            return step_lr(base, iteration, steps, gamma)
        return step_lr(base, epoch, steps, gamma)
    if schedule == "cosine":
        return cosine_lr(base, iteration / iterations if iterations > 0 else epoch / epochs)
    if schedule == "exp_step":
        return exp_step_lr(base, iteration, step_period, gamma)
    raise ValueError(f"unknown schedule {schedule!r}")
