"""Mask schedulers for dynamic sparse training, used the way learning-rate schedulers are:

    sched = siftc.sparse.RigL(model, optimizer, total_steps=10_000)
    for x, y in data:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        sched.step()                       # after optimizer.step(), once per training step

Every `update_every` steps (paper: 100) until `end_fraction` of training (paper: 75%), each sparse layer
drops the `drop_fraction(t)` of its active weights with the smallest magnitude and regrows as many
elsewhere: SET at uniformly random inactive positions, RigL where the dense gradient's magnitude is
largest. The drop fraction is cosine-annealed, a/2 * (1 + cos(pi * t / T_end)), from a = 0.3 to 0.
Regrown weights and their optimizer state start at zero; every layer keeps its non-zero count, so the
model stays iso-FLOP throughout. Static never changes a mask.

A layer may carry a sparsity pattern (`layer.pattern`, a siftc.sparse.patterns.Pattern; None or
unstructured is the above): then whole blocks are dropped by L1 norm and regrown (at random, or by the
L1 norm of the dense gradient), and N:M layers keep N per group, by siftc.sparse.structured.swap.

RigL's dense gradient dL/dW = dY^T X is computed only for the backward of an update step: the scheduler
knows the next step is one, and for that step hooks every sparse layer's input and output gradient, so
it works with any runtime backend (which itself only computes the weight gradient at non-zeros).

Under torch.distributed the dense gradients are all-reduced and the masks broadcast from rank 0 after
every update, so every rank holds the same masks.
"""
import math

import torch
import torch.distributed as dist
from torch import nn

from siftc import layers
from siftc.errors import UsageError
from siftc.sparse import structured
from siftc.sparse.distribution import sparse_layers

# The paper's schedule, the one default of every scheduler, TrainConfig and `siftc train`: masks change
# every UPDATE_EVERY steps (its dT), first dropping DROP_FRACTION of each layer's active weights (its a,
# cosine-annealed to 0), and no longer change after END_FRACTION of training.
UPDATE_EVERY = 100
DROP_FRACTION = 0.3
END_FRACTION = 0.75


def cosine_drop_fraction(t: int, a: float, end_step: int) -> float:
    """a/2 * (1 + cos(pi * t / end_step)) before `end_step`, 0 from it on."""
    if t >= end_step or end_step <= 0:
        return 0.0
    return a / 2 * (1 + math.cos(math.pi * t / end_step))


