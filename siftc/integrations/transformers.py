"""SparsityCallback: siftc's mask scheduler (static / SET / RigL) inside the HuggingFace Trainer.

    gm = siftc.convert(model, "wide", 0.9, example_inputs)        # or siftc.load("out/bert-wide90")
    trainer = Trainer(gm, args, train_dataset=ds, compute_loss_func=loss_of_logits,
                      callbacks=[SparsityCallback("rigl", update_every=100)])
    trainer.train()                                # masks change every 100 optimizer steps
    trainer.train(resume_from_checkpoint=True)     # the scheduler goes on from the checkpoint's step

One optimizer step of the Trainer (transformers 5, `_inner_training_loop`): forward and backward of
each of `gradient_accumulation_steps` micro-batches, gradient clipping, `on_pre_optimizer_step`,
`optimizer.step()`, `on_optimizer_step`, `lr_scheduler.step()`, `model.zero_grad()`, `global_step
+= 1`, `on_step_end`, then logging, evaluation and checkpoints. The scheduler steps in
`on_optimizer_step`, so it counts optimizer steps as `global_step` does, and its total is the Trainer's
`max_steps` (from `max_steps`, or epochs x batches / accumulation). RigL's dense gradient needs no
ordering of its own: on the step before an update the scheduler hooks the sparse layers, whose
forwards and backwards in every micro-batch of the update step add up dL/dW (zero_grad only clears
`.grad`); the update then runs right after that step's optimizer.step(), before zero_grad.

State: the callback is an `ExportableState`, so the Trainer writes the scheduler's state into each
checkpoint's trainer_state.json (`stateful_callbacks`); a resumed `train()` loads that file from the
checkpoint it resumes (whatever folder it is: the Trainer does not tell callbacks the path) and the
callback continues the scheduler from it. The masks themselves are the sparse layers' `positions`
buffers, in the model weights the Trainer saves. Each mask update is a record in
`trainer.state.log_history` ({"step", "mask/drop_fraction", "mask/changed", "mask/updates"}), saved
with the checkpoints.
"""
import dataclasses

from siftc.integrations import require
from siftc.integrations.masks import MaskSchedule, from_json, resume, to_json, update_log
from siftc.sparse.schedulers import DROP_FRACTION, END_FRACTION, UPDATE_EVERY

require("transformers", "transformers")
from transformers import TrainerCallback  # noqa: E402
from transformers.trainer_callback import ExportableState  # noqa: E402


class SparsityCallback(TrainerCallback, ExportableState):
    """Steps siftc's mask scheduler after every optimizer step of a HuggingFace Trainer. The settings
    are `siftc train`'s (siftc.integrations.masks.MaskSchedule)."""

    def __init__(self, method: str = "rigl", update_every: int = UPDATE_EVERY,
                 drop_fraction: float = DROP_FRACTION, end_fraction: float = END_FRACTION, seed: int = 0):
        self.schedule = MaskSchedule(method, update_every, drop_fraction, end_fraction, seed)
        self.scheduler = None  # built when training starts, from the Trainer's model and optimizer
        self._record = None    # the mask update of the step in progress, logged at its end

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.scheduler = self.schedule.build(model, [optimizer], state.max_steps)
        if state.global_step:  # resumed: `state` is the checkpoint's trainer_state.json
            saved = state.stateful_callbacks.get(type(self).__name__)
            saved = (saved[0] if isinstance(saved, list) else saved or {}).get("attributes", {}).get("scheduler_state")
            resume(self.scheduler, from_json(saved) if saved else None, state.global_step,
                   "the checkpoint's trainer_state.json")

    def on_optimizer_step(self, args, state, control, **kwargs):
        self._record = self.scheduler.step()

    def on_step_end(self, args, state, control, **kwargs):
        if self._record:
            state.log_history.append({**update_log(self._record, self.scheduler), "step": state.global_step})
            self._record = None

    def state(self) -> dict:
        """What the Trainer writes into trainer_state.json at each checkpoint."""
        return {"args": dataclasses.asdict(self.schedule),
                "attributes": {"scheduler_state": to_json(self.scheduler.state_dict()) if self.scheduler else None}}
