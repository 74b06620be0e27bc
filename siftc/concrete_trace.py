"""Concrete-shape tracing: torch.fx tracing in which every proxy also carries its value.

Plain `torch.fx.symbolic_trace` stops at the first Python decision a model makes about a tensor:
`assert t <= block_size`, `if x.dim() == 3`, `int(x.size(1) * r)`, `torch.finfo(x.dtype)`,
`range(seq_len)`. Those depend on shapes and dtypes, not on data, so siftc traces with the example
inputs: each proxy holds a fake tensor (shapes only, no data) whose sizes are symbols of torch's
ShapeEnv, one per input dimension. A Python decision on a shape is taken on the example's value and
recorded as a `Specialization`, with the guard it implies over the input dimensions (`s1 <= 64`) and
the user's line; `Guards.check` later refuses an input the graph cannot serve instead of running a
graph traced for another shape. Work inside torch ops (a broadcast, a matmul's inner size) is the
graph's own business and is not a specialisation. A decision on tensor *values* (`if x.sum() > 0`) is
data-dependent and still an error, for which `--leaf` keeps the module opaque.

The graph stays module-level: leaves are the same as plain fx tracing (torch.nn layers, siftc's
layers, and modules matching `leaves`), so every pass works unchanged.

    >>> gm, guards = concrete_trace(gpt, {"idx": torch.randint(0, 256, (1, 64))})
    >>> guards.specializations[0].text
    'input idx dim 1 = 64 fixed by `assert t <= self.block_size` at model.py:173 (s1 <= 64)'

Training flags are not baked: a module's `self.training` is read through the graph's own flag, so
`F.dropout(x, p, self.training)` and `if self.training: x = F.dropout(x, p)` follow `.train()` and
`.eval()` of the converted model.
"""
import contextlib
import gc
import inspect
import linecache
import logging
import math
import operator
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.graph import CodeGen, _PyTreeCodeGen, _PyTreeInfo
from torch.fx.node import map_aggregate
from torch.utils import _pytree as pytree

from siftc.value_rules import FUNCTION_RULES, ValueCache, call_with_rule, module_rule

_TORCH = Path(torch.__file__).resolve().parent
_SIFTC = Path(__file__).resolve().parent
# Tensor attributes that are properties of the tensor's type, not of its data or shape: read directly.
_STATIC_ATTRS = frozenset({"dtype", "device", "layout", "is_cuda", "is_sparse", "is_quantized", "is_meta",
                           "ndim", "is_floating_point", "is_complex"})
_DROPOUTS = (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout)


class DataDependent(Exception):
    """A Python decision on tensor values (`bool(x.sum() > 0)`, `x.item()`): not traceable."""

    def __init__(self, what: str, where: str, module: str = ""):
        super().__init__(f"{what} at {where}")
        self.what, self.where, self.module = what, where, module  # module: the innermost traced module


@dataclass
class Specialization:
    """One shape decision the trace took on the example inputs."""
    kind: str                  # "bool", "int", "len", "iter", "float", "training"
    value: object              # what the decision came out as
    guard: str                 # the condition on the input dims it implies, e.g. "s1 <= 64"
    dims: list                 # [(input name, dim, example size)] the guard reads
    where: str                 # the user's file:line
    code: str                  # that line's source

    @property
    def text(self) -> str:
        if self.kind == "training":
            return f"`{self.code}` at {self.where} traced in training mode; dropout follows .train()/.eval()"
        fixed = ", ".join(f"input {n} dim {d} = {s}" for n, d, s in self.dims) or "the inputs' ranks and dtypes"
        how = "fixed" if self.guard.startswith("Eq(") else "constrained"
        if not self.where:
            return f"{fixed} {how}: {self.code} ({self.guard})"
        return f"{fixed} {how} by `{self.code}` at {self.where} ({self.guard})"

    def to_json(self) -> dict:
        return {"kind": self.kind, "value": repr(self.value), "guard": self.guard,
                "dims": [list(d) for d in self.dims], "where": self.where, "code": self.code, "text": self.text}


