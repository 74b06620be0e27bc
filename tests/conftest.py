"""Shared test helpers: the shipped examples and small models."""
from pathlib import Path

import pytest
import torch

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
