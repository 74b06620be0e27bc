"""Training settings: one frozen dataclass, validated on construction."""
import math
from dataclasses import asdict, dataclass, fields

import torch

from siftc.errors import UsageError
from siftc.runtime import DEFAULT as DEFAULT_BACKEND
from siftc.sparse import DISTRIBUTIONS, METHODS
from siftc.sparse.schedulers import DROP_FRACTION, END_FRACTION, UPDATE_EVERY
from siftc.train.schedule import SCHEDULES

OPTIMIZERS = {
    # AdamW: robust on both the MLP and the GPT without tuning (the paper uses it for GPT).
    "adamw": lambda params, lr, wd: torch.optim.AdamW(params, lr=lr, weight_decay=wd),
    # SGD with Nesterov-free momentum 0.9: the paper's choice for vision.
    "sgd": lambda params, lr, wd: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd),
}


@dataclass(frozen=True)
class TrainConfig:
    artifact: str
    data: str
    out: str
    method: str = "rigl"            # static | set | rigl
    steps: int | None = None        # exactly one of steps / epochs; neither means 1 epoch
    epochs: float | None = None
    batch_size: int = 32            # global: split across --nproc processes
    lr: float = 1e-3                # AdamW's usual small-model rate; the peak, after any warmup
    lr_schedule: str = "constant"   # a siftc.train.schedule.SCHEDULES name; constant: as runs always were
    warmup_steps: int = 0           # linear warmup to lr over this many steps; 0: none, as before
    optimizer: str = "adamw"
    weight_decay: float = 0.0       # short runs on small data do not need it
    decay_norms_and_biases: bool = False  # False: the paper's recipe, decay on weights (sparse values) only
    backend: str = DEFAULT_BACKEND  # a siftc.runtime.BACKENDS name; auto: per layer, the faster of native/torch
    seed: int = 0                   # data order, mask distribution, SET's draws, dropout
    distribution: str = "uniform"   # uniform keeps every layer iso-FLOP; erk keeps the total
    update_every: int = UPDATE_EVERY      # the paper's dT
    drop_fraction: float = DROP_FRACTION  # the paper's a, cosine-annealed to 0
    end_fraction: float = END_FRACTION    # no mask updates after this fraction of training (paper)
    checkpoint_every: int = 200     # steps between checkpoints; a killed run loses at most this many
    eval_every: int | None = None   # steps between validations; None: 10 over the run, and at the end
    log_every: int = 10             # steps averaged into one metrics.jsonl line
    nproc: int = 1                  # processes (torch.distributed, gloo)
    threads: int | None = None      # intra-op threads per process; None: torch's default (cores / nproc)
    tensorboard: str | None = None  # a directory for TensorBoard scalars beside metrics.jsonl; None: none

    def __post_init__(self):
        if self.method not in METHODS:
            raise UsageError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"unknown optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
        if self.lr_schedule not in SCHEDULES:
            raise UsageError(f"unknown LR schedule {self.lr_schedule!r}; choose one of: {', '.join(SCHEDULES)}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise UsageError(f"warmup-steps={self.warmup_steps!r} must be an integer >= 0")
        if self.steps is not None and self.warmup_steps >= self.steps:
            raise UsageError(f"--warmup-steps {self.warmup_steps} leaves none of the {self.steps} steps to "
                             f"train at --lr; pass fewer warmup steps")
        if self.distribution not in DISTRIBUTIONS:
            raise UsageError(f"unknown distribution {self.distribution!r}; choose one of: "
                             f"{', '.join(DISTRIBUTIONS)}")
        if self.steps is not None and self.epochs is not None:
            raise UsageError("give --steps or --epochs, not both")
        for name in ("steps", "eval_every"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise UsageError(f"{name.replace('_', '-')}={v!r} must be a positive integer")
        if self.epochs is not None and not 0 < self.epochs < math.inf:
            raise UsageError(f"epochs={self.epochs!r} must be a positive finite number, e.g. --epochs 3")
        for name in ("batch_size", "update_every", "checkpoint_every", "log_every", "nproc"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UsageError(f"{name.replace('_', '-')}={v!r} must be a positive integer")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise UsageError(f"threads={self.threads!r} must be a positive integer")
        if self.tensorboard is not None and (not isinstance(self.tensorboard, str) or not self.tensorboard):
            raise UsageError(f"tensorboard={self.tensorboard!r} must be a directory path")
        if self.batch_size % self.nproc:
            raise UsageError(f"batch size {self.batch_size} does not split over {self.nproc} processes; "
                             f"pass a --batch-size that is a multiple of --nproc")
        if not 0 < self.lr < math.inf:
            raise UsageError(f"lr={self.lr!r} must be a positive finite number, e.g. --lr 1e-3")
        if not 0 <= self.weight_decay < math.inf:
            raise UsageError(f"weight decay {self.weight_decay!r} must be a finite number >= 0")
        if not 0 <= self.drop_fraction <= 1 or not 0 <= self.end_fraction <= 1:
            raise UsageError(f"drop fraction and end fraction must be in [0, 1] "
                             f"(paper: {DROP_FRACTION} and {END_FRACTION})")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        # A run started before weight-decay groups existed decayed every parameter (and its checkpoint
        # has one optimizer group): it resumes that way.
        d = {"decay_norms_and_biases": True, **d}
        return cls(**{k: v for k, v in d.items() if k in known})
