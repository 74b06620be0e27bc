"""siftc.source: a spec, an artifact directory or a converted model resolves to the model, its example
inputs and where it came from; make_inputs draws inputs like the examples, from tensors or from a
sidecar's input specs alike, and keeps a boolean input's pattern."""
import re
import sys

import pytest
import torch
from torch import nn

import siftc
from siftc import source, store
from siftc.errors import ModelLoadError, UsageError

from conftest import ROOT, spec_path

MLP = spec_path("examples/mlp.py:mlp")


def test_make_inputs_from_tensors_or_specs_alike():
    mask = torch.tensor([[True, False, True, True]])
    example = (torch.randn(1, 3), torch.randint(5, 9, (1, 4)), mask)
    specs = source.input_specs(example, ["x", "ids", "mask"], "batch")
    assert [s["shape"] for s in specs] == [["batch", 3], ["batch", 4], ["batch", 4]]
    assert specs[1]["low"] == int(example[1].min()) and specs[1]["high"] == int(example[1].max())
    a, b = source.make_inputs(example, 5, seed=3), source.make_inputs(specs, 5, seed=3)
    for x, y, like in zip(a, b, example):
        assert x.shape[0] == 5 and x.dtype == like.dtype and torch.equal(x, y)
    assert int(a[1].min()) >= specs[1]["low"] and int(a[1].max()) <= specs[1]["high"]
    assert torch.equal(a[2], mask.expand(5, 4))  # a mask keeps the example's pattern, never drawn at random


def test_bool_spec_without_the_example_is_all_true():
    (x,) = source.make_inputs([{"name": "m", "shape": [1, 2, 3], "dtype": "bool"}], 2)
    assert x.shape == (2, 2, 3) and bool(x.all())


def test_a_spec_resolves_seeded_with_its_provenance():
    a, b = source.resolve(MLP), source.resolve(MLP)
    assert a.origin == {"type": "model", **a.source.to_json(), "seed": source.SEED} and a.report is None
    assert a.source.spec.endswith("mlp.py:mlp") and a.source.sha256
    for (k, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), k  # the dense baseline's weights do not depend on the global seed


def test_an_artifact_resolves_and_is_verified_once(tmp_path, monkeypatch):
    gm = siftc.convert(MLP, kind="parallel", sparsity=0.5)
    siftc.save(gm, tmp_path / "art")
    hashed = []
    real = store.file_sha256
    monkeypatch.setattr(store, "file_sha256", lambda p: hashed.append(p.name) or real(p))
    got = source.resolve(tmp_path / "art")
    assert sorted(hashed) == ["graph.json", "inputs.pt", "weights.pt"]  # each checksum checked once, not twice
    assert got.origin == {"type": "artifact", "path": str((tmp_path / "art").resolve()),
                          "model": gm.siftc_info.source.to_json()}
    assert got.report["kind"] == "parallel" and len(got.example_inputs) == 1
    mem = source.resolve(gm)
    assert mem.model is gm and mem.origin == {"type": "in-memory", "converted_from": gm.siftc_info.source.spec}


def test_a_source_says_when_its_file_changed(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from torch import nn\ndef build():\n    return nn.Linear(2, 2)\n")
    before = source.load_model(f"{f}:build", inputs=False).source
    assert before.absolute == f"{f.resolve()}:build"
    f.write_text("from torch import nn\ndef build():\n    return nn.Linear(2, 2)  # edited\n")
    assert before.changed(source.load_model(before.absolute, inputs=False).source)
    assert not before.changed(before)


@pytest.mark.parametrize("what, error, match", [
    (nn.Linear(2, 2), UsageError, "for a plain nn.Module pass its spec"),
    ("nowhere/model.py", UsageError, "not found; pass an artifact directory"),
    (str(ROOT / "pyproject.toml"), UsageError, "neither an artifact directory nor a model.py"),
])
def test_what_does_not_resolve_says_what_to_pass(what, error, match):
    with pytest.raises(error, match=match):
        source.resolve(what)


def test_load_model_errors_name_the_fix(tmp_path):
    f = tmp_path / "two.py"
    f.write_text("from torch import nn\ndef a():\n    return nn.Linear(1, 1)\ndef b():\n    return nn.Linear(1, 1)\n")
    with pytest.raises(ModelLoadError, match=r"several candidate factories \(a, b\); name one as"):
        source.load_model(str(f))
    with pytest.raises(UsageError, match="defines no example_inputs"):
        source.load_model(f"{f}:a")
    assert source.load_model(f"{f}:a", input_shape=(3, 1)).example_inputs[0].shape == (3, 1)
    assert source.parse_shape("1,3,32x32") == (1, 3, 32, 32)
    with pytest.raises(UsageError, match="is not a shape"):
        source.parse_shape("1,-3")


def test_a_model_file_that_exits_is_its_own_doing(tmp_path):
    """sys.exit at import or in the factory is a one-line ModelLoadError naming the file and line, not
    a SystemExit out of siftc; sys.argv is siftc's again afterwards."""
    quits = tmp_path / "quits.py"
    quits.write_text("import sys\nsys.exit(3)\n")
    factory = tmp_path / "fexit.py"
    factory.write_text("import sys\n\ndef build():\n    print('bye', file=sys.stderr)\n    sys.exit()\n")
    argv = list(sys.argv)
    with pytest.raises(ModelLoadError, match=rf"^importing {re.escape(str(quits))} exited \(sys.exit\(3\) at "
                                             rf"{re.escape(str(quits))}:2\): the model file's doing; guard its "
                                             r"script code with `if __name__ == \"__main__\":`$"):
        source.load_model(str(quits))
    with pytest.raises(ModelLoadError, match=rf"^factory {re.escape(str(factory))}:build exited \(sys.exit\(\) at "
                                             rf"{re.escape(str(factory))}:5, after printing \"bye\"\)"):
        source.load_model(f"{factory}:build")
    assert sys.argv == argv
