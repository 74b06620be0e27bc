"""Pretrained weights in (`--weights`, `weights=`) and factory arguments (`--model-arg`, `model_args=`):
the values reach the converted model where its layers keep their shapes, the report says per layer which
kept them, the artifact records the file's name and sha256, and a file or argument that does not fit is a
one-line error (exit 2, nothing written)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import siftc
from siftc.errors import SiftcError, UsageError
from siftc.source import parse_model_args
from siftc.store import file_sha256
from conftest import spec_path

MLP = spec_path("examples/mlp.py:mlp")
MLP_CLASS = spec_path("examples/mlp.py:MLP")


def siftc_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "siftc", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def one_line_error(proc, *words):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("siftc: error: ")
    for w in words:
        assert w in proc.stderr, proc.stderr


def pretrained_mlp(seed=7, **kwargs):
    """An MLP whose values differ from what the factory's seeded init would give."""
    from siftc.source import load_model
    torch.manual_seed(seed)
    model = load_model(MLP_CLASS if kwargs else MLP, model_args=kwargs or None, inputs=False).model
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model


@pytest.fixture
def dense_pt(tmp_path):
    model = pretrained_mlp()
    path = tmp_path / "dense.pt"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_weights_reach_kept_dense_and_sparse_layers(tmp_path, fmt):
    model = pretrained_mlp()
    path = tmp_path / f"dense.{fmt}"
    (torch.save if fmt == "pt" else save_file)(model.state_dict(), path)
    gm = siftc.convert(MLP, "sparse", 0.9, weights=path)
    for name in ("net.0", "net.6"):  # kept dense: all values
        torch.testing.assert_close(gm.get_submodule(name).weight, model.get_submodule(name).weight, rtol=0, atol=0)
    for name in ("net.2", "net.4"):  # sparse at the same shape: the values at the mask, the bias
        layer, dense = gm.get_submodule(name), model.get_submodule(name)
        assert torch.equal(layer.values, dense.weight.reshape(-1)[layer.positions.long()])
        assert torch.equal(layer.bias, dense.bias)
    report = gm.siftc_info.report
    assert report["weights"] == {"file": path.name, "sha256": file_sha256(path)}
    assert {r["name"]: r["init"] for r in report["layers"]} == dict.fromkeys(["net.0", "net.2", "net.4", "net.6"],
                                                                            "kept")


def test_report_says_fresh_where_the_kind_changes_shapes(dense_pt):
    model, path = dense_pt
    par = siftc.convert(MLP, "parallel", 0.75, weights=path).siftc_info.report
    assert {r["name"]: r["init"] for r in par["layers"]} == {"net.0": "kept", "net.2": "fresh", "net.4": "fresh",
                                                            "net.6": "kept"}
    wide = siftc.convert(MLP, "wide", 0.75, weights=path)
    assert all(r["init"] == "fresh" for r in wide.siftc_info.report["layers"])  # the stem and head widen too
    assert any("initialised fresh (new shapes): net.0" in n for n in wide.siftc_info.report["notes"])
    # parallel kept the pretrained first layer: the converted model's first layer computes the dense one's
    x = torch.randn(3, 64)
    gm = siftc.convert(MLP, "parallel", 0.75, weights=path)
    torch.testing.assert_close(gm.get_submodule("net.0")(x), model.net[0](x))


