"""SparsityCallback: siftc's mask scheduler (static / SET / RigL) inside a PyTorch Lightning Trainer.

    class Classifier(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = siftc.convert(model, "wide", 0.9, example_inputs)   # or siftc.load(artifact)
        ...
    trainer = L.Trainer(max_steps=10_000, callbacks=[SparsityCallback("rigl", update_every=100)])
    trainer.fit(Classifier(), loader)
    trainer.fit(Classifier(), loader, ckpt_path="last")   # the scheduler goes on from the checkpoint

One batch of Lightning's automatic optimization (lightning 2.x, `_AutomaticOptimization.run`): the
training_step, `zero_grad` (first batch of an accumulation window only), backward, and on the last
batch of the window `optimizer.step()`, which advances `trainer.global_step`; then `on_train_batch_end`.
The scheduler steps there when `global_step` moved past it, so with `accumulate_grad_batches` it steps
once per optimizer step, and its total is `trainer.estimated_stepping_batches` (max_steps, or epochs x
batches / accumulation). RigL's dense gradient: on the step before an update the scheduler hooks the
sparse layers, whose forwards and backwards in every batch of the update step add up dL/dW; the update
runs after that step's optimizer.step(), before the next zero_grad.

State: `state_dict` / `load_state_dict`, so the scheduler is in every Lightning checkpoint; Lightning
restores callbacks before it builds the optimizers, so the state is kept until `on_train_start` builds
the scheduler. Masks are the sparse layers' `positions` buffers, in the module's state dict. Each mask
update is logged with `pl_module.log_dict` ("mask/drop_fraction", "mask/changed", "mask/updates",
on_step), reaching the loggers at their `log_every_n_steps` like any metric.
"""
from siftc.integrations import require
from siftc.integrations.masks import MaskSchedule, resume, update_log
from siftc.sparse.schedulers import DROP_FRACTION, END_FRACTION, UPDATE_EVERY

pl = require("lightning.pytorch", "lightning")


class SparsityCallback(pl.Callback):
    """Steps siftc's mask scheduler after every optimizer step of a Lightning Trainer. The settings
    are `siftc train`'s (siftc.integrations.masks.MaskSchedule)."""

    def __init__(self, method: str = "rigl", update_every: int = UPDATE_EVERY,
                 drop_fraction: float = DROP_FRACTION, end_fraction: float = END_FRACTION, seed: int = 0):
        self.schedule = MaskSchedule(method, update_every, drop_fraction, end_fraction, seed)
        self.scheduler = None  # built when training starts, from the module and the trainer's optimizers
        self._saved = None     # a checkpoint's scheduler state, until then

    def on_train_start(self, trainer, pl_module):
        self.scheduler = self.schedule.build(pl_module, trainer.optimizers, trainer.estimated_stepping_batches)
        if trainer.global_step:  # resumed from a checkpoint
            resume(self.scheduler, self._saved, trainer.global_step, f"checkpoint {trainer.ckpt_path}")
        self._saved = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > self.scheduler.t:  # an optimizer step ended this batch
            record = self.scheduler.step()
            if record:
                pl_module.log_dict(update_log(record, self.scheduler), on_step=True, on_epoch=False)

    def state_dict(self) -> dict:
        return self.scheduler.state_dict() if self.scheduler is not None else {}

    def load_state_dict(self, state_dict: dict):
        self._saved = state_dict or None
