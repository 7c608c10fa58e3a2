"""``mode = "auto"`` on a GPU (and ``mode = "measure"`` anywhere): time the two exact CAT step modes over the
first steps of the run and keep the faster.

The two modes give the same losses and gradients (rounding apart), so every trial step is a real training step.
Which is faster depends on the GPU, the model, the batch and the dtype (a bf16 UNet with fp32 LoRA included):
the one H200 measurement had the fused step at 0.80x the official step where the CPU rule says fused, so on a
GPU the run measures instead of assuming. On the CPU ``auto`` keeps the measured rule of ``auto_mode``.
"""

from __future__ import annotations

import statistics

TRIAL_MODES = ("fused", "reference")


class ModeTrial:
    """Alternates ``TRIAL_MODES`` step by step: each mode's first ``warmup`` steps are not counted (kernel
    choices, allocator growth, convolution timing), then ``rounds`` timed steps each, interleaved so that a
    change in the machine's load falls on both. ``next_mode()`` is the mode of the next step until ``decided``."""

    def __init__(self, warmup: int = 1, rounds: int = 3):
        self.warmup, self.rounds = warmup, rounds
        self.seconds: dict[str, list[float]] = {m: [] for m in TRIAL_MODES}
        self.seen: dict[str, int] = {m: 0 for m in TRIAL_MODES}
        self.decided: tuple[str, str] | None = None  # (mode, why) once both modes are timed
        self._turn = 0

    def next_mode(self) -> str:
        """The mode of the next step (the decided one after the trial)."""
        if self.decided is not None:
            return self.decided[0]
        return TRIAL_MODES[self._turn % len(TRIAL_MODES)]

    def record(self, mode: str, seconds: float) -> tuple[str, str] | None:
        """The step of ``mode`` took ``seconds`` (synchronised with the device); returns ``(mode, why)`` when this
        step completed the trial, else None."""
        if self.decided is not None:
            return None
        self.seen[mode] += 1
        if self.seen[mode] > self.warmup:
            self.seconds[mode].append(seconds)
        self._turn += 1
        if all(len(s) >= self.rounds for s in self.seconds.values()):
            medians = {m: statistics.median(s) for m, s in self.seconds.items()}
            best = min(medians, key=medians.get)
            other = next(m for m in medians if m != best)
            why = (
                f"measured over the run's first steps: {best} {medians[best] * 1e3:.1f} ms against {other} "
                f"{medians[other] * 1e3:.1f} ms a step (median of {self.rounds}, interleaved, after "
                f"{self.warmup} warm-up step(s) each)"
            )
            self.decided = (best, why)
            return self.decided
        return None
