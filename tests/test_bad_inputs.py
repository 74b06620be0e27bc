"""Bad inputs a careful user still makes, each answered by one `siftc: error:` line with exit code 2, no
traceback, and the file system as it was: nothing deleted, nothing half-written (issue 17).

Every case is a row of CASES: how to set it up, the command, and a phrase the error must contain. Rows
marked PROC run as a real `siftc` subprocess, the rest through click's CliRunner. Read-only and full
file systems are a small tmpfs or a read-only bind mount in a private mount namespace (`unshare -m`),
skipped where the machine does not allow one.
"""
import functools
import hashlib
import os
import re
import shutil
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
from siftc.cli import main
from siftc.export import export
from siftc.source import load_model
from siftc.store import LOCK
from siftc.train import TrainConfig, train

MLP = '''
import torch
from torch import nn

def build():
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))

def example_inputs():
    return (torch.randn(1, 16),)
'''

BN = '''
import torch
from torch import nn

def build():
    return nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 4))

def example_inputs():
    return (torch.randn(2, 16),)
'''

ARGPARSE_REQUIRED = MLP + '''
import argparse
parser = argparse.ArgumentParser()
parser.add_argument("--data", required=True)
args = parser.parse_args()
'''

EXITS = MLP + '''
import sys
sys.exit(3)
'''

FACTORY_EXITS = '''
import sys

def build():
    sys.exit("no model today")
'''

SIFTC = str(Path(sys.executable).with_name("siftc"))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
PROC = "proc"  # run this row as a real subprocess
TEMP = re.compile(r"\.[^/]+\.[a-z0-9_]{8}$")  # a temp file or dir of siftc.store


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """Inputs every case may read and none may change: a model file, its artifact, data, an export
    and a finished run."""
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("inputs")
    (d / "mlp.py").write_text(MLP)
    (d / "bn.py").write_text(BN)
    siftc.save(siftc.convert(str(d / "mlp.py"), "parallel", 0.5), d / "art")
    siftc.save(siftc.convert(str(d / "bn.py"), "parallel", 0.5), d / "bn")
    g = np.random.default_rng(0)
    x = g.normal(size=(40, 16)).astype(np.float32)
    np.savez(d / "data.npz", x=x, y=x[:, :4].argmax(1))
    x[7, 3] = np.nan
    np.savez(d / "nan.npz", x=x, y=np.zeros(40, dtype=np.int64))
    export(d / "art", d / "m.onnx")
    train(TrainConfig(str(d / "art"), str(d / "data.npz"), str(d / "run"), steps=2, batch_size=8,
                      backend="torch"))
    return d


def tree(root: Path) -> dict:
    """path -> content digest ("dir", "-> target" for links) of everything under root but a run's lock
    file (which holds the pid of its last writer)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.name == LOCK:
            continue
        if p.is_symlink():
            out[rel] = f"-> {os.readlink(p)}"
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _resume_without(key):
    def setup(w, t):
        shutil.copytree(w / "run", t / "run")
        state = torch.load(t / "run" / "checkpoint.pt", weights_only=True)
        del state[key]
        torch.save(state, t / "run" / "checkpoint.pt")
        return ["train", "--resume", t / "run"]
    return setup


def _files(**files):
    """Setup helper: write `files` (name -> text, or None for a directory) into the case's dir."""
    def make(t):
        for name, text in files.items():
            p = t / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.mkdir() if text is None else p.write_text(text)
    return make


CONVERT = ["convert", "mlp.py", "-k", "parallel", "-s", "0.5"]
BENCH = ["--engine", "onnxruntime", "--iterations", "1", "--warmup", "1", "--turns", "1"]


def _train(w, *extra):
    return ["train", w / "art", "--data", w / "data.npz", "--steps", "2", "--batch-size", "8", "--backend",
            "torch", "--quiet", *extra]


