"""Tracing: torch.fx with siftc's modules as leaves, and shape facts on node.meta.

Plain fx where it can, concrete-shape tracing (siftc.concrete_trace) where the model decides on shapes.

Loading a model (`model.py[:factory]`, example inputs) is siftc.source's job; this module takes the
model and its inputs from there.
"""
import fnmatch
import inspect
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from siftc import flops
from siftc.concrete_trace import (DataDependent, Guards, add_input_guard, concrete_trace, live_training_flag,
                                  restore_training)
from siftc.errors import TraceError, UsageError
from siftc.layers import layer_type
from siftc.nn.attention import SplitAttention

_TORCH = Path(torch.__file__).resolve().parent  # frames in here (or siftc) are not the user's line
_SIFTC = Path(__file__).resolve().parent


class Tracer(torch.fx.Tracer):
    """Plain fx tracer: siftc's modules and the `leaf` rule's matches stay leaves, and `self.training`
    is read through the graph (a branch on it cannot be traced plainly: the concrete tracer takes it)."""

    def __init__(self, is_leaf):
        super().__init__()
        self.is_leaf, self.flags = is_leaf, []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return self.is_leaf(m, qualname) or super().is_leaf_module(m, qualname)

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        out = super().create_args_for_root(root_fn, is_module, concrete_args)
        self.flags = live_training_flag(self)
        return out


@dataclass
class Traced:
    """A traced model: the module-level graph (with `tensor_meta` on every node), its example inputs in
    placeholder order, and what the trace assumed about inputs (None for a plain fx trace)."""
    gm: torch.fx.GraphModule
    inputs: tuple
    guards: Guards | None = None
    how: str = "fx"           # "fx", "concrete" (shape decisions taken on the example) or "given"


def leaf_rule(patterns: tuple[str, ...] = ()):
    """is_leaf(module, qualname): siftc's own layers, the layer table's weight layers (HF's Conv1D),
    and modules whose qualified name or class name matches one of `patterns` (fnmatch). SplitAttention
    is traced through (its q/k/v/out Linear layers are the weight layers), unless a pattern names it."""
    def is_leaf(m: nn.Module, qualname: str) -> bool:
        own = m.__module__.startswith("siftc.nn") and not isinstance(m, SplitAttention)
        return own or layer_type(m) is not None or matches(patterns, m, qualname)
    return is_leaf


def matches(patterns: tuple[str, ...], m: nn.Module, qualname: str) -> bool:
    """True if `m`'s qualified name or class name matches one of the `--leaf` patterns (fnmatch)."""
    return any(fnmatch.fnmatchcase(qualname, p) or fnmatch.fnmatchcase(type(m).__name__, p) for p in patterns)


def kept_whole(model: nn.Module, patterns: tuple[str, ...] = ()):
    """keep(name, module): True for a module tracing keeps whole, one it matches a `--leaf` pattern or
    sits inside a leaf (a torch.nn layer such as nn.TransformerEncoderLayer runs as one module). For
    `split_attention`: an attention the trace never enters stays as its parent expects it."""
    tracer, containers = Tracer(leaf_rule(patterns)), (nn.ModuleList, nn.ModuleDict)  # never called
    inside = tuple(f"{n}." for n, m in model.named_modules()
                   if n and not isinstance(m, containers) and tracer.is_leaf_module(m, n))
    return lambda name, m: matches(patterns, m, name) or name.startswith(inside)


def trace(model: nn.Module, example_inputs, leaves: tuple[str, ...] = ()) -> Traced:
    """Trace `model` on `example_inputs` (a tuple of positional inputs or a dict of keyword inputs).

    Plain fx first, when the inputs give every forward parameter by position; else, or when plain fx
    meets a Python decision it cannot take, the concrete-shape tracer (`siftc.concrete_trace`), which
    takes shape decisions on the example and guards them. A GraphModule is used as given."""
    for p in leaves:
        if not any(matches((p,), m, n) for n, m in model.named_modules()):
            raise UsageError(f"--leaf {p!r} matches no module of {type(model).__name__}; name a module path "
                             f"(e.g. {next(iter(n for n, _ in model.named_children()), 'encoder')}.*) or a class name")
    inputs = bind_inputs(model, example_inputs)
    if isinstance(model, torch.fx.GraphModule):
        traced = Traced(model, _in_order(model, inputs), None, "given")
    else:
        traced = _plain(model, inputs, leaf_rule(leaves)) or _concrete(model, inputs, leaf_rule(leaves))
    propagate_shapes(traced.gm, traced.inputs)
    return traced


