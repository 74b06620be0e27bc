"""A converted GraphModule as plain data (JSON) and back, building only what an allow-list names.

    before   gm: GraphModule  fc1 = SparseLinear(64, 256, nnz=...); relu; add(x, 1)
    data     {"class_name": "MLP",
              "modules": [{"name": "", "class": "torch.nn.modules.module.Module", "params": {}, ...},
                          {"name": "fc1", "class": "siftc.nn.sparse.SparseLinear",
                           "args": {"in_features": 64, "out_features": 256, "bias": true, "nnz": 1638}}],
              "nodes": [{"op": "call_function", "name": "add", "target": "operator:add",
                         "args": [{"node": "fc1"}, 1], "kwargs": {}}, ...],
              "constants": []}
    after    from_data(data, constants) -> an equivalent GraphModule (load the state dict into it)

A module is stored one of two ways. "args": its class and constructor arguments, read off the module
by the names in its __init__ signature (torch.nn layers, siftc's sparse layers, SplitAttention); its
children come from the constructor. "tree": its class, plain attributes, parameter and buffer shapes,
and its children as further records (containers, and siftc's blocks, whose constructors take a dense
layer); it is built with `cls.__new__` and nn.Module.__init__, so no constructor of its runs.
`to_data` rebuilds every "args" module and checks it is the same (class, repr, state keys and shapes,
plain attributes); what cannot be stored so raises NotData with the reason, and the artifact then
needs its source (siftc.artifact). A concrete trace's input guard is stored as its guards
(siftc.guard_data), and a graph that takes or returns a structure (a HuggingFace ModelOutput) stores
its code generator with the input and output structures (siftc.tree_data).

Loading calls nothing outside ALLOWED: call_function targets from torch (its C functions and
torch.functional), torch.nn.functional, operator, math, builtins.getattr of a public attribute, and
siftc.nn's modules; call_method names of public torch.Tensor methods; module classes from
torch.nn.modules and siftc.nn; output classes from transformers.modeling_outputs (tree_data). Anything
else is a one-line Refused naming it.
"""
import builtins
import contextlib
import importlib
import inspect
import keyword
import math
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

SIFTC_MODULES = ("siftc.nn.sparse", "siftc.nn.blocks", "siftc.nn.attention")
# name -> (namespace object, which of its public callables a graph may call)
NAMESPACES = {
    "torch.nn.functional": F, "torch": torch, "operator": operator, "math": math, "builtins": builtins,
    **{m: m for m in SIFTC_MODULES},  # imported when first needed
}
TORCH_FROM = ("torch", "torch.functional", "torch._C._VariableFunctions", None)  # torch.load (torch.serialization) is not
DENIED = {"torch": {"from_file"}, "operator": {"attrgetter", "methodcaller", "call"}}
BUILTINS = {"getattr"}  # fx records `x.shape` as getattr(x, "shape")
SKIPPED_ARGS = {"device", "dtype", "generator", "factory_kwargs"}
IGNORED_ATTRS = {"training", "mask_version", "backend"}  # state the loader sets itself, not structure
TREE = (nn.Sequential, nn.ModuleList, nn.ModuleDict)  # + nn.Module itself and siftc.nn.blocks, see _is_tree


class NotData(Exception):
    """The model cannot be stored as data; the message says which part and why."""


class Refused(Exception):
    """Stored data names something loading may not call or build."""


# ------------------------------------------------------------------------------------------ names

def function_name(fn) -> str:
    """'namespace:name' of an allowed callable, or NotData."""
    for ns_name in NAMESPACES:
        name = getattr(fn, "__name__", None)
        if name and _lookup(ns_name, name, strict=False) is fn:
            return f"{ns_name}:{name}"
    where = f"{getattr(fn, '__module__', None)}.{getattr(fn, '__qualname__', fn)}"
    raise NotData(f"calls {where}, which is not on the allow-list (torch, torch.nn.functional, operator, "
                  f"math, siftc.nn)")


