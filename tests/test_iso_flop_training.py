"""benchmarks/iso_flop_training.py plans dense, each requested kind at 50% and 75% and the Sparse Wide
pattern rows; a kind that cannot convert a model gets a row with its error, never another kind's run."""
import subprocess
import sys

import pytest

import benchmark_scripts

SCRIPT = benchmark_scripts.BENCHMARKS / "iso_flop_training.py"


@pytest.fixture(scope="module")
def bench():
    return benchmark_scripts.load("iso_flop_training")


def test_plan_has_every_kind_at_both_sparsities_and_the_pattern_rows(bench):
    plan = bench.configs()
    assert [c.name for c in plan] == ["dense"] + [f"{k}-{s}%" for k in ("wide", "parallel", "factorized", "doped")
                                                  for s in (50, 75)] + [f"wide-75% {p}" for p in bench.PATTERNS]
    assert {(c.kind, c.method, c.pattern) for c in plan[1:9]} == {(k, "rigl", "unstructured") for k in bench.KINDS}
    subset = bench.configs(kinds=("doped",))  # no wide: no Sparse Wide pattern rows
    assert [c.name for c in subset] == ["dense", "doped-50%", "doped-75%"]


def test_a_kind_that_cannot_convert_gets_its_error_not_a_substitute(bench, tmp_path):
    # wide at 99% on the MLP: its kept-dense first and last layers would grow by more FLOPs than the sparse
    # layers have, so convert refuses; parallel converts it (the old fallback trained that under wide's name)
    row = bench.train_config("digits-mlp", bench.Config("wide-99%", "wide", 0.99, "rigl"), (0,), True, tmp_path)
    assert row["kind"] == "wide" and "kept-dense layers" in row["error"]
    assert "val_loss" not in row and "steps_per_s" not in row


def test_unknown_kind_is_a_usage_error(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--kinds", "wide,wider", "-o",
                          str(tmp_path / "x.json")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "--kinds wider: not a Sparse-IFT kind" in out.stderr
    assert not (tmp_path / "x.json").exists()
