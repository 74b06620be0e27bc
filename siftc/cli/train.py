"""`siftc train`: sparse training with a progress bar; everything else is siftc.train."""
import datetime
import sys
import time
from pathlib import Path

import click
from click.core import ParameterSource

from siftc.cli import config_file
from siftc.cli.options import defaults, trust_source_option
from siftc.runtime import BACKENDS
from siftc.sparse import DISTRIBUTIONS, METHODS
from siftc.train import OPTIMIZERS, TrainConfig
from siftc.train.schedule import SCHEDULES


DEFAULT = defaults(TrainConfig)
PLAIN_EVERY = 30.0  # seconds between progress lines when stdout is not a terminal (a log, a pipe)


class Warnings:
    """The progress of a --quiet run: warnings only, on stderr. Picklable, as every progress is, so
    rank 0 of a multi-process run can show it too."""

    def __call__(self, event):
        if event["event"] == "warning":
            click.echo(f"siftc: warning: {event['message']}", err=True)
        elif event["event"] == "note":  # e.g. how an extended run's schedules were re-planned
            click.echo(f"siftc: {event['message']}", err=True)
        else:
            self.show(event)

    def show(self, event):
        pass


class RichProgress(Warnings):
    """Progress bar (loss, items/s, ETA) and evaluation lines on the terminal."""

    def __init__(self):
        self.bar = None

    def show(self, event):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)
        kind = event["event"]
        if kind == "start":
            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]}"),
                                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
            self.bar.start()
            self.task = self.bar.add_task(event["method"], total=event["steps"],
                                          completed=event["start_step"], loss="-", rate="")
        elif kind == "step":
            self.bar.update(self.task, completed=event["step"], loss=f"{event['loss']:.4f}",
                            rate=f"{event['items_per_s']:,.0f} items/s")
        elif kind == "eval":
            self.bar.console.print(f"step {event['step']}: val loss {event['val_loss']:.4f}, "
                                   f"val acc {event['val_acc']:.2%}")
        elif kind in ("end", "interrupted"):
            self.bar.stop()


class PlainProgress(Warnings):
    """When stdout is not a terminal: a plain line about every PLAIN_EVERY seconds (step, loss, rate,
    ETA), and the evaluation lines."""

    def __init__(self):
        self.every = PLAIN_EVERY  # read here: a worker process imports this module afresh

    def show(self, event):
        kind, now = event["event"], time.monotonic()
        if kind == "start":
            self.steps, self.first, self.t0, self.last = event["steps"], event["start_step"], now, now
        elif kind == "step" and now - self.last >= self.every:
            self.last = now
            steps_per_s = (event["step"] - self.first) / max(now - self.t0, 1e-9)
            eta = datetime.timedelta(seconds=round((self.steps - event["step"]) / max(steps_per_s, 1e-9)))
            click.echo(f"step {event['step']}/{self.steps} ({event['step'] / self.steps:.0%}), loss "
                       f"{event['loss']:.4f}, {event['items_per_s']:,.0f} items/s, ETA {eta}")
        elif kind == "eval":
            click.echo(f"step {event['step']}: val loss {event['val_loss']:.4f}, val acc {event['val_acc']:.2%}")


@click.command("train")
@click.argument("artifact", required=False, type=click.Path())
@click.option("--data", type=click.Path(), help="A .npz with x/y arrays (classification) or a text file "
              "(byte-level language modelling).")
@click.option("-o", "--output", type=click.Path(), help="Run directory (checkpoints, metrics, model/).")
@click.option("--method", type=click.Choice(tuple(METHODS)), default=DEFAULT["method"], show_default=True,
              help="Mask scheduler.")
@click.option("--steps", type=int, default=None, help="Training steps. [default: 1 epoch]")
@click.option("--epochs", type=float, default=None, help="Epochs (instead of --steps).")
@click.option("--batch-size", type=int, default=DEFAULT["batch_size"], show_default=True, help="Global batch size.")
@click.option("--lr", type=float, default=DEFAULT["lr"], show_default=True,
              help="Learning rate: the peak, reached after --warmup-steps.")
@click.option("--lr-schedule", type=click.Choice(tuple(SCHEDULES)), default=DEFAULT["lr_schedule"],
              show_default=True, help="After the warmup: cosine decays to 0; step divides by 10 at 50% and 75%.")
@click.option("--warmup-steps", type=int, default=DEFAULT["warmup_steps"], show_default=True,
              help="Steps of linear warmup from lr/N to lr.")
@click.option("--optimizer", type=click.Choice(tuple(OPTIMIZERS)), default=DEFAULT["optimizer"], show_default=True)
@click.option("--weight-decay", type=float, default=DEFAULT["weight_decay"], show_default=True,
              help="On weights, a sparse layer's non-zeros included; biases and norm parameters get none.")
@click.option("--decay-norms-and-biases", is_flag=True, help="Weight decay on biases and norm parameters too.")
@click.option("--backend", type=click.Choice(sorted(BACKENDS)), default=DEFAULT["backend"], show_default=True,
              help="Runtime for the sparse layers; auto: per layer, the faster of native and torch by a short "
                   "timing (torch where the native kernels cannot build).")
@click.option("--seed", type=int, default=DEFAULT["seed"], show_default=True, help="Data order, masks, SET draws.")
@click.option("--distribution", type=click.Choice(tuple(DISTRIBUTIONS)), default=DEFAULT["distribution"],
              show_default=True, help="uniform: every layer iso-FLOP; erk: total FLOPs iso-FLOP.")
@click.option("--update-every", type=int, default=DEFAULT["update_every"], show_default=True,
              help="Steps between mask updates.")
