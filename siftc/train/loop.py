"""The training loop behind `siftc train`: load an artifact, check the data against it, train with a
mask scheduler on a runtime backend, checkpoint, evaluate, and save the trained artifact.

    >>> from siftc.train import TrainConfig, train
    >>> summary = train(TrainConfig("out/mlp-par90", "data/digits.npz", "runs/mlp", method="rigl", steps=500))

The library never prints: pass `progress`, a callable taking event dicts ({"event": "start" | "step" |
"eval" | "warning" | "interrupted" | "end", ...}); only rank 0 calls it. Warnings are also listed in
summary.json.

SIGINT and SIGTERM stop a run between steps: the step in progress finishes, a checkpoint is written at
it, and `Interrupted` is raised (its message ends with the `siftc train --resume RUN` line; `.code` is
130 or 143, the shell's status for the signal). With --nproc, the launching process passes the signal
on to its workers (torchrun does the same for its own), and every rank learns of it through a flag
all-reduced after each step, so all of them stop at the same step; rank 0 alone writes the checkpoint.

Under a launcher (torchrun; siftc.train.distributed) `train` and `resume` are called on every rank; rank 0
claims RUN/ and the others receive what they need from it.
"""
import collections
import functools
import json
import math
import multiprocessing
import os
import shlex
import shutil
import signal
import threading
import time
import contextlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import siftc
from siftc.errors import SiftcError, UsageError
from siftc.extras import available
from siftc.nn.sparse import set_backend
from siftc.runtime import BACKENDS
from siftc.sparse import METHODS, apply, distribute, sparse_layers
from siftc.artifact import FORMAT as ARTIFACT, unpack_state
from siftc.store import LOCK, check_output, file_sha256, os_errors, run_lock, verify_digest, write_json
from siftc.train import checkpoint, data as data_mod
from siftc.train.checkpoint import RUN_FORMAT as RUN
from siftc.train.config import OPTIMIZERS, TrainConfig
from siftc.train.distributed import launched
from siftc.train.extend import begin_extended, extend
from siftc.train.flops import training_flops
from siftc.train.metrics import Metrics, plot_losses, summary_writer_class
from siftc.train.schedule import lr_scheduler, param_groups

AUTO = BACKENDS["auto"]  # its per-layer choices are checkpointed: a resumed run keeps them
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C, and a cluster's preemption


class Interrupted(SiftcError):
    """A signal stopped the run after a step; the checkpoint holds that step. The message starts with
    the signal's name and ends with the command that resumes the run. Every rank raises it; `lead`
    says whether this is rank 0, the one that tells the user."""

    def __init__(self, message: str, lead: bool = True):
        super().__init__(message)
        self.lead = lead

    @property
    def code(self) -> int:
        """The shell's exit status for the signal: 128 + its number (SIGINT 130, SIGTERM 143)."""
        return 128 + signal.Signals[str(self).split()[0]]


def prepare(cfg: TrainConfig, lead: bool = True):
    """Load the artifact and the data and check they fit: every user error surfaces here, before any
    process is spawned. Returns (model, data). `lead`: for rank 0, which alone writes metrics."""
    model = siftc.load(cfg.artifact)
    set_backend(model, cfg.backend)
    info = model.siftc_info
    model.eval()
    with torch.no_grad():
        out = logits_of(model(*info.example_inputs))
    data = data_mod.load(cfg.data, info.example_inputs, tuple(out.shape))
    if cfg.batch_size > data.train_items:
        raise UsageError(f"--batch-size {cfg.batch_size} is larger than the {data.train_items} training "
                         f"examples in {cfg.data}; pass --batch-size {data.train_items} or less, or more data")
    _check_batch_norm(model, data, cfg)
    if cfg.tensorboard and lead:
        summary_writer_class()  # a missing tensorboard package is one line, before any training
    if cfg.warmup_steps >= total_steps(cfg, data):  # --steps was checked by TrainConfig; --epochs here
        raise UsageError(f"--warmup-steps {cfg.warmup_steps} leaves none of the run's "
                         f"{total_steps(cfg, data)} steps to train at --lr; pass fewer warmup steps")
    return model, data


