"""`siftc train` end to end: .npz and text data, bad inputs, SIGKILL + resume, 2-process DDP."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import siftc
from siftc.artifact import read_state
from siftc.cli import main
from siftc.sparse import sparse_layers
from siftc.train import TrainConfig, train
from siftc.train.distributed import launch

CLASSIFIER = '''
import torch
from torch import nn

def build():
    return nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(),
                         nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 10))

def example_inputs():
    return (torch.randn(1, 64),)
'''

BYTE_LM = '''
import torch
from torch import nn

class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(256, 16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 32)
        self.head = nn.Linear(32, 256)

    def forward(self, idx):  # (B, T) -> (B, T, 256)
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(self.emb(idx))))))

def build():
    return TinyLM()

def example_inputs():
    return (torch.randint(0, 256, (1, 16)),)
'''

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SIFTC = str(Path(sys.executable).with_name("siftc"))  # the installed console script


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    (d / "clf.py").write_text(CLASSIFIER)
    (d / "lm.py").write_text(BYTE_LM)
    siftc.save(siftc.convert(str(d / "clf.py"), "parallel", 0.75), d / "clf")
    siftc.save(siftc.convert(str(d / "lm.py"), "parallel", 0.5), d / "lm")
    g = np.random.default_rng(0)
    x = g.normal(size=(300, 64)).astype(np.float32)
    y = (x[:, :10].argmax(1)).astype(np.int64)  # learnable labels
    np.savez(d / "data.npz", x=x, y=y)
    (d / "text.txt").write_bytes(Path(np.__file__).read_bytes() * 4)  # real text, a few KB
    return d


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: one thread is faster and bitwise reproducible
    yield
    torch.set_num_threads(n)


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_train_npz_end_to_end(work, tmp_path):
    run = tmp_path / "run"
    r = cli("train", work / "clf", "--data", work / "data.npz", "--method", "rigl", "--steps", 60,
            "--update-every", 10, "--batch-size", 16, "--lr", 3e-3, "--backend", "torch", "--seed", 1,
            "-o", run, "--quiet", "--checkpoint-every", 25)
    assert r.exit_code == 0, r.output
    assert "training FLOPs" in r.output and "dense model" in r.output
    for name in ("run.json", "checkpoint.pt", "metrics.jsonl", "loss.png", "summary.json"):
        assert (run / name).is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 60 and summary["mask_updates"] == 4  # 10, 20, 30, 40 (< 45)
    assert summary["flops"]["dense_grad_steps"] == 4
    assert summary["flops"]["total"] > 60 * summary["flops"]["train_per_step"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "mask_update" in r] == [10, 20, 30, 40]
    assert [r["step"] for r in records if "val_acc" in r] == list(range(6, 61, 6))  # steps/10
    assert summary["val_loss"] < 2.3  # better than chance (ln 10)
    trained = siftc.load(run / "model")
    assert {n: l.nnz for n, l in sparse_layers(trained).items()} == summary["nnz"]
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_train_text_end_to_end(work, tmp_path):
    run = tmp_path / "run"
    r = cli("train", work / "lm", "--data", work / "text.txt", "--method", "set", "--steps", 30,
            "--update-every", 5, "--batch-size", 8, "--backend", "torch", "-o", run, "--quiet")
    assert r.exit_code == 0, r.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "set" and summary["mask_updates"] == 4
    assert summary["flops"]["dense_grad_steps"] == 0  # SET needs no dense gradient
    assert 0 < summary["val_loss"] < 5.6  # below uniform over 256 bytes


def test_erk_and_epochs(work, tmp_path):
    summary = train(TrainConfig(str(work / "clf"), str(work / "data.npz"), str(tmp_path / "r"),
                                method="static", epochs=1, batch_size=64, distribution="erk"))
    assert summary["steps"] == 270 // 64 and summary["mask_updates"] == 0
    dense = summary["flops"]["dense_model_total"]
    assert abs(summary["flops"]["total"] - dense) / dense < 0.01  # ERK keeps the total iso-FLOP


def _bad_inputs(work, tmp):
    np.savez(tmp / "shape.npz", x=np.zeros((20, 32), np.float32), y=np.zeros(20, np.int64))
    np.savez(tmp / "labels.npz", x=np.zeros((20, 64), np.float32), y=np.full(20, 10))
    np.savez(tmp / "nox.npz", inputs=np.zeros((20, 64), np.float32))
    np.savez(tmp / "ylen.npz", x=np.zeros((20, 64), np.float32), y=np.zeros(19, np.int64))
    (tmp / "short.txt").write_text("too short")
    return {
        "missing data": ("clf", tmp / "nope.npz", "not found"),
        "wrong shape": ("clf", tmp / "shape.npz", "shape (20, 32)"),
        "labels out of range": ("clf", tmp / "labels.npz", "10 classes"),
        "no x array": ("clf", tmp / "nox.npz", "no 'x' array"),
        "label count": ("clf", tmp / "ylen.npz", "one label per row"),
        "npz on a byte LM": ("lm", work / "data.npz", "takes token ids"),
        "text on a classifier": ("clf", work / "text.txt", "float inputs"),
        "text too short": ("lm", tmp / "short.txt", "bytes"),
        "missing artifact": ("nothing-here", work / "data.npz", "not found"),
    }


def test_bad_inputs_one_line_exit_2(work, tmp_path):
    for case, (artifact, data, needle) in _bad_inputs(work, tmp_path).items():
        r = cli("train", work / artifact, "--data", data, "--steps", 2, "-o", tmp_path / case, "--quiet")
        assert r.exit_code == 2, (case, r.output)
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("siftc: error:"), (case, r.output)
        assert needle in lines[0], (case, r.output)


def test_checkpoint_from_another_run_and_resume_misuse(work, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for run in (a, b):
        assert cli("train", work / "clf", "--data", work / "data.npz", "--steps", 4, "--batch-size", 8,
                   "-o", run, "--quiet").exit_code == 0
    (b / "checkpoint.pt").write_bytes((a / "checkpoint.pt").read_bytes())
    r = cli("train", "--resume", b, "--quiet")
    assert r.exit_code == 2 and "belongs to another run" in r.output
    r = cli("train", "--resume", b, "--lr", 0.1)
    assert r.exit_code == 2 and "drop lr" in r.output
    r = cli("train", "--resume", tmp_path / "nowhere")
    assert r.exit_code == 2 and "not a siftc training run" in r.output
    r = cli("train", work / "clf", "--data", work / "data.npz", "--steps", 4, "-o", a)
    assert r.exit_code == 2 and "--force" in r.output


def test_checkpoint_is_checked_and_metrics_are_never_padded(work, tmp_path):
    run = tmp_path / "run"
    assert cli("train", work / "clf", "--data", work / "data.npz", "--steps", 10, "--batch-size", 8,
               "--backend", "torch", "-o", run, "--quiet").exit_code == 0
    good = (run / "checkpoint.pt").read_bytes()
    (run / "metrics.jsonl").unlink()  # lost: resume keeps going, and writes no NUL bytes
    r = cli("train", "--resume", run, "--quiet")
    assert r.exit_code == 0, r.output
    assert b"\0" not in (run / "metrics.jsonl").read_bytes()
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    w = next(k for k, t in state["model"].items() if t.is_floating_point())
    state["model"][w].view(-1)[0] += 1e-2  # one weight off, the checksum kept
    torch.save(state, run / "checkpoint.pt")
    r = cli("train", "--resume", run, "--quiet")
    assert r.exit_code == 2 and "does not match its checksum" in r.stderr, r.output
    (run / "checkpoint.pt").write_bytes(good)


def test_resume_hashes_the_artifact_and_data_once(work, tmp_path, monkeypatch):
    """`--resume` checks the run's inputs in one place (siftc.train.loop.resume), not in the CLI and
    again in the loop."""
    from siftc.train import checkpoint, loop
    run = tmp_path / "run"
    assert cli("train", work / "clf", "--data", work / "data.npz", "--steps", 4, "--batch-size", 8,
               "--checkpoint-every", 2, "--backend", "torch", "-o", run, "--quiet").exit_code == 0
    seen = []
    digest, sha = checkpoint.artifact_digest, loop.file_sha256
    monkeypatch.setattr(checkpoint, "artifact_digest", lambda p: seen.append(("artifact", str(p))) or digest(p))
    monkeypatch.setattr(loop, "file_sha256", lambda p: seen.append(("data", str(p))) or sha(p))
    r = cli("train", "--resume", run, "--quiet")
    assert r.exit_code == 0, r.output
    assert seen == [("artifact", str(work / "clf")), ("data", str(work / "data.npz"))]
    seen.clear()
    summary = loop.resume(run)  # the library call the CLI makes
    assert summary["resumed_at"] == 4 and len(seen) == 2


def test_sigkill_and_resume_equals_uninterrupted(work, tmp_path):
    args = dict(method="rigl", steps=500, batch_size=16, update_every=60, checkpoint_every=50,
                seed=3, backend="torch", threads=1)
    ref = tmp_path / "ref"
    train(TrainConfig(str(work / "clf"), str(work / "data.npz"), str(ref), **args))

    run = tmp_path / "killed"
    cmd = [SIFTC, "train", str(work / "clf"), "--data", str(work / "data.npz"),
           "-o", str(run), "--quiet"] + [f"--{k.replace('_', '-')}={v}" for k, v in args.items()]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    metrics = run / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and any(json.loads(l)["step"] >= 130 for l in metrics.read_text().splitlines()):
            break
        time.sleep(0.005)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert 100 <= ckpt["step"] < 500 and not (run / "summary.json").exists()

    done = subprocess.run([SIFTC, "train", "--resume", str(run), "--quiet"],
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads((run / "summary.json").read_text())["resumed_at"] == ckpt["step"]
    want = read_state(ref / "model")
    got = read_state(run / "model")
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(l)]
    assert steps == list(range(10, 501, 10))  # metrics cut back to the checkpoint, nothing repeated


def test_two_process_ddp_ranks_agree(work, tmp_path):
    cfg = TrainConfig(str(work / "clf"), str(work / "data.npz"), str(tmp_path / "ddp"), method="rigl",
                      steps=20, batch_size=16, update_every=5, backend="torch", nproc=2, threads=1)
    from siftc.train.loop import prepare, start
    prepare(cfg)
    info = start(cfg)
    launch(cfg, info["run_id"])  # raises if the ranks' weights or masks differ in a single bit
    final = read_state(tmp_path / "ddp" / "model")  # rank 0's, saved at the end
    initial = read_state(work / "clf")
    masks = [k for k in final if k.endswith(".positions")]
    assert masks and any(not torch.equal(final[k], initial[k]) for k in masks)  # RigL moved them
    assert all(final[k].numel() == initial[k].numel() for k in masks)  # non-zero counts kept
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["mask_updates"] == 2 and summary["nproc"] == 2  # steps 5 and 10 (< 15)


def _ranks_agree_worker(rank: int, port: int):
    """Two ranks with the same numbers, except that rank 1 has two of them swapped: the same sum."""
    from siftc.train.loop import _check_ranks_agree
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = torch.nn.Linear(3, 2)
        with torch.no_grad():
            model.weight.copy_(torch.arange(6.0).view(2, 3))
            model.bias.zero_()
            if rank == 1:
                model.weight[0, 0], model.weight[0, 1] = 1.0, 0.0
        _check_ranks_agree(model)
    finally:
        torch.distributed.destroy_process_group()


def test_check_ranks_agree_is_exact():
    from siftc.train.distributed import free_port
    with pytest.raises(torch.multiprocessing.ProcessRaisedException, match="rank 1 diverged from rank 0 at weight"):
        torch.multiprocessing.spawn(_ranks_agree_worker, args=(free_port(),), nprocs=2)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(steps=5, epochs=1.0), "not both"),
    (dict(batch_size=15, nproc=2), "multiple of --nproc"),
    (dict(method="magnitude"), "static, set, rigl"),
    (dict(lr=0.0), "positive"),
    (dict(distribution="normal"), "uniform, erk"),
])
def test_config_is_validated(kwargs, needle):
    from siftc.errors import UsageError
    with pytest.raises(UsageError, match=needle):
        TrainConfig("a", "d", "o", **kwargs)


def test_make_data_writes_offline_data(tmp_path):
    import importlib.util
    path = Path(__file__).resolve().parent.parent / "examples" / "make_data.py"
    spec = importlib.util.spec_from_file_location("make_data", path)
    make_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_data)
    with np.load(make_data.digits(tmp_path)) as d:
        assert d["x"].shape == (1797, 64) and d["y"].min() == 0 and d["y"].max() == 9
        assert 0 <= d["x"].min() and d["x"].max() <= 1
    text = make_data.stdlib_text(tmp_path).read_bytes()
    assert 100_000 < len(text) <= make_data.MAX_TEXT_BYTES and b"def " in text


def test_rigl_on_native_runtime_matches_masked_dense(work, tmp_path):
    """The sparse kernels train like the masked-dense reference, through RigL mask updates."""
    args = dict(method="rigl", steps=40, batch_size=16, update_every=10, seed=1, threads=1)
    runs = {}
    for backend in ("torch", "native"):
        out = tmp_path / backend
        summary = train(TrainConfig(str(work / "clf"), str(work / "data.npz"), str(out), backend=backend, **args))
        assert summary["backend"] == backend and summary["mask_updates"] == 2  # steps 10 and 20 (< 75% of 40)
        runs[backend] = read_state(out / "model")
    initial = read_state(work / "clf")
    masks = [k for k in initial if k.endswith(".positions")]
    assert masks
    for k in masks:
        assert torch.equal(runs["native"][k], runs["torch"][k]), k
        assert runs["native"][k].numel() == initial[k].numel(), k  # non-zero count kept
    assert any(not torch.equal(runs["native"][k], initial[k]) for k in masks)  # RigL moved them
    for k, want in runs["torch"].items():
        torch.testing.assert_close(runs["native"][k], want, rtol=1e-4, atol=1e-5, msg=k)


def test_batch_norm_statistics_agree_across_ranks(work, tmp_path):
    """Each rank normalises its own slice of the batch; the running statistics are averaged after every
    step, so the ranks agree bit for bit (the end-of-run check) and the run finishes (it stopped with
    'rank 1 diverged from rank 0 at 1.running_mean' before)."""
    (tmp_path / "bn.py").write_text(CLASSIFIER.replace("nn.Linear(64, 48), nn.ReLU()",
                                                       "nn.Linear(64, 48), nn.BatchNorm1d(48), nn.ReLU()")
                                    .replace("torch.randn(1, 64)", "torch.randn(2, 64)"))
    siftc.save(siftc.convert(str(tmp_path / "bn.py"), "parallel", 0.5), tmp_path / "bn")
    summary = train(TrainConfig(str(tmp_path / "bn"), str(work / "data.npz"), str(tmp_path / "run"), method="static",
                                steps=4, batch_size=16, backend="torch", nproc=2, threads=1))
    assert summary["steps"] == 4
    state = read_state(tmp_path / "run" / "model")
    initial = read_state(tmp_path / "bn")
    assert not torch.equal(state["1.running_mean"], initial["1.running_mean"])  # the statistics moved
