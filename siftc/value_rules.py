"""Values of the costly calls of a concrete trace, by rule instead of fake-tensor dispatch.

The concrete tracer (siftc.concrete_trace) needs a node's value only for what Python can read off it:
shape, dtype, device, strides, requires_grad. Dispatching a layer's forward on fake tensors with symbolic
sizes computes all of that op by op (GPT-2's Conv1D: view, addmm, view, ~15 ms, each step re-deriving
symbolic strides); the answer is one empty tensor of a known shape:

    before   value of  h.0.attn.c_attn(x)   = Conv1D.forward on the fake x, fake weight and bias
    after    value of  h.0.attn.c_attn(x)   = empty (*x.shape[:-1], nf), contiguous, x's dtype

A rule applies only to the plain case it knows (the exact class, no extra arguments, the weight's dtype
and device); anything else returns None and the call is dispatched as before, so torch raises its own
error. The size checks are the ones the layer's kernel makes (`x.shape[-1] == in_features`), so the
trace's ShapeEnv learns the same facts. Module rules run as the module's forward, so the module's hooks
(flops.counting's) see the value as they did; modules with pre-hooks or global hooks are dispatched.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor


def _empty(like: torch.Tensor, shape, dtype=None, grad: bool = False) -> torch.Tensor:
    """A contiguous fake tensor of `shape` on `like`'s device (called inside the trace's fake mode)."""
    out = like.new_empty(tuple(shape), dtype=dtype or like.dtype)
    if grad and torch.is_grad_enabled():
        out.requires_grad_(True)
    return out


def _plain_input(x, weight: torch.Tensor | None) -> bool:
    return isinstance(x, FakeTensor) and x.dim() >= 1 and (
        weight is None or (x.dtype == weight.dtype and x.device == weight.device))


def _grad(x, m: nn.Module) -> bool:
    return x.requires_grad or any(p.requires_grad for p in m.parameters(recurse=False))


def linear(m: nn.Linear, x, *rest, **kwargs):
    if rest or kwargs or not _plain_input(x, m.weight) or x.shape[-1] != m.in_features:
        return None
    return _empty(x, (*x.shape[:-1], m.out_features), grad=_grad(x, m))       # (..., out)


def transposed_linear(m, x, *rest, **kwargs):
    """HF's Conv1D: weight (nx, nf), y = x @ W + b."""
    nx, nf = m.weight.shape
    if rest or kwargs or not _plain_input(x, m.weight) or x.shape[-1] != nx:
        return None
    return _empty(x, (*x.shape[:-1], nf), grad=_grad(x, m))                   # (..., nf)


def embedding(m: nn.Embedding, idx, *rest, **kwargs):
    if rest or kwargs or not _plain_input(idx, None) or idx.dtype not in (torch.long, torch.int):
        return None
    return _empty(idx, (*idx.shape, m.embedding_dim), m.weight.dtype, _grad(idx, m))  # (..., dim)


def norm(m, x, *rest, **kwargs):
    """nn.LayerNorm and nn.RMSNorm over their normalized_shape: the input's shape, contiguous."""
    n = len(m.normalized_shape)
    if rest or kwargs or not _plain_input(x, m.weight) or x.dim() < n or \
            tuple(x.shape[-n:]) != tuple(m.normalized_shape):
        return None
    return _empty(x, x.shape, grad=_grad(x, m))


def sdpa(*args, **kwargs):
    """scaled_dot_product_attention's value in eval mode (as a leaf's): dropout changes no shape, and
    its fake kernel with dropout_p > 0 (a trace runs in training mode) costs ~100 ms a call."""
    if len(args) > 4:
        args = (*args[:4], 0.0, *args[5:])
    else:
        kwargs = {**kwargs, "dropout_p": 0.0}
    return F.scaled_dot_product_attention(*args, **kwargs)


# Keyed by the exact class (a subclass may change forward) or its qualified name (optional packages).
MODULE_RULES = {nn.Linear: linear, nn.Embedding: embedding, nn.LayerNorm: norm, nn.RMSNorm: norm,
                "transformers.pytorch_utils.Conv1D": transposed_linear}
