"""`--backend auto` resumes exactly: its per-layer choices are part of the checkpoint, restored at the
masks as loaded (nothing is timed again), while a mask made after the resume is timed as usual."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from siftc.artifact import read_state
from siftc.nn.sparse import SparseLinear, random_mask, set_backend
from siftc.runtime import BACKENDS
import siftc.runtime.auto as auto_module
from siftc.runtime.auto import AutoBackend
from siftc.runtime.masked import MaskedDense
from test_train import ENV, work  # noqa: F401 (work: the converted classifier and its data)
from test_train_interrupt import signal_after

# Imported first by every siftc process below: makes candidate os.environ["SLOW"] of the auto backend
# 5 ms slower while auto times it, so which backend wins is a setting of the process, as real timings
# are a fact of the process; a resumed process that timed again would choose the other one.
SLOWED = '''
import os
import time

import siftc.runtime.auto as auto
from siftc.runtime import BACKENDS

timing = False
real_timed = auto._timed


def _timed(fn, reps, best_ms):
    global timing
    timing = True
    try:
        return real_timed(fn, reps, best_ms)
    finally:
        timing = False


class Slow:
    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, op):
        run = getattr(self.inner, op)

        def slowed(*args):
            if timing:
                time.sleep(0.005)
            return run(*args)
        return slowed


auto._timed = _timed
auto.DROP_ABOVE_MS = float("inf")  # every candidate timed in full: the sleep decides, not the cost model
backend = BACKENDS["auto"]
backend.candidates = {n: Slow(b) if n == os.environ["SLOW"] else b for n, b in backend.candidates.items()}
'''


class Counting:
    """A candidate backend that counts its calls: timing a layer calls each candidate 1 + reps times,
    running it calls the chosen one once."""

    def __init__(self):
        self.inner, self.calls = MaskedDense(), 0

    def linear(self, layer, x):
        self.calls += 1
        return self.inner.linear(layer, x)


def new_process(monkeypatch) -> AutoBackend:
    """A fresh auto backend in the registry, as a new process has, timing two counting candidates."""
    auto = AutoBackend({"native": Counting(), "torch": Counting()})
    monkeypatch.setitem(BACKENDS, "auto", auto)
    monkeypatch.setattr(auto_module, "DROP_ABOVE_MS", float("inf"))  # both timed in full, whatever the load
    return auto


def calls(auto) -> int:
    return sum(c.calls for c in auto.candidates.values())


def model_on_auto(seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    return set_backend(nn.Sequential(SparseLinear(8, 6, nnz=20, generator=g), nn.ReLU(),
                                     SparseLinear(6, 4, nnz=10, generator=g)), "auto")


def resumed(monkeypatch, tmp_path, x):
    """A model that ran `x` on auto, its choices through torch.save / torch.load(weights_only=True),
    and a new process's model that loaded its state dict (a new mask_version) and restored them.
    Returns (that first model and its output, the new model, the new process's backend, the choices)."""
    auto = new_process(monkeypatch)
    model = model_on_auto(0)
    y = model(x)
    torch.save(auto.choices_of(model), tmp_path / "choices.pt")
    saved = torch.load(tmp_path / "choices.pt", weights_only=True)
    auto = new_process(monkeypatch)
    again = model_on_auto(1)
    again.load_state_dict(model.state_dict())
    auto.restore(again, saved)
    return (model, y), again, auto, saved


def test_choices_are_plain_data_by_layer_name_setting_and_dtype(monkeypatch, tmp_path):
    (model, _), _, _, saved = resumed(monkeypatch, tmp_path, torch.randn(5, 8))
    assert set(saved) == {"0", "2"}
    # the setting: the batch of 5 rounded up to 8, training (the layers' values want gradients)
    assert [(r["shape"], r["dtype"], r["mode"]) for r in saved["0"]] == [([8, 8], "float32", "train")]
    assert [(r["shape"], r["dtype"], r["mode"]) for r in saved["2"]] == [([8, 6], "float32", "train")]
    for name in saved:
        assert saved[name][0]["choice"] == model.get_submodule(name).auto_choice["choice"]
        assert set(saved[name][0]["ms"]) == {"native", "torch"}


def test_restored_choices_are_not_timed_again(monkeypatch, tmp_path):
    x = torch.randn(5, 8)
    (_, y), again, auto, saved = resumed(monkeypatch, tmp_path, x)
    assert torch.equal(again(x), y)
    assert calls(auto) == 2  # each layer ran once, on its restored choice; nothing was timed
    for name, records in saved.items():
        assert again.get_submodule(name).auto_choice["choice"] == records[0]["choice"]
    assert auto.choices_of(again) == saved


def test_a_new_mask_or_shape_after_the_resume_is_timed_as_usual(monkeypatch, tmp_path):
    x = torch.randn(5, 8)
    _, again, auto, _ = resumed(monkeypatch, tmp_path, x)
    layer = again[0]
    layer.set_mask(random_mask(tuple(layer.weight.shape), layer.nnz, torch.Generator().manual_seed(2)))
    assert set(auto.choices_of(again)) == {"2"}  # the old mask's choice is not in force any more
    timed = 2 * (1 + auto.reps) + 1  # calls of a layer that is timed: both candidates, then the choice
    again(x)
    assert calls(auto) == timed + 1  # layer 0 was timed, layer 2 kept its restored choice
    assert set(auto.choices_of(again)) == {"0", "2"}
    again(torch.randn(3, 8))
    assert calls(auto) == timed + 1 + 2 * timed  # a new setting (batch 3 -> 4, not 8): both layers timed


def siftc_slowed(tmp_path, slow: str):
    """The `siftc` command line with SLOWED imported first, and its environment."""
    (tmp_path / "slowed.py").write_text(SLOWED)
    path = os.pathsep.join(filter(None, [str(tmp_path), ENV.get("PYTHONPATH")]))
    env = {**ENV, "SLOW": slow, "PYTHONPATH": path}
    return [sys.executable, "-c", "import slowed; from siftc.cli import main; main()"], env


def kill_after(cmd, env, run, step: int, timeout: float = 60) -> dict:
    """Start `cmd` (a `siftc train` into `run`), SIGKILL it once metrics.jsonl has reached `step`, and
    return the checkpoint it left."""
    signal_after(cmd, run, step, signal.SIGKILL, timeout, env=env)
    return torch.load(run / "checkpoint.pt", weights_only=True)


def test_sigkill_and_resume_on_auto_equals_uninterrupted(work, tmp_path):
    # One RigL update (step 40), before any checkpoint the kill can leave: every choice the resumed run
    # needs was made before the kill. (A mask made after a resume is timed afresh, as an uninterrupted
    # run times it; the two agree only when their timings do.)
    args = ["--method=rigl", "--steps=300", "--batch-size=16", "--update-every=40", "--end-fraction=0.25",
            "--checkpoint-every=50", "--eval-every=30", "--seed=3", "--backend=auto", "--threads=1",
            "--quiet"]
    train = ["train", str(work / "clf"), "--data", str(work / "data.npz")]
    native_wins, env = siftc_slowed(tmp_path, slow="torch")
    ref, run = tmp_path / "ref", tmp_path / "killed"
    done = subprocess.run(native_wins + train + ["-o", str(ref)] + args, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ckpt = kill_after(native_wins + train + ["-o", str(run)] + args, env, run, step=130)
    assert 100 <= ckpt["step"] < 300 and not (run / "summary.json").exists()
    choices = ckpt["auto_choices"][0]
    if any("errors" in r for records in choices.values() for r in records):
        pytest.skip(f"the native kernels do not build here: {next(iter(choices.values()))[0]['errors']}")
    assert choices and all(r["choice"] == "native" for records in choices.values() for r in records)

    torch_wins, env = siftc_slowed(tmp_path, slow="native")  # timing again would now choose torch
    done = subprocess.run(torch_wins + ["train", "--resume", str(run), "--quiet"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads((run / "summary.json").read_text())["resumed_at"] == ckpt["step"]
    last = torch.load(run / "checkpoint.pt", weights_only=True)["auto_choices"][0]
    assert {n: [r for r in rs if r["shape"][0] == 16] for n, rs in last.items()} == \
        {n: [r for r in rs if r["shape"][0] == 16] for n, rs in choices.items()}  # training ran as before
    want, got = read_state(ref / "model"), read_state(run / "model")
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
