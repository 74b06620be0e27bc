"""Sparse Wide on a whole graph: every width of the network times k = sqrt(1/(1-s)), weights sparse.

Before (examples/mlp.py, --kind wide --sparsity 0.75, so k = 2):
    net.0: Linear(64, 256)   net.2: Linear(256, 256)   net.4: Linear(256, 256)   net.6: Linear(256, 10)
After:
    net.0: Linear(64, 512)                              # kept dense, out side widened
    net.2: SparseLinear(512, 512, nnz <= 65,536)        # dense budget, less what net.0/net.6 grew by
    net.4: SparseLinear(512, 512, nnz <= 65,536)
    net.6: Linear(512, 10)                              # kept dense, in side widened
The input (64) and the output (10) keep their widths. Widths move in groups found on the fx graph
(`siftc.passes.groups`); view/reshape/split arguments are rewritten to the new sizes, and a shape check
re-runs the graph. Iso-FLOP: `siftc.solve.wide_nnz`.

With a sparsity pattern (`--pattern`, siftc.passes.patterns), each sparse layer's sides become multiples
of the pattern's tile (block:RxC: out of R, in of C; nm:N:M: in of M; nm:N:M:t: both of M), so the
widened layers take the pattern itself; a side fixed at a size the tile does not divide (a 3-channel
input, 10 classes) gets a fallback (siftc.sparse.patterns.fit) after the pass. N:M fixes every sparse
layer's density at N/M, so the widths solve around it: `siftc.passes.wide_density`.
"""
import math
import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch import nn

from siftc import flops, layers, solve
from siftc.errors import TraceError, UsageError
from siftc.nn.sparse import SPARSE_LAYERS, shapes_only
from siftc.passes.groups import analyse
from siftc.passes.record import LayerRecord, PassResult
from siftc.passes.select import choose, replace_submodule, tied_weights, weight_layers
from siftc.passes import wide_density
from siftc.passes.tensor_rules import node_arg, positive_dim
from siftc.sparse.patterns import Pattern
from siftc.trace import NodeFailed, node_shape, record_shapes

if TYPE_CHECKING:  # the config validates kinds against KINDS here: no import back at run time
    from siftc.config import ConvertConfig


@dataclass
class Plan:
    """One module's old and new widths (by side name), and what happens to it."""
    name: str
    module: nn.Module
    old: dict
    new: dict
    positions: int = 0       # output positions per channel, over all its calls
    sparse: bool = False
    kept_dense: bool = False  # by the user's or the paper's choice (not a grouped conv, dense by type)
    nnz: int = 0
    reason: str = ""

    @property
    def changed(self) -> bool:
        return self.old != self.new