FUNCTION_RULES = {F.scaled_dot_product_attention: sdpa}


def module_rule(m: nn.Module):
    """The rule for `m`'s class, or None (also for a module whose hooks a rule would skip)."""
    cls = type(m)
    rule = MODULE_RULES.get(cls) or MODULE_RULES.get(f"{cls.__module__}.{cls.__qualname__}")
    if rule is None or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks or _global_hooks():
        return None
    return rule


def _global_hooks() -> bool:
    from torch.nn.modules import module
    return bool(module._global_forward_pre_hooks or module._global_forward_hooks or
                module._global_backward_hooks or module._global_backward_pre_hooks)


def call_with_rule(m: nn.Module, rule, args, kwargs):
    """`m(*args, **kwargs)` with `rule` as its forward (its forward hooks run as usual); None if the
    rule does not apply (nothing ran)."""
    value = rule(m, *args, **kwargs)
    if value is None:
        return None
    m.__dict__["forward"] = lambda *a, **k: value
    try:
        return m(*args, **kwargs)
    finally:
        del m.__dict__["forward"]


# ---- identical calls --------------------------------------------------------------------------
class ValueCache:
    """Values of calls already made with the same inputs: GPT-2's 12 blocks make the same 50 calls on
    the same symbolic shapes, and each fake dispatch re-derives the same sizes and strides.

    A key is the call and, for each tensor, its sizes, strides, offset, dtype, device and grad (sizes
    as ShapeEnv's expressions), plus the grad mode. Only tensor calls that change nothing are cached
    (no name ending in `_`, no `out=`/`inplace=`); a value from the cache is shared by the nodes that
    hit it, so an in-place method on one is run on a private copy (`private`)."""

    def __init__(self):
        self.values, self.shared = {}, set()  # key -> value; ids of the tensors handed out more than once

    def key(self, kind, target, args, kwargs):
        name = target if isinstance(target, str) else getattr(target, "__name__", "")
        if kind not in ("call_method", "call_function") or name.endswith("_") or \
                "out" in kwargs or kwargs.get("inplace"):
            return None
        tensors = []
        try:
            key = (kind, target, _sig((args, kwargs), tensors), torch.is_grad_enabled())
            hash(key)
        except TypeError:  # an argument that cannot be compared (a module, a list subclass...)
            return None
        return key if tensors else None

    def get(self, key):
        value = self.values.get(key)
        if value is not None:
            _each_tensor(value, lambda t: self.shared.add(id(t)))
        return value

    def put(self, key, value):
        if key is not None:
            self.values[key] = value

    def private(self, value):
        """A copy of a shared tensor value (same metadata) for an in-place method to change."""
        if not isinstance(value, torch.Tensor) or id(value) not in self.shared:
            return value
        if value.storage_offset() != 0:
            return value.clone()
        copy = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device)
        return copy.requires_grad_() if value.requires_grad else copy


def _sig(a, tensors: list):
    if isinstance(a, torch.Tensor):
        tensors.append(a)
        return ("T", _sizes(a.shape), _sizes(a.stride()), _size(a.storage_offset()), a.dtype, a.device,
                a.requires_grad, type(a))
    if isinstance(a, torch.SymInt):
        return ("S", a.node.expr)
    if isinstance(a, (tuple, list)):
        return (type(a), tuple(_sig(x, tensors) for x in a))
    if isinstance(a, dict):
        return (dict, tuple((k, _sig(v, tensors)) for k, v in a.items()))
    if isinstance(a, slice):
        return (slice, _sig((a.start, a.stop, a.step), tensors))
    if isinstance(a, (int, float, bool, str, type(None), type(Ellipsis), torch.dtype, torch.device,
                      torch.memory_format, torch.layout)):
        return (type(a), a)
    raise TypeError(type(a).__name__)


def _size(s):
    return s.node.expr if isinstance(s, torch.SymInt) else s


def _sizes(sizes):
    return tuple(_size(s) for s in sizes)


def _each_tensor(value, fn):
    if isinstance(value, torch.Tensor):
        fn(value)
    elif isinstance(value, (tuple, list)):
        for v in value:
            _each_tensor(v, fn)
