"""`siftc convert` and `siftc inspect` through click's CliRunner, and once through the installed script.

Bad input must give one line on stderr naming the problem and the fix, exit code 2, no traceback
(unless --debug), and no output directory, not even a partial or temporary one."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import siftc
from siftc.cli import main
from siftc.errors import ArtifactError

from conftest import ROOT, spec_path

MLP = spec_path("examples/mlp.py:mlp")
REPORT_KEYS = {"kind", "sparsity", "dense_flops", "flops", "layers"}
LAYER_KEYS = {"name", "kind", "density", "dense_flops", "flops"}

# Tiny model files, written into tmp_path by the tests that need them.
BAD_MODELS = {
    "none.py": "X = 1\n",
    "several.py": "from torch import nn\n\n\ndef a():\n    return nn.Sequential(nn.Linear(4, 4))\n\n\n"
                  "def b():\n    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))\n",
    "raises.py": "def build():\n    raise ValueError('width must be even\\nsee the docs')\n",
    "untraceable.py": """import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:
            return self.c(self.b(self.a(x)))
        return x


def build():
    return Net()


def example_inputs():
    return (torch.randn(2, 8),)
""",
}


def siftc_cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def models(tmp_path):
    """The bad model files, in a folder whose name contains "siftc" (frames there are still the user's)."""
    folder = tmp_path / "siftc_models"
    folder.mkdir()
    for name, text in BAD_MODELS.items():
        (folder / name).write_text(text)
    return folder


def assert_one_line_error(result, tmp_path, *patterns):
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("siftc: error: "), result.stderr
    for pattern in patterns:
        assert re.search(pattern, lines[0]), (pattern, lines[0])
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary dir left


def convert(tmp_path, model, *args, kind="parallel", sparsity="0.5"):
    return siftc_cli("convert", model, "--kind", kind, "--sparsity", sparsity, *args, "-o", tmp_path / "out")


def test_convert_prints_the_table_and_inspect_reads_it_back(tmp_path):
    result = convert(tmp_path, MLP)
    assert result.exit_code == 0, result.output
    assert re.search(r"net\.2\s+│ parallel │ 256x256\s+│ 2 x \(256x256\)\s+│\s+0\.5000", result.stdout)
    assert re.search(r"total .* ratio 1\.0000", result.stdout) and "wrote " in result.stdout
    table = siftc_cli("inspect", tmp_path / "out")
    assert table.exit_code == 0 and "net.4" in table.stdout and "ratio 1.0000" in table.stdout


def test_json_from_convert_and_inspect(tmp_path):
    result = convert(tmp_path, MLP, "--json", kind="factorized", sparsity="0.75")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert REPORT_KEYS <= report.keys() and report["kind"] == "factorized" and report["sparsity"] == 0.75
    assert [r["name"] for r in report["layers"]] == ["net.0", "net.2", "net.4", "net.6"]
    assert all(LAYER_KEYS <= r.keys() for r in report["layers"])
    assert report["flops"] == sum(r["flops"] for r in report["layers"]) == report["dense_flops"]
    assert json.loads(siftc_cli("inspect", tmp_path / "out", "--json").stdout) == report


def test_existing_output_needs_force(tmp_path):
    assert convert(tmp_path, MLP).exit_code == 0
    weights = (tmp_path / "out" / "weights.pt").read_bytes()
    refused = convert(tmp_path, MLP, kind="doped")
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1
    assert re.search(r"out already exists.*--force", refused.stderr)
    assert (tmp_path / "out" / "weights.pt").read_bytes() == weights  # left as it was
    assert convert(tmp_path, MLP, "--force", kind="doped").exit_code == 0
    assert json.loads(siftc_cli("inspect", tmp_path / "out", "--json").stdout)["kind"] == "doped"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("model,patterns", [
    ("nope.py", [r"model file \S*nope\.py not found", r"pass a path like"]),
    ("none.py", [r"none\.py has no factory", r"none\.py:<factory>"]),
    ("several.py", [r"several candidate factories \(a, b\)", r"several\.py:<factory>"]),
    ("raises.py:build", [r"raises\.py:build raised ValueError: width must be even see the docs",
                         r"raises\.py:2\)", "--debug"]),
    ("untraceable.py", [r"cannot trace Net", r"`if x\.sum\(\) > 0:` decides on tensor values at untraceable\.py:11",
                        r"--leaf", r"torch\.where"]),
])
def test_bad_model_files(tmp_path, models, model, patterns):
    assert_one_line_error(convert(tmp_path, models / model), tmp_path, *patterns)


def test_a_named_factory_settles_several(tmp_path, models):
    result = convert(tmp_path, f"{models / 'several.py'}:b", "--input-shape", "2,4", "--no-keep-dense", "--json")
    assert result.exit_code == 0, result.output
    assert [r["kind"] for r in json.loads(result.stdout)["layers"]] == ["parallel", "parallel"]


@pytest.mark.parametrize("flags,patterns", [
    (["--sparsity", "1"], [r"--sparsity.*1\.0 is outside \[0, 1\)", r"--sparsity 0\.9", r"convert --help"]),
    (["--sparsity", "-0.1"], [r"-0\.1 is outside \[0, 1\)"]),
    (["--sparsity", "nan"], [r"nan is outside \[0, 1\)"]),
    (["--kind", "dense"], [r"'dense' is not one of 'wide', 'parallel', 'factorized', 'doped', 'sparse'"]),
    (["--input-shape", "1,3,32,32"], [r"input of shape \(1, 3, 32, 32\) does not fit the model at net\.0 "
                                      r"\(Linear\): mat1 and mat2", r"pass --input-shape"]),
    (["--input-shape", "1,x"], [r"--input-shape '1,x' is not a shape"]),
])
def test_bad_flags(tmp_path, flags, patterns):
    result = siftc_cli("convert", MLP, "--kind", "parallel", "--sparsity", "0.5", *flags, "-o", tmp_path / "out")
    assert_one_line_error(result, tmp_path, *patterns)


def test_debug_shows_the_traceback(tmp_path):
    result = siftc_cli("--debug", "convert", tmp_path / "nope.py", "--kind", "parallel", "--sparsity", "0.5")
    assert result.exit_code != 0 and isinstance(result.exception, siftc.SiftcError)
    assert "siftc: error" not in result.stderr


def _truncate(f: Path):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


# Ways an artifact goes bad: (what to do to a good one, what the error must say)
BREAKAGES = {
    "missing": (lambda a: shutil.rmtree(a), r"artifact \S+ not found"),
    "foreign dir": (lambda a: (a / "siftc.json").unlink(), r"not a siftc artifact \(no siftc\.json\)"),
    "garbage json": (lambda a: (a / "siftc.json").write_bytes(b"\x00\xff{{"), r"siftc\.json is corrupt"),
    "truncated json": (lambda a: _truncate(a / "siftc.json"), r"siftc\.json is corrupt"),
    "another tool": (lambda a: (a / "siftc.json").write_text('{"format": "onnx"}'),
                     r"not a siftc artifact \(format tag missing\)"),
    "no report keys": (lambda a: _edit(a, lambda m: m["report"].pop("flops")),
                       r"report without 'flops'"),
    "no checksums": (lambda a: _edit(a, lambda m: m.update(sha256=5)), r"lacks 'sha256'"),
    "truncated weights": (lambda a: _truncate(a / "weights.pt"), r"weights\.pt does not match its checksum"),
    "missing inputs": (lambda a: (a / "inputs.pt").unlink(), r"inputs\.pt is missing"),
}


def _edit(artifact: Path, change):
    meta = json.loads((artifact / "siftc.json").read_text())
    change(meta)
    (artifact / "siftc.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def good_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("good") / "mlp"
    siftc.save(siftc.convert(MLP, "parallel", 0.5), out)
    return out


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_bad_artifacts(tmp_path, good_artifact, breakage):
    artifact = tmp_path / "art"
    shutil.copytree(good_artifact, artifact)
    spoil, pattern = BREAKAGES[breakage]
    spoil(artifact)
    for args in ([], ["--json"]):
        assert_one_line_error(siftc_cli("inspect", artifact, *args), tmp_path, pattern, r"convert|pass")
    with pytest.raises(ArtifactError, match=pattern):
        siftc.load(artifact)


def installed_siftc() -> str:
    return shutil.which("siftc") or str(Path(sys.executable).parent / "siftc")


def test_installed_script(tmp_path):
    """The console script, as a user runs it: from the repository, with a relative model path."""
    ok = subprocess.run([installed_siftc(), "convert", "examples/mlp.py", "--kind", "doped", "--sparsity", "0.9",
                         "--json", "-o", tmp_path / "out"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["kind"] == "doped" and (tmp_path / "out" / "weights.pt").is_file()
    bad = subprocess.run([installed_siftc(), "inspect", tmp_path / "nothing"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and bad.stdout == "" and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("siftc: error: artifact ") and bad.stderr.count("\n") == 1


def test_help_example_names_a_real_model():
    from siftc.source import load_model

    result = siftc_cli("--help")
    specs = re.findall(r"siftc convert (\S+)", result.stdout)
    assert result.exit_code == 0 and specs
    for spec in specs:
        assert load_model(str(ROOT / spec)).source.spec.endswith(spec.rpartition("/")[2])



def test_dotted_module_spec_is_imported_not_taken_for_a_file(tmp_path):
    """torch.nn:Linear names a module and a class (not a file 'torch.nn'); that factory needs arguments."""
    assert_one_line_error(convert(tmp_path, "torch.nn:Linear", kind="wide"), tmp_path,
                          r"factory torch\.nn:Linear raised TypeError")


def _help_defaults(command: str, cls) -> set:
    """Every option of `siftc COMMAND` that shows a default and is named after a field of the dataclass
    `cls` has that field's default, and `--help` prints it. Returns the names checked."""
    from siftc.cli.options import defaults

    field_defaults = defaults(cls)
    cmd = main.get_command(None, command)
    shown = " ".join(siftc_cli(command, "--help").stdout.split())  # unwrapped
    checked = set()
    for p in cmd.params:
        if getattr(p, "show_default", None) is True and p.name in field_defaults:
            assert p.default == field_defaults[p.name], p.name
            assert f"[default: {field_defaults[p.name]}]" in shown, p.name
            checked.add(p.name)
    return checked


def test_train_help_shows_train_config_defaults():
    from siftc.train import TrainConfig

    checked = _help_defaults("train", TrainConfig)
    assert {"method", "batch_size", "lr", "optimizer", "weight_decay", "backend", "seed", "distribution",
            "update_every", "drop_fraction", "end_fraction", "checkpoint_every", "nproc"} <= checked
    assert "else torch" not in siftc_cli("train", "--help").stdout  # auto is always there: no fallback to name


def test_convert_help_shows_convert_config_defaults_and_the_registry_kinds():
    from siftc.config import ConvertConfig
    from siftc.passes import KINDS

    assert {"branch_act", "round_to", "seed"} <= _help_defaults("convert", ConvertConfig)
    kind = next(p for p in main.get_command(None, "convert").params if p.name == "kind")
    assert tuple(kind.type.choices) == tuple(KINDS)


def test_export_help_shows_the_export_functions_defaults():
    import inspect

    from siftc.export import DEFAULT_OPSET, export

    shown = " ".join(siftc_cli("export", "--help").stdout.split())
    batch = inspect.signature(export).parameters["batch"].default
    assert f"ONNX opset. [default: {DEFAULT_OPSET}]" in shown
    assert f"Static batch size of the file. [default: {batch}]" in shown


def test_export_batch_and_dynamic_batch_still_contradict(tmp_path):
    assert_one_line_error(siftc_cli("export", MLP, "-o", tmp_path / "m.onnx", "--batch", "1", "--dynamic-batch"),
                          tmp_path, r"--batch and --dynamic-batch contradict")


# A model siftc cannot deep-copy (it copies so the user's model is left untouched): today an internal
# error, and the way to reach one from the command line.
UNCOPYABLE = """import threading

import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 2)
        self.lock = threading.Lock()

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def build():
    return Net()


def example_inputs():
    return (torch.randn(2, 8),)
"""

INTERNAL = (r"siftc: internal error: TypeError: cannot pickle '_thread\.lock' object \(at siftc/export\.py:\d+\); "
            r"rerun with --debug for the traceback and please report it")


def test_an_internal_error_is_one_line_with_exit_code_1(tmp_path):
    (tmp_path / "uncopyable.py").write_text(UNCOPYABLE)
    run = [installed_siftc(), "export", tmp_path / "uncopyable.py", "-o", tmp_path / "out" / "m.onnx"]
    proc = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == "", proc.stderr
    assert re.fullmatch(INTERNAL + "\n", proc.stderr), proc.stderr
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    debug = subprocess.run([run[0], "--debug", *run[1:]], capture_output=True, text=True, timeout=120)
    assert debug.returncode == 1 and "siftc: internal error" not in debug.stderr
    assert debug.stderr.startswith("Traceback (most recent call last):") and 'siftc/export.py", line' in debug.stderr
    assert debug.stderr.rstrip().endswith("TypeError: cannot pickle '_thread.lock' object")


def test_an_internal_error_names_the_fx_node():
    import torch
    from torch import nn
    from torch.fx.passes.shape_prop import ShapeProp

    from siftc.errors import internal_error

    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    shapes = "RuntimeError: mat1 and mat2 shapes cannot be multiplied (2x3 and 4x4)"
    with pytest.raises(RuntimeError) as interpreted:  # a pass walking the graph: its `node` local
        ShapeProp(gm).propagate(torch.randn(2, 3))
    assert internal_error(interpreted.value) == f"{shapes} (at fx node _0 (call_module 0))"  # the cause, not the wrapper
    with pytest.raises(RuntimeError) as generated:  # the GraphModule's own forward: its generated line
        gm(torch.randn(2, 3))
    assert internal_error(generated.value) == f"{shapes} (at fx node _0)"
