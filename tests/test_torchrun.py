"""`siftc train` under a launcher: torchrun as two nodes on 127.0.0.1 equals `--nproc 2` bit for bit;
rank 0 alone writes the run directory; SIGTERM under torchrun checkpoints once and every rank exits 143;
launcher settings that do not fit are one-line errors."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from siftc.artifact import read_state
from siftc.cli import main
from siftc.train import TrainConfig, train
from siftc.train.distributed import free_port
from test_train import ENV, work  # noqa: F401 (work: the converted classifier and its data)
from test_train_interrupt import assert_same_model

RUNNER = Path(sys.executable).with_name("torchrun")
TORCHRUN = [str(RUNNER)] if RUNNER.is_file() else [sys.executable, "-m", "torch.distributed.run"]
ARGS = dict(method="rigl", batch_size=16, update_every=5, backend="torch", seed=2, threads=1)


def flags(**args) -> list:
    return [f"--{k.replace('_', '-')}={v}" for k, v in args.items()]


def siftc_under_torchrun(launcher: list, work, run, *more) -> list:
    return [*TORCHRUN, *launcher, "-m", "siftc", "train", str(work / "clf"), "--data", str(work / "data.npz"),
            "-o", str(run), "--quiet", *more]


def losses(run) -> list:
    """metrics.jsonl without its timings (items/s and elapsed differ from run to run)."""
    return [{k: v for k, v in json.loads(line).items() if k not in ("items_per_s", "elapsed")}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def two_nodes(work, run, args_of) -> list:
    """Two torchrun agents on 127.0.0.1 as two nodes of one process each (c10d rendezvous on a free
    port; node 0 hosts it), running `siftc train` with args_of(node), at once; [(exit code, stdout,
    stderr)] of each agent."""
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-id", "siftc-test",
              "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
    agents = [subprocess.Popen(siftc_under_torchrun([*common, "--node-rank", str(node), "--rdzv-conf",
                                                     f"is_host={int(node == 0)}"], work, run, *args_of(node)),
                               env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for node in (0, 1)]
    try:
        ended = [agent.communicate(timeout=300) for agent in agents]
    finally:
        for agent in agents:
            agent.kill()
    return [(agent.returncode, out, err) for agent, (out, err) in zip(agents, ended)]


def test_two_torchrun_nodes_equal_nproc_2(work, tmp_path):
    """Two agents on 127.0.0.1, one process each, c10d rendezvous: the run trains, every rank's weights
    and masks agree bit for bit (the loop's rank check, which fails the run on any difference), and rank
    0's saved model equals that of a --nproc 2 run with the same seed, tensor for tensor."""
    ref = tmp_path / "nproc2"
    train(TrainConfig(str(work / "clf"), str(work / "data.npz"), str(ref), steps=20, nproc=2, **ARGS))

    run = tmp_path / "two-nodes"
    ended = two_nodes(work, run, lambda node: ["--steps=20", *flags(**ARGS)])
    for code, _, err in ended:
        assert code == 0, err
    summaries = [out for _, out, _ in ended if "rigl: 20 steps" in out]
    assert len(summaries) == 1, ended  # rank 0's agent prints the summary; the other node prints nothing

    want, got = read_state(ref / "model"), read_state(run / "model")
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    initial = read_state(work / "clf")
    masks = [k for k in got if k.endswith(".positions")]
    assert masks and any(not torch.equal(got[k], initial[k]) for k in masks)  # RigL moved masks
    assert all(got[k].numel() == initial[k].numel() for k in masks)  # and kept their non-zero counts
    assert losses(run) == losses(ref)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["nproc"] == 2 and summary["mask_updates"] == 2
    assert json.loads((run / "run.json").read_text())["config"]["nproc"] == 2


def _worker_of_rank(agent: subprocess.Popen, rank: int) -> int:
    """The pid of the agent's worker process that runs `rank` (read from its environment)."""
    for pid in Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split():
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"no worker of rank {rank} under torchrun {agent.pid}")


