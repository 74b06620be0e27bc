"""benchmarks/readme_tables.py renders the README's tables from result JSON: the iso-FLOP training table
shows every row a full run plans (not run / could not convert / measured), the pattern table takes its
accuracy from the Sparse Wide rows only, and the script runs on the committed results."""
import json
import subprocess
import sys

import pytest

import benchmark_scripts

SCRIPT = benchmark_scripts.BENCHMARKS / "readme_tables.py"


@pytest.fixture(scope="module")
def tables():
    return benchmark_scripts.load("readme_tables")


def trained(config, kind, sparsity, loss, acc, native=None, pattern="unstructured", **extra):
    """A row as benchmarks/iso_flop_training.py writes it, for a configuration that trained."""
    return {"config": config, "kind": kind, "sparsity": sparsity, "method": "rigl", "pattern": pattern,
            "val_loss": [loss, 0.0014], "val_acc": [acc, 0.0056],
            "steps_per_s": {"torch": 200.0, **({"native": native} if native else {})},
            "train_flops": 3.47e10, "flop_ratio": 1.0039, **extra}


def results(*rows) -> dict:
    return {"seeds": [0, 1, 2], "threads": 1, "torch": "2.13.0+cpu", "tasks": {"digits-mlp": list(rows)}}


def cells(markdown: str) -> dict:
    """(task, config) -> the row's cells, from the table's Markdown."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines()
            if line.startswith("| digits-mlp") or line.startswith("| stdlib-gpt")]
    return {(r[0], r[1]): r[2:] for r in rows}


def test_iso_flop_table_shows_measured_unconverted_and_unrun_rows(tables):
    d = results(trained("dense", "dense", 0.0, 0.0853, 0.9722),
                trained("wide-50%", "wide", 0.5, 0.0547, 0.9889, native=226.8),
                {"config": "parallel-75%", "kind": "parallel", "sparsity": 0.75, "method": "rigl",
                 "pattern": "unstructured", "error": "no parallel rule for node 'fc1'"},
                trained("wide-75% block:16x1", "wide", 0.75, 0.0700, 0.9800, native=300.0, pattern="block:16x1",
                        pattern_fit={"sparse_layers": 3, "as_requested": 2, "effective_sparsity": 0.75}))
    text = tables.iso_flop_training(d)
    table = cells(text)
    assert table["digits-mlp", "dense"] == ["dense", "0.0853 ± 0.0014", "97.22 ± 0.56", "—", "200.0",
                                            "3.470e+10", "1.004"]
    assert table["digits-mlp", "wide-50%"][3] == "226.8"
    assert table["digits-mlp", "parallel-75%"] == ["parallel: could not convert"] + ["—"] * 6
    assert "- digits-mlp parallel-75%: no parallel rule for node 'fc1'" in text
    assert table["digits-mlp", "wide-75% block:16x1"][0] == "wide, 2/3 layers `block:16x1`, 75.0% sparse"
    # every kind a full run plans has a row, measured or not; a task missing from the JSON too
    for kind in ("wide", "parallel", "factorized", "doped"):
        assert ("digits-mlp", f"{kind}-50%") in table and ("digits-mlp", f"{kind}-75%") in table
    assert table["digits-mlp", "doped-50%"] == ["not run"] + ["—"] * 6
    assert table["stdlib-gpt", "dense"] == ["not run"] + ["—"] * 6


def test_pattern_table_accuracy_is_sparse_wide_not_another_kind(tables):
    d = results(trained("dense", "dense", 0.0, 0.0853, 0.9722),
                trained("wide-75%", "wide", 0.75, 0.0806, 0.9722, native=180.0),
                trained("parallel-75%", "parallel", 0.75, 0.3000, 0.5000, native=150.0),
                trained("wide-75% block:4x4", "wide", 0.75, 0.0900, 0.9600, native=250.0, pattern="block:4x4"))
    d["tasks"]["stdlib-gpt"] = d["tasks"]["digits-mlp"]  # a pattern row in two tasks is still one pattern row
    lines = [[c.strip() for c in line.strip("|").split("|")]
             for line in tables.patterns_table({"iso_flop_training": d}).splitlines() if line.startswith("| ")]
    assert [r[0] for r in lines] == ["pattern", "dense", "`unstructured`", "`block:4x4`"]
    rows = {r[0]: r[1:] for r in lines}
    assert rows["`unstructured`"][-1] == "97.22 ± 0.56"  # wide-75%, not parallel-75%'s 50.00
    assert rows["`block:4x4`"][-1] == "96.00 ± 0.56"
    assert rows["dense"][-1] == "97.22 ± 0.56"


def test_pattern_table_shows_a_layer_row_once_the_full_run_first(tables):
    def layer(row, native):
        return {"row": row, "kind": "conv", "fwd+bwd": {"native": {"vs_base": native}}}
    full = {"rows": [layer("Wide Linear", 5.0), layer("Wide Conv2d", 13.0)], "machine": {"cpu": "X"}}
    conv_only = {"rows": [layer("Wide Conv2d", 9.0), layer("Other conv", 2.0)], "machine": {"cpu": "X"}}
    lines = [[c.strip() for c in line.strip("|").split("|")] for line in
             tables.patterns_table({"patterns": full, "patterns_conv": conv_only}).splitlines()
             if line.startswith("| ")]
    assert lines[0][1:4] == ["Wide Linear fwd+bwd ÷ dense", "Wide Conv2d fwd+bwd ÷ dense", "Other conv fwd+bwd ÷ dense"]
    assert lines[2][:4] == ["`unstructured`", "5.00×", "13.00×", "2.00×"]  # patterns.json's conv row, not 9.00


def test_glance_passes_over_a_kind_that_could_not_convert(tables):
    d = results(trained("dense", "dense", 0.0, 0.0853, 0.9722),
                {"config": "wide-50%", "kind": "wide", "sparsity": 0.5, "error": "no width rule"},
                trained("doped-50%", "doped", 0.5, 0.0600, 0.9800, native=100.0))
    assert "digits-mlp: doped-50% val loss 0.0600 vs dense 0.0853" in tables.glance({"iso_flop_training": d})


def test_cli_renders_a_results_folder_and_the_committed_results(tmp_path):
    (tmp_path / "iso_flop_training.json").write_text(json.dumps(results(
        trained("dense", "dense", 0.0, 0.0853, 0.9722), trained("factorized-50%", "factorized", 0.5, 0.2, 0.9,
                                                                 native=90.0))))
    out = subprocess.run([sys.executable, str(SCRIPT), "--results", str(tmp_path)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert cells(out.stdout)["digits-mlp", "factorized-50%"][:2] == ["factorized", "0.2000 ± 0.0014"]
    assert f"no `{tmp_path / 'runtime'}.json` yet (not run)" in out.stdout
    committed = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300)
    assert committed.returncode == 0, committed.stderr
    assert "**Iso-FLOP training**" in committed.stdout and "| digits-mlp | dense | dense |" in committed.stdout
    missing = subprocess.run([sys.executable, str(SCRIPT), "--results", str(tmp_path / "nope")],
                             capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