# id: (setup(w, t) -> argv, run from t; phrase of the error; PROC or None)
CASES = {
    # --- nothing lost: --force replaces only what siftc wrote
    "convert -o . --force": (lambda w, t: CONVERT + ["-o", ".", "--force"], "current directory", PROC),
    "convert -o .. --force": (lambda w, t: ["convert", w / "mlp.py", "-k", "parallel", "-s", "0.5", "-o",
                                            t.parent, "--force"], "current directory or holds it", None),
    "convert -o model.py --force": (lambda w, t: CONVERT + ["-o", "mlp.py", "--force"],
                                    "mlp.py is a file and this command writes a siftc artifact", PROC),
    "convert over a user's directory": (lambda w, t: _files(**{"mine/notes.txt": "keep"})(t) or
                                        CONVERT + ["-o", "mine", "--force"], "directory siftc did not write", None),
    "convert over a symlink": (lambda w, t: (t / "link").symlink_to(w / "art") or
                               CONVERT + ["-o", "link", "--force"], "symbolic link", None),
    "convert over a training run": (lambda w, t: CONVERT + ["-o", w / "run", "--force"],
                                    "is a siftc training run and this command writes a siftc artifact", None),
    "train -o its own artifact": (lambda w, t: _train(w, "-o", w / "art", "--force"),
                                  "this command's input", None),
    "train over another artifact": (lambda w, t: shutil.copytree(w / "art", t / "a2") and
                                    _train(w, "-o", t / "a2", "--force"),
                                    "is a siftc artifact and this command writes a siftc training run", None),
    "train -o a run holding the data": (
        lambda w, t: shutil.copytree(w / "run", t / "run") and shutil.copy(w / "data.npz", t / "run") and
        ["train", w / "art", "--data", t / "run" / "data.npz", "--steps", "2", "-o", t / "run", "--force"],
        "or holds it", None),
    "export over a user's file": (lambda w, t: _files(**{"user.onnx": "mine"})(t) or
                                  ["export", w / "art", "-o", "user.onnx", "--force"], "file siftc did not write", None),
    "export onto a directory": (lambda w, t: ["export", w / "art", "-o", w / "run", "--force"],
                                "is a directory and this command writes a file", None),
    "bench --json onto the sidecar": (lambda w, t: ["bench", w / "m.onnx", *BENCH, "--json", w / "m.onnx.json",
                                                    "--force"], "this command's input", PROC),
    "bench --json over a user's results": (lambda w, t: _files(**{"results.json": '{"mine": 1}'})(t) or
                                           ["bench", w / "m.onnx", *BENCH, "--json", "results.json", "--force"],
                                           "file siftc did not write", None),
    "bench --json over a file without --force": (
        lambda w, t: _files(**{"results.json": "{}"})(t) or ["bench", w / "m.onnx", *BENCH, "--json",
                                                             "results.json"], "already exists", None),
    "bench --json under a regular file": (lambda w, t: _files(f="x")(t) or
                                          ["bench", w / "m.onnx", *BENCH, "--json", "f/out.json"],
                                          "f is a file, not a directory", None),
    "bench --json onto a directory": (lambda w, t: ["bench", w / "m.onnx", *BENCH, "--json", w / "run"],
                                      "is a directory", None),
    "bench --sweep --out-dir a file": (lambda w, t: _files(f="x")(t) or
                                       ["bench", "--sweep", w / "mlp.py", *BENCH, "--out-dir", "f"],
                                       "--out-dir f is a file", None),
    # --- every OS error is one line
    "--data a directory": (lambda w, t: _train(w, "-o", "run")[:3] + [t] + _train(w, "-o", "run")[4:],
                           "is a directory", None),
    "--data /dev/null": (lambda w, t: _train(w, "-o", "run")[:3] + ["/dev/null"] + _train(w, "-o", "run")[4:],
                         "not a regular file", PROC),
    "convert -o under a regular file": (lambda w, t: _files(f="x")(t) or CONVERT + ["-o", "f/out"],
                                        "f is a file, not a directory", None),
    "resume a checkpoint without its optimizer": (_resume_without("optimizer"), "lacks 'optimizer'", None),
    "resume a file": (lambda w, t: ["train", "--resume", w / "mlp.py"], "is a file, not a siftc training run", None),
    # --- the user's model file misbehaving at import is the file's doing, not siftc's
    "model.py argparse at import": (lambda w, t: _files(**{"script.py": ARGPARSE_REQUIRED})(t) or
                                    ["convert", "script.py", "-k", "parallel", "-s", "0.5", "-o", "out"],
                                    'script.py:14, after printing '
                                    '"script.py: error: the following arguments are required: --data"): the '
                                    'model file\'s doing; guard its script code with `if __name__ == "__main__":`',
                                    PROC),
    "model.py sys.exit(3) at import": (lambda w, t: _files(**{"quits.py": EXITS})(t) or
                                       ["convert", "quits.py", "-k", "parallel", "-s", "0.5", "-o", "out"],
                                       "quits.py:12): the model file's doing; guard its script code", PROC),
    "factory sys.exit": (lambda w, t: _files(**{"fexit.py": FACTORY_EXITS})(t) or
                         ["convert", "fexit.py:build", "-k", "parallel", "-s", "0.5", "-o", "out"],
                         "fexit.py:5): the model file's doing; a factory returns an nn.Module", PROC),
    # --- numbers that are numbers
    "--lr inf": (lambda w, t: _train(w, "-o", "run", "--lr", "inf"), "positive finite", None),
    "--epochs inf": (lambda w, t: _train(w, "-o", "run")[:4] + ["--epochs", "inf"] + _train(w, "-o", "run")[6:],
                     "positive finite", None),
    "--epochs nan": (lambda w, t: _train(w, "-o", "run")[:4] + ["--epochs", "nan"] + _train(w, "-o", "run")[6:],
                     "positive finite", None),
    "--weight-decay inf": (lambda w, t: _train(w, "-o", "run", "--weight-decay", "inf"), "finite number", None),
    "--batch-size larger than the data": (lambda w, t: _train(w, "-o", "run", "--batch-size", "1000"),
                                          "larger than the 36 training examples", None),
    "NaN in the data": (lambda w, t: ["train", w / "art", "--data", w / "nan.npz", "-o", "run", "--quiet"],
                        "NaN or infinite values in 1 row(s)", None),
    "BatchNorm on one example": (lambda w, t: ["train", w / "bn", "--data", w / "data.npz", "--steps", "2",
                                               "--batch-size", "1", "-o", "run"], "BatchNorm layer", PROC),
    "bench --threads 0": (lambda w, t: ["bench", w / "m.onnx", *BENCH, "--threads", "0"], "threads 0 must be >= 1", None),
    "bench --time 0": (lambda w, t: ["bench", w / "m.onnx", "--time", "0"], "--time must be a finite", None),
    "bench --time inf": (lambda w, t: ["bench", w / "m.onnx", "--time", "inf"], "--time must be a finite", None),
    "bench --warmup 0": (lambda w, t: ["bench", w / "m.onnx", "--iterations", "1", "--warmup", "0"],
                         "--warmup (got 0)", None),
    "export --batch 0": (lambda w, t: ["export", w / "art", "-o", "m.onnx", "--batch", "0"],
                         "must be a positive integer", None),
}


