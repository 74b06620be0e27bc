"""The shipped examples/*.py: every factory traces with torch.fx, the traced graph computes what the eager
model computes, outputs have the promised shape, every parameter gets a gradient, and the `siftc convert`
commands in each docstring name a spec siftc can load."""
import importlib.util
import re
from pathlib import Path

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# (file, factory, output shape on its example inputs)
CASES = [
    ("mlp.py", "mlp", (1, 10)),
    ("resnet.py", "resnet18_cifar", (1, 10)),
    ("resnet.py", "resnet18_imagenet", (1, 1000)),
    ("mobilenetv2.py", "mobilenetv2", (1, 10)),
    ("gpt.py", "gpt", (1, 64, 256)),
    ("gpt.py", "gpt_tied", (1, 64, 256)),
]
IDS = [factory for _, factory, _ in CASES]
FILES = sorted({filename for filename, _, _ in CASES})


def load_example(filename: str):
    """Import examples/<filename> by path, as `siftc convert examples/<filename>` does."""
    path = EXAMPLES / filename
    spec = importlib.util.spec_from_file_location(f"siftc_example_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(filename: str, factory: str) -> tuple[nn.Module, tuple]:
    """A fresh model and its example inputs (`example_inputs_<factory>` wins over `example_inputs`)."""
    module = load_example(filename)
    torch.manual_seed(0)
    model = getattr(module, factory)()
    inputs = (getattr(module, f"example_inputs_{factory}", None) or module.example_inputs)()
    return model, inputs


def loss_of(out: torch.Tensor, inputs: tuple) -> torch.Tensor:
    """Cross-entropy: the input bytes as targets for a language model (B, T, V), class 0 for a classifier."""
    if out.dim() == 3:
        return F.cross_entropy(out.flatten(0, 1), inputs[0].flatten())
    return F.cross_entropy(out, torch.zeros(out.shape[0], dtype=torch.long))


@pytest.mark.parametrize("filename,factory,out_shape", CASES, ids=IDS)
def test_traced_matches_eager(filename, factory, out_shape):
    model, inputs = build(filename, factory)
    model.eval()  # BatchNorm on running stats, so eager and traced see the same function
    gm = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        expected = model(*inputs)
        got = gm(*inputs)
    assert expected.shape == out_shape
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("filename,factory,out_shape", CASES, ids=IDS)
def test_every_linear_and_conv_is_a_graph_node(filename, factory, out_shape):
    """The layers siftc rewrites must each show up as a call_module node, not hidden inside a leaf."""
    model, _ = build(filename, factory)
    gm = torch.fx.symbolic_trace(model)
    layers = {name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert layers
    assert layers <= called


@pytest.mark.parametrize("traced", [False, True], ids=["eager", "traced"])
@pytest.mark.parametrize("filename,factory,out_shape", CASES, ids=IDS)
def test_backward_reaches_every_parameter(filename, factory, out_shape, traced):
    model, inputs = build(filename, factory)
    model.train()
    net = torch.fx.symbolic_trace(model) if traced else model
    out = net(*inputs)
    assert out.shape == out_shape
    loss_of(out, inputs).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, f"{factory}: {name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{factory}: {name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{factory}: {name} has an all-zero gradient"


@pytest.mark.parametrize("filename,factory,out_shape", CASES, ids=IDS)
def test_factory_returns_a_fresh_model(filename, factory, out_shape):
    module = load_example(filename)
    a, b = getattr(module, factory)(), getattr(module, factory)()
    shared = {p.data_ptr() for p in a.parameters()} & {p.data_ptr() for p in b.parameters()}
    assert not shared


@pytest.mark.parametrize("factory,tied", [("gpt", False), ("gpt_tied", True)])
def test_gpt_head_tying_survives_tracing(factory, tied):
    model, _ = build("gpt.py", factory)
    gm = torch.fx.symbolic_trace(model)
    for m in (model, gm):
        assert (m.lm_head.weight is m.wte.weight) == tied


def test_traced_gpt_takes_shorter_sequences():
    """Positions come from idx.size(), not the config, so one traced graph serves any T <= block_size."""
    model, _ = build("gpt.py", "gpt")
    model.eval()
    gm = torch.fx.symbolic_trace(model)
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(gm(idx), model(idx))
    assert gm(idx).shape == (2, 16, 256)


@pytest.mark.parametrize("filename", FILES)
def test_every_file_has_example_inputs(filename):
    inputs = load_example(filename).example_inputs()
    assert isinstance(inputs, tuple) and inputs and all(isinstance(t, torch.Tensor) for t in inputs)
    assert all(t.shape[0] == 1 for t in inputs)


@pytest.mark.parametrize("filename", FILES)
def test_docstring_commands_load(filename):
    """Each `siftc convert <spec> --kind <kind>` in a docstring names a spec siftc's loader resolves, with
    inputs that fit, and a kind siftc implements."""
    from siftc.passes import KINDS
    from siftc.source import load_model

    doc = load_example(filename).__doc__
    assert "siftc inspect " in doc
    commands = re.findall(r"siftc convert (\S+) --kind (\w+)", doc)
    assert commands
    for spec, kind in commands:
        assert kind in KINDS
        assert spec.startswith(f"examples/{filename}")
        loaded = load_model(str(EXAMPLES.parent / spec))
        with torch.no_grad():
            out = loaded.model.eval()(*loaded.example_inputs)
        assert out.shape[0] == 1
