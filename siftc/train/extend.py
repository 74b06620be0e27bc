"""`siftc train --resume RUN --steps M`: a finished or interrupted run trains on to step M.

Its schedules are re-planned for M steps: from the step it stopped at on, the LR and the mask updates are
what a run started with --steps M has there (a cosine or step LR stretched over M, RigL/SET updating
until end_fraction of M). Continuing the old plan instead would train the extra steps of a finished
cosine run at an LR of about 0, with masks frozen since 75% of the old total.
"""
from dataclasses import replace
from pathlib import Path

from siftc.errors import UsageError
from siftc.sparse import METHODS
from siftc.store import os_errors, write_json
from siftc.train.config import TrainConfig


def extend(cfg: TrainConfig, info: dict, done: int, planned: int, steps: int) -> tuple[TrainConfig, dict]:
    """The settings and run.json of a run of `planned` steps, `done` of them trained, that is to train
    to `steps` instead (`--resume RUN --steps M`, a finished run included). Its schedules are re-planned
    for `steps`: from step `done` on, the LR and the mask updates are what a run started with --steps
    `steps` has there (a cosine LR stretched over the new total, RigL/SET updating until end_fraction of
    it), so a longer run trains at an LR that is not already 0, and its masks keep moving. Each extension
    is listed under run.json's "extended" with the line that says so."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UsageError(f"steps={steps!r} must be a positive integer")
    if steps < done:
        raise UsageError(f"--steps {steps} is fewer than the {done} steps {cfg.out} has done; pass --steps "
                         f"{done} or more")
    new = replace(cfg, steps=steps, epochs=None)
    record = {"at_step": done, "from_steps": planned, "to_steps": steps, "note": _replanned(new, done, planned)}
    return new, {**info, "config": {**info["config"], "steps": steps, "epochs": None},
                 "extended": [*info.get("extended", []), record]}


def _replanned(cfg: TrainConfig, done: int, planned: int) -> str:
    """'extended from 20 to 40 steps at step 20: the cosine LR schedule (warmup 4) and rigl's mask
    updates (every 5 until step 30) are re-planned for 40 steps, as if ...'"""
    parts = []
    if cfg.lr_schedule != "constant" or cfg.warmup_steps:
        warmup = f" (warmup {cfg.warmup_steps})" if cfg.warmup_steps else ""
        parts.append(f"the {cfg.lr_schedule} LR schedule{warmup}")
    if METHODS[cfg.method].updates_masks:
        end = int(cfg.end_fraction * cfg.steps)
        parts.append(f"{cfg.method}'s mask updates (every {cfg.update_every} until step {end})")
    what = (f"{' and '.join(parts)} {'are' if len(parts) > 1 else 'is'} re-planned for {cfg.steps} steps, as "
            f"if the run had been started with --steps {cfg.steps}" if parts
            else "the LR stays constant and the masks static")
    return f"extended from {planned} to {cfg.steps} steps at step {done}: {what}"


def begin_extended(out: Path, info: dict) -> dict:
    """run.json with the new total; the finished run's summary.json and loss.png go (the run is
    unfinished again)."""
    write_json(out / "run.json", info)
    with os_errors(out):
        (out / "summary.json").unlink(missing_ok=True)
        (out / "loss.png").unlink(missing_ok=True)
    return info