@dataclass
class Guards:
    """What a concrete trace assumed about its inputs: names, ranks, dtypes, and shape guards."""
    names: list                                   # placeholder names, in order
    ranks: dict                                   # name -> ndim
    dtypes: dict                                  # name -> str(dtype)
    symbols: dict                                 # "s1" -> (input name, dim)
    specializations: list = field(default_factory=list)
    constants: dict = field(default_factory=dict)  # forward arguments left at their defaults

    def check(self, inputs: dict) -> None:
        """Raise ShapeMismatch if `inputs` (name -> tensor) break an assumption of the trace."""
        env = {}
        for name in self.names:
            t = inputs.get(name)
            if not isinstance(t, torch.Tensor):
                continue
            if t.dim() != self.ranks[name]:
                raise ShapeMismatch(f"input {name} has {t.dim()} dims, the model was traced with "
                                    f"{self.ranks[name]}; convert again with inputs of this form")
        for sym, (name, dim) in self.symbols.items():
            t = inputs.get(name)
            if isinstance(t, torch.Tensor):
                env[sym] = t.shape[dim]
        for s in self.specializations:
            if s.kind == "training" or not s.guard:
                continue
            if not _holds(s.guard, env):
                sizes = ", ".join(f"input {n} dim {d} = {inputs[n].shape[d]}" for n, d, _ in s.dims if n in inputs)
                why = f"by `{s.code}` at {s.where}" if s.where else f"({s.code})"
                raise ShapeMismatch(f"{sizes}: the graph was specialised {why} ({s.guard}, traced at "
                                    f"{', '.join(str(x[2]) for x in s.dims)}); convert again with example "
                                    f"inputs of this shape")

    def to_json(self) -> dict:
        return {"names": self.names, "ranks": self.ranks, "dtypes": self.dtypes,
                "symbols": {k: list(v) for k, v in self.symbols.items()},
                "specializations": [s.to_json() for s in self.specializations],
                "constants": {k: repr(v) for k, v in self.constants.items()}}

    @classmethod
    def from_json(cls, d: dict) -> "Guards":
        specs = [Specialization(s["kind"], s["value"], s["guard"], [tuple(x) for x in s["dims"]], s["where"],
                                s["code"]) for s in d.get("specializations", [])]
        return cls(list(d["names"]), dict(d["ranks"]), dict(d["dtypes"]),
                   {k: tuple(v) for k, v in d["symbols"].items()}, specs, dict(d.get("constants", {})))


class ShapeMismatch(ValueError):
    """An input the specialised graph cannot serve."""


def _holds(guard: str, env: dict) -> bool:
    """Evaluate a guard as ShapeEnv printed it (it may use torch's sympy functions: TruncToInt...)."""
    import sympy
    import torch.utils._sympy.functions as fns
    names = {k: v for k, v in vars(fns).items() if isinstance(v, type) and issubclass(v, sympy.Basic)}
    symbols = {k: sympy.Symbol(k, integer=True, positive=True) for k in env}
    expr = sympy.sympify(guard, locals={**names, **symbols})
    return bool(expr.subs({symbols[k]: v for k, v in env.items()}))


# ---- proxies ----------------------------------------------------------------------------------
class ConcreteProxy(torch.fx.Proxy):
    """A proxy that also knows its value (a fake tensor, a SymInt, a torch.Size, a dtype...)."""

    @property
    def value(self):
        return self.tracer.values[self.node]

    def __bool__(self):
        return self.tracer.concretize(self, bool, "bool")

    def __int__(self):
        return self.tracer.concretize(self, int, "int")

    def __index__(self):
        return self.tracer.concretize(self, operator.index, "int")

    def __float__(self):
        return self.tracer.concretize(self, float, "float")

    def __len__(self):
        return self.tracer.concretize(self, len, "len")

    def __iter__(self):
        return iter([self[i] for i in range(len(self))])

    def keys(self):
        return self.value.keys()

    def __getattr__(self, k):
        value = self.tracer.values.get(self.node)
        if k in _STATIC_ATTRS and isinstance(value, torch.Tensor):
            return getattr(value, k)
        return ConcreteAttribute(self, k)