def resolve_function(text) -> object:
    if not isinstance(text, str) or text.count(":") != 1:
        raise Refused(f"names a callable {text!r} that is not 'namespace:name'")
    ns_name, name = text.split(":")
    fn = _lookup(ns_name, name, strict=True)
    if fn is None:
        raise Refused(f"names {ns_name}.{name}, which is not on the allow-list of callables")
    return fn


def _lookup(ns_name: str, name: str, strict: bool):
    """The allowed callable `name` of namespace `ns_name`, or None."""
    if ns_name not in NAMESPACES or not name.isidentifier() or name.startswith("_") or \
            name in DENIED.get(ns_name, ()) or (ns_name == "builtins" and name not in BUILTINS):
        return None
    ns = NAMESPACES[ns_name]
    if isinstance(ns, str):
        ns = importlib.import_module(ns)
    fn = getattr(ns, name, None)
    if not callable(fn) or isinstance(fn, type):
        return None
    if ns_name == "torch" and getattr(fn, "__module__", None) not in TORCH_FROM:
        return None
    if ns_name in SIFTC_MODULES and getattr(fn, "__module__", None) != ns_name:
        return None  # a name it imported from elsewhere
    return fn


def class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def resolve_class(text) -> type:
    module, _, name = str(text).rpartition(".")
    allowed = module.startswith("torch.nn.modules.") or module in SIFTC_MODULES
    if not allowed or not name.isidentifier() or name.startswith("_"):
        raise Refused(f"names module class {text}, which is not on the allow-list (torch.nn, siftc.nn)")
    cls = getattr(importlib.import_module(module), name, None)
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise Refused(f"names module class {text}, which is not an nn.Module of torch.nn or siftc.nn")
    return cls


def _allowed_class(cls: type) -> bool:
    try:
        return resolve_class(class_name(cls)) is cls
    except Refused:
        return False


# ------------------------------------------------------------------------------------------ values

_ENUMS = {"dtype": (torch.dtype, lambda v: str(v).removeprefix("torch.")),
          "memory_format": (torch.memory_format, lambda v: str(v).removeprefix("torch.")),
          "layout": (torch.layout, lambda v: str(v).removeprefix("torch."))}


def encode(v):
    """A graph argument or constructor argument as JSON; fx Nodes as {"node": name}."""
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else {"float": repr(v)}
    if isinstance(v, fx.Node):
        return {"node": v.name}
    if isinstance(v, torch.Size):
        return {"size": list(v)}
    if isinstance(v, tuple):
        return {"tuple": [encode(x) for x in v]}
    if isinstance(v, list):
        return [encode(x) for x in v]
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return {"dict": {k: encode(x) for k, x in v.items()}}
    if isinstance(v, slice):
        return {"slice": [encode(v.start), encode(v.stop), encode(v.step)]}
    if v is Ellipsis:
        return {"ellipsis": True}
    if isinstance(v, torch.device):
        return {"device": str(v)}
    for tag, (kind, text) in _ENUMS.items():
        if isinstance(v, kind):
            return {tag: text(v)}
    if callable(v) and not isinstance(v, (type, nn.Module)):
        return {"fn": function_name(v)}
    raise NotData(f"holds a {type(v).__name__} value ({str(v)[:60]}), which is not stored as data")


def decode(v, nodes: dict):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, list):
        return [decode(x, nodes) for x in v]
    if not isinstance(v, dict) or len(v) != 1:
        raise Refused(f"holds a value {str(v)[:80]} of no known form")
    (tag, x), = v.items()
    if tag == "node":
        if x not in nodes:
            raise Refused(f"refers to node {x!r} before it is defined")
        return nodes[x]
    if tag in ("tuple", "size", "slice"):
        items = [decode(i, nodes) for i in _list(x, tag)]
        return {"tuple": tuple, "size": torch.Size, "slice": lambda a: slice(*a)}[tag](items)
    if tag == "dict" and isinstance(x, dict):
        return {str(k): decode(i, nodes) for k, i in x.items()}
    if tag == "float" and x in ("inf", "-inf", "nan"):
        return float(x)
    if tag == "ellipsis":
        return Ellipsis
    if tag == "device":
        return torch.device(str(x))
    if tag in _ENUMS and isinstance(x, str) and x.isidentifier() and \
            isinstance(getattr(torch, x, None), _ENUMS[tag][0]):
        return getattr(torch, x)
    if tag == "fn":
        return resolve_function(x)
    raise Refused(f"holds a value {str(v)[:80]} of no known form")


