"""A training run's directory and its checkpoint.

    RUN/run.json        the run's settings, its id, and digests of the artifact and data it started from
    RUN/checkpoint.pt   the last checkpoint: model (packed as an artifact's weights.pt: a sparse layer's
                        values and its mask's bits), optimizer (nnz-sized state), scheduler, LR schedule
                        (lr_schedule; absent in checkpoints from before schedules), step, every
                        rank's RNG state and `--backend auto` choices, and how far metrics.jsonl had
                        got; replaced atomically
    RUN/metrics.jsonl   one JSON record per line (train loss, evaluations, mask updates)
    RUN/loss.png, RUN/summary.json, RUN/model/  written at the end (model/ is a siftc artifact)

A checkpoint is written to a temporary file, fsync'ed and renamed over the old one (siftc.store), so a
kill at any moment leaves either the old or the new checkpoint, never half of one; metrics.jsonl is
fsync'ed just before. The checkpoint carries a sha256 over its contents, checked when it is read. It is read back with
`torch.load(weights_only=True)`: tensors and plain data, no pickled code.
"""
import hashlib
import json
import uuid
from pathlib import Path

import torch

from siftc.errors import SiftcError, UsageError
from siftc.store import os_errors, write_file, write_json

RUN_FORMAT = "siftc-run"
CKPT_FORMAT = "siftc-checkpoint"
VERSION = 1
# What a checkpoint holds (siftc.train.loop._checkpoint writes them, _restore reads them).
# Later additions are optional, so a checkpoint from before them resumes: lr_schedule (a constant LR
# then) and auto_choices (none restored then: auto times its layers again).
KEYS = ("run_id", "step", "model", "optimizer", "scheduler", "rng", "metrics_offset", "elapsed")


def model_state(model) -> dict:
    """The model's state as a checkpoint holds it: packed as an artifact's weights.pt (a sparse layer's
    values and its mask's bits), which `siftc.artifact.unpack_state` reverses."""
    from siftc.artifact import pack_state
    return pack_state(model.state_dict())


def artifact_digest(artifact) -> str:
    """Identifies an artifact by the checksums its siftc.json records for its tensors."""
    from siftc.artifact import read_meta
    meta = read_meta(artifact, verify=False)
    return hashlib.sha256(json.dumps(meta["sha256"], sort_keys=True).encode()).hexdigest()


def write_run(run: Path, config: dict, artifact_sha: str, data_sha: str) -> dict:
    info = {"format": RUN_FORMAT, "version": VERSION, "run_id": uuid.uuid4().hex, "config": config,
            "artifact_sha": artifact_sha, "data_sha": data_sha}
    write_json(run / "run.json", info)
    return info


def read_run(run) -> dict:
    run = Path(run)
    path = run / "run.json"
    if run.exists() and not run.is_dir():
        raise UsageError(f"{run} is a file, not a siftc training run; pass the -o directory of an "
                         f"earlier `siftc train`")
    if not path.is_file():
        raise UsageError(f"{run} is not a siftc training run (no run.json); pass the -o directory of "
                         f"an earlier `siftc train`")
    try:
        with os_errors(path, "read"):
            info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is corrupt ({e}); start a new run") from e
    if not isinstance(info, dict) or info.get("format") != RUN_FORMAT or info.get("version") != VERSION:
        raise UsageError(f"{path} is not a siftc run file of version {VERSION}; start a new run")
    return info


def digest(obj, h=None) -> str:
    """sha256 over a checkpoint's contents: every tensor's dtype, shape and bytes, every key and value,
    in order, so a flipped bit anywhere is noticed."""
    h = h or hashlib.sha256()
    if isinstance(obj, torch.Tensor):
        h.update(f"{obj.dtype}{tuple(obj.shape)}".encode())
        if obj.numel():  # an empty tensor may have stride 0, which .view(uint8) refuses; it has no bytes
            h.update(obj.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        for k, v in obj.items():
            h.update(repr(k).encode())
            digest(v, h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__}{len(obj)}".encode())
        for v in obj:
            digest(v, h)
    else:
        h.update(repr(obj).encode())
    return h.hexdigest()


def save(run: Path, state: dict):
    """Write RUN/checkpoint.pt atomically, with a checksum over its contents."""
    state = {"format": CKPT_FORMAT, "version": VERSION, **state}
    state["sha256"] = digest(state)
    write_file(run / "checkpoint.pt", lambda f: torch.save(state, f))


def load(run: Path, run_id: str) -> dict | None:
    """The run's last checkpoint, or None if it has none yet. Refuses one from another run."""
    path = Path(run) / "checkpoint.pt"
    if not path.is_file():
        return None
    try:
        with os_errors(path, "read"):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except SiftcError:
        raise
    except Exception as e:
        raise UsageError(f"cannot read {path} ({str(e).splitlines()[0]}); it is corrupt, or not a "
                         f"siftc checkpoint; delete it to restart the run from step 0") from e
    if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT or state.get("version") != VERSION:
        raise UsageError(f"{path} is not a siftc checkpoint of version {VERSION}; delete it to restart "
                         f"the run from step 0")
    missing = [k for k in (*KEYS, "sha256") if k not in state]
    if missing:
        raise UsageError(f"{path} lacks {missing[0]!r}: truncated or written by another tool; delete it "
                         f"to restart the run from step 0")
    if digest({k: v for k, v in state.items() if k != "sha256"}) != state["sha256"]:
        raise UsageError(f"{path} does not match its checksum: corrupt; delete it to restart the run from "
                         f"step 0")
    if state.get("run_id") != run_id:
        raise UsageError(f"{path} belongs to another run (run id {state.get('run_id')}, this run is "
                         f"{run_id}); resume the run it came from, or delete it to restart from step 0")
    return state
