"""siftc's mask scheduler inside training loops people already have.

    from siftc.integrations.transformers import SparsityCallback   # the HuggingFace Trainer
    from siftc.integrations.lightning import SparsityCallback      # PyTorch Lightning

Each callback builds the Static / SET / RigL scheduler (siftc.sparse) from the trainer's optimizer and
the converted model when training starts, steps it once per optimizer step (gradient accumulation
included), keeps its state in the trainer's checkpoints and logs every mask update. The settings and
their defaults are `siftc train`'s (siftc.integrations.masks.MaskSchedule). A trainer that is not
installed is a one-line ImportError naming the extra that brings it.
"""
import importlib

from siftc.errors import UsageError


class MissingExtra(UsageError, ImportError):
    """An integration's trainer is not installed; the message says which extra installs it."""


def require(module: str, extra: str):
    """`module`, imported; or MissingExtra naming `pip install 'siftc[extra]'`."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtra(f"siftc.integrations.{extra} needs {module}, which is not installed here: "
                           f"pip install 'siftc[{extra}]'") from e