def _list(x, tag):
    if not isinstance(x, list) or (tag == "slice" and len(x) != 3):
        raise Refused(f"holds a malformed {tag} {str(x)[:60]}")
    return x


# ------------------------------------------------------------------------------------------ modules

def _is_tree(cls: type) -> bool:
    return cls is nn.Module or issubclass(cls, TREE) or cls.__module__ == "siftc.nn.blocks"


def _module_record(name: str, m: nn.Module) -> dict:
    from siftc import guard_data  # it reads this module's errors
    cls = type(m)
    if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._state_dict_hooks:
        raise NotData(f"module {name or '(root)'} has hooks, which are not stored as data")
    if name and guard_data.is_guard(m):
        return guard_data.to_data(name, m)
    if name and not _allowed_class(cls):
        raise NotData(f"module {name} is a {class_name(cls)}, which is not on the allow-list "
                      f"(torch.nn, siftc.nn)")
    if not name or _is_tree(cls):  # the root: a GraphModule, rebuilt from a plain Module and the graph
        return {"name": name, "class": class_name(nn.Module if not name else cls), "attrs": _attrs(name, m),
                "params": {k: _tensor_spec(p) for k, p in m._parameters.items()},
                "buffers": {k: _tensor_spec(b) | {"persistent": k not in m._non_persistent_buffers_set}
                            for k, b in m._buffers.items()}}
    args = _constructor_args(name, m)
    try:  # rebuilt as loading rebuilds it (on the meta device, the state assigned): nothing materialised
        new = _rebuild(cls, args, [k for k, p in m.named_parameters() if not p.requires_grad])
        new.load_state_dict(m.state_dict(), assign=True)
        _check_rebuilds(name, m, new)
    except Refused as e:
        raise NotData(f"module {name} {e}") from None
    except RuntimeError as e:
        raise NotData(f"module {name} does not take its own state when rebuilt ({' '.join(str(e).split())[:200]})") \
            from None
    frozen = [k for k, p in m.named_parameters() if not p.requires_grad]
    return {"name": name, "class": class_name(cls), "args": args, **({"frozen": frozen} if frozen else {})}


def _tensor_spec(t) -> dict | None:
    if t is None:
        return None
    return {"shape": list(t.shape), "dtype": encode(t.dtype), "requires_grad": bool(t.requires_grad)}


def _attrs(name: str, m: nn.Module) -> dict:
    """A tree module's public plain attributes (`has_g`-style class attributes are the class's)."""
    if isinstance(m, fx.GraphModule):
        return {}
    out = {}
    for k, v in vars(m).items():
        if k.startswith("_") or k in IGNORED_ATTRS:
            continue
        try:
            out[k] = encode(v)
        except NotData as e:
            raise NotData(f"module {name}'s attribute {k} {e}") from None
    return out