def total_steps(cfg: TrainConfig, data) -> int:
    return cfg.steps or max(1, round((cfg.epochs or 1) * data.steps_per_epoch(cfg.batch_size)))


def _check_batch_norm(model, data, cfg: TrainConfig):
    """BatchNorm in training needs more than one value per channel; with one example per process and
    no spatial dimensions it has one. Checked on a real batch with hooks, in eval mode (no statistics
    change)."""
    norms = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    if not norms or cfg.batch_size // cfg.nproc > 1:
        return
    seen = {}

    def values_per_channel(name):
        def hook(module, args):  # returns None: the input is left as it is
            seen[name] = args[0].numel() // args[0].shape[1]
        return hook

    hooks = [m.register_forward_pre_hook(values_per_channel(n)) for n, m in norms.items()]
    try:
        with torch.no_grad():
            model(data.batch(0, cfg.batch_size, cfg.seed, 0, cfg.nproc)[0])
    finally:
        for h in hooks:
            h.remove()
    one = [n for n, values in seen.items() if values <= 1]
    if one:
        raise UsageError(f"BatchNorm layer {one[0]} cannot train on {cfg.batch_size // cfg.nproc} example "
                         f"per process (it needs more than one value per channel); pass --batch-size "
                         f"{2 * cfg.nproc} or more")


def start(cfg: TrainConfig, force: bool = False, digests: tuple[str, str] | None = None) -> dict:
    """Fill RUN/ (new, or a run being replaced; `train` has checked and locked it) with a new run.json,
    after removing what an earlier run left there. `digests`: input_digests(cfg), if known."""
    out = Path(cfg.out)
    with os_errors(out):
        out.mkdir(parents=True, exist_ok=True)
        for stale in ("checkpoint.pt", "metrics.jsonl", "summary.json", "loss.png", "run.json"):
            (out / stale).unlink(missing_ok=True)
        model = out / "model"
        if model.is_symlink() or model.is_file():
            model.unlink()
        elif model.is_dir():
            shutil.rmtree(check_output(model, True, want=ARTIFACT))
    return checkpoint.write_run(out, cfg.to_json(), *(digests or input_digests(cfg)))


def input_digests(cfg: TrainConfig) -> tuple[str, str]:
    """(artifact, data) digests, as run.json records them."""
    with os_errors(cfg.data, "read"):
        data_sha = file_sha256(cfg.data)
    return checkpoint.artifact_digest(cfg.artifact), data_sha


def check_resumable(run) -> tuple[TrainConfig, dict]:
    """The settings of RUN/ and its run.json, after checking its artifact and data are unchanged."""
    info = checkpoint.read_run(run)
    cfg = TrainConfig.from_json({**info["config"], "out": str(run)})
    for what, path, digest, digest_of in (("artifact", cfg.artifact, info["artifact_sha"], checkpoint.artifact_digest),
                                          ("data", cfg.data, info["data_sha"], file_sha256)):
        verify_digest(path, digest, digest_of=digest_of, present=Path.exists,
                      missing=f"the run's {what} {path} is gone; restore it to resume {run}",
                      changed=f"the run's {what} {path} changed since {run} started; a resumed run "
                              f"must see the same {what}: restore it or start a new run")
    return cfg, info


def train(cfg: TrainConfig, progress=None, force: bool = False) -> dict | None:
    """Train in this process (cfg.nproc == 1), in cfg.nproc processes, or, when a launcher (torchrun)
    set RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, as this process's rank of the launcher's group
    (siftc.train.distributed). Returns the run's summary (None on ranks other than 0). RUN/ is locked
    while this runs: a second run into it, or a resume of it, is refused."""
    group = launched()
    if group is not None:
        cfg = group.config(cfg)  # nproc: the launcher's world size
    return _execute(group, functools.partial(_new_run, cfg, force), progress, given=cfg)


