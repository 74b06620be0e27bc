"""What both trainer callbacks share: the scheduler's settings, building it from a trainer's model and
optimizers, its state as JSON, resuming it at the trainer's step, and the record of a mask update.

    schedule = MaskSchedule("rigl", update_every=100)        # checked now, not when training starts
    sched = schedule.build(model, trainer_optimizers, total_steps=trainer_max_steps)
    ...after each optimizer step:  record = sched.step();  if record: log(update_log(record, sched))
"""
import base64
from dataclasses import dataclass

import torch
from torch import nn

from siftc.errors import UsageError
from siftc.sparse import METHODS, sparse_layers
from siftc.sparse.schedulers import DROP_FRACTION, END_FRACTION, UPDATE_EVERY


@dataclass(frozen=True)
class MaskSchedule:
    """The mask scheduler's settings, with `siftc train`'s defaults (the paper's)."""
    method: str = "rigl"                  # a siftc.sparse.METHODS name: static | set | rigl
    update_every: int = UPDATE_EVERY      # optimizer steps between mask updates (the paper's dT)
    drop_fraction: float = DROP_FRACTION  # the paper's a, cosine-annealed to 0
    end_fraction: float = END_FRACTION    # no mask updates after this fraction of the trainer's steps
    seed: int = 0                         # SET's random regrowth

    def __post_init__(self):
        if self.method not in METHODS:
            raise UsageError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        self._make(nn.Module(), None, 1)  # the scheduler's own checks of the other settings, now

    def _make(self, model, optimizer, total_steps: int):
        return METHODS[self.method](model, optimizer, total_steps, update_every=self.update_every,
                                    drop_fraction=self.drop_fraction, end_fraction=self.end_fraction,
                                    seed=self.seed)

    def build(self, model: nn.Module, optimizers, total_steps):
        """The scheduler of `model`'s sparse layers over `total_steps` optimizer steps, moving the
        optimizer state of whichever of `optimizers` trains their values."""
        if not sparse_layers(model):
            raise UsageError("the trainer's model has no siftc sparse layers: hand it the model "
                             "siftc.convert returns (or siftc.load of an artifact), not the dense one")
        if isinstance(total_steps, float) and total_steps.is_integer():
            total_steps = int(total_steps)  # Lightning's estimated_stepping_batches (inf when unbounded)
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise UsageError(f"the trainer's number of optimizer steps is {total_steps}, and the mask schedule "
                             f"needs a finite one: give the trainer max_steps (or a sized dataset and epochs)")
        return self._make(model, optimizer_of(model, optimizers), total_steps)


def optimizer_of(model: nn.Module, optimizers) -> torch.optim.Optimizer:
    """The torch optimizer among `optimizers` (unwrapped from accelerate's or Lightning's wrappers)
    that trains the values of `model`'s sparse layers."""
    values = {id(layer.values) for layer in sparse_layers(model).values()}
    for opt in optimizers:
        while isinstance(getattr(opt, "optimizer", None), torch.optim.Optimizer):
            opt = opt.optimizer  # accelerate's AcceleratedOptimizer, Lightning's LightningOptimizer
        if opt is not None and any(id(p) in values for group in opt.param_groups for p in group["params"]):
            return opt
    raise UsageError("no optimizer of the trainer trains the sparse layers' values; create the trainer's "
                     "optimizer from the converted model's parameters")


def to_json(state: dict) -> dict:
    """A scheduler's state_dict as JSON (its generator state as base64), for trainer_state.json."""
    return {**state, "generator": base64.b64encode(state["generator"].numpy().tobytes()).decode()}


def from_json(state: dict) -> dict:
    raw = base64.b64decode(state["generator"])
    return {**state, "generator": torch.frombuffer(bytearray(raw), dtype=torch.uint8)}


def resume(sched, state: dict, step: int, where: str):
    """Load the scheduler `state` a checkpoint at the trainer's `step` holds (`where` names it)."""
    if state is None:
        raise UsageError(f"the training resumes at step {step} from {where}, which holds no siftc mask "
                         f"scheduler state (saved without SparsityCallback); start a new run with the callback")
    sched.load_state_dict(state)
    if sched.t != step:
        raise UsageError(f"{where} holds the mask scheduler at step {sched.t} but the trainer at step {step}: "
                         f"the checkpoint is inconsistent; resume from another one")


def update_log(record: dict, sched) -> dict:
    """A mask update as log values: its drop fraction, the weights it moved, the updates so far."""
    return {"mask/drop_fraction": record["drop_fraction"], "mask/changed": sum(record["changed"].values()),
            "mask/updates": sched.updates}