def run(gm: torch.fx.GraphModule, cfg: "ConvertConfig", generator: torch.Generator):
    """Widen every width group of `gm` by k and sparsify its weight layers. Returns (gm, PassResult), with
    the report's "groups" and "non_weight_flops"."""
    a = analyse(gm, cfg.widen_heads)
    _tie_shared_weights(gm, a)
    _check_strict(a, cfg)
    choices = {c.name: c for c in choose(gm, cfg.keep_dense, cfg.strict)}
    pattern = Pattern.parse(cfg.pattern)
    _divide_by_tiles(a, choices, pattern)
    multiple = lambda divs, scale: math.lcm(cfg.round_to // math.gcd(cfg.round_to, scale), *divs)
    if pattern.density is None:
        new_width = a.widths(lambda size, divs, scale: solve.wide_width(size, cfg.sparsity, multiple(divs, scale)))
    else:  # N:M: the widths solve around its density, from the plans at the dense widths
        dense = _plans(gm, a, choices, wide_density.width_of(a, {g: grp.size for g, grp in enumerate(a.groups)}))
        new_width = wide_density.widths(a, _weighted(dense), pattern.density, multiple)
    width = wide_density.width_of(a, new_width)
    plans = _plans(gm, a, choices, width)
    _solve(plans, cfg, pattern)
    dense_shapes = {n: node_shape(n) for n in gm.graph.nodes}
    _rebuild(gm, plans, generator)
    _resize_params(gm, a, width, generator)
    _rewrite_sizes(gm, a, width)
    gm.graph.eliminate_dead_code()  # sizes computed from a width (C // n_head) that nothing reads now
    gm.graph.lint()
    gm.recompile()
    _check_shapes(gm, width)
    records = [_record(p, gm.get_submodule(p.name)) for p in plans.values() if layers.layer_type(p.module)]
    return gm, PassResult(records, _group_report(a, new_width), _non_weight(gm, dense_shapes))


# ---- analysis additions -----------------------------------------------------------------------
def _weight_dims(mod, sides):
    """Labels of a module's weight dims (None where no width group: vocabulary, kernel)."""
    t = layers.layer_type(mod)
    return tuple(sides.get(s) if s else None for s in t.sides) if t else ()


def _tie_shared_weights(gm, a):
    """Modules sharing one weight Parameter (a tied LM head) must get the same new shape."""
    for name, other in tied_weights(gm).items():
        if name in a.uses and other in a.uses:
            mine = _weight_dims(gm.get_submodule(name), a.uses[name])
            theirs = _weight_dims(gm.get_submodule(other), a.uses[other])
            for x, y in zip(mine, theirs):
                if x is not None and y is not None:
                    a.tie(x, y, f"{name} shares its weight with {other}")
                elif (x or y) is not None:
                    a.fix(x or y, f"{name} shares its weight with {other}")
    a.resolve_uses()


def _divide_by_tiles(a, choices, pattern: Pattern):
    """Each sparse layer's sides must stay multiples of the pattern's tile: (rows, cols) = (out, in)."""
    rows, cols = pattern.tile
    for name, choice in choices.items():
        sides = a.uses.get(name)
        if choice.transform and sides is not None:
            for side, step in (("out", rows), ("in", cols)):
                if side in sides:
                    a.divide(sides[side], step)


def _check_strict(a, cfg):
    for g, grp in enumerate(a.groups):
        if cfg.strict and grp.no_rule and grp.sourced and a.find(g) == g and grp.alias is None:
            members = a.members().get(g, ["an unnamed width"])
            raise UsageError(f"--strict: the width of {', '.join(members[:3])} {grp.fixed}; drop --strict "
                             f"to keep that width and report it, or replace the op")


# ---- planning ---------------------------------------------------------------------------------
def _plans(gm, a, choices, width) -> dict:
    plans, modules = {}, dict(gm.named_modules())
    for name, sides in a.uses.items():
        if name not in modules:
            continue  # a parameter used directly: `_resize_params`
        mod = modules[name]
        plans[name] = Plan(name, mod, {s: sum(a.groups[g].size * m for g, m in l) for s, l in sides.items()},
                           {s: width(l) for s, l in sides.items()})
    for name, positions in flops.graph_positions(gm).items():
        if name in plans:
            plans[name].positions = positions
    for name, mod in weight_layers(gm):
        choice = choices[name]
        plan = plans.get(name)
        if plan is None:  # no width rule recorded it: a type the table leaves as is says why itself
            plans[name] = Plan(name, mod, {}, {}, reason=choice.reason if not layers.layer_type(mod).transforms
                               else f"{choice.reason or type(mod).__name__}: no width rule, left as is")
            continue
        plan.sparse, plan.kept_dense = choice.transform, choice.kept_dense
        plan.reason = choice.reason
        if layers.grouped(mod):
            groups = layers.layer_type(mod).groups_at(mod, plan.new["in"])
            how = "groups scale with its channels" if layers.depthwise(mod) else "each group keeps its width"
            plan.reason = (f"{'depthwise' if layers.depthwise(mod) else 'grouped'} conv (groups={mod.groups}"
                           f"{f' -> {groups}' if groups != mod.groups else ''}): widened by its number of groups "
                           f"({how}), kept dense and paid for by the sparse layers")
    if not any(p.sparse for p in plans.values()):
        kept = [n for n, _ in weight_layers(gm)]
        raise UsageError(f"wide: nothing to widen: every weight layer ({', '.join(kept[:4])}) is kept dense, "
                         f"so no sparse layer can pay for wider widths; keep fewer dense (--keep-dense "
                         f"PATTERN or --no-keep-dense) or use a model with hidden layers")
    return plans


def _weighted(plans) -> list[Plan]:
    """The plans whose FLOPs the widths change: counted weight layers with a width rule."""
    return [p for p in plans.values() if layers.counted(p.module) and p.new]


def _solve(plans, cfg, pattern: Pattern):
    weighted = _weighted(plans)
    sparse = [p for p in weighted if p.sparse]
    if pattern.density is not None:
        return wide_density.nnz(weighted, pattern, cfg.round_to)
    extra = sum(2 * (layers.new_weights(p.module, p.new) - p.module.weight.numel()) * p.positions
                for p in weighted if not p.sparse)
    budgets = [p.module.weight.numel() for p in sparse]
    capacities = [layers.new_weights(p.module, p.new) for p in sparse]
    try:
        nnz = solve.wide_nnz(budgets, capacities, [p.positions for p in sparse], extra)
    except ValueError:
        grown = [p for p in weighted if not p.sparse and p.changed]
        kept = [p.name for p in grown if p.kept_dense]
        typed = [p.name for p in grown if not p.kept_dense]  # dense by type: grouped convs
        what = " and ".join(filter(None, [kept and f"the kept-dense layers ({', '.join(kept[:4])})",
                                          typed and f"the layers no kind sparsifies ({', '.join(typed[:4])})"]))
        fix = "keep fewer dense (--keep-dense PATTERN or --no-keep-dense) or " if kept else ""
        raise UsageError(f"wide at sparsity {cfg.sparsity}: {what} grow by more FLOPs than the sparse layers "
                         f"have; {fix}lower the sparsity") from None
    for p, n in zip(sparse, nnz):
        p.nnz = n


# ---- rewriting --------------------------------------------------------------------------------
def _layer_norm(m, new):
    return nn.LayerNorm([new[f"d{i}"] for i in range(len(new))], m.eps, m.elementwise_affine,
                        bias=getattr(m, "bias", None) is not None)


def _rms_norm(m, new):
    return nn.RMSNorm([new[f"d{i}"] for i in range(len(new))], m.eps, m.elementwise_affine)


def _group_norm(m, new):
    return nn.GroupNorm(m.num_groups, new["c"], m.eps, m.affine)


def _batch_norm(m, new):
    return type(m)(new["c"], m.eps, m.momentum, m.affine, m.track_running_stats)


NORM_COPIES = {nn.LayerNorm: _layer_norm, nn.RMSNorm: _rms_norm, nn.GroupNorm: _group_norm, nn.modules.batchnorm._BatchNorm: _batch_norm}


def _build(p: Plan, generator) -> nn.Module:
    """The module of `p` at its new widths, initialised by its own init (or its weights, if unchanged)."""
    m, new = p.module, p.new
    t = layers.layer_type(m)
    if t is None:
        return layers.lookup(NORM_COPIES, m)(m, new)
    if p.sparse:
        return t.sparse_copy(m, p.nnz, generator, d_in=new["in"], d_out=new["out"])
    return t.widened(m, new)


def _tie(new: nn.Module, first: nn.Module):
    """Make `new` share `first`'s weight: the Parameter of two dense layers, the values and positions of
    two sparse ones. A dense and a sparse layer cannot share one tensor; they are left untied."""
    if isinstance(new, SPARSE_LAYERS) and isinstance(first, SPARSE_LAYERS):
        new.values, new.positions = first.values, first.positions
    elif not isinstance(new, SPARSE_LAYERS) and not isinstance(first, SPARSE_LAYERS):
        new.weight = first.weight


@torch.no_grad()
def _rebuild(gm, plans, generator):
    replaced = {}  # id of an old weight Parameter -> the first new module holding it (ties stay tied)
    for p in plans.values():
        if not p.new or (not p.changed and not p.sparse):
            continue
        new = _build(p, generator)
        if not p.changed:  # sparse at the dense shape: keep the dense weights at its positions
            new.load_state_dict(layers.layer_type(p.module).torch_state(p.module), strict=False)
        old_w = getattr(p.module, "weight", None)
        if old_w is not None and id(old_w) in replaced:
            _tie(new, replaced[id(old_w)])
        elif old_w is not None:
            replaced[id(old_w)] = new
        new.train(p.module.training)
        replace_submodule(gm, p.name, new)


@torch.no_grad()
def _resize_params(gm, a, width, generator):
    """Parameters and buffers used directly in the graph (a learned position table, a scale): old
    values in the leading block, new entries drawn like the old ones (same mean and std)."""
    modules = dict(gm.named_modules())
    for target, sides in a.uses.items():
        if target in modules:
            continue
        owner_name, _, attr = target.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        old = getattr(owner, attr)
        shape = tuple(width(sides[f"dim{i}"]) for i in range(old.dim()))
        if shape == tuple(old.shape):
            continue
        std = float(old.float().std()) if old.numel() > 1 else 0.0
        new = torch.full(shape, float(old.float().mean()), dtype=old.dtype)
        if std > 0:
            new.normal_(float(old.float().mean()), std, generator=generator)
        new[tuple(slice(0, s) for s in old.shape)] = old
        if attr in owner._parameters:
            setattr(owner, attr, nn.Parameter(new, requires_grad=old.requires_grad))
        elif attr in owner._buffers:
            owner._buffers[attr] = new
        else:
            setattr(owner, attr, new)


def _new_shape(node, width):
    return tuple(width(l) for l in node.meta["siftc.dims"])


def _rewrite_sizes(gm, a, width):
    """Size arguments baked into the graph (view shapes, split sizes) follow the new widths."""
    for node, how in a.rewrites:
        old = node_shape(node) if how != "split" else None
        if how == "shape":
            new, labels = _new_shape(node, width), node.meta["siftc.dims"]
            nested = len(node.args) == 2 and isinstance(node.args[1], (list, tuple))
            args = list(node.args[1] if nested else node.args[1:])
            args = [s if _keeps(a, s, label, o, n) else n for s, label, o, n in zip(args, labels, old, new)]
            node.args = (node.args[0], tuple(args)) if nested else (node.args[0], *args)
        elif how == "split":
            d = positive_dim(node_arg(node, 2, "dim", 0), len(node.args[0].meta["siftc.dims"]))
            sizes = [width(dims[d]) for dims in node.meta["siftc.dims"]]
            node.args = (node.args[0], sizes, *node.args[2:])
        else:  # F.layer_norm's normalized_shape
            n = len(node.args[1])
            node.args = (node.args[0], tuple(_new_shape(node, width)[-n:]), *node.args[2:])


def _keeps(a, arg, label, old: int, new: int) -> bool:
    """Keep a view's size argument: -1, an unchanged number, or a size read from the model's input
    (batch, sequence length: the graph keeps taking any). Sizes computed from a width (C // n_head)
    become the new number. A size read straight off a tensor (`x.shape[0]`, `x.size(1)`) is judged by
    the dim it was read from: HF's attention mask is built from aranges (dims of no input) and then
    expanded to the batch size read off the hidden states, which must stay the batch size."""
    if isinstance(arg, int):
        return arg == -1 or arg == new
    read = _dim_read(arg)
    if read is not None and a.dims(read[0]) is not None:
        label = a.dims(read[0])[read[1]]
    return old == 1 or all(a.groups[g].fixed == "model input" for g, _ in label)


def _dim_read(arg) -> tuple | None:
    """(tensor node, dim) if `arg` is one size read off a tensor: x.size(d), x.size()[d], x.shape[d]."""
    if not isinstance(arg, torch.fx.Node) or arg.op not in ("call_method", "call_function"):
        return None
    if arg.op == "call_method" and arg.target == "size" and len(arg.args) == 2:
        x, d = arg.args
    elif arg.target is operator.getitem and isinstance(arg.args[1], int) and isinstance(arg.args[0], torch.fx.Node):
        whole = arg.args[0]
        if not (whole.op == "call_method" and whole.target == "size" and len(whole.args) == 1 or
                whole.op == "call_function" and whole.target is getattr and whole.args[1] == "shape"):
            return None
        x, d = whole.args[0], arg.args[1]
    else:
        return None
    dims = x.meta.get("siftc.dims") if isinstance(x, torch.fx.Node) else None
    if not isinstance(d, int) or not isinstance(dims, tuple) or not -len(dims) <= d < len(dims):
        return None
    return x, d % len(dims)


def _check_shapes(gm, width):
    """Run the rewritten graph on zeros shaped like the example inputs; every tensor must come out at
    the size the width analysis predicts. The tensor_meta on the graph then describes the wide model."""
    inputs = [torch.zeros(n.meta["tensor_meta"].shape, dtype=n.meta["tensor_meta"].dtype)
              for n in gm.graph.nodes if n.op == "placeholder"]
    predicted = {n: _new_shape(n, width) for n in gm.graph.nodes if isinstance(n.meta.get("siftc.dims"), tuple)}
    try:  # on fake tensors, and sparse layers give zeros of their shapes: nothing is computed or built
        with shapes_only(gm), FakeTensorMode(allow_non_fake_inputs=True) as fake:
            record_shapes(gm, [fake.from_tensor(t) for t in inputs])
    except NodeFailed as e:
        raise TraceError(f"wide: the widened graph does not run at node {e.node.name}: {e.first_line}; a size in "
                         f"the model is not derived from its inputs (keep that layer dense or report it)") from e.error
    for node, shape in predicted.items():
        if node_shape(node) != shape:
            raise TraceError(f"wide: node {node.name} came out {node_shape(node)}, expected {shape}; "
                             f"its op hides a width the rules do not see (please report it)")


# ---- report -----------------------------------------------------------------------------------
def _record(p: Plan, new: nn.Module) -> LayerRecord:
    """What became of `p`'s module (`new` is what replaced it, or the module itself)."""
    m, t = p.module, layers.layer_type(p.module)
    dense_shape = t.dense_shape(m)
    counts = {"dense_flops": flops.module_flops(m, p.positions), "flops": flops.module_flops(new, p.positions)}
    if not p.new:
        return LayerRecord(p.name, "skipped", dense_shape, reason=p.reason, search_space=t.weight_count(m), **counts)
    shape = t.weight_shape(m, p.new)
    weights = math.prod(shape)
    structure = {"in": p.new.get("in"), "out": p.new.get("out"), "dense_in": p.old.get("in"),
                 "dense_out": p.old.get("out")}
    new_shape = "x".join(map(str, shape))  # as the dense shape is printed: 202x202x3x3
    if p.sparse:
        return LayerRecord(p.name, "wide", dense_shape, new_shape, structure, density=p.nnz / weights,
                           search_space=weights, **counts)
    why = p.reason or "kept dense"
    if p.changed and not layers.grouped(m):  # a grouped conv's reason says it already
        why += "; " + t.widened_why
    return LayerRecord(p.name, "dense", dense_shape, new_shape, structure, search_space=weights, reason=why,
                       **counts)


def _group_report(a, new_width) -> list[dict]:
    out = []
    for g, members in sorted(a.members().items()):
        size, new = a.groups[g].size, new_width[g]
        out.append({"id": g, "members": members, "width": size, "new_width": new,
                    "widened": new != size, "fixed": a.why_fixed(g) or None})
    return out


def _non_weight(gm, dense_shapes) -> dict:
    """The work a wider stream adds besides its weight layers (`siftc.flops.non_weight`), dense and
    widened: reported beside the iso-FLOP total, not in it."""
    dense, wide = flops.non_weight(gm, dense_shapes.__getitem__), flops.non_weight(gm, node_shape)
    return {"dense": dense, "wide": wide, "extra": wide - dense,
            "counted": "norms at 2 FLOPs per element, scaled_dot_product_attention products at 2 per MAC"}
