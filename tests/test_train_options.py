"""`siftc train`'s honesty and options: a warning when SET/RigL would make no mask update, the backend
each layer ran on, LR schedules with warmup, weight-decay groups, plain progress when piped."""
import json

import pytest
import torch
from torch import nn

from siftc.nn.sparse import SparseLinear, set_backend
from siftc.runtime import BACKENDS
from siftc.runtime.auto import AutoBackend
from siftc.runtime.masked import MaskedDense
from siftc.sparse import sparse_layers
from siftc.train import loop
from test_train import cli, one_thread, work  # noqa: F401 (fixtures: the converted classifier, 1 thread)


def quick(work, run, *args):
    return cli("train", work / "clf", "--data", work / "data.npz", "--batch-size", 16, "--backend", "torch",
               "-o", run, "--quiet", *args)


def test_no_mask_update_warns_with_an_update_every_that_gives_some(work, tmp_path):
    r = quick(work, tmp_path / "r", "--method", "rigl", "--steps", 50, "--update-every", 100)
    assert r.exit_code == 0, r.output
    warning = next(l for l in r.stderr.splitlines() if l.startswith("siftc: warning:"))
    assert "no mask update" in warning and "step 37" in warning  # 75% of 50
    assert "--update-every 36 or less" in warning and "--update-every 9 gives 4 updates" in warning
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["mask_updates"] == 0 and summary["warnings"] == [warning.removeprefix("siftc: warning: ")]

    r = quick(work, tmp_path / "s", "--method", "set", "--steps", 50, "--update-every", 9)  # the advice
    assert r.exit_code == 0 and "warning" not in r.stderr, r.output
    assert json.loads((tmp_path / "s" / "summary.json").read_text())["mask_updates"] == 4

    r = quick(work, tmp_path / "t", "--method", "static", "--steps", 5)  # static: nothing to warn about
    assert r.exit_code == 0 and "warning" not in r.stderr, r.output


def test_summary_and_final_line_name_each_layers_backend(work, tmp_path):
    r = quick(work, tmp_path / "r", "--method", "static", "--steps", 3)
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    n = len(summary["nnz"])
    assert n > 1 and summary["layer_backends"] == {name: "torch" for name in summary["nnz"]}
    assert summary["backends"] == f"{n} layers torch"
    assert f"on torch ({n} layers torch)" in r.output


def test_auto_backends_are_its_choices(monkeypatch):
    auto = AutoBackend({"native": MaskedDense(), "torch": MaskedDense()})
    monkeypatch.setitem(BACKENDS, "auto", auto)
    monkeypatch.setattr(loop, "AUTO", auto)
    g = torch.Generator().manual_seed(0)
    model = set_backend(nn.Sequential(SparseLinear(8, 6, nnz=20, generator=g), nn.ReLU(),
                                      SparseLinear(6, 4, nnz=10, generator=g)), "auto")
    assert loop.layer_backends(model, "auto") == {"0": "untimed", "2": "untimed"}
    model(torch.randn(5, 8))
    backends = loop.layer_backends(model, "auto")
    assert backends == {name: layer.auto_choice["choice"] for name, layer in sparse_layers(model).items()}
    assert loop.backends_in_short({"a": "native", "b": "torch", "c": "native"}) == "2 layers native, 1 torch"
    assert loop.backends_in_short({"a": "torch"}) == "1 layer torch"


def lrs(schedule: str, steps: int, warmup: int) -> list[float]:
    """The LR each step of a run trains with, --lr 1."""
    from siftc.train.schedule import lr_scheduler
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched, seen = lr_scheduler(opt, schedule, steps, warmup), []
    for _ in range(steps):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return seen


def test_lr_schedules_with_warmup():
    assert lrs("constant", 5, 0) == [1.0] * 5  # today's runs: exactly --lr
    assert lrs("constant", 6, 4) == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    cos = lrs("cosine", 14, 4)  # 10 steps after the warmup
    assert cos[:4] == [0.25, 0.5, 0.75, 1.0]
    assert abs(cos[4 + 5] - 0.5) < 1e-12 and cos[-1] < 0.03  # half way, near 0 at the end
    assert all(a > b for a, b in zip(cos[4:], cos[5:]))
    assert lrs("step", 8, 0) == [1.0] * 4 + [0.1] * 2 + [0.1 ** 2] * 2  # /10 at 50%, again at 75%


