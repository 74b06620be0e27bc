"""A run's metrics: RUN/metrics.jsonl, one JSON record a line, and with `--tensorboard DIR` the same
numbers as TensorBoard scalars (rank 0 only, as metrics.jsonl).

    metrics.jsonl record                                   TensorBoard tags, at the record's step
    {"step", "loss", "lr", "items_per_s", "elapsed"}       train/loss, train/lr, train/items_per_s
    {"step", "val_loss", "val_acc"}                        val/loss, val/acc
    {"step", "mask_update", "changed", "changed_fraction"} mask/drop_fraction, mask/changed,
                                                           mask/changed_fraction (of all non-zeros)

A resumed run cuts metrics.jsonl back to its checkpoint, and opens its TensorBoard writer with
purge_step just after the checkpoint's step, so TensorBoard hides what the interrupted run logged
after it.
"""
import json
import os
from pathlib import Path

from siftc.extras import require
from siftc.store import os_errors, write_file

TAGS = {"loss": "train/loss", "lr": "train/lr", "items_per_s": "train/items_per_s",
        "val_loss": "val/loss", "val_acc": "val/acc",
        "mask_update": "mask/drop_fraction", "changed": "mask/changed", "changed_fraction": "mask/changed_fraction"}


def summary_writer_class():
    """torch.utils.tensorboard.SummaryWriter; a one-line error naming the extra if tensorboard is missing."""
    require("tensorboard", "--tensorboard")
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter


class Metrics:
    """metrics.jsonl, cut back to where the checkpoint was taken when a run resumes. A file shorter
    than that (lost, or cut by hand) keeps its complete lines and is never padded. `tensorboard`: a
    directory that gets every record's numbers as scalars too, from step `step0` on."""

    def __init__(self, path: Path, offset: int, tensorboard: str | None = None, step0: int = 0):
        self.path = path
        with os_errors(path):
            with open(path, "a+b") as f:
                f.seek(0)
                kept = f.read(offset)
                f.truncate(kept.rfind(b"\n") + 1 if len(kept) < offset else offset)
            self.f = open(path, "a")
        self.board = None
        if tensorboard:
            with os_errors(tensorboard):
                # the checkpoint at step0 kept step0's own records: hide what came after them
                self.board = summary_writer_class()(tensorboard, purge_step=step0 + 1 if step0 else None)

    def write(self, record: dict):
        with os_errors(self.path):
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()
        if self.board is not None:
            for key, tag in TAGS.items():
                if key in record:
                    self.board.add_scalar(tag, record[key], record["step"])

    def sync(self):
        """On disk before the checkpoint that records how far it got."""
        with os_errors(self.path):
            self.f.flush()
            os.fsync(self.f.fileno())
        if self.board is not None:
            self.board.flush()

    def tell(self) -> int:
        return self.f.tell()

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def close(self):
        self.f.close()
        if self.board is not None:
            self.board.close()


def plot_losses(records: list, path: Path, title: str = ""):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6))
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.set_title(title, fontsize=9)
    if train or val:  # a resumed run whose metrics.jsonl was lost has nothing to label
        ax.legend()
    fig.tight_layout()
    write_file(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)
