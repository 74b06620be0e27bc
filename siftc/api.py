"""The library surface: what the CLI calls and what users import.

    >>> import siftc
    >>> sparse = siftc.convert(model, kind="parallel", sparsity=0.9, example_inputs=(torch.randn(1, 64),))
    >>> siftc.save(sparse, "out/mlp-par90")
    >>> again = siftc.load("out/mlp-par90", model=MLP())   # model= only for in-memory conversions
"""
from torch import nn

from siftc import artifact
from siftc.config import ConvertConfig
from siftc.convert import convert_module
from siftc.errors import UsageError
from siftc.source import load_model


def convert(model: nn.Module | str, kind: str, sparsity: float, example_inputs: tuple | None = None, *,
            keep_dense=None, branch_act: str = "relu", seed: int = 0, round_to: int = 1,
            strict: bool = False, widen_heads: bool = False, leaf=(), input_shape=None):
    """Return a Sparse-IFT copy of `model` (an nn.Module, or a "model.py[:factory]" spec) with the
    dense model's weight FLOPs. `example_inputs`: a tensor, a tuple of positional inputs, or a dict of
    keyword inputs (`{"input_ids": ids}` for a HuggingFace model). `keep_dense`: None keeps the first
    and last weight layer dense (the paper), a list of fnmatch patterns keeps those, [] keeps none.
    `leaf`: fnmatch patterns of modules to keep opaque (a module that branches on tensor values)."""
    cfg = ConvertConfig(kind=kind, sparsity=sparsity, keep_dense=keep_dense, branch_act=branch_act,
                        seed=seed, round_to=round_to, strict=strict, widen_heads=widen_heads, leaf=leaf)
    source = None
    if isinstance(model, str):
        loaded = load_model(model, input_shape)
        model, source = loaded.model, loaded.source
        example_inputs = example_inputs if example_inputs is not None else loaded.example_inputs
    if not isinstance(model, nn.Module):
        raise UsageError(f"convert takes an nn.Module or a 'model.py[:factory]' string, not {type(model).__name__}")
    if example_inputs is None:
        raise UsageError("example_inputs is required to trace an in-memory model, e.g. (torch.randn(1, 64),)")
    if not isinstance(example_inputs, (tuple, list, dict)):
        example_inputs = (example_inputs,)
    return convert_module(model, example_inputs, cfg, source)


def save(model, out, force: bool = False):
    """Write a converted model to the artifact directory `out` (atomically)."""
    return artifact.save(model, out, force=force)


def load(path, model: nn.Module | None = None):
    """Rebuild a converted model from an artifact directory (no pickled code is executed)."""
    return artifact.load(path, model=model)
