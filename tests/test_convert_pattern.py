"""convert --pattern (issue 13): every sparse layer of the converted model gets the pattern (or the best
fitting fallback, reported with why), in whole blocks, iso-FLOP within 0.5%; N:M is solved at its
density and the report shows the effective sparsity; the config records it through the artifact; a bad
pattern is a one-line error, exit 2 (wide with N:M: tests/test_wide_nm.py)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import siftc
from siftc.sparse import Pattern, check_structure, sparse_layers

MLP = Path(__file__).resolve().parents[1] / "examples" / "mlp.py"


def dense(i=30):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(i, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def assert_patterned(gm, want: dict):
    report = gm.siftc_info.report
    assert abs(report["flop_ratio"] - 1) <= 0.005
    layers = sparse_layers(gm)
    assert {r["name"]: r["pattern"] for r in report["patterns"]} == {n: str(m.pattern) for n, m in layers.items()}
    for name, m in layers.items():
        assert check_structure(m.positions, m.weight_shape, m.pattern) is None, name
        assert str(m.pattern) == want.get(name, report["pattern"]), name
        assert m.nnz % m.pattern.unit == 0 if m.pattern.kind == "block" else True
    return report


@pytest.mark.parametrize("kind", ["wide", "parallel", "factorized", "doped"])
def test_block_pattern_per_kind_is_iso_flop_in_whole_blocks(kind, tmp_path):
    gm = siftc.convert(dense(32), kind, 0.75, (torch.randn(4, 32),), pattern="block:4x1")
    report = assert_patterned(gm, {})
    assert report["config"]["pattern"] == "block:4x1" and report["pattern"] == "block:4x1"
    siftc.save(gm, tmp_path / "art")
    meta = json.loads((tmp_path / "art" / "siftc.json").read_text())
    assert meta["config"]["pattern"] == "block:4x1"
    back = siftc.load(tmp_path / "art")
    assert [str(m.pattern) for m in sparse_layers(back).values()] == ["block:4x1"] * len(sparse_layers(gm))


def test_a_layer_the_pattern_does_not_fit_gets_the_largest_fallback_and_the_report_says_why():
    gm = siftc.convert(dense(30), "parallel", 0.75, (torch.randn(4, 30),), keep_dense=(), pattern="block:1x4")
    first = [n for n in sparse_layers(gm) if n.startswith("0.")]
    report = assert_patterned(gm, {n: "block:1x2" for n in first})
    rows = {r["name"]: r for r in report["patterns"]}
    assert first and all(rows[n]["reason"] == "block:1x4 does not fit a 64x30 weight (in=30 is not a multiple of 4): "
                         "block:1x2" for n in first)
    assert all(rows[n]["reason"] is None for n in rows if n not in first)
    assert any("in=30 is not a multiple of 4" in line for line in report["notes"])


@pytest.mark.parametrize("kind", ["parallel", "factorized", "doped"])
def test_nm_is_solved_at_its_density_and_reports_the_effective_sparsity(kind):
    gm = siftc.convert(dense(32), kind, 0.9, (torch.randn(4, 32),), pattern="nm:2:4")
    report = assert_patterned(gm, {})
    assert report["sparsity"] == 0.9 and report["effective_sparsity"] == pytest.approx(0.5)
    assert all(m.density == 0.5 for m in sparse_layers(gm).values())
    assert "pattern nm:2:4: effective sparsity 0.5000 (requested 0.9000)" in report["notes"]


def run(*args):
    return subprocess.run([sys.executable, "-m", "siftc", *args], capture_output=True, text=True, timeout=300)


def test_cli_pattern_and_its_errors(tmp_path):
    out = tmp_path / "par"
    r = run("convert", str(MLP), "--kind", "parallel", "--sparsity", "0.75", "--pattern", "block:4x4", "-o", str(out),
            "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["config"]["pattern"] == "block:4x4"
    assert json.loads((out / "siftc.json").read_text())["report"]["pattern"] == "block:4x4"
    r = run("convert", str(MLP), "--sparsity", "0.75", "--kind", "parallel", "--pattern", "block:3", "-o",
            str(tmp_path / "x"))
    assert r.returncode == 2 and "unknown sparsity pattern 'block:3'" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
