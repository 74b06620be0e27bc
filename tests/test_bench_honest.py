"""siftc bench says when a number is not solid: unstable rows (long tail, drifting turns) are marked in
the table and the JSON and give no ratio; a ÷baseline column over several files; DeepSparse's banner
kept out of the output (its version goes into the JSON)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import spec_path

import siftc
from siftc.bench import runner
from siftc.bench.deepsparse_engine import DeepSparseEngine
from siftc.bench.runner import BenchConfig, bench, summarize, times
from siftc.cli import main
from siftc.cli.bench import print_results
from siftc.errors import EngineError
from siftc.export import export as export_onnx


def _turns(*per_turn_ms):
    return [[ms / 1e3 for ms in turn] for turn in per_turn_ms]


def test_steady_latencies_are_stable():
    s = summarize(_turns([1.0] * 100, [1.02] * 100, [0.99] * 100), batch=1)
    assert s["stable"] is True and s["stability"]["reasons"] == []
    assert s["stability"]["turn_spread"] == pytest.approx(1.02 / 0.99)
    assert s["stability"]["p99_over_p50"] == pytest.approx(1.02, rel=1e-3)


def test_long_tail_is_unstable():
    # 3 calls in 100 take 20x the median: p99/p50 = 20 > MAX_P99_OVER_P50
    turn = [1.0] * 97 + [20.0] * 3
    s = summarize(_turns(turn, turn), batch=1)
    assert s["stable"] is False
    assert s["stability"]["p99_over_p50"] == pytest.approx(20.0)
    assert s["stability"]["turn_spread"] == pytest.approx(1.0)
    assert s["stability"]["reasons"] == [f"p99/p50 20.00x > {runner.MAX_P99_OVER_P50:g}x"]


def test_drifting_turns_are_unstable():
    # every turn steady on its own, but the machine changed: medians 1, 1 and 4 ms
    s = summarize(_turns([1.0] * 50, [1.0] * 50, [4.0] * 50), batch=1)
    assert s["stable"] is False and s["stability"]["turn_spread"] == pytest.approx(4.0)
    assert any(r.startswith("turn medians spread 4.00x") for r in s["stability"]["reasons"])


def test_one_turn_has_no_spread():
    s = summarize(_turns([1.0] * 10), batch=1)
    assert s["stability"]["turn_spread"] is None and s["stable"] is True


def test_limits_sit_between_steady_and_broken():
    """Just under each limit is stable, just over is not."""
    lim = runner.MAX_TURN_SPREAD
    assert summarize(_turns([1.0] * 9, [lim * 0.99] * 9), 1)["stable"]
    assert not summarize(_turns([1.0] * 9, [lim * 1.01] * 9), 1)["stable"]


@pytest.mark.parametrize("ratio,text", [(None, "n/a"), (float("nan"), "n/a"), (1839.0, "1,839x"),
                                        (13.642, "13.64x"), (0.4249, "0.42x"), (0.0042, "0.0042x"),
                                        (0.000123, "0.00012x")])
def test_ratios_never_read_0_00x(ratio, text):
    assert times(ratio) == text


def _result(rows, baseline=None):
    r = {"machine": {"cpu": "test", "usable_cores": 2}, "results": rows, "notes": []}
    if baseline:
        r["baseline"] = baseline
        runner.add_baseline(rows, baseline)
    return r


def _row(model, engine, turns_ms, batch=4, sparsity=None):
    return {"model": model, "kind": None, "sparsity": sparsity, "engine": engine, "batch": batch, "threads": 1,
            "status": "ok", **summarize(_turns(*turns_ms), batch)}


def test_unstable_row_prints_its_reason_and_no_ratio(capsys):
    steady = [[1.0] * 20, [1.0] * 20]
    drifting = [[1.0] * 20, [3.0] * 20]
    rows = [_row("a.onnx", "onnxruntime", steady), _row("b.onnx", "onnxruntime", steady),
            _row("a.onnx", "torch", steady), _row("b.onnx", "torch", drifting)]
    print_results(_result(rows, baseline="a.onnx"))
    out = capsys.readouterr().out
    lines = _cells(out)
    assert lines[("b.onnx", "onnxruntime")][9] == "1.00x"
    assert lines[("b.onnx", "torch")][9] == "n/a (unstable)"
    assert lines[("b.onnx", "torch")][10].startswith("unstable: turn medians spread 3.00x > 1.5x")
    assert rows[3]["vs_baseline"] == {"model": "a.onnx", "items_per_s": pytest.approx(0.5), "stable": False}
    assert "0.00x" not in out


def _cells(out: str) -> dict:
    """(first cell, second cell) -> a printed table row's cells."""
    rows = ([c.strip() for c in line.split("│")[1:-1]] for line in out.splitlines() if line.startswith("│"))
    return {(cells[0], cells[1]): cells for cells in rows}


