"""Front end: load `model.py[:factory]`, make example inputs, trace with torch.fx, record shapes.

Naming follows uvicorn: `path/to/model.py:build` or `pkg.module:build`, where `build` is a callable
returning an nn.Module (or an nn.Module attribute). Without `:name` siftc takes the one obvious
factory, or says what it found. Example inputs come from `example_inputs_<factory>()` or
`example_inputs()` in the same file, or from an explicit shape (`--input-shape 1,3,224,224`).
Importing a model file runs its code: that is the contract of naming one.
"""
import hashlib
import importlib
import importlib.util
import inspect
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx
from torch import nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from siftc.errors import ModelLoadError, TraceError, UsageError

_TORCH = Path(torch.__file__).resolve().parent  # frames in here (or siftc) are not the user's line
_SIFTC = Path(__file__).resolve().parent
FACTORY_NAMES = ("build", "model", "make_model", "create_model", "get_model")


@dataclass
class Source:
    """Where a model came from, so an artifact can rebuild it."""
    spec: str                  # as the user wrote it, with the factory resolved: "examples/mlp.py:mlp"
    path: str | None = None    # absolute path of the file, when it is one
    sha256: str | None = None  # of that file, to notice edits after conversion

    def to_json(self):
        return {"spec": self.spec, "path": self.path, "sha256": self.sha256}


@dataclass
class LoadedModel:
    model: nn.Module
    example_inputs: tuple
    source: Source


def _import(target: str):
    """Import a .py path or a dotted module name; returns (module, file path or None)."""
    dotted = all(part.isidentifier() for part in target.split("."))  # torch.nn, pkg.models
    if target.endswith(".py") or "/" in target or not dotted or Path(target).is_file():
        path = Path(target)
        if not path.is_file():
            raise ModelLoadError(f"model file {target} not found; pass a path like examples/mlp.py[:factory]")
        name = "siftc_user_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses and pickling look modules up here
        sys.path.insert(0, str(path.resolve().parent))
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(name, None)
            raise ModelLoadError(f"importing {target} failed: {type(e).__name__}: {e} "
                                 f"({_where(e, path)}); fix the file or run with --debug") from e
        finally:
            sys.path.remove(str(path.resolve().parent))
        return module, path.resolve()
    try:
        return importlib.import_module(target), None
    except Exception as e:
        raise ModelLoadError(f"cannot import module {target!r}: {type(e).__name__}: {e}; "
                             f"pass a file path (model.py) or an importable module") from e


def _where(exc: BaseException, path: Path | None = None) -> str:
    """file:line of the innermost frame in `path` (or the innermost frame) of an exception."""
    frames = traceback.extract_tb(exc.__traceback__)
    if path is not None:
        frames = [f for f in frames if Path(f.filename).resolve() == path.resolve()] or frames
    if not frames:
        return "unknown location"
    f = frames[-1]
    return f"{f.filename}:{f.lineno}"


def _candidates(module) -> list[str]:
    """Obvious factories: a conventional name, else nn.Module instances, else zero-arg functions
    defined in the file itself."""
    names = [n for n in FACTORY_NAMES if callable(getattr(module, n, None))]
    if names:
        return names[:1]
    instances = [n for n, v in vars(module).items() if isinstance(v, nn.Module) and not n.startswith("_")]
    if instances:
        return instances
    funcs = []
    for n, v in vars(module).items():
        if n.startswith("_") or n.startswith("example_inputs") or not inspect.isfunction(v):
            continue
        if v.__module__ != module.__name__:
            continue
        params = inspect.signature(v).parameters.values()
        if all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
            funcs.append(n)
    return funcs


def load_model(spec: str, input_shape: tuple[int, ...] | None = None, inputs: bool = True) -> LoadedModel:
    """Load `spec` ("model.py[:factory]" or "pkg.module:factory") into a model and example inputs
    (none with inputs=False: an artifact brings its own)."""
    target, _, name = spec.partition(":") if not spec.startswith(":") else (spec, "", "")
    module, path = _import(target)
    if not name:
        found = _candidates(module)
        if len(found) != 1:
            why = f"several candidate factories ({', '.join(found)})" if found else "no factory"
            raise ModelLoadError(f"{target} has {why}; name one as {target}:<factory>, "
                                 f"a function returning an nn.Module")
        name = found[0]
    if not hasattr(module, name):
        raise ModelLoadError(f"{target} has no attribute {name!r}; available: "
                             f"{', '.join(_candidates(module)) or 'no obvious factory'}")
    obj = getattr(module, name)
    if isinstance(obj, nn.Module):
        model = obj
    elif callable(obj):
        try:
            model = obj()
        except Exception as e:
            raise ModelLoadError(f"factory {target}:{name} raised {type(e).__name__}: {e} "
                                 f"({_where(e, path)}); fix it or run with --debug") from e
    else:
        raise ModelLoadError(f"{target}:{name} is a {type(obj).__name__}, not a factory; "
                             f"name a function returning an nn.Module")
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"factory {target}:{name} returned a {type(model).__name__}, not an nn.Module")
    example = _example_inputs(module, name, target, input_shape) if inputs else ()
    sha = hashlib.sha256(path.read_bytes()).hexdigest() if path else None
    return LoadedModel(model, example, Source(f"{target}:{name}", str(path) if path else None, sha))