class ConcreteAttribute(ConcreteProxy, torch.fx.proxy.Attribute):
    """`proxy.attr` before it is known whether it is read or called (then it is a method call)."""

    def __init__(self, root, attr):
        torch.fx.proxy.Attribute.__init__(self, root, attr)

    @property
    def value(self):
        return getattr(self.root.value, self.attr)


# ---- tracer -----------------------------------------------------------------------------------
class ConcreteTracer(torch.fx.Tracer):
    """fx tracer whose proxies carry fake values with symbolic sizes (see the module docstring)."""

    def __init__(self, inputs: dict, is_leaf=None, example: dict | None = None):
        super().__init__(autowrap_functions=())
        self.proxy_buffer_attributes = True  # a buffer sliced by a size (`bias[:, :, :T, :T]`) stays in the graph
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
        self.shape_env = ShapeEnv(duck_shape=False)
        self.fake_mode = FakeTensorMode(shape_env=self.shape_env, allow_non_fake_inputs=True)
        self.values: dict = {}
        self.is_leaf = is_leaf
        self.inputs, self.symbols = {}, {}
        for name, t in inputs.items():
            if isinstance(t, torch.Tensor):
                ctx = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC] * t.dim())
                fake = self.fake_mode.from_tensor(t, symbolic_context=ctx)
                for d, s in enumerate(fake.shape):
                    if isinstance(s, torch.SymInt):
                        self.symbols[str(s.node.expr)] = (name, d)
                self.inputs[name] = fake
            else:
                self.inputs[name] = t
        self.example = example or inputs  # the sizes specialisations report (the user's, when inflated)
        self.specializations: list[Specialization] = []
        self.flags: list = []   # (module, its own training bool), restored after the trace
        self.training_scopes: set = set()  # module paths whose forward branched on self.training
        self._fakes: dict = {}
        self.cache = ValueCache()  # values of calls made before with the same inputs
        self._computing = False
        self.out_spec, self.dropped = None, []
        self.decisions = 0  # Python decisions on constants (which may be example dims of size 0 or 1)

    # fx hooks
    def proxy(self, node):
        return ConcreteProxy(node, self)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if self.is_leaf is not None and self.is_leaf(m, qualname):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        if self._computing:  # a leaf's value: run it, do not trace it
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._computing:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        value = self._compute(kind, target, args, kwargs)
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        self.values[proxy.node] = value
        return proxy

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        """Placeholders for the given inputs only, by name; the forward's other parameters keep their
        defaults (`targets=None` is no graph input). Works for `*args, **kwargs` forwards too."""
        sig = inspect.signature(inspect.unwrap(root_fn))
        params = list(sig.parameters.values())[1:]  # without self
        named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in params)
        for n in self.inputs:
            if n not in named and not takes_kwargs:
                raise TypeError(f"forward() has no parameter {n!r}")
        proxies = {n: self.create_proxy("placeholder", n, (), {}) if isinstance(v, torch.Tensor) else v
                   for n, v in self.inputs.items()}
        self.flags = live_training_flag(self)

        def fn(root):
            leaves, self.out_spec = pytree.tree_flatten(root_fn(root, **proxies))
            leaves = [self._output_leaf(i, x) for i, x in enumerate(leaves)]
            return leaves[0] if self.out_spec.is_leaf() else tuple(leaves)
        return fn, [self.root]

    def _output_leaf(self, i, x):
        """An output leaf fx can hold (a proxy or a constant); anything else (a KV cache object) is
        returned as None and named in `dropped`."""
        if isinstance(x, (torch.fx.Proxy, torch.Tensor, int, float, bool, str, type(None))):
            return x
        self.dropped.append(f"output {i} ({type(x).__name__})")
        return None

    # values
    def _fake(self, t: torch.Tensor):
        if not isinstance(t, torch.Tensor) or isinstance(t, torch._subclasses.FakeTensor):
            return t
        key = id(t)
        if key not in self._fakes:
            self._fakes[key] = (t, self.fake_mode.from_tensor(t, static_shapes=True))
        return self._fakes[key][1]

    def _value_of(self, a):
        def one(x):
            if isinstance(x, torch.fx.Proxy):
                return self.values[x.node]
            return self._fake(x)
        return map_aggregate(a, one) if not isinstance(a, torch.fx.Proxy) else one(a)

    def _compute(self, kind, target, args, kwargs):
        if kind == "placeholder":
            return self.inputs.get(target)
        if kind == "output":
            return None
        if kind == "get_attr":
            self._computing = True
            try:
                obj = self.root
                for part in target.split("."):
                    obj = getattr(obj, part)
            finally:
                self._computing = False
            return self._fake(obj)
        vargs, vkwargs = self._value_of(tuple(args)), self._value_of(dict(kwargs))
        python_level = kind == "call_function" and not _has_tensor((vargs, vkwargs))
        key = None if python_level else self.cache.key(kind, target, vargs, vkwargs)
        out = self.cache.get(key) if key is not None else None
        if out is not None:
            return out
        before = len(self.shape_env.guards)
        try:
            self._computing = True
            with self.fake_mode:
                if kind == "call_method" and target.endswith("_"):  # in place: not on a shared value
                    vargs = (self.cache.private(vargs[0]), *vargs[1:])
                    if isinstance(args[0], torch.fx.Proxy):
                        self.values[args[0].node] = vargs[0]
                out = self._dispatch(kind, target, vargs, vkwargs)
            self.cache.put(key, out)
        except Exception as e:
            if _data_dependent(e):
                raise DataDependent(f"{_op_name(kind, target)} needs tensor values", self._user_line()[0],
                                    self._scope()) from e
            raise
        finally:
            self._computing = False
        if python_level:  # shape arithmetic in Python that decided something (a tuple ==, a min())
            self._record_new_guards(before, "bool")
        return out

    def _dispatch(self, kind, target, args, kwargs):
        """The value of one call on fake values: by a rule of `siftc.value_rules` where one applies
        (a layer's output is one empty tensor of a known shape), else by running it."""
        if kind == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        if kind == "call_function":
            return FUNCTION_RULES.get(target, target)(*args, **kwargs)
        mod = self.root.get_submodule(target)
        rule = module_rule(mod)
        out = call_with_rule(mod, rule, args, kwargs) if rule else None
        if out is None:
            with _eval_for_value(mod):
                out = mod(*args, **kwargs)
        return out

    def concretize(self, proxy, fn, kind):
        """Take a Python decision (`bool`, `int`, `len`...) on a proxy's value, recording what it fixed."""
        value = proxy.value
        if proxy.node.op == "get_attr" and proxy.node.target == "training":
            self.specializations.append(Specialization("training", True, "", [], *self._user_line()))
            self.training_scopes.add(self._scope())
            return fn(value)
        if kind == "len" and isinstance(value, (torch.Size, torch.Tensor)):
            return fn(value)  # a rank (or a tensor's first dim, a SymInt below): ranks are guarded anyway
        if isinstance(value, torch.Tensor):
            where, code = self._user_line()
            raise DataDependent(f"`{code}` decides on tensor values", where, self._scope())
        before = len(self.shape_env.guards)
        try:
            out = fn(value)
        except Exception as e:
            if _data_dependent(e):
                where, code = self._user_line()
                raise DataDependent(f"`{code}` decides on tensor values", where, self._scope()) from e
            raise
        symbols = _free_symbols(value)
        if len(self.shape_env.guards) > before:
            self._record_new_guards(before, kind, out, *self._user_line())
        elif symbols:  # decided without a guard: by ShapeEnv's standing assumption that sizes are >= 2
            self._record(kind, out, " & ".join(f"{s} >= 2" for s in symbols), symbols, *self._user_line())
        else:
            self.decisions += 1  # on constants: possibly on an example dim of size 0 or 1 (see the probe)
        return out

    def _record_new_guards(self, before, kind, value=None, where=None, code=None):
        new = self.shape_env.guards[before:]
        if not new:
            return
        if where is None:
            where, code = self._user_line()
        for g in new:
            self._record(kind, value, str(g.expr), sorted(str(s) for s in g.expr.free_symbols), where, code)

    def _record(self, kind, value, guard, symbols, where, code):
        dims = [(*self.symbols[s], self._example_size(s)) for s in symbols if s in self.symbols]
        self.specializations.append(Specialization(kind, value, guard, dims, where, code))

    def _example_size(self, sym):
        name, dim = self.symbols[sym]
        return int(self.example[name].shape[dim])

    def _scope(self) -> str:
        """The path of the module whose forward is being traced ("" for the root)."""
        return next(reversed(self.module_stack), "") if self.module_stack else ""

    @staticmethod
    def _user_line() -> tuple[str, str]:
        """file:line and source text of the innermost frame of the user's code."""
        for f in reversed(traceback.extract_stack()):
            path = Path(f.filename)
            if f.filename.startswith("<") or path.resolve().is_relative_to(_TORCH) or \
                    path.resolve().is_relative_to(_SIFTC):
                continue
            line = (f.line or linecache.getline(f.filename, f.lineno)).strip()
            return f"{path.name}:{f.lineno}", line
        return "unknown location", ""


