"""`siftc convert --kind wide` bad input through the CLI: a one-line error naming the problem and the
fix, exit code 2, and no output directory (not even a partial one)."""
import json
import re

import pytest
from click.testing import CliRunner

from siftc.cli import main

from conftest import spec_path

MLP = spec_path("examples/mlp.py:mlp")
TWO_LAYERS = spec_path("tests/models_wide.py:TwoLayers")  # two Linears: both kept dense
NO_RULE = spec_path("tests/models_wide.py:NoRule")        # torch.cumsum has no width rule


def convert(tmp_path, model, *args):
    return CliRunner().invoke(main, ["convert", model, "--kind", "wide", *args, "-o", str(tmp_path / "out")])


def assert_one_line_error(result, tmp_path, match):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("siftc: error:"), result.output
    assert re.search(match, lines[0]), result.output
    assert list(tmp_path.iterdir()) == []  # no output directory, no temporary one left behind


@pytest.mark.parametrize("value", ["0", "-3", "2.5", "eight"])
def test_round_to_must_be_a_positive_integer(tmp_path, value):
    result = convert(tmp_path, MLP, "--sparsity", "0.5", f"--round-to={value}")
    assert_one_line_error(result, tmp_path, rf"round-to.*{re.escape(value)}.*positive integer")


def test_all_weight_layers_kept_dense_is_nothing_to_widen(tmp_path):
    result = convert(tmp_path, TWO_LAYERS, "--sparsity", "0.5", "--input-shape", "3,8")
    assert_one_line_error(result, tmp_path, r"nothing to widen.*\(a, b\) is kept dense.*--no-keep-dense")


def test_strict_names_the_op_without_a_width_rule(tmp_path):
    result = convert(tmp_path, NO_RULE, "--sparsity", "0.5", "--input-shape", "3,8", "--strict")
    assert_one_line_error(result, tmp_path, r"--strict.*b:out.*cumsum")
    assert convert(tmp_path, NO_RULE, "--sparsity", "0.5", "--input-shape", "3,8").exit_code == 0  # reported


def test_kept_dense_layers_outgrowing_the_budget(tmp_path):
    result = convert(tmp_path, MLP, "--sparsity", "0.99")  # net.0 alone outgrows the model at k = 10
    assert_one_line_error(result, tmp_path, r"kept-dense layers \(net\.0.*lower the sparsity")


@pytest.mark.parametrize("model,sparsity", [("examples/mobilenetv2.py:mobilenetv2", "0.75"),
                                            ("examples/gpt.py:gpt", "0.5")])
def test_inspect_lists_every_group_and_the_kept_dense_layers(tmp_path, model, sparsity):
    out = tmp_path / "out"
    assert convert(tmp_path, spec_path(model), "--sparsity", sparsity).exit_code == 0
    report = json.loads(CliRunner().invoke(main, ["inspect", str(out), "--json"]).output)
    text = CliRunner().invoke(main, ["inspect", str(out)]).output
    lines = text.splitlines()
    for g in report["groups"]:  # one row each: id, old width, new width, members, why fixed
        row = rf"│ {g['id']}\s+│\s+{g['width']} │\s+{g['new_width']} │ {re.escape(g['members'][0])}"
        found = [line for line in lines if re.match(row, line)]
        assert len(found) == 1, (g, text)
        assert (g["fixed"] or "")[:20] in found[0]
    dense = [r for r in report["layers"] if r["kind"] == "dense"]
    assert dense and all(f"dense {r['name']}: {r['reason']}" in text for r in dense)
    assert "non-weight FLOPs" in text
    if "mobilenet" in model:  # depthwise convs: widened, kept dense, paid for by the sparse layers
        depthwise = [r for r in dense if "depthwise" in r["reason"]]
        assert len(depthwise) == 10 and all("kept dense and paid for" in r["reason"] for r in depthwise)
    else:  # q, k, v keep heads x head_dim, each piece of c_attn's out named by its slice
        heads = [g for g in report["groups"] if g["fixed"] and g["fixed"].startswith("attention heads")]
        members = {m for g in heads for m in g["members"]}
        assert {"blocks.0.attn.c_attn:out[128:256]", "blocks.0.attn.c_proj:in"} <= members
        assert any(g["width"] == 512 and g["new_width"] == 724 for g in report["groups"])  # the MLP widens
