"""The Python API next to the CLI: siftc.export and siftc.bench are the functions (not the modules of
the same name), `python -m siftc` is the command, and a missing optional extra is a one-line error."""
import json
import subprocess
import sys

import pytest

import siftc
from siftc import extras
from siftc.errors import UsageError

from conftest import spec_path


def test_export_and_bench_from_python(tmp_path):
    gm = siftc.convert(spec_path("examples/mlp.py:mlp"), "parallel", 0.75)
    siftc.save(gm, tmp_path / "art")
    done = siftc.export(tmp_path / "art", tmp_path / "m.onnx", batch=4)  # the torch engine rebuilds from it
    assert done.path.is_file() and done.meta["checks"]["sparsity"] == "passed"
    result = siftc.bench(done.path, engines=("onnxruntime", "torch"), batches=(4,), iterations=10, turns=2,
                         warmup=1, threads=1)
    rows = {r["engine"]: r for r in result["results"]}
    assert set(rows) == {"onnxruntime", "torch"} and all(r["status"] == "ok" for r in rows.values())
    assert all(r["p50_ms"] > 0 for r in rows.values())
    with pytest.raises(UsageError, match="exists"):
        siftc.export(gm, tmp_path / "m.onnx", batch=4)  # an in-memory model too; the same "exists unless force" rule as the CLI


def test_python_dash_m_siftc_is_the_command(tmp_path):
    run = subprocess.run([sys.executable, "-m", "siftc", "inspect", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("Usage: siftc inspect"), run.stderr
    bad = subprocess.run([sys.executable, "-m", "siftc", "convert", str(tmp_path / "missing.py"), "--kind", "wide",
                          "--sparsity", "0.5", "-o", str(tmp_path / "out")], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


def test_a_missing_extra_names_what_to_install():
    assert extras.available("json") and not extras.available("siftc_no_such_module")
    extras.EXTRAS["siftc_no_such_module"] = "plot"
    try:
        with pytest.raises(UsageError, match=r"--plot needs siftc_no_such_module.*pip install 'siftc\[plot\]'"):
            extras.require("siftc_no_such_module", "--plot")
    finally:
        del extras.EXTRAS["siftc_no_such_module"]
    assert extras.require("json", "x") is json


def test_bench_notes_print_brackets_as_written(capsys):
    """Notes are plain text, not rich markup: the extra's name survives printing."""
    from siftc.cli.bench import print_results
    result = {"machine": {"cpu": "x", "usable_cores": 1}, "results": [],
              "notes": ["deepsparse: not installed; pip install 'siftc[deepsparse]'"]}
    print_results(result)
    assert "pip install 'siftc[deepsparse]'" in capsys.readouterr().out
