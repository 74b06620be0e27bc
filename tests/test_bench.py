"""siftc.bench: real DeepSparse and ONNX Runtime runs on a small model, the JSON schema, turns that
interleave engines, a missing engine as a note, the sweep and its picture, and the CLI's errors."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import spec_path

import siftc
from siftc.export import DEFAULT_OPSET, export as export_onnx, read_sidecar
from siftc.artifact import trusting
from siftc.bench import runner
from siftc.bench.deepsparse_engine import DeepSparseEngine, sparse_layers_off_kernels, sparse_weight_nodes
from siftc.bench.runner import BenchConfig, bench
from siftc.bench.sweep import run_sweep
from siftc.cli import main
from siftc.errors import EngineError, UsageError

ROW_KEYS = {"model", "kind", "sparsity", "engine", "batch", "threads", "status", "iterations", "p50_ms", "p90_ms",
            "p99_ms", "mean_ms", "items_per_s", "turn_p50_ms"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    siftc.save(siftc.convert(spec_path("examples/mlp.py:mlp"), kind="parallel", sparsity=0.9), d / "par90")
    return {"dense": export_onnx(spec_path("examples/mlp.py:mlp"), d / "dense.onnx", batch=4).path,
            "sparse": export_onnx(d / "par90", d / "par90.onnx", batch=4).path,
            "dynamic": export_onnx(d / "par90", d / "dyn.onnx", dynamic_batch=True).path}


def test_real_engines_schema_and_agreement(files):
    cfg = BenchConfig(engines=("deepsparse", "onnxruntime", "torch"), batches=(4,), threads=1, warmup=2,
                      iterations=6, turns=2)
    with trusting():  # dense.onnx names examples/mlp.py, which the torch engine imports only when trusted
        result = bench([files["dense"], files["sparse"]], cfg)
    json.dumps(result)  # JSON-able as is
    assert result["format"] == "siftc-bench" and result["version"] == 1
    assert {"cpu", "logical_cores", "usable_cores"} <= result["machine"].keys()
    assert result["settings"]["iterations"] == 6 and result["notes"] == []
    rows = result["results"]
    assert [(r["engine"], r["sparsity"]) for r in rows] == [(e, s) for s in (0, 0.9) for e in cfg.engines]
    for r in rows:
        assert ROW_KEYS <= r.keys() and r["status"] == "ok" and r["batch"] == 4 and r["threads"] == 1
        assert r["iterations"] == 6 and len(r["turn_p50_ms"]) == 2  # 2 turns x 3 calls, warm-up excluded
        assert min(r["turn_p50_ms"]) <= r["p50_ms"] <= max(r["turn_p50_ms"])
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"]
        assert r["items_per_s"] == pytest.approx(4 * 1000 / r["mean_ms"], rel=1e-6)
        if r["engine"] != "deepsparse":  # every engine gets the same inputs: outputs agree
            assert r["max_abs_diff"]["vs"] == "deepsparse" and r["max_abs_diff"]["value"] < 1e-3
    ds = [r for r in rows if r["engine"] == "deepsparse"]
    assert all(r["supported_fraction"] == 1.0 for r in ds)  # every layer, so every sparse layer, on its kernels


def test_deepsparse_names_sparse_layers_off_its_kernels(tmp_path):
    # The GPT's embedding and LayerNorm run on DeepSparse's fallback executor (fraction < 1); its sparse
    # MatMuls must not. The analysis used to compile at batch 1, which aborts the whole process inside
    # DeepSparse on a static-batch file; it now runs at the file's batch, in a child process.
    siftc.save(siftc.convert(spec_path("examples/gpt.py:gpt"), kind="wide", sparsity=0.75), tmp_path / "art")
    path = export_onnx(tmp_path / "art", tmp_path / "gpt.onnx", batch=2).path
    details = DeepSparseEngine(path, 2, 1).details()
    assert details["supported_fraction"] < 1.0 and details["sparse_layers_fallback"] == []
    assert len(sparse_weight_nodes(path)) == len([x for x in read_sidecar(path)["layers"] if x["initializer"]])
    with pytest.raises(EngineError, match="layer analysis .* failed"):
        sparse_layers_off_kernels(path, 1, 1)  # the old call: DeepSparse aborts, the caller survives


def test_dynamic_file_runs_at_every_batch(files):
    result = bench([files["dynamic"]], BenchConfig(engines=("onnxruntime", "deepsparse"), batches=(1, 3),
                                                   iterations=2, turns=1, warmup=1))
    assert sorted((r["engine"], r["batch"]) for r in result["results"]) == \
        [("deepsparse", 1), ("deepsparse", 3), ("onnxruntime", 1), ("onnxruntime", 3)]


def test_engines_take_turns(files, monkeypatch):
    """The real engines, each call recorded on its way through: warm-up, then turns that alternate."""
    from siftc.bench.onnxruntime_engine import OnnxRuntimeEngine
    from siftc.bench.torch_engine import TorchEngine
    calls = []
    for cls in (OnnxRuntimeEngine, TorchEngine):
        def recorded(self, inputs, _run=cls.run):
            calls.append(self.name)
            return _run(self, inputs)
        monkeypatch.setattr(cls, "run", recorded)
    monkeypatch.setattr(runner, "SETTLE_S", 0)
    bench([files["sparse"]], BenchConfig(engines=("onnxruntime", "torch"), batches=(4,), warmup=1,
                                         iterations=4, turns=2))
    o, t = "onnxruntime", "torch"
    assert calls == [o, t] + [o] * 2 + [t] * 2 + [o] * 2 + [t] * 2  # warm-up, turn 1, turn 2


def test_missing_deepsparse_is_a_note(files, monkeypatch):
    def unavailable():
        raise EngineError("DeepSparse is not usable here (test); pip install deepsparse==1.8.0")
    monkeypatch.setattr(DeepSparseEngine, "available", classmethod(lambda cls: unavailable()))
    result = bench([files["sparse"]], BenchConfig(batches=(4,), iterations=2, turns=1, warmup=1))
    assert {r["engine"] for r in result["results"]} == {"onnxruntime", "torch"}
    assert any("DeepSparse is not usable" in n for n in result["notes"])


def test_static_batch_that_does_not_fit(files):
    with pytest.raises(UsageError, match="static batch 4.*--dynamic-batch"):
        bench([files["sparse"]], BenchConfig(engines=("onnxruntime",), batches=(1,), iterations=1))


def test_sweep_relative_latency_and_plot(tmp_path):
    cfg = BenchConfig(engines=("onnxruntime", "deepsparse"), batches=(2,), iterations=3, turns=1, warmup=1)
    result = run_sweep(spec_path("examples/mlp.py:mlp"), "parallel", [0.5], tmp_path / "sw", cfg)
    points = result["sweep"]["points"]
    assert [p["sparsity"] for p in points] == [0, 0.5]  # the dense point is added
    assert points[0]["relative"] == {"onnxruntime": 1.0, "deepsparse": 1.0}
    assert points[1]["deepsparse_speedup_vs_onnxruntime"] > 0
    assert (tmp_path / "sw" / "parallel50").is_dir()  # the artifact, so torch can rebuild the point
    mtime = (tmp_path / "sw" / "parallel50.onnx").stat().st_mtime
    run_sweep(spec_path("examples/mlp.py:mlp"), "parallel", [0.5], tmp_path / "sw", cfg)
    assert (tmp_path / "sw" / "parallel50.onnx").stat().st_mtime == mtime  # up-to-date points are reused
    from siftc.bench.plot import plot_sweep
    png = plot_sweep(result, tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bench_json(files, tmp_path):
    out = tmp_path / "b.json"
    res = CliRunner().invoke(main, ["bench", str(files["sparse"]), "--engine", "onnxruntime", "--batch", "4",
                                    "--iterations", "3", "--turns", "1", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "p50 ms" in res.output
    data = json.loads(out.read_text())
    assert ROW_KEYS <= data["results"][0].keys()


@pytest.mark.parametrize("args,match", [
    (["missing.onnx"], "not found"),
    (["{py}"], "not an ONNX model.*siftc export"),
    (["{garbage}"], "not an ONNX model"),
    (["{sparse}", "--engine", "tensorrt"], "unknown engine tensorrt"),
    (["{sparse}", "--batch", "64"], "batch 64 does not fit"),
    (["{sparse}", "--time", "1", "--iterations", "2"], "contradict"),
])
def test_cli_errors(files, tmp_path, args, match):
    garbage = tmp_path / "g.onnx"
    garbage.write_bytes(b"\x00not onnx at all")
    out = tmp_path / "b.json"
    args = [a.format(py=spec_path("examples/mlp.py"), garbage=garbage, sparse=files["sparse"]) for a in args]
    res = CliRunner().invoke(main, ["bench", *args, "--iterations" if "--iterations" not in args and "--time" not in args
                                    else "--turns", "1", "--json", str(out)])
    assert res.exit_code == 2, res.output
    lines = res.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("siftc: error:"), res.output  # one line, nothing else
    assert re.search(match, lines[0]), res.output
    assert not out.exists()  # no partial result


def test_cli_error_subprocess(files, tmp_path):
    out = tmp_path / "b.json"
    proc = subprocess.run([str(Path(sys.executable).parent / "siftc"), "bench", str(files["sparse"]), "--batch", "64",
                           "--engine", "onnxruntime", "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "" and not out.exists()
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("siftc: error: batch 64 does not fit"), proc.stderr


def test_cli_sweep_kind_is_one_of_the_kinds(tmp_path):
    res = CliRunner().invoke(main, ["bench", "--sweep", spec_path("examples/mlp.py"), "--kind", "wider",
                                    "--out-dir", str(tmp_path / "sweep")])
    assert res.exit_code == 2, res.output
    lines = res.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("siftc: error:"), res.output
    assert "'wider' is not one of" in lines[0] and all(k in lines[0] for k in siftc.passes.KINDS), lines[0]
    assert not (tmp_path / "sweep").exists()


def test_cli_help_shows_the_library_defaults():
    from siftc.config import ConvertConfig

    shown = " ".join(CliRunner().invoke(main, ["bench", "--help"]).output.split())
    cfg = BenchConfig()
    for option, default in (("--warmup", cfg.warmup), ("--turns", cfg.turns), ("--time", cfg.time_s),
                            ("--batch", ",".join(map(str, cfg.batches))), ("--engine", ",".join(cfg.engines)),
                            ("--round-to", ConvertConfig(kind="wide", sparsity=0).round_to),
                            ("--opset", DEFAULT_OPSET)):
        assert re.search(rf"{option} \S+ [^[]*\[default: {re.escape(str(default))}\]", shown), option


def test_defaults_have_one_home():
    """The 5 s measurement time lives in runner.DEFAULT_TIME_S (BenchConfig and the CLI read it); the
    sweep's rounding is ConvertConfig's own default, not a copy of it."""
    import inspect

    from siftc.bench import sweep
    from siftc.cli import bench as cli_bench
    from siftc.config import ConvertConfig

    assert BenchConfig().time_s == runner.DEFAULT_TIME_S
    assert BenchConfig(iterations=3).time_s is None  # the default applies only when neither is given
    time_opt = next(p for p in cli_bench.bench_cmd.params if p.name == "time_s")
    assert time_opt.default is runner.DEFAULT_TIME_S
    assert sweep.ROUND_TO == ConvertConfig.round_to == ConvertConfig(kind="wide", sparsity=0).round_to
    for fn in (sweep.run_sweep, sweep.build_points):
        assert inspect.signature(fn).parameters["round_to"].default is sweep.ROUND_TO, fn.__name__
