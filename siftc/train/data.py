"""Training data: classification arrays in a `.npz` and byte-level language modelling on any text file.

    .npz     arrays `x` (N, *input shape) and `y` (N,) integer labels; optional `x_val`/`y_val`, else a
             fixed 10% of the examples (chosen with seed 0, whatever the training seed) is held out.
    text     any other file, read as bytes: inputs are windows of the model's block length T, targets the
             same windows shifted by one byte; the last 10% of the file is the validation text.

The data is checked against the model before training: input shape, label range, token-id vs float
inputs, vocabulary size. The order of examples is a pure function of (seed, step), so a resumed run sees
exactly the batches an uninterrupted run would have seen, with nothing to save.
"""
import math
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from siftc.errors import UsageError
from siftc.store import os_error, os_errors

VAL_FRACTION = 0.1      # held out when the data has no explicit validation split
MAX_VAL_WINDOWS = 256   # text validation: at most this many non-overlapping windows (keeps eval quick)
VOCAB = 256             # byte-level language modelling


@dataclass
class Data:
    task: str                  # "classify" or "lm"
    train_x: torch.Tensor      # classify: (N, *shape) float32; lm: (n_bytes,) int64
    train_y: torch.Tensor | None
    val_x: torch.Tensor        # classify: (M, *shape); lm: (M, T) windows
    val_y: torch.Tensor        # classify: (M,); lm: (M, T)
    block: int = 0             # lm: window length T

    @property
    def train_items(self) -> int:
        """Examples in one epoch: arrays, or non-overlapping windows of the training text."""
        return len(self.train_x) if self.task == "classify" else (len(self.train_x) - 1) // self.block

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(1, self.train_items // batch_size)

    def batch(self, step: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        """The (x, y) of training step `step` (0-based) for `rank` of `world`: a slice of one global
        batch of `batch_size`, drawn from a per-epoch shuffle that depends only on (seed, epoch)."""
        spe = self.steps_per_epoch(batch_size)
        epoch, i = divmod(step, spe)
        order = self._epoch_order(seed, epoch)
        idx = order[i * batch_size:(i + 1) * batch_size][rank::world]
        if self.task == "classify":
            return self.train_x[idx], self.train_y[idx]
        windows = self.train_x[idx[:, None] + torch.arange(self.block + 1)]  # (b, T+1)
        return windows[:, :-1], windows[:, 1:]

    def _epoch_order(self, seed: int, epoch: int) -> torch.Tensor:
        cached = getattr(self, "_cache", None)
        if cached and cached[0] == (seed, epoch):
            return cached[1]
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        if self.task == "classify":
            order = torch.randperm(len(self.train_x), generator=g)
        else:  # random window starts; an epoch covers about as many bytes as the text has
            n = self.train_items
            order = torch.randint(0, len(self.train_x) - self.block, (n,), generator=g)
        self._cache = ((seed, epoch), order)
        return order


def load(path, example_inputs: tuple, output_shape: tuple) -> Data:
    """Read and check `path` against a model that takes `example_inputs` and returns `output_shape`."""
    path = Path(path)
    if not path.is_file():
        what = "not found" if not path.exists() else "is a directory" if path.is_dir() else \
            "is not a regular file (a device or a pipe)"
        raise UsageError(f"data file {path} {what}; pass a .npz with x/y arrays or a text file "
                         f"(examples/make_data.py writes both)")
    x0 = example_inputs[0]
    takes_tokens = not torch.is_floating_point(x0)
    if path.suffix == ".npz":
        if takes_tokens:
            raise UsageError(f"{path} is classification data, but this artifact's model takes token ids "
                             f"{tuple(x0.shape)}; pass a text file, or an artifact of a classifier")
        return _load_npz(path, x0, output_shape)
    if not takes_tokens:
        raise UsageError(f"{path} is read as text, but this artifact's model takes float inputs "
                         f"{tuple(x0.shape)}; pass a .npz with x/y arrays, or an artifact of a byte LM")
    return _load_text(path, x0, output_shape)


def _load_npz(path: Path, x0: torch.Tensor, output_shape: tuple) -> Data:
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        if isinstance(e, OSError) and e.errno is not None:  # the file system's doing, not the format's
            raise os_error(e, path, "read") from e
        raise UsageError(f"cannot read {path} as .npz ({str(e).splitlines()[0]}); write it with "
                         f"numpy.savez(path, x=..., y=...)") from e
    for key in ("x", "y"):
        if key not in arrays:
            raise UsageError(f"{path} has no {key!r} array (it has: {', '.join(arrays) or 'nothing'}); "
                             f"write it with numpy.savez(path, x=inputs, y=labels)")
    if len(output_shape) != 2:
        raise UsageError(f"this artifact's model returns {tuple(output_shape)}, not (batch, classes); "
                         f"a .npz trains a classifier")
    classes = output_shape[-1]
    x, y = _check_pair(path, "x", "y", arrays["x"], arrays["y"], x0, classes)
    if ("x_val" in arrays) != ("y_val" in arrays):
        raise UsageError(f"{path} has only one of x_val/y_val; give both or neither")
    if "x_val" in arrays:
        vx, vy = _check_pair(path, "x_val", "y_val", arrays["x_val"], arrays["y_val"], x0, classes)
    else:
        if len(x) < 2:
            raise UsageError(f"{path} has {len(x)} example(s); at least 2 are needed to hold one out")
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        n_val = max(1, int(math.ceil(VAL_FRACTION * len(x))))
        x, y, vx, vy = x[perm[n_val:]], y[perm[n_val:]], x[perm[:n_val]], y[perm[:n_val]]
    return Data("classify", x, y, vx, vy)


def _check_pair(path, kx, ky, x, y, x0: torch.Tensor, classes: int):
    want = tuple(x0.shape[1:])
    if x.ndim < 1 or tuple(x.shape[1:]) != want:
        raise UsageError(f"{path}: {kx} has shape {tuple(x.shape)} but the model takes (N, "
                         f"{', '.join(map(str, want))}); reshape the inputs or use the matching artifact")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise UsageError(f"{path}: {kx} has dtype {x.dtype}; store real numbers")
    if y.ndim != 1 or len(y) != len(x):
        raise UsageError(f"{path}: {ky} has shape {tuple(y.shape)}, expected ({len(x)},): one label per "
                         f"row of {kx}")
    if not np.issubdtype(y.dtype, np.integer):
        raise UsageError(f"{path}: {ky} has dtype {y.dtype}; labels must be integers 0..{classes - 1}")
    if len(y) and (y.min() < 0 or y.max() >= classes):
        raise UsageError(f"{path}: {ky} has labels in [{y.min()}, {y.max()}] but the model has {classes} "
                         f"classes (0..{classes - 1}); relabel, or use the matching artifact")
    if len(x) == 0:
        raise UsageError(f"{path}: {kx} is empty")
    finite = np.isfinite(x).reshape(len(x), -1).all(1)
    if not finite.all():
        rows = np.flatnonzero(~finite)
        raise UsageError(f"{path}: {kx} has NaN or infinite values in {len(rows)} row(s) (first: row "
                         f"{rows[0]}); clean or drop them before training")
    return torch.from_numpy(np.ascontiguousarray(x)).float(), torch.from_numpy(y.astype(np.int64))


def _load_text(path: Path, x0: torch.Tensor, output_shape: tuple) -> Data:
    if x0.ndim != 2 or len(output_shape) != 3 or output_shape[-1] < VOCAB:
        raise UsageError(f"byte-level language modelling needs a model from (B, T) token ids to (B, T, "
                         f">= {VOCAB}) logits; this artifact's model gives {tuple(output_shape)}")
    block = x0.shape[1]
    with os_errors(path, "read"):
        text = path.read_bytes()
    raw = torch.frombuffer(bytearray(text), dtype=torch.uint8).long() if text else torch.zeros(0, dtype=torch.long)
    n_val = int(len(raw) * VAL_FRACTION)
    need = block + 1
    if n_val < need or len(raw) - n_val < need:
        raise UsageError(f"{path} has {len(raw)} bytes; with block length {block} it needs at least "
                         f"{int(math.ceil(need / VAL_FRACTION))} (10% is held out for validation)")
    train, val = raw[:-n_val], raw[-n_val:]
    m = min(MAX_VAL_WINDOWS, (len(val) - 1) // block)
    starts = torch.arange(m) * block
    windows = val[starts[:, None] + torch.arange(block + 1)]  # (m, T+1)
    return Data("lm", train, None, windows[:, :-1], windows[:, 1:], block=block)
