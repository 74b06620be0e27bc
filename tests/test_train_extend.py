"""`siftc train --resume RUN --steps M`: a finished or interrupted run trains on to step M, its LR
schedule and mask updates re-planned for M steps (what a run started with --steps M does from that step
on), recorded in run.json and summary.json; fewer steps than done is a one-line error."""
import json

import torch

from siftc.artifact import read_state
from siftc.train import TrainConfig, train
from siftc.train.schedule import lr_factor
from test_train import cli, one_thread, work  # noqa: F401 (fixtures: the converted classifier, 1 thread)
from test_train_interrupt import assert_same_model

ARGS = dict(method="rigl", batch_size=16, update_every=5, lr_schedule="cosine", warmup_steps=4, seed=4,
            backend="torch", checkpoint_every=10, log_every=5, eval_every=10)


def records(run) -> list:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_extending_a_finished_run_replans_its_schedules_for_the_new_total(work, tmp_path):
    run = tmp_path / "run"
    train(TrainConfig(str(work / "clf"), str(work / "data.npz"), str(run), steps=20, **ARGS))
    nnz20 = json.loads((run / "summary.json").read_text())["nnz"]
    before = records(run)
    assert [r["step"] for r in before if "mask_update" in r] == [5, 10]  # until 75% of 20

    r = cli("train", "--resume", run, "--steps", 40, "--quiet")
    assert r.exit_code == 0, r.output
    note = "extended from 20 to 40 steps at step 20: the cosine LR schedule (warmup 4) and rigl's mask " \
           "updates (every 5 until step 30) are re-planned for 40 steps, as if the run had been started " \
           "with --steps 40"
    assert f"siftc: {note}" in r.stderr.splitlines(), r.stderr

    info, summary = json.loads((run / "run.json").read_text()), json.loads((run / "summary.json").read_text())
    assert info["config"]["steps"] == 40 and info["extended"] == summary["extended"]
    assert summary["extended"] == [{"at_step": 20, "from_steps": 20, "to_steps": 40, "note": note}]
    assert summary["steps"] == 40 and summary["resumed_at"] == 20 and summary["nnz"] == nnz20  # nnz constant
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 40
    after = records(run)
    assert after[:len(before)] == before  # metrics.jsonl continues after the first 20 steps' lines
    assert [r["step"] for r in after if "loss" in r] == list(range(5, 41, 5))
    assert [r["step"] for r in after if "mask_update" in r] == [5, 10, 25]  # step 25 < 75% of 40 = 30
    # the LR of step 20 on is what a 40-step run has at that step (logged lr: the step's own)
    lrs = {r["step"]: r["lr"] for r in after if "lr" in r}
    for step in (25, 30, 35, 40):
        assert lrs[step] == 1e-3 * lr_factor("cosine", step - 1, 40, 4), step


def test_extending_continues_exactly_where_the_run_stopped(work, tmp_path):
    """Where the schedules do not depend on the total (constant LR, static masks), 20 steps extended to
    40 end bit-equal to 40 steps straight: data order, optimizer state and step counter carry on."""
    args = {**ARGS, "method": "static", "lr_schedule": "constant", "warmup_steps": 0}
    ref, run = tmp_path / "ref", tmp_path / "run"
    train(TrainConfig(str(work / "clf"), str(work / "data.npz"), str(ref), steps=40, **args))
    train(TrainConfig(str(work / "clf"), str(work / "data.npz"), str(run), steps=20, **args))
    r = cli("train", "--resume", run, "--steps", 40, "--quiet")
    assert r.exit_code == 0, r.output
    assert_same_model(ref, run)


def test_fewer_steps_than_done_is_one_line(work, tmp_path):
    run = tmp_path / "run"
    train(TrainConfig(str(work / "clf"), str(work / "data.npz"), str(run), steps=20, **ARGS))
    state = read_state(run / "model")
    r = cli("train", "--resume", run, "--steps", 10, "--quiet")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1, r.output
    assert f"--steps 10 is fewer than the 20 steps {run} has done; pass --steps 20 or more" in r.stderr
    r = cli("train", "--resume", run, "--epochs", 2, "--quiet")
    assert r.exit_code == 2 and "drop epochs" in r.stderr, r.output
    assert json.loads((run / "run.json").read_text())["config"]["steps"] == 20  # untouched
    got = read_state(run / "model")
    assert all(torch.equal(state[k], got[k]) for k in state)
