"""Shared test helpers: the shipped examples and small models."""
import os
import sys
from pathlib import Path

# OpenMP threads that spin while they wait make every torch op ~7x slower when another process holds a
# core (measured: a ResNet-18 convert + train step, 46 s against 7 s with one core busy). Tests check
# correctness, so they wait passively; this must be set before torch loads libgomp (subprocesses inherit it).
assert "torch" not in sys.modules, "conftest must set OMP_WAIT_POLICY before torch is imported"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

from siftc.runtime import build  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# Every shipped factory, as `siftc convert` names it.
EXAMPLE_SPECS = [
    "examples/mlp.py:mlp",
    "examples/resnet.py:resnet18_cifar",
    "examples/resnet.py:resnet18_imagenet",
    "examples/mobilenetv2.py:mobilenetv2",
    "examples/gpt.py:gpt",
    "examples/gpt.py:gpt_tied",
]


_BUILDS = pytest.StashKey[list]()


def pytest_configure(config):
    # The kernel libraries compile (minutes on a clean checkout) while the first tests run, and together
    # rather than one after the other on first use; a test that loads one first waits for its build.
    # Under pytest-xdist the controller starts them, once, and the workers wait like any loader.
    if not hasattr(config, "workerinput"):
        config.stash[_BUILDS] = build.build_in_background()


def pytest_unconfigure(config):
    build.stop_background(config.stash.get(_BUILDS, []))


def kernels_or_skip(load, what: str):
    """A module's autouse fixture that loads kernels with `load` when its first test runs (not at collection,
    so their build overlaps the tests before it) and skips the module where they cannot be built."""
    @pytest.fixture(autouse=True, scope="module")
    def kernels():
        try:
            load()
        except build.BuildError as e:  # pragma: no cover - machines without a compiler
            pytest.skip(f"{what} unavailable: {e}")
    return kernels


def spec_path(spec: str) -> str:
    """An example spec with an absolute path, so tests run from any directory."""
    return str(ROOT / spec)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
