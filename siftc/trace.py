"""Tracing: torch.fx with siftc's modules as leaves, and shape facts on node.meta.

Loading a model (`model.py[:factory]`, example inputs) is siftc.source's job; this module takes the
model and its inputs from there.
"""
import traceback
from pathlib import Path

import torch
import torch.fx
from torch import nn
from torch.fx.node import map_aggregate
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from siftc.errors import TraceError, UsageError

_TORCH = Path(torch.__file__).resolve().parent  # frames in here (or siftc) are not the user's line
_SIFTC = Path(__file__).resolve().parent


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