def _free_symbols(value) -> list:
    node = getattr(value, "node", None)
    expr = getattr(node, "expr", None)
    return sorted(str(s) for s in getattr(expr, "free_symbols", ()))


def live_training_flag(tracer: torch.fx.Tracer) -> list:
    """Replace every traced-through module's `training` bool by a proxy of the root's `self.training`,
    so reading it puts it in the graph instead of baking it; returns [(module, its bool)] for
    `restore_training`. Leaves keep their bool: they run as modules, in whatever mode they are."""
    proxy = tracer.create_proxy("get_attr", "training", (), {})
    if isinstance(tracer, ConcreteTracer):
        tracer.values[proxy.node] = True  # traced in training mode: the dropout paths are in the graph
    flags = []
    for name, m in tracer.root.named_modules():
        if name and tracer.is_leaf_module(m, name):
            continue
        flags.append((m, m.__dict__.get("training", True)))
        m.__dict__["training"] = proxy
    return flags


def restore_training(flags: list):
    for m, t in flags:
        m.__dict__["training"] = t


class InputGuard(nn.Module):
    """First node of a concrete-traced graph: refuses inputs that break what the trace assumed
    (`Guards.check`). Impure, so dead-code elimination keeps it; it returns nothing, so no pass sees it."""
    _is_impure = True

    def __init__(self, guards: "Guards"):
        super().__init__()
        self.guards = guards

    def forward(self, *inputs):
        self.guards.check(dict(zip(self.guards.names, inputs)))


