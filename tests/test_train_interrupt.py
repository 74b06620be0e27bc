"""SIGTERM (a cluster's preemption) and SIGINT (Ctrl-C) during `siftc train`: the step in progress
finishes, a checkpoint is written at it, the resume command is printed, the exit status is 128 + the
signal's number, and the resumed run ends bit-equal to an uninterrupted one."""
import json
import re
import signal
import subprocess
import time

import torch

from siftc.artifact import read_state
from siftc.train import TrainConfig, train
from test_train import ENV, SIFTC, work  # noqa: F401 (work: the converted classifier and its data)

ARGS = dict(method="rigl", batch_size=16, update_every=60, checkpoint_every=50, seed=3, backend="torch",
            threads=1)


def signal_after(cmd, run, step: int, sig: int, timeout: float = 120, env=None) -> subprocess.CompletedProcess:
    """Start `cmd` (a `siftc train` into `run`; environment `env`, default test_train's), send it `sig`
    once metrics.jsonl has reached `step`, and return how it ended."""
    proc = subprocess.Popen(cmd, env=ENV if env is None else env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, metrics = time.time() + timeout, run / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and any(json.loads(l)["step"] >= step for l in metrics.read_text().splitlines()):
            break
        time.sleep(0.005)
    assert proc.poll() is None, f"the run ended before it could be signalled: {proc.stderr.read()}"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def siftc_train(work, run, steps: int, **args) -> list:
    return [SIFTC, "train", str(work / "clf"), "--data", str(work / "data.npz"), "-o", str(run), "--quiet",
            f"--steps={steps}"] + [f"--{k.replace('_', '-')}={v}" for k, v in args.items()]


def interrupted_then_resumed(work, tmp_path, steps: int, at: int, sig=signal.SIGTERM, **args) -> int:
    """Run, signal, check how it stopped, resume; returns the step the signal's checkpoint holds."""
    run = tmp_path / "stopped"
    done = signal_after(siftc_train(work, run, steps, **args), run, at, sig)
    assert done.returncode == 128 + sig, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1] == f"siftc train --resume {run}", done.stderr  # the exact command, last
    held = int(re.search(rf"{signal.Signals(sig).name} at step (\d+) of {steps}", done.stderr)[1])
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == held and at <= held < steps and not (run / "summary.json").exists()

    resumed = subprocess.run([SIFTC, "train", "--resume", str(run), "--quiet"], env=ENV, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run / "summary.json").read_text())["resumed_at"] == held
    steps_logged = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()
                    if "loss" in json.loads(l)]
    assert steps_logged == sorted(set(steps_logged)) and steps_logged[-1] == steps  # nothing repeated
    return held


def assert_same_model(a, b):
    want, got = read_state(a / "model"), read_state(b / "model")
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k


def test_sigterm_checkpoints_exits_143_and_resumes_bit_equal(work, tmp_path):
    ref = tmp_path / "ref"
    train(TrainConfig(str(work / "clf"), str(work / "data.npz"), str(ref), steps=300, **ARGS))
    interrupted_then_resumed(work, tmp_path, steps=300, at=70, **ARGS)
    assert_same_model(ref, tmp_path / "stopped")


def test_sigint_exits_130(work, tmp_path):
    run = tmp_path / "stopped"
    done = signal_after(siftc_train(work, run, 300, **ARGS), run, 20, signal.SIGINT)
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"siftc train --resume {run}"
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] >= 20


def test_sigterm_under_two_processes(work, tmp_path):
    """The launcher gets the signal and passes it on; the ranks agree (an all-reduced flag) on the
    step they stop after, so the checkpoint is a consistent one and the resume equals a straight run."""
    args = {**ARGS, "nproc": 2, "update_every": 30}
    ref = tmp_path / "ref"
    train(TrainConfig(str(work / "clf"), str(work / "data.npz"), str(ref), steps=160, **args))
    interrupted_then_resumed(work, tmp_path, steps=160, at=40, **args)
    assert_same_model(ref, tmp_path / "stopped")
