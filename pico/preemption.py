"""Graceful preemption: a signal (`training.preempt_signals`) asks the run to stop at the next step boundary,
where every rank agrees, the loop checkpoints that step, and the process exits with PREEMPTED, resumable by
launching the same command again (docs/distributed.md, "Preemption")."""

from __future__ import annotations

import signal
import sys
import time

from pico.distributed import any_rank, is_main, new_gloo_group

PREEMPTED = 75  # the exit status of a preempted run: EX_TEMPFAIL of sysexits.h, "try again later"


class Preemption:
    """Handlers for `signals` that only record the first one; `requested()` makes every rank agree on it.

    As a handler interrupts nothing, a signal at any moment (mid-step, during a checkpoint write, a second
    one during the preemption save) changes nothing until the loop asks at a step boundary. Constructing
    it is a collective (its gloo group); `requested` is one on every call until it returns True.
    """

    def __init__(self, signals: list[str], timeout: float):
        self.timeout, self.is_main = timeout, is_main()  # is_main asked now: exit() runs after cleanup()
        self.received: tuple[str, float] | None = None  # (name, time.monotonic()) of this rank's first signal
        self.agreed: float | None = None  # time.monotonic() when the ranks agreed to stop
        # NOTE: the agreement, a CPU all-reduce at every step, runs on a gloo group of its own: no device
        # synchronisation, and never interleaved with training's collectives or the checkpoint writer's.
        self._group = new_gloo_group()
        for name in signals:
            signal.signal(signal.Signals[name], self._record)

    def _record(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = (signal.Signals(signum).name, time.monotonic())

    def requested(self) -> bool:
        """True on every rank once any rank has received one of the signals (then without a collective)."""
        if self.agreed is None and any_rank(self.received is not None, self._group):
            self.agreed = time.monotonic()
        return self.agreed is not None

    def time_left(self) -> float:
        """Seconds left of `timeout` since this rank's signal (else since the ranks agreed), at least 0."""
        return max(0.0, self.timeout - (time.monotonic() - self._since()[1]))

    def exit(self, step: int) -> None:
        """Say (rank 0) which signal stopped the run at `step` and how long it took from the signal to here,
        then exit with PREEMPTED."""
        name, since = self._since()
        took = time.monotonic() - since
        if self.is_main:
            late = f", over training.preempt_timeout={self.timeout:g}s" if took > self.timeout else ""
            print(
                f"preempted by {name} at step {step}: step_{step} is saved; {took:.1f}s from the signal to "
                f"exit{late}; launch the same command to resume (exit {PREEMPTED})",
                flush=True,
            )
        sys.exit(PREEMPTED)

    def _since(self) -> tuple[str, float]:
        """(signal name, when) that the time to exit counts from."""
        return self.received or ("a signal on another rank", self.agreed)