def test_weight_decay_skips_biases_and_norms_but_not_sparse_values():
    from siftc.train.schedule import param_groups
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), SparseLinear(8, 8, nnz=16), nn.BatchNorm1d(8),
                          nn.Linear(8, 2, bias=False))
    decay, exempt = param_groups(model, 0.1, decay_all=False)
    assert "weight_decay" not in decay and exempt["weight_decay"] == 0.0  # decay: the optimizer's --weight-decay
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == ["0.weight", "2.values", "4.weight"]
    assert sorted(names[id(p)] for p in exempt["params"]) == ["0.bias", "1.bias", "1.weight", "2.bias",
                                                              "3.bias", "3.weight"]
    # One group, as before, with nothing to exempt from or when asked to decay all.
    assert param_groups(model, 0.0, decay_all=False) == list(model.parameters())
    assert param_groups(model, 0.1, decay_all=True) == list(model.parameters())
    opt = loop.OPTIMIZERS["adamw"](param_groups(model, 0.1, False), 1e-3, 0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_schedule_is_in_run_json_and_resumes_exactly(work, tmp_path):
    """An interrupted cosine run with warmup continues its schedule where it stopped (the LR schedule's
    state is in the checkpoint): the resumed run ends bit-equal to a straight one."""
    import signal
    from siftc.train import TrainConfig, train
    args = dict(method="rigl", steps=30, batch_size=16, update_every=10, backend="torch", lr=3e-3,
                lr_schedule="cosine", warmup_steps=5, weight_decay=0.05)
    ref, run = tmp_path / "ref", tmp_path / "run"
    train(TrainConfig(str(work / "clf"), str(work / "data.npz"), str(ref), **args))

    def stop_at_10(event):
        if event["event"] == "step" and event["step"] == 10:
            signal.raise_signal(signal.SIGTERM)  # caught: the run stops after this step
    with pytest.raises(loop.Interrupted, match="SIGTERM at step 10 of 30") as stopped:
        train(TrainConfig(str(work / "clf"), str(work / "data.npz"), str(run), **args), stop_at_10)
    assert stopped.value.code == 143
    info = json.loads((run / "run.json").read_text())["config"]
    assert (info["lr_schedule"], info["warmup_steps"], info["decay_norms_and_biases"]) == ("cosine", 5, False)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["step"] == 10 and state["lr_schedule"]["last_epoch"] == 10
    assert len(state["optimizer"]["param_groups"]) == 2  # weights; biases
    assert loop.resume(run)["resumed_at"] == 10
    from test_train_interrupt import assert_same_model
    assert_same_model(ref, run)


def test_old_runs_resume_as_they_ran_and_warmup_is_checked(work):
    from siftc.errors import UsageError
    from siftc.train import TrainConfig
    old = TrainConfig.from_json({"artifact": "a", "data": "d", "out": "o", "weight_decay": 0.1})
    assert old.decay_norms_and_biases and old.lr_schedule == "constant" and old.warmup_steps == 0
    with pytest.raises(UsageError, match="fewer warmup steps"):
        TrainConfig("a", "d", "o", steps=10, warmup_steps=10)
    with pytest.raises(UsageError, match="of the run's 8 steps"):  # 270 training examples // 32
        loop.prepare(TrainConfig(str(work / "clf"), str(work / "data.npz"), "o", epochs=1, warmup_steps=1000))


def test_piped_output_prints_plain_progress_lines(work, tmp_path):
    """Not a terminal: plain lines with rate and ETA, every PLAIN_EVERY seconds (0 here: at every
    logged step), and no progress bar's control codes."""
    import re
    import subprocess
    import sys
    from test_train import ENV
    code = "import siftc.cli.train as t; t.PLAIN_EVERY = 0; from siftc.cli import main; main()"
    done = subprocess.run([sys.executable, "-c", code, "train", str(work / "clf"), "--data", str(work / "data.npz"),
                           "--steps", "30", "--batch-size", "16", "--backend", "torch", "-o", str(tmp_path / "r")],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [l for l in done.stdout.splitlines() if re.fullmatch(r"step \d+/30 \(\d+%\), loss [\d.]+, "
                                                                   r"[\d,]+ items/s, ETA \d+:\d\d:\d\d", l)]
    assert [l.split()[1] for l in lines] == ["10/30", "20/30", "30/30"], done.stdout
    assert "\x1b" not in done.stdout


def test_without_matplotlib_training_ends_without_the_plot_and_says_so(work, tmp_path):
    import subprocess
    import sys

    from test_train import ENV
    run = tmp_path / "r"
    blocked = "import sys; sys.modules['matplotlib'] = None; from siftc.cli import main; sys.exit(main())"
    r = subprocess.run([sys.executable, "-c", blocked, "train", str(work / "clf"), "--data", str(work / "data.npz"),
                        "-o", str(run), "--steps", "3", "--method", "static", "--backend", "torch", "--quiet"],
                       env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    warning = "loss.png is not drawn: matplotlib is not installed here; pip install 'siftc[plot]'"
    assert r.stderr == f"siftc: warning: {warning}\n"
    assert r.stdout.splitlines()[-1] == f"wrote {run}/model (artifact), metrics.jsonl, summary.json"
    assert not (run / "loss.png").exists()
    assert json.loads((run / "summary.json").read_text())["warnings"] == [warning]