def test_provenance_in_artifact_and_inspect(tmp_path, dense_pt):
    _, path = dense_pt
    out = tmp_path / "art"
    proc = siftc_cli("convert", MLP, "--kind", "sparse", "--sparsity", "0.9", "--weights", path, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert "pretrained values (dense.pt) kept in net.0, net.2, net.4, net.6" in proc.stdout
    meta = json.loads((out / "siftc.json").read_text())
    assert meta["report"]["weights"] == {"file": "dense.pt", "sha256": file_sha256(path)}
    shown = siftc_cli("inspect", out)
    assert shown.returncode == 0 and f"weights: dense.pt (sha256 {file_sha256(path)[:16]}" in shown.stdout
    again = siftc.load(out)  # the provenance travels with the loaded model (train saves it again)
    assert again.siftc_info.report["weights"]["sha256"] == file_sha256(path)


def test_model_args_build_the_model_and_are_recorded(tmp_path):
    model = pretrained_mlp(hidden=96, n_hidden=2)
    path = tmp_path / "small.pt"
    torch.save(model.state_dict(), path)
    out = tmp_path / "art"
    proc = siftc_cli("convert", MLP_CLASS, "--model-arg", "hidden=96", "--model-arg", "n_hidden=2", "--kind", "sparse",
                     "--sparsity", "0.5", "--weights", path, "-o", out, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert [r["dense_shape"] for r in report["layers"]] == [[96, 64], [96, 96], [10, 96]]
    meta = json.loads((out / "siftc.json").read_text())
    assert meta["source"]["model_args"] == {"hidden": 96, "n_hidden": 2}
    gm = siftc.load(out)
    x = torch.randn(2, 64)
    torch.testing.assert_close(gm.get_submodule("net.0")(x), model.net[0](x))


def test_model_args_api_and_parsing():
    assert parse_model_args(["hidden=128", "name=tiny", "dims=(64, 32)", "flag=True", "empty="]) == \
        {"hidden": 128, "name": "tiny", "dims": (64, 32), "flag": True, "empty": ""}
    gm = siftc.convert(MLP_CLASS, "sparse", 0.5, model_args={"hidden": 32})
    assert gm.siftc_info.report["layers"][1]["dense_shape"] == [32, 32]
    assert gm.siftc_info.source.model_args == {"hidden": 32}
    for bad, words in (({"hidden": {1, 2}}, "cannot be recorded"), ({"nope": 1}, "has no parameter 'nope'")):
        with pytest.raises(UsageError, match=words):
            siftc.convert(MLP_CLASS, "sparse", 0.5, model_args=bad)
    with pytest.raises(UsageError, match="model_args"):
        siftc.convert(pretrained_mlp(), "sparse", 0.5, example_inputs=(torch.randn(1, 64),), model_args={"a": 1})


def test_in_memory_model_left_untouched(dense_pt):
    model, path = dense_pt
    other = pretrained_mlp(seed=3)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    gm = siftc.convert(other, "sparse", 0.9, example_inputs=(torch.randn(1, 64),), weights=path)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
    assert torch.equal(gm.get_submodule("net.0").weight, model.net[0].weight)


def bad_weight_files(tmp_path: Path) -> dict:
    good = pretrained_mlp().state_dict()
    files = {}

    def put(name, obj, save=torch.save):
        files[name] = tmp_path / name
        save(obj, files[name])

    put("shape.pt", {**good, "net.2.weight": torch.zeros(256, 128)})
    put("missing.pt", {k: v for k, v in good.items() if k != "net.4.bias"})
    put("extra.pt", {**good, "head.weight": torch.zeros(3)})
    put("nested.pt", {"state_dict": good})
    put("module.pt", torch.nn.Linear(2, 2))
    put("shape.safetensors", {**good, "net.0.bias": torch.zeros(7)}, save_file)
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    files["garbage.pt"] = tmp_path / "garbage.pt"
    (tmp_path / "weights.txt").write_text("hi")
    files["weights.txt"] = tmp_path / "weights.txt"
    files["absent.pt"] = tmp_path / "absent.pt"
    return files


WORDS = {"shape.pt": ["net.2.weight", "(256, 128) in the file", "(256, 256) in the model"],
         "missing.pt": ["lacks net.4.bias"], "extra.pt": ["head.weight", "which the model lacks"],
         "nested.pt": ["'state_dict'", "not a tensor"], "module.pt": ["torch.nn.modules.linear.Linear", "refuses"],
         "shape.safetensors": ["net.0.bias", "(7,) in the file", "(256,) in the model"],
         "garbage.pt": ["corrupt or truncated"], "weights.txt": [".safetensors"], "absent.pt": ["not found"]}


def test_bad_weight_files_one_line_exit_2(tmp_path):
    files = bad_weight_files(tmp_path)
    out = tmp_path / "out"
    for name, path in files.items():
        proc = siftc_cli("convert", MLP, "--kind", "sparse", "--sparsity", "0.9", "--weights", path, "-o", out)
        one_line_error(proc, *WORDS[name])
        assert not out.exists()  # nothing half-written
    with pytest.raises(SiftcError, match="net.2.weight"):  # the API says the same
        siftc.convert(MLP, "wide", 0.5, weights=files["shape.pt"])


@pytest.mark.parametrize("args,words", [
    (["--model-arg", "hidden"], ["not key=value"]),
    (["--model-arg", "2x=3"], ["not key=value"]),
    (["--model-arg", "hidden=1", "--model-arg", "hidden=2"], ["given twice"]),
    (["--model-arg", "hidden=128"], ["has no parameter 'hidden'", "no arguments"]),  # mlp() takes none
    (["--model-arg", "x={1, 2}"], ["cannot be recorded"]),
])
def test_bad_model_args_one_line_exit_2(tmp_path, args, words):
    proc = siftc_cli("convert", MLP, "--kind", "sparse", "--sparsity", "0.9", *args, "-o", tmp_path / "o")
    one_line_error(proc, *words)
    assert not (tmp_path / "o").exists()


def test_tied_weights_stored_once(tmp_path):
    """A checkpoint may store a tied weight once (safetensors refuses to store a shared tensor twice)."""
    from siftc.source import load_model
    loaded = load_model(spec_path("examples/gpt.py:gpt_tied"))
    state = loaded.model.state_dict()
    by_storage = {}
    for k, v in state.items():
        by_storage.setdefault(v.data_ptr(), []).append(k)
    tied = next(names for names in by_storage.values() if len(names) > 1)  # the embedding and the LM head
    path = tmp_path / "gpt.pt"
    torch.save({k: v for k, v in state.items() if k != tied[1]}, path)
    gm = siftc.convert(loaded.model, "sparse", 0.5, example_inputs=loaded.example_inputs, weights=path)
    assert gm.siftc_info.report["weights"]["file"] == "gpt.pt"


LEAFY = '''
import torch
from torch import nn


class Scale(nn.Module):
    def forward(self, x):
        return 2 * x


class Net(nn.Module):
    def __init__(self, hidden: int = 32):
        super().__init__()
        self.fc1, self.act, self.mid, self.fc2 = nn.Linear(64, hidden), Scale(), nn.Linear(hidden, hidden), nn.Linear(hidden, 10)

    def forward(self, x):
        return self.fc2(self.mid(self.act(self.fc1(x))))


def example_inputs():
    return (torch.randn(2, 64),)
'''


def test_model_args_reach_a_trusted_reload(tmp_path):
    """An artifact that needs its model file (a --leaf user module) rebuilds it with the recorded
    --model-arg values, not the factory's defaults."""
    (tmp_path / "leafy.py").write_text(LEAFY)
    out = tmp_path / "art"
    proc = siftc_cli("convert", f"{tmp_path / 'leafy.py'}:Net", "--model-arg", "hidden=48", "--leaf", "Scale",
                     "--kind", "parallel", "-s", "0.5", "-o", out)
    assert proc.returncode == 0, proc.stderr
    gm = siftc.load(out, trust_source=True)
    assert gm.get_submodule("fc1").weight.shape == (48, 64)
