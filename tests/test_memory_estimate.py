"""A conversion too large for the machine is refused up front with the numbers (issue 17): one
`siftc: error:` line, exit 2, nothing written, for every kind; the estimate follows what is built."""
import pytest
import torch

import test_bad_inputs as bad
from siftc import memory
from siftc.config import ConvertConfig
from siftc.convert import convert_module
from siftc.errors import UsageError
from siftc.memory import ENV, available, estimate
from siftc.trace import trace
from test_bad_inputs import MLP, assert_one_line, invoke, tree

KINDS = ("wide", "parallel", "factorized", "doped")

# Cheap to build (a 4096x4096 hidden Linear, 64 MiB); wide at 0.9999 (k^2 = 10^4) makes it a 409,600-wide
# square layer.
BIG = '''
import torch
from torch import nn

def build():
    return nn.Sequential(nn.Linear(16, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 4))

def example_inputs():
    return (torch.randn(1, 16),)
'''


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    (tmp_path / "mlp.py").write_text(MLP)
    (tmp_path / "big.py").write_text(BIG)
    return tmp_path


def refused(cwd, argv, needle: str, proc: bool) -> str:
    """Run `siftc argv` in cwd: exit 2, one line containing `needle`, the directory as it was."""
    before = tree(cwd)
    code, stdout, stderr = invoke(argv, cwd, proc)
    assert_one_line(code, stdout, stderr, needle)
    assert tree(cwd) == before, "a refused conversion wrote something"
    return stderr


def test_over_the_limit_is_refused_by_a_subprocess_in_one_line(cwd, monkeypatch):
    monkeypatch.setitem(bad.ENV, ENV, "1K")
    line = refused(cwd, ["convert", "mlp.py", "-k", "parallel", "-s", "0.5", "-o", "out"],
                   "of memory for its new layers (the largest layer: ", proc=True)
    assert "more than the 1.0 KiB available (SIFTC_MEMORY_LIMIT=1K)" in line
    assert "lower --sparsity (fewer branches), or convert a smaller model" in line


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_is_estimated_and_refused(cwd, monkeypatch, kind):
    monkeypatch.setenv(ENV, "1K")
    refused(cwd, ["convert", "mlp.py", "-k", kind, "-s", "0.5", "-o", "out"], f"{kind} at sparsity 0.5 needs",
            proc=False)
    monkeypatch.setenv(ENV, "1G")  # under the limit: converts as before
    code, _, stderr = invoke(["convert", "mlp.py", "-k", kind, "-s", "0.5", "-o", "out"], cwd, False)
    assert code == 0, stderr


def test_too_big_to_address_is_refused_in_one_line(cwd):
    """Wide at 0.9999 widens the 4096x4096 layer 100x: 1.7e11 dense entries, beyond the int32 positions
    of a sparse layer. Its values-only state would fit (16.8M non-zeros), so the estimate passes it; the
    layer is refused by name when it is built, in one line, and nothing is written."""
    gm = trace(_big(), (torch.randn(1, 16),), ()).gm
    need = estimate(gm, ConvertConfig("wide", 0.9999))
    assert need.largest == "2" and need.total < 4 << 30  # nnz-sized: a few hundred MB, not 1.2 TiB
    refused(cwd, ["convert", "big.py", "-k", "wide", "-s", "0.9999", "-o", "out"],
            "dense entries, more than its int32 positions can address (2^31); lower the sparsity", proc=True)


def _big():
    code = {}
    exec(BIG, code)
    return code["build"]()


def hidden_256():
    return torch.nn.Sequential(torch.nn.Linear(16, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                               torch.nn.ReLU(), torch.nn.Linear(256, 4))


def new_bytes(dense, gm) -> int:
    """Bytes of the converted model's tensors that the dense one has not (by name and shape): the new
    layers."""
    old = {k: v.shape for k, v in dense.state_dict().items()}
    return sum(v.numel() * v.element_size() for k, v in gm.state_dict().items() if old.get(k) != v.shape)


@pytest.mark.parametrize("kind,within", [("parallel", 0.05), ("factorized", 0.05), ("doped", 0.05),
                                         ("wide", 0.25)])
def test_the_estimate_is_what_the_new_layers_hold(kind, within):
    """Layer-wise kinds: exact up to biases and norms; wide: before its widths are known, close."""
    dense, x, cfg = hidden_256(), (torch.randn(1, 16),), ConvertConfig(kind, 0.9)
    need = estimate(trace(dense, x, ()).gm, cfg)
    gm = convert_module(dense, x, cfg)
    held = new_bytes(dense, gm)
    assert need.largest == "2" and need.building > 0
    assert abs(need.held - held) <= within * held, (need.held, held)


def test_available_memory_reads_meminfo_or_the_override(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24683584 kB\nMemFree: 1 kB\nMemAvailable:   2048 kB\n")
    monkeypatch.setattr(memory, "MEMINFO", str(meminfo))
    assert available() == (2 << 20, f"MemAvailable in {meminfo}; {ENV} overrides it")
    monkeypatch.setattr(memory, "MEMINFO", str(tmp_path / "none"))  # not Linux: no check
    assert available() is None
    memory.check_fits(None, ConvertConfig("wide", 0.9999))  # nothing to compare with: it runs
    for text, n in (("4096", 4096), ("1.5G", 3 << 29), ("2 MiB", 2 << 20), ("8t", 8 << 40)):
        monkeypatch.setenv(ENV, text)
        assert available() == (n, f"{ENV}={text}")
    monkeypatch.setenv(ENV, "lots")
    with pytest.raises(UsageError, match=f"{ENV}='lots' is not an amount of memory; .* e.g. {ENV}=8G"):
        available()
