"""siftc's mask scheduler inside training loops people already have.

    from siftc.integrations.transformers import SparsityCallback   # the HuggingFace Trainer
    from siftc.integrations.lightning import SparsityCallback      # PyTorch Lightning

Each callback builds the Static / SET / RigL scheduler (siftc.sparse) from the trainer's optimizer and
the converted model when training starts, steps it once per optimizer step (gradient accumulation
included), keeps its state in the trainer's checkpoints and logs every mask update. The settings and
their defaults are `siftc train`'s (siftc.integrations.masks.MaskSchedule). A trainer that is not
installed is a one-line ImportError naming the extra that brings it.
"""
from siftc import extras
from siftc.extras import MissingExtra  # noqa: F401  (re-exported: what a missing trainer raises)


def require(module: str, extra: str):
    """`module`, imported; or MissingExtra naming `pip install 'siftc[extra]'`."""
    return extras.require(module, f"siftc.integrations.{extra}")