def test_sweep_ratios_small_or_unstable(capsys):
    """A 250x faster point prints 0.004x, not 0.00x; a ratio with an unstable side prints n/a."""
    from siftc.bench.sweep import relative
    rows = [_row("dense.onnx", "deepsparse", [[1.0] * 9] * 2, sparsity=0),
            _row("dense.onnx", "onnxruntime", [[1.0] * 9] * 2, sparsity=0),
            _row("s.onnx", "deepsparse", [[0.5] * 9, [2.0] * 9], sparsity=0.9),
            _row("s.onnx", "onnxruntime", [[0.004] * 9] * 2, sparsity=0.9)]
    result = _result(rows, baseline="dense.onnx")
    result["sweep"] = {"points": relative(result)}
    dense_point, point = result["sweep"]["points"]
    assert dense_point["stable"] == {"deepsparse": True, "onnxruntime": True}
    assert point["stable"] == {"deepsparse": False, "onnxruntime": True}  # the JSON says it too
    assert point["deepsparse_speedup_stable"] is False
    print_results(result)
    out = capsys.readouterr().out
    cells = _cells(out)
    assert cells[("4", "0")][2:] == ["1.00x", "1.00x", "1.00x"]  # deepsparse, onnxruntime, speed-up
    assert cells[("4", "0.9")][2:] == ["n/a (unstable)", "0.004x", "n/a (unstable)"]
    assert "0.00x" not in out


def test_baseline_missing_on_an_engine_is_n_a():
    rows = [_row("a.onnx", "onnxruntime", [[1.0] * 5]), _row("b.onnx", "torch", [[1.0] * 5])]
    runner.add_baseline(rows, "a.onnx")
    assert rows[1]["vs_baseline"] == {"model": "a.onnx", "items_per_s": None, "stable": False}


# ----------------------------------------------------------------------------------- real files

@pytest.fixture(scope="module")
def two_sparsities(tmp_path_factory):
    d = tmp_path_factory.mktemp("honest")
    paths = []
    for s in (0.5, 0.9):
        siftc.save(siftc.convert(spec_path("examples/mlp.py:mlp"), kind="parallel", sparsity=s), d / f"p{s}")
        paths.append(export_onnx(d / f"p{s}", d / f"p{s}.onnx", batch=4).path)
    return paths


def test_baseline_column_over_two_real_files(two_sparsities, tmp_path):
    p50, p90 = two_sparsities
    out = tmp_path / "b.json"
    res = CliRunner().invoke(main, ["bench", str(p50), str(p90), "--engine", "onnxruntime", "--batch", "4",
                                    "--iterations", "20", "--turns", "2", "--warmup", "1", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "÷baseline" in res.output and f"items/s over {p50.name}'s" in res.output
    data = json.loads(out.read_text())
    assert data["baseline"] == str(p50)
    assert data["stability_limits"] == {"p99_over_p50": runner.MAX_P99_OVER_P50,
                                        "turn_spread": runner.MAX_TURN_SPREAD}
    base, other = data["results"]
    assert base["vs_baseline"]["items_per_s"] == 1.0
    assert other["vs_baseline"]["items_per_s"] == pytest.approx(other["items_per_s"] / base["items_per_s"])
    for r in (base, other):
        assert r["vs_baseline"]["stable"] == (base["stable"] and r["stable"])
        assert isinstance(r["stable"], bool) and r["stable"] == (r["stability"]["reasons"] == [])


def test_baseline_option_moves_that_file_first(two_sparsities):
    p50, p90 = two_sparsities
    result = bench([p50, p90], BenchConfig(engines=("onnxruntime",), batches=(4,), iterations=2, turns=1,
                                           warmup=1), baseline=p90)
    assert result["baseline"] == str(p90)
    assert [r["model"] for r in result["results"]] == [str(p90), str(p50)]
    assert result["results"][1]["vs_baseline"]["model"] == str(p90)


def test_baseline_not_among_the_files_is_benched_first(two_sparsities):
    p50, p90 = two_sparsities
    result = bench([p90], BenchConfig(engines=("onnxruntime",), batches=(4,), iterations=2, turns=1, warmup=1),
                   baseline=p50)
    assert [r["model"] for r in result["results"]] == [str(p50), str(p90)] and result["baseline"] == str(p50)


def test_cli_baseline_with_a_sweep_is_refused(two_sparsities, tmp_path):
    res = CliRunner().invoke(main, ["bench", "--sweep", spec_path("examples/mlp.py"), "--baseline",
                                    str(two_sparsities[0]), "--out-dir", str(tmp_path / "sw")])
    assert res.exit_code == 2 and res.output.startswith("siftc: error: a --sweep's baseline is its dense point")
    assert not (tmp_path / "sw").exists()


def test_one_file_has_no_baseline(two_sparsities):
    result = bench(two_sparsities[:1], BenchConfig(engines=("onnxruntime",), batches=(4,), iterations=2,
                                                   turns=1, warmup=1))
    assert "baseline" not in result and "vs_baseline" not in result["results"][0]


def test_deepsparse_banner_stays_out_of_the_cli_output(two_sparsities, tmp_path):
    try:
        DeepSparseEngine.available()
    except EngineError as e:
        pytest.skip(f"DeepSparse cannot run here: {e}")
    out = tmp_path / "b.json"
    # A real subprocess: the banner is written by C++ to file descriptor 2, which CliRunner never sees.
    proc = subprocess.run([sys.executable, "-m", "siftc", "bench", *map(str, two_sparsities), "--engine",
                           "deepsparse", "--batch", "4", "--iterations", "4", "--turns", "1", "--warmup", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for stream in (proc.stdout, proc.stderr):
        assert "Neuralmagic" not in stream and "Copyright" not in stream, stream
    assert "deepsparse" in proc.stdout  # the table itself is there
    rows = json.loads(out.read_text())["results"]
    import deepsparse
    assert all(r["deepsparse_version"].startswith(deepsparse.__version__) for r in rows)
    assert all("COMMUNITY" in r["deepsparse_version"] or "ENTERPRISE" in r["deepsparse_version"] for r in rows)
    assert Path(out).is_file()