def _dist_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class Static:
    """A mask scheduler whose masks never change; it only keeps pruned weights at exactly zero."""

    name = "static"
    updates_masks = False

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, total_steps: int, *,
                 update_every: int = UPDATE_EVERY, drop_fraction: float = DROP_FRACTION,
                 end_fraction: float = END_FRACTION, seed: int = 0):
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise UsageError(f"total_steps={total_steps!r} must be a positive integer")
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise UsageError(f"update_every={update_every!r} must be a positive integer (paper: {UPDATE_EVERY})")
        if not 0 <= drop_fraction <= 1:
            raise UsageError(f"drop_fraction={drop_fraction!r} must be in [0, 1] (paper: {DROP_FRACTION})")
        if not 0 <= end_fraction <= 1:
            raise UsageError(f"end_fraction={end_fraction!r} must be in [0, 1] (paper: {END_FRACTION})")
        self.model, self.optimizer = model, optimizer
        self.layers = sparse_layers(model)
        self.total_steps, self.update_every = total_steps, update_every
        self.drop_fraction, self.end_fraction = drop_fraction, end_fraction
        self.end_step = int(end_fraction * total_steps)  # no updates from this step on
        self.t = 0              # training steps done (calls to step())
        self.updates = 0        # mask updates done
        self.dense_grad_steps = 0
        self.generator = torch.Generator().manual_seed(seed)
        self._hooks: list = []
        self._dense_grad: dict[str, torch.Tensor] = {}
        self._arm(self.is_update_step(1))

    # -- schedule -------------------------------------------------------------------------------
    def drop_fraction_at(self, t: int) -> float:
        return cosine_drop_fraction(t, self.drop_fraction, self.end_step) if self.updates_masks else 0.0

    def is_update_step(self, t: int) -> bool:
        return self.updates_masks and t > 0 and t % self.update_every == 0 and t < self.end_step

    def update_steps(self) -> list[int]:
        """Every step at which masks change over the whole run."""
        return [t for t in range(self.update_every, self.total_steps + 1, self.update_every)
                if self.is_update_step(t)]

    # -- the step -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> dict | None:
        """Call once per training step, after `optimizer.step()`. Returns a record on update steps."""
        self.t += 1
        record = self._update(self.t) if self.is_update_step(self.t) else None
        self._arm(self.is_update_step(self.t + 1))
        return record

    def _update(self, t: int) -> dict:
        frac = self.drop_fraction_at(t)
        scores = self._grow_scores()
        changed = {}
        for name, layer in self.layers.items():
            k = int(round(frac * layer.nnz))
            changed[name] = k
            if k == 0:
                continue
            pattern = getattr(layer, "pattern", None)
            if pattern is not None and pattern.structured:
                src, kept = self._swap_structured(layer, pattern, k, scores.get(name))
                changed[name] = int((~kept).sum())
            else:
                mask, moved = self._swap(layer, k, scores.get(name))
                self._sync(mask, moved)
                src, kept = layer.set_mask(mask)  # dropped weights leave; grown ones start at zero
                kept &= ~moved.reshape(-1)[layer.positions.long()]  # so does one dropped and regrown
            layer.values[~kept] = 0
            self._repack_optimizer_state(layer.values, src, kept)
        self._dense_grad.clear()
        self.updates += 1
        return {"step": t, "drop_fraction": frac, "changed": changed}

    def _swap(self, layer, k: int, grow_score):
        """Drop the k smallest-magnitude active weights, regrow k inactive ones. Returns (new mask,
        positions dropped or grown)."""
        mask = layer.mask.reshape(-1)
        magnitude = torch.full(mask.shape, math.inf, dtype=layer.values.dtype)
        magnitude[layer.positions.long()] = layer.values.detach().abs()
        drop = torch.topk(magnitude, k, largest=False).indices
        kept = mask.clone()
        kept[drop] = False
        score = self._score(grow_score, kept).masked_fill(kept, -math.inf)  # candidates: all not kept
        grow = torch.topk(score, k).indices
        new = kept.clone()
        new[grow] = True
        moved = torch.zeros_like(mask)
        moved[drop] = True
        moved[grow] = True
        return new.view_as(layer.mask), moved.view_as(layer.mask)

    def _swap_structured(self, layer, pattern, k: int, grow_score) -> tuple[torch.Tensor, torch.Tensor]:
        """The same update keeping `layer.pattern` (siftc.sparse.structured.swap: whole blocks, N per
        group); returns set_positions' (src, kept) with regrown entries not kept."""
        new, regrown = structured.swap(layer.positions, layer.values, layer.weight_shape, pattern, k,
                                       **self._grow_from(grow_score))
        self._sync(new, regrown)
        src, kept = layer.set_positions(new)
        return src, kept & ~regrown

    def _grow_from(self, grow_score) -> dict:
        """What `structured.swap` grows by: `grad=` (RigL) or `generator=` (SET)."""
        raise NotImplementedError

    def _score(self, grow_score, kept):
        raise NotImplementedError

    def _grow_scores(self) -> dict[str, torch.Tensor]:
        return {}

    @staticmethod
    def _sync(*tensors: torch.Tensor):
        """Every rank takes rank 0's decision (masks, or positions and their regrown flags), so masks are
        identical everywhere whatever the tie-breaks."""
        if _dist_world() > 1:
            for t in tensors:
                wire = t.to(torch.uint8) if t.dtype == torch.bool else t  # bools go as bytes
                dist.broadcast(wire, src=0)
                t.copy_(wire)

    def _repack_optimizer_state(self, param: torch.Tensor, src: torch.Tensor, kept: torch.Tensor):
        """Per-parameter optimizer state (momentum, Adam's moments) follows the values to their new
        entries (`set_positions`' src, kept); regrown entries start at zero."""
        if self.optimizer is None:
            return
        for value in self.optimizer.state.get(param, {}).values():
            if torch.is_tensor(value) and value.shape == param.shape:
                value.copy_(torch.where(kept, value[src], 0))

    # -- RigL's dense gradient, on update steps only ----------------------------------------------
    def _arm(self, on: bool):
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if on and self.needs_dense_grad:
            for name, layer in self.layers.items():
                self._hooks.append(layer.register_forward_hook(self._capture(name)))

    needs_dense_grad = False

    def _capture(self, name: str):
        def hook(layer, args, out):
            if not out.requires_grad:
                return  # a no-grad forward (evaluation) between steps
            x = args[0].detach()

            def on_grad(g):  # g = dL/dY, the same shape as out
                dw = dense_weight_grad(layer, x, g)
                self._dense_grad[name] = self._dense_grad[name] + dw if name in self._dense_grad else dw
            out.register_hook(on_grad)
        return hook

    # -- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"method": self.name, "t": self.t, "updates": self.updates,
                "dense_grad_steps": self.dense_grad_steps, "generator": self.generator.get_state(),
                "total_steps": self.total_steps, "update_every": self.update_every,
                "drop_fraction": self.drop_fraction, "end_fraction": self.end_fraction}

    def load_state_dict(self, state: dict):
        if state.get("method") != self.name:
            raise UsageError(f"scheduler state is for {state.get('method')!r}, not {self.name!r}")
        self.t, self.updates = int(state["t"]), int(state["updates"])
        self.dense_grad_steps = int(state["dense_grad_steps"])
        self.generator.set_state(state["generator"])
        self._arm(self.is_update_step(self.t + 1))