def _constructor_args(name: str, m: nn.Module) -> dict:
    """The __init__ arguments of `m`'s class, read off `m` by name: a bool flag whose attribute holds
    a tensor or None (Linear's `bias`, LayerNorm's `bias`) is whether it holds one."""
    args = {}
    for p in list(inspect.signature(type(m).__init__).parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in SKIPPED_ARGS:
            continue
        if p.name == "nnz" and hasattr(m, "nnz"):
            v = m.nnz
        elif not hasattr(m, p.name):
            if p.default is p.empty:
                raise NotData(f"module {name} ({class_name(type(m))}) has no attribute for its constructor "
                              f"argument {p.name}")
            continue  # its default; _check_rebuilds tells whether that was right
        else:
            v = getattr(m, p.name)
        if isinstance(p.default, bool) and (v is None or isinstance(v, torch.Tensor)):
            v = v is not None
        try:
            args[p.name] = encode(v)
        except NotData as e:
            raise NotData(f"module {name}'s constructor argument {p.name} {e}") from None
    return args


# A sparse layer is built holding no non-zeros (no random draw of positions, no init): the state dict
# loaded next gives it its values and positions, whatever their count (siftc.nn.sparse).
EMPTY = {"nnz": 0}


def _build_args(cls: type, args: dict, nodes=None, meta: bool = False) -> nn.Module:
    """`cls(**args)`; with `meta`, its tensors on the meta device (see on_meta), unless it holds
    buffers no state dict brings back (non-persistent), which are then built for real."""
    args = {k: decode(v, nodes or {}) for k, v in args.items()}
    try:
        if meta:
            with on_meta():
                m = cls(**args)
            if not any(sub._non_persistent_buffers_set for sub in m.modules()):
                for sub in m.modules():
                    if isinstance(sub._buffers.get("positions"), torch.Tensor):  # a sparse layer's: none yet,
                        sub.positions = sub.positions.new_empty(0)  # as many as its values (see on_meta)
                return m
        with torch.random.fork_rng():  # a constructor's init draws must not move the caller's RNG
            return cls(**args)
    except (TypeError, ValueError) as e:
        raise Refused(f"stores arguments {cls.__name__} does not take ({e})") from e


@contextlib.contextmanager
def on_meta():
    """Tensors created inside are on the meta device: shapes without memory or init (no dense draws of
    a rebuilt layer), for `load_state_dict(assign=True)` to replace with the stored ones. A sparse
    layer's constructor finds its positions with nonzero(), which a meta tensor answers only when told
    to assume every entry non-zero; the count is the state dict's anyway."""
    from torch.fx.experimental import _config
    with torch.device("meta"), _config.patch(meta_nonzero_assume_all_nonzero=True):
        yield


def _check_rebuilds(name: str, m: nn.Module, new: nn.Module):
    """`new`, built from the recorded arguments, is `m` up to its parameter values."""
    for k in IGNORED_ATTRS - {"training"}:
        if k in vars(m):
            setattr(new, k, getattr(m, k))
    new.train(m.training)
    mine, theirs = m.state_dict(), new.state_dict()
    grads = [(k, p.requires_grad) for k, p in m.named_parameters()] == \
        [(k, p.requires_grad) for k, p in new.named_parameters()]
    same = type(new) is type(m) and repr(new) == repr(m) and list(mine) == list(theirs) and grads and \
        all(mine[k].shape == theirs[k].shape and mine[k].dtype == theirs[k].dtype for k in mine) and \
        all(_same(vars(m).get(k), v) for k, v in vars(new).items() if not k.startswith("_"))
    # (attributes the constructor sets; what a runtime caches on the layer later is not structure)
    if not same:
        raise NotData(f"module {name} ({class_name(type(m))}) does not rebuild from its constructor "
                      f"arguments to the same module")


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
    try:
        return bool(a == b)
    except Exception:
        return type(a) is type(b)


def _build_tree(rec: dict) -> nn.Module:
    cls = resolve_class(rec["class"])
    if not _is_tree(cls):
        raise Refused(f"stores {rec['class']} as a tree; it is built from constructor arguments")
    m = cls.__new__(cls)
    nn.Module.__init__(m)
    for k, v in rec.get("attrs", {}).items():
        if not isinstance(k, str) or not k.isidentifier() or k.startswith("_"):
            raise Refused(f"sets attribute {k!r} on module {rec['name']}")
        object.__setattr__(m, k, decode(v, {}))
    for k, spec in rec.get("params", {}).items():
        m.register_parameter(k, None if spec is None else
                             nn.Parameter(_empty(spec, "meta"), requires_grad=bool(spec["requires_grad"])))
    for k, spec in rec.get("buffers", {}).items():  # a non-persistent one is not loaded: zeros, for real
        persistent = bool(spec.get("persistent")) if spec else True
        m.register_buffer(k, None if spec is None else _empty(spec, "meta" if persistent else "cpu"),
                          persistent=persistent)
    return m


def _empty(spec: dict, device: str) -> torch.Tensor:
    """A tensor of the spec's shape and dtype: on the meta device for the state dict to replace."""
    dtype = decode(spec["dtype"], {})
    if not isinstance(dtype, torch.dtype):
        raise Refused(f"holds a tensor of dtype {spec['dtype']}")
    return torch.zeros([int(s) for s in spec["shape"]], dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------ graph

def to_data(gm: fx.GraphModule) -> tuple[dict, dict, list]:
    """(data, constants, notes): the graph and module tree as JSON-able data, the tensors the graph
    reads with get_attr that are not in the state dict, and what was stored other than as it is (an
    output class stored as a dict). NotData if some part cannot be stored as data."""
    notes = []
    codegen = codegen_data(gm.graph._codegen, notes)
    records, skip = [], ()
    for name, m in gm.named_modules(remove_duplicate=False):
        if skip and any(name.startswith(s + ".") for s in skip):
            continue  # built by its parent's constructor
        rec = _module_record(name, m)
        records.append(rec)
        if "args" in rec:
            skip = (*skip, name)
    state = gm.state_dict(keep_vars=True)
    constants, nodes = {}, []
    for node in gm.graph.nodes:
        target = node.target
        if node.op == "call_function":
            target = function_name(target)
        elif node.op == "get_attr" and target not in state and not _is_training(gm, target):
            value = _attr(gm, target)
            if not isinstance(value, torch.Tensor):
                raise NotData(f"node {node.name} reads {target}, a {type(value).__name__}, not a tensor")
            constants[target] = value.detach().clone()
        nodes.append({"op": node.op, "name": node.name, "target": target,
                      "args": encode(node.args), "kwargs": encode(node.kwargs)})
    return {"class_name": type(gm).__name__, "modules": records, "nodes": nodes,
            "constants": sorted(constants), "codegen": codegen}, constants, notes


def _codegens() -> dict:
    from siftc.concrete_trace import _OutputTree
    return {"output_tree": _OutputTree, "pytree": fx.graph._PyTreeCodeGen}


def codegen_data(codegen, notes: list) -> dict | None:
    """How the graph takes its inputs and returns its outputs: None for plain arguments and outputs,
    else the pytree codegen's kind, argument names and input/output structures (siftc.tree_data)."""
    from siftc import tree_data  # it reads this module's errors
    if type(codegen) is fx.graph.CodeGen:
        return None
    kind = next((k for k, c in _codegens().items() if type(codegen) is c), None)
    if kind is None:
        raise NotData(f"the graph generates its code with {type(codegen).__name__}, which is not stored as data")
    info = codegen.pytree_info
    return {"kind": kind, "orig_args": list(info.orig_args),
            "in_spec": tree_data.to_data(info.in_spec, notes), "out_spec": tree_data.to_data(info.out_spec, notes)}


def _codegen(data):
    from siftc import tree_data
    if data is None:
        return fx.graph.CodeGen()
    if not isinstance(data, dict) or data.get("kind") not in _codegens() or not isinstance(data.get("orig_args"), list) \
            or not all(isinstance(a, str) and a.isidentifier() for a in data["orig_args"]):
        raise Refused(f"holds a code generator {str(data)[:80]} of no known form")
    info = fx.graph._PyTreeInfo(list(data["orig_args"]), tree_data.from_data(data.get("in_spec")),
                                tree_data.from_data(data.get("out_spec")))
    return _codegens()[data["kind"]](info)


def _attr(root, target: str):
    for atom in target.split("."):
        root = getattr(root, atom)
    return root


def _is_training(gm, target: str) -> bool:
    owner, _, atom = target.rpartition(".")
    return atom == "training" and isinstance(_attr(gm, owner) if owner else gm, nn.Module)


def from_data(data: dict, constants: dict) -> fx.GraphModule:
    """The GraphModule `to_data` stored (parameters uninitialised: load the state dict next).
    Refused if the data names a callable, class or attribute outside the allow-list."""
    if not isinstance(data, dict) or not isinstance(data.get("modules"), list) or \
            not isinstance(data.get("nodes"), list) or not data["modules"] or data["modules"][0].get("name") != "":
        raise Refused("is not a stored graph (modules and nodes)")
    root, names = None, set()
    for rec in data["modules"]:
        name = rec.get("name")
        parent, _, atom = str(name).rpartition(".")
        if name != "" and (parent not in names or not atom.isidentifier() and not atom.isdigit()):
            raise Refused(f"has module {name!r} outside the module tree")
        m = _build(rec)
        if name == "":
            root = m
        else:
            root.get_submodule(parent).add_module(atom, m)
        names.add(name)
    for target in data.get("constants", []):
        owner, _, atom = str(target).rpartition(".")
        if target not in constants or (owner and owner not in names) or not atom.isidentifier():
            raise Refused(f"reads constant {target!r}, which is not stored")
        setattr(root.get_submodule(owner) if owner else root, atom, constants[target])
    graph = _graph(data["nodes"], root, names, set(data.get("constants", [])))
    graph._codegen = _codegen(data.get("codegen"))
    name = data.get("class_name", "GraphModule")
    return fx.GraphModule(root, graph, class_name=name if str(name).isidentifier() else "GraphModule")


def _build(rec: dict) -> nn.Module:
    from siftc import guard_data
    if "guards" in rec and rec.get("name"):
        return guard_data.from_data(rec)
    if "args" not in rec:
        return _build_tree(rec)
    return _rebuild(_args_class(rec), rec["args"], rec.get("frozen", []))


def _rebuild(cls: type, args: dict, frozen=()) -> nn.Module:
    """`cls` from its stored arguments as loading builds it: on the meta device, a sparse layer with
    no non-zeros yet, for the state dict to fill; the parameters named in `frozen` do not require grad
    (load_state_dict(assign=True) keeps a parameter's flag)."""
    m = _build_args(cls, {**args, **{k: v for k, v in EMPTY.items() if k in args}}, meta=True)
    params = dict(m.named_parameters())
    if not isinstance(frozen, list) or any(k not in params for k in frozen):
        raise Refused(f"freezes parameters {str(frozen)[:80]} that {cls.__name__} does not have")
    for k in frozen:
        params[k].requires_grad_(False)
    return m


def _args_class(rec: dict) -> type:
    cls = resolve_class(rec["class"])
    if _is_tree(cls) or not isinstance(rec["args"], dict):
        raise Refused(f"stores {rec['class']} by constructor arguments; it is a container")
    return cls


def _graph(records: list, root: nn.Module, modules: set, constants: set) -> fx.Graph:
    graph, nodes = fx.Graph(), {}
    state = set(root.state_dict()) | {n for n, _ in root.named_buffers()}
    for rec in records:
        op, name, target = rec.get("op"), rec.get("name"), rec.get("target")
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name) or name in nodes:
            raise Refused(f"has a node named {name!r}")
        if op == "call_function":
            target = resolve_function(target)
        elif op == "call_method":
            if not isinstance(target, str) or target.startswith("_") or not callable(getattr(torch.Tensor, target, None)):
                raise Refused(f"node {name} calls method {target!r}, which is not a public torch.Tensor method")
        elif op == "call_module":
            if target not in modules or target == "":
                raise Refused(f"node {name} calls module {target!r}, which is not in the module tree")
        elif op == "get_attr":
            owner, _, atom = str(target).rpartition(".")
            if target not in state and target not in constants and not (atom == "training" and owner in modules):
                raise Refused(f"node {name} reads {target!r}, which is no parameter, buffer or constant")
        elif op in ("placeholder", "output"):
            if not isinstance(target, str) or not target.isidentifier():
                raise Refused(f"node {name} has target {target!r}")
        else:
            raise Refused(f"has a node {name} of op {op!r}")
        args, kwargs = decode(rec.get("args"), nodes), decode(rec.get("kwargs"), nodes)
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise Refused(f"node {name} has malformed arguments")
        if target is builtins.getattr and (len(args) != 2 or not isinstance(args[1], str) or args[1].startswith("_")):
            raise Refused(f"node {name} calls getattr for {args[1:2]!r}; only public attributes are read")
        node = graph.create_node(op, target, args, kwargs, name=name)
        if node.name != name:
            raise Refused(f"has a node named {name!r} that clashes with a Python or torch name")
        nodes[name] = node
    graph.lint()
    return graph