def add_input_guard(gm: torch.fx.GraphModule, guards: "Guards"):
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    gm.add_submodule("siftc_input_guard", InputGuard(guards))
    with gm.graph.inserting_after(placeholders[-1]):
        gm.graph.call_module("siftc_input_guard", tuple(placeholders))
    gm.recompile()


def _changes_its_input(node: torch.fx.Node) -> bool:
    """fx's impure nodes, and in-place calls (`x.unsqueeze_(0)`, `x[i] = v`, `relu(x, inplace=True)`),
    which dead-code elimination must keep even when nothing reads their result."""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    in_place = node.op in ("call_method", "call_function") and (
        name.endswith("_") or node.target is operator.setitem or node.kwargs.get("inplace") is True)
    return in_place or node.is_impure()


def _has_tensor(values) -> bool:
    found = []
    map_aggregate(values, lambda v: found.append(v) if isinstance(v, torch.Tensor) else v)
    return bool(found)


def _op_name(kind, target) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _data_dependent(e: Exception) -> bool:
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException
    return isinstance(e, (GuardOnDataDependentSymNode, DataDependentOutputException, DynamicOutputShapeException))


@contextlib.contextmanager
def _eval_for_value(mod: nn.Module):
    """A leaf module's value is computed in eval mode (a BatchNorm of batch 1 in training mode would
    refuse, and running statistics must not move); the graph keeps the module, so the mode is its own
    at run time."""
    modes = [(m, m.training) for m in mod.modules()]
    mod.eval()
    try:
        yield
    finally:
        for m, t in modes:
            m.training = t


