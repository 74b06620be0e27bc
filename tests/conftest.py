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


def spec_path(spec: str) -> str:
    """An example spec with an absolute path, so tests run from any directory."""
    return str(ROOT / spec)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
