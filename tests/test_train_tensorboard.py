"""`siftc train --tensorboard DIR`: the metrics.jsonl numbers as TensorBoard scalars (read back with
tensorboard's own EventAccumulator), continued by an extended run; a missing tensorboard is one line."""
import json
import subprocess
import sys

import numpy as np
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from siftc.train.metrics import TAGS
from test_train import ENV, cli, one_thread, work  # noqa: F401 (fixtures: the converted classifier, 1 thread)


def scalars(board) -> dict:
    events = EventAccumulator(str(board))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def from_metrics(run) -> dict:
    """What metrics.jsonl says, per tag, as TensorBoard stores it (float32)."""
    want = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, tag in TAGS.items():
            if key in record:
                want.setdefault(tag, []).append((record["step"], float(np.float32(record[key]))))
    return want


def test_scalars_match_metrics_jsonl_and_an_extended_run_continues_them(work, tmp_path):
    run, board = tmp_path / "run", tmp_path / "tb"
    r = cli("train", work / "clf", "--data", work / "data.npz", "-o", run, "--method", "rigl", "--steps", 12,
            "--update-every", 3, "--log-every", 2, "--eval-every", 4, "--lr-schedule", "cosine",
            "--batch-size", 16, "--backend", "torch", "--quiet", "--tensorboard", board)
    assert r.exit_code == 0, r.output
    want = from_metrics(run)
    assert set(want) == set(TAGS.values())  # loss, lr, throughput, validation and mask-update stats
    assert [s for s, _ in want["mask/changed_fraction"]] == [3, 6]  # < 75% of 12
    assert all(0 < v < 1 for _, v in want["mask/changed_fraction"])
    assert scalars(board) == want

    r = cli("train", "--resume", run, "--steps", 20, "--quiet")  # run.json keeps --tensorboard
    assert r.exit_code == 0, r.output
    got, want = scalars(board), from_metrics(run)
    assert got == want and got["train/loss"][-1][0] == 20


def test_missing_tensorboard_is_one_line(work, tmp_path):
    blocked = "import sys; sys.modules['tensorboard'] = None; from siftc.cli import main; sys.exit(main())"
    r = subprocess.run([sys.executable, "-c", blocked, "train", str(work / "clf"), "--data", str(work / "data.npz"),
                        "-o", str(tmp_path / "r"), "--steps", "2", "--tensorboard", str(tmp_path / "tb")],
                       env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr == ("siftc: error: --tensorboard needs tensorboard, which is not installed here: "
                        "pip install 'siftc[tensorboard]'\n")
    assert not (tmp_path / "r").exists() and not (tmp_path / "tb").exists()


def test_a_killed_runs_events_after_its_checkpoint_are_purged_on_resume(work, tmp_path):
    """SIGKILL after step 70, checkpoint at 50: the events of steps 51-70 are in the event file, and the
    resumed run's writer hides them (purge_step 51), so TensorBoard shows each step once, as metrics.jsonl."""
    import signal

    from test_train import SIFTC
    from test_train_interrupt import signal_after
    run, board = tmp_path / "run", tmp_path / "tb"
    cmd = [SIFTC, "train", str(work / "clf"), "--data", str(work / "data.npz"), "-o", str(run), "--quiet",
           "--steps=200", "--checkpoint-every=50", "--batch-size=16", "--backend=torch", "--threads=1",
           f"--tensorboard={board}"]
    killed = signal_after(cmd, run, 70, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    held = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    assert max(s for s, _ in scalars(board)["train/loss"]) > held  # logged past the checkpoint
    resumed = subprocess.run([SIFTC, "train", "--resume", str(run), "--quiet"], env=ENV, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    got = scalars(board)
    assert got == from_metrics(run)
    assert [s for s, _ in got["train/loss"]] == list(range(10, 201, 10))