# ---- entry point ------------------------------------------------------------------------------
def concrete_trace(model: nn.Module, inputs: dict, is_leaf=None) -> tuple[torch.fx.GraphModule, Guards]:
    """Trace `model` called as `model(**inputs)`; returns the module-level GraphModule and its Guards.

    torch's shape analysis treats a size of 1 as a constant, so an example batch of 1 would hide every
    decision on the batch. The trace therefore runs with such dims at 2 (the values are fake anyway);
    when every guard it recorded also holds at the example's own sizes, each decision came out as it
    would have there, and that graph is kept. Otherwise the trace runs again at the example's sizes,
    and any dim of 1 the model decided on is probed."""
    inflated = {n: torch.zeros([2 if d == 1 else d for d in t.shape], dtype=t.dtype)
                if isinstance(t, torch.Tensor) and 1 in t.shape else t for n, t in inputs.items()}
    if any(inflated[n] is not inputs[n] for n in inputs):
        gm, tracer = _trace_once(model, inflated, is_leaf, example=inputs)
        guards = _guards(model, inputs, gm, tracer)
        sizes = {sym: inputs[n].shape[d] for sym, (n, d) in guards.symbols.items()}
        if all(_holds(sp.guard, sizes) for sp in guards.specializations if sp.guard):
            return gm, guards
    gm, tracer = _trace_once(model, inputs, is_leaf)
    guards = _guards(model, inputs, gm, tracer)
    if tracer.decisions:
        _probe_unit_dims(model, inputs, is_leaf, gm, guards)
    return gm, guards


def _guards(model, inputs, gm, tracer) -> Guards:
    names = names_of(gm)
    return Guards(names, {n: inputs[n].dim() for n in names}, {n: str(inputs[n].dtype) for n in names},
                  dict(tracer.symbols), _dedupe(tracer.specializations), _defaults(model, inputs))


def _trace_once(model, inputs, is_leaf, example=None):
    tracer = ConcreteTracer(inputs, is_leaf, example=example)
    log = logging.getLogger("torch._subclasses.fake_tensor")  # it logs a failing op's traceback itself
    level, collecting = log.level, gc.isenabled()
    log.setLevel(logging.CRITICAL)
    gc.disable()  # the trace makes many small objects (symbols, nodes); full collections cost it ~10%
    try:
        graph = tracer.trace(model)
    finally:
        log.setLevel(level)
        if collecting:
            gc.enable()
        restore_training(tracer.flags)
    gm = torch.fx.GraphModule(tracer.root, graph, type(model).__name__)
    if not tracer.out_spec.is_leaf():  # outputs come back as the model's own structure (a ModelOutput)
        gm.graph._codegen = _OutputTree(_PyTreeInfo(names_of(gm), None, tracer.out_spec))
    _dropout_follows_training(gm, tracer.training_scopes)
    gm.graph.eliminate_dead_code(is_impure_node=_changes_its_input)
    gm.graph.lint()
    gm.recompile()
    return gm, tracer