def test_sigterm_under_torchrun_checkpoints_once_and_resumes_equal(work, tmp_path):
    """SIGTERM reaches one rank (rank 1's process, as a scheduler signalling one node would): all ranks
    stop after the same step, rank 0 writes the checkpoint and says so once, both exit 143; a resume under
    torchrun ends equal to a run never stopped. A second run into the directory is refused once, by rank 0."""
    args = {**ARGS, "update_every": 30, "checkpoint_every": 50}
    ref = tmp_path / "ref"
    train(TrainConfig(str(work / "clf"), str(work / "data.npz"), str(ref), steps=200, nproc=2, **args))

    run = tmp_path / "stopped"
    launcher = ["--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
    # torchrun checks its workers every --monitor-interval (0.1 s by default) and SIGTERMs the rest once one has
    # exited: rank 0 exiting 143 a moment before rank 1 then read as rank 1 killed (-15) under load
    monitored = ["--monitor-interval", "2", *launcher]
    agent = subprocess.Popen(siftc_under_torchrun(monitored, work, run, "--steps=200", *flags(**args)), env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, metrics = time.time() + 240, run / "metrics.jsonl"
    while time.time() < deadline and agent.poll() is None:
        if metrics.is_file() and any(json.loads(l)["step"] >= 40 for l in metrics.read_text().splitlines()):
            break
        time.sleep(0.01)
    assert agent.poll() is None, f"the run ended before it could be signalled: {agent.stderr.read()}"
    os.kill(_worker_of_rank(agent, 1), signal.SIGTERM)
    _, err = agent.communicate(timeout=120)
    stopped = [l for l in err.splitlines() if l.startswith("siftc: stopped by")]
    assert len(stopped) == 1, err  # rank 0's; rank 1 stops without a word
    held = int(re.search(r"SIGTERM at step (\d+) of 200", stopped[0])[1])
    assert err.splitlines()[err.splitlines().index(stopped[0]) + 1] == f"siftc train --resume {run}"
    codes = dict(re.findall(r"rank\s+: (\d) \(local_rank.*\n\s+exitcode\s+: (-?\d+)", err))
    assert codes == {"0": "143", "1": "143"}, err  # torchrun's failure report lists each worker's status
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == held and 40 <= held < 200
    assert not (run / "summary.json").exists()

    launcher[-1] = f"127.0.0.1:{free_port()}"
    resumed = subprocess.run([*TORCHRUN, *launcher, "-m", "siftc", "train", "--resume", str(run), "--quiet"],
                             env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run / "summary.json").read_text())["resumed_at"] == held
    assert_same_model(ref, run)

    launcher[-1] = f"127.0.0.1:{free_port()}"
    again = subprocess.run(siftc_under_torchrun(launcher, work, run, "--steps=200", *flags(**args)), env=ENV,
                           capture_output=True, text=True, timeout=300)
    errors = [l for l in again.stderr.splitlines() if l.startswith("siftc:")]
    assert again.returncode != 0 and errors == [f"siftc: error: output {run} already exists; choose another "
                                                f"-o or pass --force to replace it"], again.stderr
    assert_same_model(ref, run)  # untouched


def test_a_rank_that_cannot_start_stops_every_rank_before_anything_is_written(work, tmp_path):
    """Two nodes started with different seeds: the rank that sees the difference says so, rank 0 says
    which rank could not start, both exit 2, and the run directory rank 0 had made is gone again."""
    run = tmp_path / "run"
    ended = two_nodes(work, run, lambda node: ["--steps=2", f"--seed={node}", "--backend=torch"])
    errors = sorted(l for _, _, err in ended for l in err.splitlines() if l.startswith("siftc:"))
    differ = r"rank 1 was started with seed=(\d), rank 0 with (\d); start every node with the same siftc command"
    assert len(errors) == 2 and re.fullmatch(f"siftc: error: rank 1 cannot start: {differ}", errors[0]), errors
    assert re.fullmatch(f"siftc: error: {differ}", errors[1]), errors
    assert all(code != 0 for code, _, _ in ended)
    assert re.findall(r"exitcode\s+: (\d+)", "".join(err for _, _, err in ended)) == ["2", "2"]
    assert not run.exists()


LAUNCHED = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}


@pytest.mark.parametrize("env, args, needle", [
    (LAUNCHED, ["--nproc", "2"], "--nproc with a launcher: the launcher (torchrun) already started this process "
                                 "as one of WORLD_SIZE=1; drop --nproc"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, [], "the environment sets RANK, WORLD_SIZE but not MASTER_ADDR, "
                                           "MASTER_PORT: a launcher (torchrun) sets all of"),
    ({**LAUNCHED, "RANK": "2", "WORLD_SIZE": "2"}, [], "RANK=2 is not in [0, WORLD_SIZE=2)"),
    ({**LAUNCHED, "WORLD_SIZE": "two"}, [], "must be integers"),
])
def test_launcher_settings_that_do_not_fit_are_one_line_errors(work, tmp_path, env, args, needle):
    r = CliRunner().invoke(main, ["train", str(work / "clf"), "--data", str(work / "data.npz"), "-o",
                                  str(tmp_path / "r"), "--steps", "2", *args], env=env)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and needle in r.stderr, r.output
    assert not (tmp_path / "r").exists()