def resume(run, progress=None, steps: int | None = None) -> dict | None:
    """Continue RUN/ from its last checkpoint with the settings it was started with, after checking
    (once) that its artifact and data are unchanged. Returns the run's summary; RUN/ is locked meanwhile.
    `steps`: train to this step instead, a finished run too (siftc.train.extend).

        >>> resume("runs/mlp")  # after an interruption
        >>> resume("runs/mlp", steps=4000)  # on from the 2000 steps it was started with
    """
    return _execute(launched(), functools.partial(_continued_run, run, steps), progress)


@dataclass
class _Claim:
    """A run this process holds (RUN/ locked, inputs checked and loaded) before it writes anything."""
    cfg: TrainConfig
    prepared: tuple               # (model, data), from prepare()
    state: dict | None            # the checkpoint the run continues from
    digests: tuple[str, str]      # the artifact's and the data's, as run.json records them
    begin: Callable[[], dict]     # writes what the run starts with; returns run.json's contents


@contextmanager
def _new_run(cfg: TrainConfig, force: bool):
    out = Path(cfg.out)
    check_output(out, force, want=RUN, inputs=(cfg.artifact, cfg.data))  # before the (slow) loading
    prepared = prepare(cfg)
    check_output(out, force, want=RUN, inputs=(cfg.artifact, cfg.data))  # again: it may have changed
    made, begun = not os.path.lexists(out), []
    with os_errors(out):
        out.mkdir(parents=True, exist_ok=True)  # to hold the lock; start() fills it
    try:
        with run_lock(out):
            digests = input_digests(cfg)
            yield _Claim(cfg, prepared, None, digests, lambda: begun.append(True) or start(cfg, force, digests))
    except BaseException:
        if made and not begun:  # stopped before the run began (another rank could not start): as it was
            with contextlib.suppress(OSError):
                (out / LOCK).unlink()
                out.rmdir()
        raise


@contextmanager
def _continued_run(run, steps: int | None = None):
    out = Path(run)
    checkpoint.read_run(out)  # a file or a stranger's directory is refused before the lock is made
    with run_lock(out):
        cfg, info = check_resumable(out)
        prepared = prepare(cfg)
        state = checkpoint.load(out, info["run_id"])  # a checkpoint from elsewhere fails here, in one
        if state is not None:                          # line, not inside N worker processes
            _fits(prepared[0], state, out)
        begin = lambda: info  # noqa: E731 (run.json as it is)
        if steps is not None and steps != total_steps(cfg, prepared[1]):
            cfg, info = extend(cfg, info, state["step"] if state else 0, total_steps(cfg, prepared[1]), steps)
            begin = functools.partial(begin_extended, out, info)
        yield _Claim(cfg, prepared, state, (info["artifact_sha"], info["data_sha"]), begin)


def _execute(group, claim, progress, given: TrainConfig | None = None) -> dict | None:
    """Claim the run and train it: in this process, in cfg.nproc spawned ones, or as one rank of a
    launcher's `group`. The summary the run wrote."""
    if group is not None:
        from siftc.train.distributed import run_launched
        return run_launched(group, claim, progress, given)
    with claim() as c:
        run_id = c.begin()["run_id"]
        if c.cfg.nproc > 1:
            from siftc.train.distributed import launch
            with _on_stop_signals(_pass_to_workers):  # each worker checkpoints and raises Interrupted
                launch(c.cfg, run_id, progress)
        else:
            run(c.cfg, run_id, progress, prepared=c.prepared, state=c.state)
    return json.loads((Path(c.cfg.out) / "summary.json").read_text())


