"""Sparsity schedules for pruning during training.

``cubic_sparsity`` is the cubic ramp of LoRAPrune (after Zhu & Gupta's gradual pruning): flat at
the initial ratio during warm-up, flat at the final ratio during cool-down, cubic in between.
``PruningSchedule`` adds *when* the masks change: every ``every`` optimizer steps while the ramp is
strictly between its ends, and once more on the first step that reaches the final ratio, so the
target is always met exactly (the reference stops just below it).
"""

from __future__ import annotations

from dataclasses import dataclass


def cubic_sparsity(step: int, total: int, final: float, initial: float = 0.0,
                   warmup: float = 0.1, cooldown: float = 0.1) -> float:
    """Target ratio after optimizer step ``step`` (1-based) of ``total``.

    ``initial`` while ``step <= warmup·total``; ``final`` once ``step > total - cooldown·total``;
    otherwise ``final + (initial - final)·(1 - (step - warmup·total) / (total - (warmup + cooldown)·total))³``.
    """
    start, stop = warmup * total, total - cooldown * total
    if step <= start:
        return initial
    if step > stop or stop <= start:
        return final
    progress = (step - start) / (stop - start)
    return final + (initial - final) * (1.0 - progress) ** 3


@dataclass(frozen=True)
class PruningSchedule:
    """Cubic ramp from ``initial`` to ``final`` over ``total`` steps, masks updated every ``every`` steps.

    Args:
        total: optimizer steps of the run.
        final: the target ratio.
        every: steps between mask updates on the ramp (the reference's ``prune_freq``).
        warmup, cooldown: fractions of ``total`` held at ``initial`` / ``final``.
    """

    total: int
    final: float
    every: int = 10
    initial: float = 0.0
    warmup: float = 0.1
    cooldown: float = 0.1

    def ratio(self, step: int) -> float:
        return cubic_sparsity(step, self.total, self.final, self.initial, self.warmup, self.cooldown)

    def reaches_final(self, step: int) -> bool:
        return self.ratio(step) >= self.final

    def final_step(self) -> int:
        """The first step whose ratio is the final one (where the last mask update happens)."""
        return next(s for s in range(1, self.total + 1) if self.reaches_final(s))

    def updates_at(self, step: int) -> bool:
        """Whether the masks change after optimizer step ``step``."""
        if step == self.final_step():
            return True
        r = self.ratio(step)
        return step % self.every == 0 and self.initial < r < self.final

    def update_steps(self) -> list[int]:
        return [s for s in range(1, self.total + 1) if self.updates_at(s)]