@click.option("--drop-fraction", type=float, default=DEFAULT["drop_fraction"], show_default=True,
              help="Initial drop fraction, cosine-annealed to 0.")
@click.option("--end-fraction", type=float, default=DEFAULT["end_fraction"], show_default=True,
              help="No mask updates after this fraction of training.")
@click.option("--checkpoint-every", type=int, default=DEFAULT["checkpoint_every"], show_default=True,
              help="Steps between checkpoints.")
@click.option("--eval-every", type=int, default=None, help="Steps between validations. [default: steps/10]")
@click.option("--log-every", type=int, default=DEFAULT["log_every"], show_default=True,
              help="Steps averaged into one metrics.jsonl line (loss, lr, items/s) and progress update.")
@click.option("--nproc", type=int, default=DEFAULT["nproc"], show_default=True,
              help="Processes on this machine (torch.distributed, gloo, DDP); the batch is split across them. "
                   "Several machines: start siftc under torchrun instead, without --nproc: torchrun "
                   "--nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint HOST:29400 -m siftc "
                   "train ...")
@click.option("--threads", type=int, default=None,
              help="Intra-op threads per process. [default: torch's, cores / nproc with --nproc]")
@click.option("--tensorboard", type=click.Path(), default=None, metavar="DIR",
              help="Also write the metrics as TensorBoard scalars into DIR (train loss, lr, items/s, val "
                   "loss/acc, mask updates): siftc train ... --tensorboard tb/mlp, then tensorboard --logdir "
                   "tb. Needs pip install 'siftc[tensorboard]'.")
@click.option("--resume", type=click.Path(), default=None, metavar="RUN",
              help="Continue RUN/ from its last checkpoint, with the settings it was started with; with "
                   "--steps M, train on to step M, a finished run too, the LR schedule and mask updates "
                   "re-planned for M steps: siftc train --resume runs/mlp --steps 4000.")
@config_file.option
@click.option("--force", is_flag=True, help="Replace the run directory if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@trust_source_option
@click.pass_context
def train(ctx, artifact, data, output, resume, config, force, quiet, trust_source, **options):
    """Train ARTIFACT (a directory from `siftc convert`) on --data with a sparse mask scheduler.

    \b
      python examples/make_data.py            # data/digits.npz and data/stdlib.txt, offline
      siftc convert examples/mlp.py --kind wide --sparsity 0.75 -o out/mlp-wide75
      siftc train out/mlp-wide75 --data data/digits.npz --method rigl --epochs 20 -o runs/mlp-rigl
      siftc train --resume runs/mlp-rigl      # after an interruption
      siftc train --resume runs/mlp-rigl --steps 4000             # on to step 4000
      siftc train --config runs/mlp-rigl/run.json -o runs/mlp-s1 --seed 1   # its settings, another seed
      torchrun --nproc-per-node 2 -m siftc train out/mlp-wide75 --data data/digits.npz -o runs/mlp-2p
    """
    from siftc.artifact import trusting
    from siftc.errors import UsageError
    from siftc.train.distributed import LeadStopped, launched, nproc_with_launcher
    from siftc.train.loop import Interrupted, resume as resume_run, train as run_training

    progress = Warnings() if quiet else RichProgress() if sys.stdout.isatty() else PlainProgress()
    group = launched()
    if group is not None and ctx.get_parameter_source("nproc") == ParameterSource.COMMANDLINE:
        raise nproc_with_launcher(group.world)
    if resume:
        given = [name for name in ("artifact", "data", "output", "config", "force", *options)
                 if name != "steps" and ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE]
        if given:
            raise UsageError(f"--resume takes every setting from {resume}/run.json (but --steps, to train "
                             f"on to another step); drop {', '.join(given)}")
    else:
        missing = [flag for flag, v in (("ARTIFACT", artifact), ("--data", data), ("-o", output)) if not v]
        if missing:
            raise UsageError(f"missing {', '.join(missing)}; e.g. siftc train out/mlp-par90 --data "
                             f"data/digits.npz -o runs/mlp (or --resume RUN)")
        cfg = TrainConfig(artifact=artifact, data=data, out=output, **options)
    try:
        with trusting(trust_source):  # --trust-source: the artifact may import its model file
            summary = (resume_run(resume, progress, steps=options["steps"]) if resume  # run.json's settings
                       else run_training(cfg, progress, force=force))
    except Interrupted as e:  # Ctrl-C or SIGTERM: checkpointed; its last line is the resume command
        if e.lead:  # under a launcher every rank stops; rank 0 says so
            click.echo(f"siftc: stopped by {e}", err=True)
        ctx.exit(e.code)
    except LeadStopped:  # another rank could not start and said why
        ctx.exit(2)
    if summary is not None:  # None on ranks other than 0 of a launched run
        _print_summary(summary, resume or output)


def _print_summary(s: dict, run: str):
    f = s["flops"]
    val = f"val loss {s['val_loss']:.4f}, val acc {s['val_acc']:.2%}" if "val_loss" in s else "no validation"
    rate = f"{s['steps_per_s']:.1f} steps/s" if s.get("steps_per_s") else "no steps run"
    click.echo(f"{s['method']}: {s['steps']} steps, {val}, {rate} on {s['backend']} ({s['backends']})")
    click.echo(f"training FLOPs {f['total']:.3e} (dense model {f['dense_model_total']:.3e}, "
               f"{f['ratio_to_dense']:.3f}x; RigL dense-gradient steps: {f['dense_grad_steps']})")
    plot = ", loss.png" if (Path(run) / "loss.png").is_file() else ""  # matplotlib is an extra
    click.echo(f"wrote {run}/model (artifact), metrics.jsonl{plot}, summary.json")