def bind_inputs(model: nn.Module, example) -> dict:
    """name -> value of each example input, by the forward's signature."""
    if isinstance(example, dict):
        return dict(example)
    example = tuple(example) if isinstance(example, (tuple, list)) else (example,)
    sig = inspect.signature(model.forward)
    try:
        bound = sig.bind_partial(*example)
    except TypeError:
        names = [n for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        raise UsageError(f"{len(example)} example inputs given but {type(model).__name__}.forward takes "
                         f"{len(names)} ({', '.join(names)}); pass one input per forward argument") from None
    out = {}
    for name, value in bound.arguments.items():
        if sig.parameters[name].kind == inspect.Parameter.VAR_POSITIONAL:
            raise UsageError(f"{type(model).__name__}.forward takes *{name}: give the example inputs as a "
                             f"dict of keyword arguments, e.g. {{'input_ids': ...}}")
        out[name] = value
    return out


def _in_order(gm: torch.fx.GraphModule, inputs: dict) -> tuple:
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    missing = [n for n in names if n not in inputs]
    if missing:
        raise UsageError(f"no example input for {', '.join(missing)}; the graph takes {', '.join(names)}")
    return tuple(inputs[n] for n in names)


def _plain(model, inputs: dict, is_leaf) -> Traced | None:
    """Plain fx, if the inputs give every forward parameter as a tensor; None where it cannot trace."""
    params = inspect.signature(model.forward).parameters
    if list(params) != list(inputs) or not all(isinstance(v, torch.Tensor) for v in inputs.values()):
        return None
    tracer = Tracer(is_leaf)
    try:
        graph = tracer.trace(model)
    except Exception:
        return None
    finally:
        restore_training(tracer.flags)
    gm = torch.fx.GraphModule(model, graph, type(model).__name__)
    return Traced(gm, _in_order(gm, inputs))


def _concrete(model, inputs: dict, is_leaf) -> Traced:
    try:
        gm, guards = concrete_trace(model, inputs, is_leaf)
    except DataDependent as e:
        raise TraceError(f"cannot trace {type(model).__name__}: {e.what} at {e.where}, which no trace can follow; keep "
                         f"the module that does it opaque with --leaf {e.module or 'MODULE_PATH'!r} "
                         f"(siftc leaves it dense), or write it with tensor ops (torch.where)") from e
    except UsageError:
        raise
    except Exception as e:
        raise TraceError(f"cannot trace {type(model).__name__}: {_trace_hint(e)}") from e
    if any(s.kind != "training" for s in guards.specializations):
        add_input_guard(gm, guards)
    return Traced(gm, _in_order(gm, inputs), guards, "concrete")


def _trace_hint(e: Exception) -> str:
    frames = [f for f in traceback.extract_tb(e.__traceback__) if _users(f.filename)]
    where = f" at {frames[-1].filename}:{frames[-1].lineno} ({frames[-1].line})" if frames else ""
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return (f"{msg}{where}; keep the module that does it opaque with --leaf MODULE_PATH, or write it "
            f"with tensor ops (torch.where)")


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

    # Modules whose eval-mode output is a tensor like their input: on fake tensors, their value without
    # dispatch (fake BatchNorm decomposes op by op, ~20 ms a call: most of MobileNetV2's shape run).
    LIKE_INPUT = (nn.modules.batchnorm._BatchNorm, nn.Identity, nn.Dropout, nn.ReLU, nn.ReLU6)

    def call_module(self, target, args, kwargs):
        m = self.fetch_attr(target)
        if isinstance(m, self.LIKE_INPUT) and not m.training and len(args) == 1 and not kwargs and \
                isinstance(args[0], FakeTensor) and not (m._forward_hooks or m._forward_pre_hooks):
            x = args[0]
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and (x.dim() < 2 or x.shape[1] != m.num_features):
                return super().call_module(target, args, kwargs)  # let torch say what is wrong
            return torch.empty_like(x)
        return super().call_module(target, args, kwargs)

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
        n.meta["type"] = torch.Tensor if isinstance(result, FakeTensor) else type(result)
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
    try:  # on fake tensors first: the shapes and the FLOP count, without computing the model
        with flops.fake_forward(), FakeTensorMode(allow_non_fake_inputs=True) as fake:
            record_shapes(gm, [fake.from_tensor(t) for t in example_inputs])
        return
    except Exception:  # noqa: BLE001  a leaf deciding on values, an op without a fake kernel: run it for real
        pass
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
