"""The library surface: what the CLI calls and what users import.

    >>> import siftc
    >>> sparse = siftc.convert(model, kind="parallel", sparsity=0.9, example_inputs=(torch.randn(1, 64),))
    >>> siftc.save(sparse, "out/mlp-par90")
    >>> again = siftc.load("out/mlp-par90", model=MLP())   # model= only for in-memory conversions
    >>> siftc.export("out/mlp-par90", "mlp.onnx", batch=64)
    >>> dense = siftc.densify(siftc.load("runs/mlp/model"))   # every weight trainable, shapes kept
    >>> result = siftc.bench(["mlp.onnx"], engines=("deepsparse", "onnxruntime"), batches=(64,))
"""
from torch import nn

from siftc import artifact
from siftc import densify as densifier  # imported here, so `siftc.densify` ends up the function (see __init__)
from siftc import export as exporter  # imported here, so `siftc.export` ends up the function (see __init__)
from siftc.bench import runner
from siftc.bench.engine import ENGINES
from siftc.config import ConvertConfig
from siftc.convert import convert_module
from siftc.errors import UsageError
from siftc.source import check_model_args, load_model


def convert(model: nn.Module | str, kind: str, sparsity: float | None, example_inputs: tuple | None = None, *,
            keep_dense=None, branch_act: str = "relu", seed: int = 0, round_to: int = 1,
            strict: bool = False, widen_heads: bool = False, leaf=(), input_shape=None, weights=None,
            model_args: dict | None = None, mask_from: str = "magnitude", distribution: str = "uniform",
            pattern: str = "unstructured"):
    """Return a Sparse-IFT copy of `model` (an nn.Module, or a "model.py[:factory]" spec) with the
    dense model's weight FLOPs, or with kind="sparse" a same-shape sparse copy (not iso-FLOP).
    `example_inputs`: a tensor, a tuple of positional inputs, or a dict of keyword inputs
    (`{"input_ids": ids}` for a HuggingFace model). `keep_dense`: None keeps the first and last weight
    layer dense (the paper), a list of fnmatch patterns keeps those, [] keeps none. `leaf`: fnmatch
    patterns of modules to keep opaque (a module that branches on tensor values). `weights`: a state
    dict file (.pt, .safetensors) loaded into the dense model first; `model_args`: keyword arguments
    for the spec's factory. kind="sparse": `mask_from` "magnitude" (prune the weights), "zeros" (their
    own zeros; `sparsity` None takes it from them, a number is checked) or "random"; `distribution`
    "uniform" or "erk". `pattern`: the sparse layers' sparsity pattern ("block:4x1", "nm:2:4", ...;
    siftc.sparse.patterns), fitted per layer and reported (N:M: solved at sparsity 1 - N/M)."""
    cfg = ConvertConfig(kind=kind, sparsity=sparsity, keep_dense=keep_dense, branch_act=branch_act,
                        seed=seed, round_to=round_to, strict=strict, widen_heads=widen_heads, leaf=leaf,
                        mask_from=mask_from, distribution=distribution, pattern=pattern)
    source = None
    if isinstance(model, str):
        check_model_args(model_args or {})
        loaded = load_model(model, input_shape, model_args=model_args)
        model, source = loaded.model, loaded.source
        example_inputs = example_inputs if example_inputs is not None else loaded.example_inputs
    elif model_args:
        raise UsageError("model_args are passed to a 'model.py:factory' spec's factory; for an nn.Module, "
                         "build it with those arguments yourself")
    if not isinstance(model, nn.Module):
        raise UsageError(f"convert takes an nn.Module or a 'model.py[:factory]' string, not {type(model).__name__}")
    if example_inputs is None:
        raise UsageError("example_inputs is required to trace an in-memory model, e.g. (torch.randn(1, 64),)")
    if not isinstance(example_inputs, (tuple, list, dict)):
        example_inputs = (example_inputs,)
    return convert_module(model, example_inputs, cfg, source, weights)


def save(model, out, force: bool = False):
    """Write a converted model to the artifact directory `out` (atomically)."""
    return artifact.save(model, out, force=force)


def load(path, model: nn.Module | None = None, trust_source: bool | None = None):
    """Rebuild a converted model from an artifact directory, running no code but siftc's and torch's.
    `trust_source=True` lets an artifact that needs its model file (a --leaf user module, format v2)
    import and run that file."""
    return artifact.load(path, model=model, trust_source=trust_source)


def densify(model: nn.Module) -> nn.Module:
    """A copy of a converted (or sparse-trained) model whose every weight trains: each sparse layer
    becomes the dense layer of its shape, the non-zeros keep their values, the rest start at zero, and
    the report's FLOPs become the dense-shaped ones. Save it with `siftc.save`."""
    return densifier.densify(model)


def export(source, out, *, batch: int | None = 1, dynamic_batch: bool = False, opset: int | None = None,
           force: bool = False):
    """Write `source` (an artifact directory, a "model.py[:factory]" spec or a converted model) as ONNX
    at `out` with its sidecar `out.json`, after checking it against PyTorch. Returns the Exported
    record (path, sidecar, meta). The batch is static (`batch`) unless `dynamic_batch`."""
    opset = exporter.DEFAULT_OPSET if opset is None else opset
    return exporter.export(source, out, batch=batch, dynamic_batch=dynamic_batch, opset=opset, force=force)


def bench(paths, *, engines=None, batches=(1,), threads: int | None = None, time_s: float | None = None,
          iterations: int | None = None, turns: int = 5, warmup: int = 5, seed: int = 0,
          trust_source: bool | None = None) -> dict:
    """Measure ONNX files (a path or a list) on each engine ("deepsparse", "onnxruntime", "torch"; all
    by default) at each batch size, in interleaved turns. Returns the result `siftc bench --json`
    writes: per (file, engine, batch) latency percentiles and items/s, plus the machine.
    `trust_source=True` lets the torch engine import a model file a file's sidecar names (as
    `siftc bench --trust-source`); without it such a row becomes a note (None: as the enclosing
    `siftc.artifact.trusting()` says, else not trusted)."""
    paths = [paths] if isinstance(paths, (str, bytes)) or hasattr(paths, "__fspath__") else list(paths)
    cfg = runner.BenchConfig(engines=tuple(engines or ENGINES), batches=tuple(batches),
                             threads=runner.default_threads() if threads is None else threads, warmup=warmup,
                             time_s=time_s, iterations=iterations, turns=turns, seed=seed)
    if trust_source is None:
        return runner.bench(paths, cfg)
    with artifact.trusting(trust_source):
        return runner.bench(paths, cfg)