def invoke(argv, cwd: Path, proc: bool):
    """(exit code, stdout, stderr) of `siftc argv` run in `cwd`."""
    argv = [str(a) for a in argv]
    if proc:
        r = subprocess.run([SIFTC, *argv], cwd=cwd, capture_output=True, text=True, env=ENV, timeout=300)
        return r.returncode, r.stdout, r.stderr
    here = os.getcwd()
    os.chdir(cwd)
    try:
        r = CliRunner().invoke(main, argv)
    finally:
        os.chdir(here)
    return r.exit_code, r.stdout, r.stderr


def assert_one_line(code, stdout, stderr, needle):
    lines = stderr.strip().splitlines()
    assert code == 2, (code, stdout, stderr)
    assert "Traceback" not in stdout + stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("siftc: error: "), stderr
    assert needle in lines[0], lines[0]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, w, tmp_path):
    setup, needle, proc = CASES[case]
    t = tmp_path / "cwd"
    t.mkdir()
    (t / "mlp.py").write_text(MLP)
    argv = setup(w, t)
    before_w, before_t = tree(w), tree(t)
    code, stdout, stderr = invoke(argv, t, proc == PROC)
    assert_one_line(code, stdout, stderr, needle)
    assert tree(w) == before_w, "an input changed"
    assert tree(t) == before_t, "the working directory changed"


def test_argparse_at_import_sees_the_model_path_as_its_argv(tmp_path):
    """A model file that parses its arguments at import sees `python model.py` (no options), not
    siftc's command line, so it converts; and sys.argv is siftc's again afterwards."""
    (tmp_path / "script.py").write_text(MLP + "import argparse, sys\nargs = argparse.ArgumentParser().parse_args()\n"
                                        "print('argv', sys.argv, file=sys.stderr)\n")
    code, stdout, stderr = invoke(["convert", "script.py", "-k", "parallel", "-s", "0.5", "-o", "out"], tmp_path,
                                  True)
    assert code == 0, stderr
    assert "argv ['script.py']" in stderr and "usage:" not in stderr  # what it printed is passed on
    assert (tmp_path / "out" / "siftc.json").is_file()
    argv = list(sys.argv)
    load_model(str(tmp_path / "script.py"))
    assert sys.argv == argv


def test_stale_temp_dirs_of_a_killed_convert_are_removed(w, tmp_path):
    """A SIGKILL mid-write leaves `.out.XXXXXXXX`; the next write beside it removes it."""
    stale = tmp_path / ".out.k1lled00"
    (stale / "out").mkdir(parents=True)
    (stale / "out" / "weights.pt").write_bytes(b"half")
    os.utime(stale, (1, 1))
    code, _, stderr = invoke(["convert", w / "mlp.py", "-k", "parallel", "-s", "0.5", "-o", "out"], tmp_path, False)
    assert code == 0, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_diverged_training_stops_and_keeps_the_last_finite_checkpoint(w, tmp_path):
    run = tmp_path / "run"
    code, stdout, stderr = invoke(_train(w, "-o", run, "--lr", "1e30", "--steps", "20", "--checkpoint-every", "1",
                                         "--update-every", "5"),
                                  tmp_path, False)
    assert_one_line(code, stdout, stderr, "training diverged at step ")
    step = int(re.search(r"diverged at step (\d+)", stderr).group(1))
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert f"keeps step {state['step']}, the last finite one" in stderr and state["step"] < step
    assert all(t.isfinite().all() for t in state["model"].values() if t.is_floating_point())
    assert not (run / "model").exists() and not (run / "summary.json").exists()


