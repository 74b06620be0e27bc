"""The optimizer's settings over time and over the model: `--lr-schedule` with `--warmup-steps`, and
which parameters get weight decay.

    factor of --lr      warmup (linear)   then, over the remaining steps' fraction p in [0, 1)
    constant            (t + 1) / N       1
    cosine              (t + 1) / N       (1 + cos(pi p)) / 2, to 0 at the end
    step                (t + 1) / N       1, then 0.1 from p = 1/2, then 0.01 from p = 3/4

>>> lr_factor("cosine", t=0, steps=100, warmup=10), lr_factor("cosine", t=55, steps=100, warmup=10)
(0.1, 0.5)

The schedule is a torch LambdaLR over a pure function of the step, so its state_dict is plain data a
checkpoint holds, and a resumed run continues it exactly.
"""
import functools
import math

import torch
from torch.optim.lr_scheduler import LambdaLR

SCHEDULES = {
    "constant": lambda p: 1.0,  # the default: runs train as they did before schedules existed
    "cosine": lambda p: 0.5 * (1 + math.cos(math.pi * p)),  # the paper's GPT recipe
    "step": lambda p: 0.1 ** ((p >= 0.5) + (p >= 0.75)),  # the classic vision recipe: /10 at 50%, 75%
}
# Modules whose 1-D parameters (gains, shifts) are not decayed: decay pulls a gain towards 0, which
# only rescales what the next layer sees.
NORMS = tuple(getattr(torch.nn, n) for n in ("LayerNorm", "GroupNorm", "RMSNorm", "LocalResponseNorm")
              if hasattr(torch.nn, n)) + (torch.nn.modules.batchnorm._NormBase,)


def lr_factor(name: str, t: int, steps: int, warmup: int) -> float:
    """The factor of --lr that step t (0-based) of `steps` trains with."""
    if t < warmup:
        return (t + 1) / warmup
    return SCHEDULES[name]((t - warmup) / max(1, steps - warmup))


def lr_scheduler(optimizer, name: str, steps: int, warmup: int) -> LambdaLR:
    """Step it after every optimizer.step()."""
    return LambdaLR(optimizer, functools.partial(lr_factor, name, steps=steps, warmup=warmup))


def param_groups(model: torch.nn.Module, weight_decay: float, decay_all: bool):
    """The optimizer's parameters: all in one group (decay_all, or no decay at all: as before), or
    [weights, biases and norm parameters with weight_decay 0]. A sparse layer's `values` are weights
    and decay; its `bias` does not."""
    if decay_all or not weight_decay:
        return list(model.parameters())
    decay, exempt, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # a tied parameter goes where its first owner puts it
                continue
            seen.add(id(p))
            no = name == "bias" or (isinstance(module, NORMS) and p.dim() == 1)
            (exempt if no else decay).append(p)
    return [g for g in ({"params": decay}, {"params": exempt, "weight_decay": 0.0}) if g["params"]]
