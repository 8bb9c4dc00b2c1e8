"""Which steps a run checkpoints, and which checkpoints keep their train state (docs/checkpoints.md).

The schedule: `checkpointing.save_every`, `save_steps` and `save_log_spaced` (`is_checkpoint_step`). The
retention: `keep_state_last` and `keep_state_steps` (`Retention`): every checkpoint keeps `model/`,
`learning_dynamics/` and `eval.json`; only the kept ones keep `state/`, the DCP train state to resume from.
"""

from __future__ import annotations

from pathlib import Path

from pico.distributed import is_main
from pico.run_dir import (
    STATE,
    drop_leftovers,
    drop_state,
    latest_checkpoint,
    list_steps,
    step_dir,
    step_name,
    step_number,
)


def is_checkpoint_step(step: int, ck, max_steps: int) -> bool:
    """Whether the run checkpoints W_step: step 0, every `save_every` steps, `max_steps`, each of
    `save_steps`, and with `save_log_spaced` the powers of two below `save_every` (1, 2, 4, ...)."""
    log_spaced = ck.save_log_spaced and step < ck.save_every and step & (step - 1) == 0
    return step % ck.save_every == 0 or step == max_steps or step in ck.save_steps or log_spaced


def checkpoint_steps(ck, max_steps: int) -> list[int]:
    """Every step of a run of `max_steps` updates that `is_checkpoint_step` picks, ascending."""
    return [step for step in range(max_steps + 1) if is_checkpoint_step(step, ck, max_steps)]


class Retention:
    """Deletes the `state/` of checkpoints that `checkpointing.keep_state_last` (the newest N) and
    `keep_state_steps` do not keep; rank 0 does, and other ranks' calls return at once.

    Only steps older than the one `latest` names lose their state, so `latest` always has it and a step's
    state goes only once a newer step is complete. While the Hub uploader uploads state (`upload_state`),
    a step's state stays until that step is on the Hub. `pico.run_dir.drop_state` renames `state/` away
    before deleting it, so a crash at any moment leaves each state whole or gone, never half.
    """

    def __init__(self, run_dir, ck, uploader):
        self.run_dir, self.uploader = Path(run_dir), uploader
        self.keep_last, self.keep_steps = ck.keep_state_last, set(ck.keep_state_steps)
        self._waiting: set[int] = set()  # steps said to wait for their Hub upload

    def published(self, step: int) -> None:
        """The checkpoint writer's `on_published(N)` (rank 0, its thread): tell the uploader, then prune."""
        self.uploader.enqueue(step)
        self.prune()

    def prune(self) -> list[int]:
        """Delete every `state/` the rule drops now and log it; returns those steps, ascending."""
        if self.keep_last is None or not is_main():
            return []
        drop_leftovers(self.run_dir)
        latest = latest_checkpoint(self.run_dir)
        if latest is None:
            return []
        newest = step_number(latest)
        held = [s for s in list_steps(self.run_dir, require=STATE) if s <= newest]
        drop = [s for s in held[: -self.keep_last] if s not in self.keep_steps and s != newest]
        uploading = self.uploader.enabled and self.uploader.upload_state
        waiting = set(self.uploader.pending()) & set(drop) if uploading else set()
        for step in sorted(waiting - self._waiting):
            print(f"retention: {step_name(step)} keeps its state/ until it is on the Hub", flush=True)
        self._waiting |= waiting
        dropped = [s for s in drop if s not in waiting]
        for step in dropped:
            drop_state(step_dir(self.run_dir, step))
        if dropped:
            kept = ", ".join(step_name(s) for s in held if s not in dropped)
            names = ", ".join(step_name(s) for s in dropped)
            print(f"retention: deleted state/ of {names}; state/ kept in {kept}", flush=True)
        return dropped
