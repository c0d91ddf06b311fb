"""Which pairs each optimizer step uses, and the learning rate of each step: pure functions of the
config, the seed and the step number, so a resumed run needs no saved iterator."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class StepPlan:
    """Which pairs each optimizer step uses, and which of them this process runs in which micro-batch.

    Epoch ``e`` visits the pairs in ``permutation(seed + e)``; step ``k`` of the epoch takes the next
    ``global_batch`` of them (the last step of an epoch may be short). Those pairs are split into
    ``grad_accum * world`` near-equal slots; slot ``m * world + rank`` is micro-batch ``m`` of process
    ``rank``.
    """

    n_pairs: int
    batch_size: int
    grad_accum: int
    world: int
    seed: int
    epochs: float
    max_steps: int | None
    _perms: dict = field(default_factory=dict, repr=False)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.world

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_pairs / self.global_batch)

    @property
    def total_steps(self) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(self.epochs * self.steps_per_epoch))

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng(self.seed + epoch).permutation(self.n_pairs)}
        return self._perms[epoch]

    def step_pairs(self, step: int) -> np.ndarray:
        epoch, k = divmod(step, self.steps_per_epoch)
        return self._perm(epoch)[k * self.global_batch : (k + 1) * self.global_batch]

    def micro_batches(self, step: int, rank: int) -> list[np.ndarray]:
        slots = np.array_split(self.step_pairs(step), self.grad_accum * self.world)
        return [slots[m * self.world + rank] for m in range(self.grad_accum)]

    def every(self, steps: float) -> int:
        """Steps between two logs, evaluations or saves: ``steps`` itself, or, below 1, that fraction of the
        run's steps rounded up, as transformers reads logging/eval/save steps (0.2 of 100 steps: 20)."""
        return math.ceil(self.total_steps * steps) if 0 < steps < 1 else int(steps)

    def due(self, step: int, strategy: str, steps: float) -> bool:
        """Whether a save or evaluation falls after optimizer step ``step`` (1-based count of steps done):
        every ``steps`` steps, at each epoch's end (``strategy == "epoch"``), or never (``"no"``, or 0
        steps); the run's start and end are the loop's business."""
        if strategy == "epoch":
            return step % self.steps_per_epoch == 0
        n = self.every(steps)
        return strategy == "steps" and n > 0 and step % n == 0

    def epoch_at(self, step: int) -> float:
        """Epochs completed after ``step`` (0-based) finishes."""
        return (step + 1) / self.steps_per_epoch


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak LR for optimizer step ``step`` (0-based): linear warmup that never uses
    a zero rate, then the schedule over the remaining steps."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    if kind == "inverse_sqrt":
        return math.sqrt(max(warmup, 1) / (step + 1))
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return max(0.0, 1.0 - progress)  # linear