def run(cfg: TrainConfig, run_id: str, progress=None, rank: int = 0, world: int = 1, prepared=None,
        state: dict | None = None) -> None:
    """One process's share of the run (all of it when world == 1), from the checkpoint `state` (None:
    from step 0). Only rank 0 writes RUN/."""
    out = Path(cfg.out)
    lead = rank == 0
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, data = prepared or prepare(cfg)
    x0 = model.siftc_info.example_inputs
    steps = total_steps(cfg, data)
    eval_every = cfg.eval_every or max(1, steps // 10)
    if state is None:  # a fresh start: same masks and init on every rank, from the seed
        apply(model, distribute(model, cfg.distribution, x0), torch.Generator().manual_seed(cfg.seed))
    torch.manual_seed(cfg.seed)
    optimizer = OPTIMIZERS[cfg.optimizer](param_groups(model, cfg.weight_decay, cfg.decay_norms_and_biases),
                                          cfg.lr, cfg.weight_decay)
    lr_sched = lr_scheduler(optimizer, cfg.lr_schedule, steps, cfg.warmup_steps)
    sched = METHODS[cfg.method](model, optimizer, steps, update_every=cfg.update_every,
                                drop_fraction=cfg.drop_fraction, end_fraction=cfg.end_fraction,
                                seed=cfg.seed)
    step0, metrics_at, elapsed0 = 0, 0, 0.0
    if state is not None:
        _restore(model, optimizer, sched, lr_sched, state, rank, out)
        step0, metrics_at, elapsed0 = state["step"], state["metrics_offset"], state["elapsed"]
    nnz = sum(layer.nnz for layer in sparse_layers(model).values()) or 1  # constant through training
    flop = training_flops(model, x0, cfg.batch_size, steps, sched, model.siftc_info.report["dense_flops"])
    net = DistributedDataParallel(model, forward_sync_buffers=False) if world > 1 else model
    log = Metrics(out / "metrics.jsonl", metrics_at, cfg.tensorboard, step0) if lead else None
    emit = progress if (lead and progress is not None) else (lambda event: None)
    warnings = [w for w in (_no_mask_updates(cfg, sched), _no_plot() if lead else None) if w]
    for message in warnings:
        emit({"event": "warning", "message": message})
    extended = checkpoint.read_run(out).get("extended", []) if lead else []
    if extended and extended[-1]["at_step"] == step0:
        emit({"event": "note", "message": extended[-1]["note"]})
    emit({"event": "start", "steps": steps, "start_step": step0, "method": cfg.method,
          "flops": flop, "items_per_step": cfg.batch_size})

    t0, window, n_window = time.perf_counter() - elapsed0, 0.0, 0
    t_window = time.perf_counter()
    kept = step0 if state is not None else None  # the step the run's checkpoint holds
    signals = []  # the stop signals this process received, oldest first
    with _on_stop_signals(signals.append):
        for step in range(step0, steps):
            model.train()
            x, y = data.batch(step, cfg.batch_size, cfg.seed, rank, world)
            lr = optimizer.param_groups[0]["lr"]  # this step's (the first group's; all share the schedule)
            loss = _loss(logits_of(net(x)), y)
            value = loss.item()
            if not _finite_everywhere(value, world):
                raise _diverged(cfg, step + 1, f"the loss is {value}", kept)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            record = sched.step()
            lr_sched.step()
            if world > 1:
                _average_norm_statistics(model, world)
            done = step + 1
            window, n_window = window + value, n_window + 1
            if record and lead:
                changed = sum(record["changed"].values())
                log.write({"step": done, "mask_update": record["drop_fraction"], "changed": changed,
                           "changed_fraction": changed / nnz})
            if done % cfg.log_every == 0 or done == steps:
                now = time.perf_counter()
                rate = n_window * cfg.batch_size / max(now - t_window, 1e-9)
                if lead:
                    log.write({"step": done, "loss": window / n_window, "lr": lr, "items_per_s": rate,
                               "elapsed": now - t0})
                emit({"event": "step", "step": done, "loss": window / n_window, "items_per_s": rate})
                window, n_window, t_window = 0.0, 0, now
            if lead and (done % eval_every == 0 or done == steps):
                val = evaluate(model, data)
                log.write({"step": done, **val})
                emit({"event": "eval", "step": done, **val})
            stop = _stop_signal(signals, world) if done < steps else 0  # the last step just finishes
            if stop or done % cfg.checkpoint_every == 0 or done == steps:
                _check_finite(model, cfg, done, kept)  # equal on every rank (DDP): all stop here
                _checkpoint(out, run_id, model, optimizer, sched, lr_sched, done, log, time.perf_counter() - t0, world,
                            lead)
                kept = done
            if stop:
                if world > 1:  # no rank leaves before rank 0 has the checkpoint on disk: a launcher
                    dist.barrier()  # stops the others as soon as one rank's process ends
                emit({"event": "interrupted", "step": done})
                raise Interrupted(f"{signal.Signals(stop).name} at step {done} of {steps}: "
                                  f"{out / 'checkpoint.pt'} holds it; {_how_to_resume(out, world)}",
                                  lead=lead)
    if world > 1:
        _check_ranks_agree(model)
    if lead:
        summary = _finish(cfg, model, steps, flop, sched, time.perf_counter() - t0, log, step0, warnings,
                          extended)
        log.close()
        emit({"event": "end", **summary})


@contextmanager
def _on_stop_signals(handler):
    """SIGINT and SIGTERM call handler(signum) instead of stopping the process, until the block ends.
    Signals can only be caught in the main thread; elsewhere they keep their usual effect."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.signal(s, lambda signum, frame: handler(signum)) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def _how_to_resume(out: Path, world: int) -> str:
    """Ends with the command line that resumes RUN/; without a launcher it spawns --nproc processes."""
    command = f"siftc train --resume {shlex.quote(str(out))}"
    if launched() is None:
        return f"continue with\n{command}"
    return (f"continue under the launcher (torchrun ... -m {command}), or on one machine ({world} "
            f"process{'es' * (world > 1)}) with\n{command}")


def _pass_to_workers(signum: int):
    """The launcher's handler: its workers (torch.multiprocessing children) stop; it waits for them."""
    for worker in multiprocessing.active_children():
        os.kill(worker.pid, signum)


def _stop_signal(signals: list, world: int) -> int:
    """The signal that stops the run after this step, 0 for none; the same on every rank (each rank's
    first signal, the largest of them: one all-reduced int a step)."""
    stop = torch.tensor([signals[0] if signals else 0])
    if world > 1:
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
    return int(stop.item())


def _no_mask_updates(cfg: TrainConfig, sched) -> str | None:
    """A warning when SET/RigL would make no mask update in this run (it would train as static), with
    an --update-every that gives some; or, for a model with no sparse layers (densified), that the
    method has nothing to act on."""
    if not sched.layers:
        return (f"the model has no sparse layers (densified, or nothing was transformed), so --method "
                f"{cfg.method} has no mask to keep or update: every weight trains dense")
    if not sched.updates_masks or sched.update_steps():
        return None
    what = (f"{cfg.method} makes no mask update in {sched.total_steps} steps: updates stop at step "
            f"{sched.end_step} (--end-fraction {cfg.end_fraction:g}) and come every {cfg.update_every} "
            f"(--update-every), so it trains as static")
    last = sched.end_step - 1  # the latest step an update can happen at
    if last < 1:
        return f"{what}; pass more --steps or a larger --end-fraction"
    return (f"{what}; pass --update-every {last} or less (--update-every {max(1, last // 4)} gives "
            f"{last // max(1, last // 4)} updates)")


def _no_plot() -> str | None:
    """A warning when loss.png cannot be drawn: matplotlib is an extra."""
    if available("matplotlib"):
        return None
    return "loss.png is not drawn: matplotlib is not installed here; pip install 'siftc[plot]'"


def _finite_everywhere(value: float, world: int) -> bool:
    """Whether the loss is finite on every rank (each rank learns the same answer, so all stop together)."""
    bad = torch.tensor([0.0 if math.isfinite(value) else 1.0])
    if world > 1:
        dist.all_reduce(bad)
    return not bad.item()


def _check_finite(model, cfg: TrainConfig, step: int, kept: int | None):
    bad = [n for n, t in model.state_dict().items() if t.is_floating_point() and not t.isfinite().all()]
    if bad:
        raise _diverged(cfg, step, f"{bad[0]} is not finite{f' (and {len(bad) - 1} more)' * (len(bad) > 1)}", kept)


def _diverged(cfg: TrainConfig, step: int, what: str, kept: int | None) -> UsageError:
    where = (f"{Path(cfg.out) / 'checkpoint.pt'} keeps step {kept}, the last finite one" if kept is not None
             else "no checkpoint was written before it")
    return UsageError(f"training diverged at step {step}: {what}; {where}; lower --lr (it is {cfg.lr:g}) "
                      f"or check the data, and start a new run")


def logits_of(out) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, a HuggingFace ModelOutput's `.logits`, or the
    first tensor of a tuple (nanoGPT's `(logits, loss)`)."""
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    from torch.utils import _pytree as pytree
    found = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    if not found:
        raise UsageError(f"the model returns {type(out).__name__} with no tensor; siftc train needs logits")
    return found[0]


def _loss(logits, y):
    if logits.dim() == 3:  # (B, T, V) next-byte logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    return F.cross_entropy(logits, y)  # (B, classes)


@torch.no_grad()
def evaluate(model, data, batch: int = 256) -> dict:
    """Validation loss and accuracy (next-byte accuracy for text), in eval mode."""
    was = model.training
    model.eval()
    total, correct, count = 0.0, 0, 0
    for i in range(0, len(data.val_x), batch):
        logits, y = logits_of(model(data.val_x[i:i + batch])), data.val_y[i:i + batch]
        flat, target = logits.reshape(-1, logits.shape[-1]), y.reshape(-1)
        total += F.cross_entropy(flat, target, reduction="sum").item()
        correct += int((flat.argmax(-1) == target).sum())
        count += target.numel()
    model.train(was)
    return {"val_loss": total / count, "val_acc": correct / count}


def _checkpoint(out, run_id, model, optimizer, sched, lr_sched, step, log, elapsed, world, lead):
    # Per rank: its RNG and the auto backend's choices (each rank timed its own; empty on other backends).
    mine = (torch.get_rng_state(), AUTO.choices_of(model))
    if world > 1:
        states = [None] * world
        dist.all_gather_object(states, mine)
    else:
        states = [mine]
    if lead:
        log.sync()
        checkpoint.save(out, {"run_id": run_id, "step": step, "model": checkpoint.model_state(model),
                              "optimizer": optimizer.state_dict(), "scheduler": sched.state_dict(),
                              "lr_schedule": lr_sched.state_dict(),
                              "rng": [rng for rng, _ in states], "auto_choices": [c for _, c in states],
                              "metrics_offset": log.tell(), "elapsed": elapsed})


def _fits(model, state, out):
    try:
        model.load_state_dict(unpack_state(state["model"], out / "checkpoint.pt"), strict=True)
    except (RuntimeError, KeyError) as e:
        raise UsageError(f"{out / 'checkpoint.pt'} does not fit this run's model "
                         f"({' '.join(str(e).split())[:200]}); it is from another run: delete it "
                         f"to restart from step 0") from e


def _restore(model, optimizer, sched, lr_sched, state, rank, out):
    _fits(model, state, out)
    optimizer.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    if "lr_schedule" in state:  # checkpoints from before LR schedules had a constant LR
        lr_sched.load_state_dict(state["lr_schedule"])
    for group, base, factor in zip(optimizer.param_groups, lr_sched.base_lrs, lr_sched.lr_lambdas):
        group["lr"] = base * factor(lr_sched.last_epoch)  # as LambdaLR sets it; re-planned if extended
    torch.set_rng_state(state["rng"][rank])
    try:  # last: at the masks as loaded, so the layers run on the backends they ran on, timing nothing
        AUTO.restore(model, state.get("auto_choices", [{}] * (rank + 1))[rank])
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as e:
        raise UsageError(f"{out / 'checkpoint.pt'}: its auto-backend choices do not fit this run's model "
                         f"({e}); delete it to restart from step 0") from e


def _average_norm_statistics(model, world: int):
    """BatchNorm's running mean and variance, averaged over the ranks after every step: each rank
    normalised its own slice of the batch, and ranks that disagree would checkpoint one rank's view
    (one all-reduce of the per-channel statistics a step: small beside the gradients')."""
    stats = [b for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
             for b in (m.running_mean, m.running_var) if b is not None]
    if not stats:
        return
    flat = torch.cat([b.reshape(-1) for b in stats])  # (sum of channels,)
    dist.all_reduce(flat)
    flat /= world
    for b, mean in zip(stats, flat.split([b.numel() for b in stats])):
        b.copy_(mean.view_as(b))


def _check_ranks_agree(model):
    """Weights and masks must be bitwise equal on every rank; a mismatch is a siftc bug. Rank 0's
    tensors are broadcast as raw bytes (so a NaN or a -0.0 has to match too), and every rank learns
    of any mismatch, so all of them stop with the same message."""
    off = []
    for name, t in model.state_dict().items():
        mine = t.detach().contiguous().reshape(-1).view(torch.uint8)  # (numel * itemsize,)
        ref = mine.clone()
        dist.broadcast(ref, src=0)
        if not torch.equal(ref, mine):
            off.append(name)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, off)
    bad = [(rank, names) for rank, names in enumerate(every) if names]
    if bad:
        rank, names = bad[0]
        raise RuntimeError(f"siftc bug: rank {rank} diverged from rank 0 at {', '.join(names)}")


def layer_backends(model, backend: str) -> dict:
    """Layer name -> the backend it ran on: `backend`, or for auto its choice (choices joined by '+'
    when inputs of different shapes, e.g. training and validation batches, chose differently)."""
    layers = sparse_layers(model)
    if backend != AUTO.name:
        return {name: backend for name in layers}
    chosen = AUTO.choices_of(model)
    return {name: "+".join(sorted({r["choice"] for r in chosen.get(name, [])})) or "untimed"
            for name in layers}


def backends_in_short(backends: dict) -> str:
    """'10 layers native, 2 torch', most first."""
    counts = sorted(collections.Counter(backends.values()).items(), key=lambda kv: (-kv[1], kv[0]))
    return ", ".join(f"{n} layer{'s' * (n != 1)} {b}" if i == 0 else f"{n} {b}"
                     for i, (b, n) in enumerate(counts)) or "no sparse layers"


def _finish(cfg, model, steps, flop, sched, elapsed, log, step0, warnings, extended) -> dict:
    out = Path(cfg.out)
    siftc.save(model, out / "model", force=True)
    records = log.records()
    evals = [r for r in records if "val_loss" in r]
    backends = layer_backends(model, cfg.backend)  # rank 0's: each rank of an auto run timed its own
    summary = {"method": cfg.method, "steps": steps, "batch_size": cfg.batch_size,
               "backend": cfg.backend, "backends": backends_in_short(backends), "layer_backends": backends,
               "warnings": warnings, "nproc": cfg.nproc, "resumed_at": step0 or None, "extended": extended,
               "elapsed_s": elapsed, "steps_per_s": steps / elapsed if elapsed else None,
               "mask_updates": sched.updates, "flops": flop,
               "nnz": {n: layer.nnz for n, layer in sparse_layers(model).items()},
               **({k: evals[-1][k] for k in ("val_loss", "val_acc")} if evals else {})}
    write_json(out / "summary.json", summary)
    if available("matplotlib"):
        plot_losses(records, out / "loss.png", title=f"{Path(cfg.artifact).name} · {cfg.method}")
    return summary