def _example_inputs(module, factory: str, target: str, input_shape) -> tuple:
    if input_shape is not None:
        return (torch.randn(*input_shape),)
    for fn_name in (f"example_inputs_{factory}", "example_inputs"):
        fn = getattr(module, fn_name, None)
        if callable(fn):
            try:
                out = fn()
            except Exception as e:
                raise ModelLoadError(f"{target}:{fn_name}() raised {type(e).__name__}: {e}") from e
            out = out if isinstance(out, tuple) else (out,)
            if not all(isinstance(t, torch.Tensor) for t in out):
                raise ModelLoadError(f"{target}:{fn_name}() must return a tensor or a tuple of tensors")
            return out
    raise UsageError(f"{target} defines no example_inputs(); add one to the file or pass "
                     f"--input-shape, e.g. --input-shape 1,3,32,32")


def parse_shape(text: str) -> tuple[int, ...]:
    """'1,3,224,224' -> (1, 3, 224, 224)."""
    try:
        shape = tuple(int(t) for t in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise UsageError(f"--input-shape {text!r} is not a shape; write positive integers like 1,3,224,224")
    return shape


class Tracer(torch.fx.Tracer):
    """fx tracer that keeps siftc's own modules as leaves (their forward dispatches to a runtime)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return m.__module__.startswith("siftc.nn") or super().is_leaf_module(m, qualname)


def trace(model: nn.Module, example_inputs: tuple) -> torch.fx.GraphModule:
    """Symbolically trace `model` and run ShapeProp, so every node carries `tensor_meta`."""
    try:
        graph = Tracer().trace(model)
    except Exception as e:
        raise TraceError(f"torch.fx cannot trace {type(model).__name__}: {_trace_hint(e)}") from e
    gm = torch.fx.GraphModule(model, graph, type(model).__name__)
    propagate_shapes(gm, example_inputs)
    return gm


def _trace_hint(e: Exception) -> str:
    frames = [f for f in traceback.extract_tb(e.__traceback__) if _users(f.filename)]
    where = f" at {frames[-1].filename}:{frames[-1].lineno} ({frames[-1].line})" if frames else ""
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return (f"{msg}{where}; fx needs code without data-dependent Python control flow: use tensor ops "
            f"(torch.where), or wrap the function with torch.fx.wrap / make the module a leaf")


def _users(filename: str) -> bool:
    """A frame of the user's code: not torch's, not siftc's, not generated ("<eval_with_key>")."""
    path = Path(filename).resolve()
    return not filename.startswith("<") and not path.is_relative_to(_TORCH) and not path.is_relative_to(_SIFTC)


def node_shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    """A node's recorded tensor shape (None for non-tensors and tuples of tensors)."""
    tm = node.meta.get("tensor_meta")
    return tuple(tm.shape) if hasattr(tm, "shape") else None


class NodeFailed(Exception):
    """A node raised while its shape was being recorded; `error` is what it raised."""

    def __init__(self, node: torch.fx.Node, error: Exception):
        super().__init__(node.name)
        self.node, self.error = node, error

    @property
    def first_line(self) -> str:
        """The error's first line (its type name when it has no message), for a one-line report."""
        return (str(self.error).splitlines() or [type(self.error).__name__])[0]


class ShapeRecorder(torch.fx.Interpreter):
    """torch.fx's ShapeProp (every node gets `tensor_meta` and `type`), except that a failing node is
    raised as itself instead of printing a traceback to stderr: the CLI owes the user one line."""

    def run_node(self, n: torch.fx.Node):
        try:
            result = super().run_node(n)
        except Exception as e:
            raise NodeFailed(n, e) from e
        found = False

        def record(obj):
            nonlocal found
            if not isinstance(obj, torch.Tensor):
                return obj
            found = True
            return _extract_tensor_metadata(obj)

        meta = map_aggregate(result, record)
        if found:
            n.meta["tensor_meta"] = meta
        n.meta["type"] = type(result)
        return result


def record_shapes(gm: torch.fx.GraphModule, inputs) -> None:
    """Run `gm` once (eval mode, no grad; its training flag restored) so every node gets `tensor_meta`.
    A failing node raises NodeFailed."""
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            ShapeRecorder(gm).run(*inputs)
    finally:
        gm.train(was_training)


def propagate_shapes(gm: torch.fx.GraphModule, example_inputs: tuple):
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(example_inputs) > len(placeholders):
        raise UsageError(f"{len(example_inputs)} example inputs given but the model takes "
                         f"{len(placeholders)}; pass one input per forward argument")
    try:
        record_shapes(gm, example_inputs)
    except NodeFailed as e:
        shapes = ", ".join(str(tuple(t.shape)) for t in example_inputs)
        raise UsageError(f"example input of shape {shapes} does not fit the model at {_describe(gm, e.node)}: "
                         f"{e.first_line}; pass --input-shape matching the model's input") from e.error


def _describe(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
    """'net.0 (Linear)', 'node add_1 (add)': where a forward failed."""
    if node.op == "call_module":
        return f"{node.target} ({type(gm.get_submodule(node.target)).__name__})"
    name = getattr(node.target, "__name__", str(node.target))
    return f"node {node.name} ({name})"