class SET(Static):
    """Sparse Evolutionary Training: drop by magnitude, regrow uniformly at random."""

    name = "set"
    updates_masks = True

    def _score(self, grow_score, kept):
        return torch.rand(kept.shape, generator=self.generator)

    def _grow_from(self, grow_score) -> dict:
        return {"generator": self.generator}


class RigL(Static):
    """Rigging the Lottery: drop by magnitude, regrow where the dense gradient is largest."""

    name = "rigl"
    updates_masks = True
    needs_dense_grad = True

    def _grow_scores(self) -> dict[str, torch.Tensor]:
        missing = [n for n in self.layers if n not in self._dense_grad]
        if missing:
            raise RuntimeError(f"RigL has no dense gradient for {missing[0]} at step {self.t}: call "
                               f"sched.step() once per step, after loss.backward() and optimizer.step()")
        world = _dist_world()
        for g in self._dense_grad.values():
            if world > 1:
                dist.all_reduce(g)
                g.div_(world)
        self.dense_grad_steps += 1
        return dict(self._dense_grad)

    def _score(self, grow_score, kept):
        return grow_score.abs().reshape(-1)

    def _grow_from(self, grow_score) -> dict:
        return {"grad": grow_score}


def dense_weight_grad(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """dL/dW at every position (not only the non-zeros) from the layer's input x and output grad g."""
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        conv_weight = torch.nn.grad.conv2d_weight if isinstance(layer, nn.Conv2d) else torch.nn.grad.conv1d_weight
        return conv_weight(x, layers.shape(layer), g, stride=layer.stride, padding=layer.padding,
                           dilation=layer.dilation, groups=layer.groups)
    g2 = g.reshape(-1, g.shape[-1])   # (N, out)
    x2 = x.reshape(-1, x.shape[-1])   # (N, in)
    return g2.t() @ x2                 # (out, in)


METHODS = {"static": Static, "set": SET, "rigl": RigL}