def test_a_live_run_is_locked(w, tmp_path):
    """A second `train -o RUN --force` and a `--resume RUN` of a run still going are refused; the live
    run's metrics are its own."""
    run = tmp_path / "run"
    live = subprocess.Popen([SIFTC, *map(str, _train(w, "-o", run, "--steps", "100000", "--checkpoint-every", "50"))],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run / "checkpoint.pt").exists():
            assert live.poll() is None and time.time() < deadline, live.stderr.read() if live.poll() else "slow"
            time.sleep(0.2)
        for argv in (_train(w, "-o", run, "--force"), ["train", "--resume", run]):
            code, stdout, stderr = invoke(argv, tmp_path, True)
            assert_one_line(code, stdout, stderr, f"is being written by another siftc process (pid {live.pid})")
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait()
    steps = [int(line.split('"step": ')[1].split(",")[0].rstrip("}")) for line in
             (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps == sorted(set(steps)), "two runs interleaved metrics.jsonl"


# ------------------------------------------------------------------- read-only and full file systems

@functools.lru_cache(maxsize=None)
def _mount_namespace() -> str | None:
    """None if `unshare -m` can mount here, else why not."""
    if not shutil.which("unshare"):
        return "no unshare(1) on this machine"
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=16k tmpfs /mnt || "
                            "mount -t tmpfs -o size=16k tmpfs /tmp"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"no private mount namespace: {probe.stderr.strip()[:100]}"


def in_mount(mount: str, target: Path, argv, cwd: Path):
    """Run `siftc argv` with `target` a full tmpfs ("full") or read-only ("ro") inside a private mount
    namespace; returns (exit code, stdout, stderr, the listing of target as the command left it)."""
    why = _mount_namespace()
    if why:
        pytest.skip(why)
    listing = cwd / "listing.txt"
    setup = (f'mount -t tmpfs -o size=256k tmpfs "$T" && (dd if=/dev/zero of="$T/fill" bs=4k 2>/dev/null; true)'
             if mount == "full" else 'mount --bind "$T" "$T" && mount -o remount,ro,bind "$T"')
    script = f'{setup} && "$@"; rc=$?; (cd "$T" && find . | sort) > "{listing}"; exit $rc'
    r = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", SIFTC, *map(str, argv)], cwd=cwd,
                       capture_output=True, text=True, env={**ENV, "T": str(target)}, timeout=300)
    return r.returncode, r.stdout, r.stderr, listing.read_text().split()


MOUNT_CASES = {
    # id: (mount, setup(w, t) -> argv with the mount at t/"m", phrase, what the mount may hold after)
    "convert on a read-only dir": ("ro", lambda w, t: ["convert", w / "mlp.py", "-k", "parallel", "-s", "0.5",
                                                       "-o", t / "m" / "out"], "is not writable", None),
    "resume a run on a read-only dir": ("ro", lambda w, t: shutil.copytree(w / "run", t / "m" / "run") and
                                        ["train", "--resume", t / "m" / "run"], "Read-only file system", None),
    "convert on a full disk": ("full", lambda w, t: ["convert", w / "mlp.py", "-k", "parallel", "-s", "0.5",
                                                     "-o", t / "m" / "out"], "No space left on device", [".", "./fill"]),
    "export on a full disk": ("full", lambda w, t: ["export", w / "art", "-o", t / "m" / "m.onnx"],
                              "No space left on device", [".", "./fill"]),
    "bench --json on a full disk": ("full", lambda w, t: ["bench", w / "m.onnx", *BENCH, "--json", t / "m" / "r.json"],
                                    "cannot write", [".", "./fill"]),
    "train on a full disk": ("full", lambda w, t: _train(w, "-o", t / "m" / "run"), "No space left on device", None),
}


@pytest.mark.parametrize("case", list(MOUNT_CASES))
def test_bad_file_system(case, w, tmp_path):
    mount, setup, needle, after = MOUNT_CASES[case]
    (tmp_path / "m").mkdir()
    argv = setup(w, tmp_path)
    before = ["."] + sorted(f"./{k}" for k in tree(tmp_path / "m"))
    before_w = tree(w)
    code, stdout, stderr, listing = in_mount(mount, tmp_path / "m", argv, tmp_path)
    assert_one_line(code, stdout, stderr, needle)
    assert tree(w) == before_w
    assert not [p for p in listing if TEMP.search(p)], listing  # no temp file left behind
    if after is not None:
        assert listing == after, listing  # nothing half-written
    elif mount == "ro":
        assert [p for p in listing if not p.endswith(LOCK)] == before