def _probe_unit_dims(model, inputs, is_leaf, gm, guards):
    """torch's shape analysis treats sizes 0 and 1 as constants, so a decision on such an example dim
    leaves no guard. When the model made decisions on constants, trace again with each such dim at 2:
    where the graph changes or the trace fails, the dim is fixed, named by the decision that differs."""
    pinned = {(n, d) for sp in guards.specializations if sp.guard.startswith("Eq(") for n, d, _ in sp.dims}
    symbol_of = {v: k for k, v in guards.symbols.items()}
    for name, t in inputs.items():
        if not isinstance(t, torch.Tensor):
            continue
        for d, size in enumerate(t.shape):
            if (name, d) in pinned or size > 1:  # sizes >= 2 are symbols: their decisions left guards
                continue
            shape = list(t.shape)
            shape[d] = 2
            try:
                other, tracer = _trace_once(model, {**inputs, name: torch.zeros(shape, dtype=t.dtype)}, is_leaf)
            except Exception as e:
                where, code = "", f"the trace fails at size {shape[d]} ({type(e).__name__})"
            else:
                if other.code == gm.code:
                    continue
                known = {(sp.where, sp.code) for sp in guards.specializations}
                new = [sp for sp in tracer.specializations if (sp.where, sp.code) not in known]
                where, code = (new[0].where, new[0].code) if new else ("", f"the graph differs at size {shape[d]}")
            sym = symbol_of.get((name, d)) or f"u{len(guards.symbols)}"
            guards.symbols[sym] = (name, d)
            guard = f"Eq({sym}, {size})"
            guards.specializations.append(Specialization("size", size, guard, [(name, d, size)], where, code))


def _dropout_follows_training(gm: torch.fx.GraphModule, scopes: set):
    """In a module whose forward branched on `self.training` (`scopes`), functional dropout traced with
    a constant `training=True` (under `if self.training:`) and an attention dropout probability baked
    from `p if self.training else 0` take the graph's flag. Dropout the model applies in both modes
    (an unconditional `F.dropout(x, p)`) stays as the dense model has it."""
    flag = next((n for n in gm.graph.nodes if n.op == "get_attr" and n.target == "training"), None)
    for node in list(gm.graph.nodes):
        stack = node.meta.get("nn_module_stack") or {}
        if node.op != "call_function" or next(reversed(stack), "") not in scopes:
            continue
        if node.target in _DROPOUTS:
            training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
            if training is True:
                with gm.graph.inserting_before(node):
                    flag = flag or gm.graph.get_attr("training")
                args = list(node.args[:2])
                kwargs = {k: v for k, v in node.kwargs.items() if k != "training"}
                node.args, node.kwargs = tuple(args), {**kwargs, "training": flag}
        elif node.target is F.scaled_dot_product_attention:
            p = node.kwargs.get("dropout_p", node.args[4] if len(node.args) > 4 else 0.0)
            if isinstance(p, float) and p > 0:
                with gm.graph.inserting_before(node):
                    flag = flag or gm.graph.get_attr("training")
                    scaled = gm.graph.call_function(operator.mul, (p, flag))
                args = list(node.args)
                if len(args) > 4:
                    args[4] = scaled
                    node.args = tuple(args)
                else:
                    node.kwargs = {**node.kwargs, "dropout_p": scaled}


class _OutputTree(_PyTreeCodeGen):
    """fx code generation that returns the traced output structure (a dict, a ModelOutput, nested
    tuples) rebuilt from the graph's flat outputs, and takes its inputs as plain arguments."""

    def process_inputs(self, *inputs):
        return inputs

    def gen_fn_def(self, free_vars, maybe_return_annotation, *, expanded_def=False):
        return CodeGen.gen_fn_def(self, free_vars, maybe_return_annotation, expanded_def=expanded_def)


def names_of(gm: torch.fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "placeholder"]


def _dedupe(specs: list) -> list:
    seen, out = set(), []
    for s in specs:
        key = (s.kind, s.guard, s.where)
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


def _defaults(model: nn.Module, inputs: dict) -> dict:
    sig = inspect.signature(inspect.unwrap(type(model).forward))
    return {p.name: p.default for p in list(sig.parameters.values())[1:]
            if p.name not in inputs and p.default is not p.empty}
