"""The width rules: a table from op to what it does to the widths that flow through it.

Each rule takes the analysis (`siftc.passes.groups.Analysis`) and a node whose inputs are labelled and
returns the labels of the node's output dimensions. An op missing from the tables gets `no_rule`: every
width it touches keeps its size and the report names the op. Example, a residual block:

    y = relu(bn(conv(x)) + shortcut(x))
    conv: in = x's channels; out = a new group that widens     (MODULE_RULES[nn.Conv2d] = conv2d)
    bn, relu: pass the channel group through                    (same)
    +: ties the conv's out group and the shortcut's into one   (broadcast)
"""
import math
import operator

import torch
import torch.nn.functional as F
from torch import nn

HEADS = "attention heads keep their width heads x head_dim (pass --widen-heads to widen them)"


# ---- helpers ----------------------------------------------------------------------------------
def _tensors(a, node):
    """Input nodes of `node` that carry one tensor's labels, in argument order."""
    out = []
    for arg in list(node.args) + list(node.kwargs.values()):
        for x in arg if isinstance(arg, (list, tuple)) else (arg,):
            if isinstance(a.dims(x), tuple):
                out.append(x)
    return out


def _arg(node, i, name, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _dim(d, rank):
    return d + rank if d < 0 else d


def _op(a, node) -> str:
    if node.op == "call_module":
        return type(a.gm.get_submodule(node.target)).__name__
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return getattr(node.target, "__name__", str(node.target))


def _keep(a, x, node, out_shape=None):
    """Same rank: dimensions of equal size keep their labels; resized ones (spatial) are new."""
    xd, xs, os_ = a.dims(x), a.shape(x), out_shape or a.shape(node)
    if len(xs) != len(os_):
        return no_rule(a, node)
    return tuple(l if s == o else a.fresh(o, "spatial size", structural=True) for l, s, o in zip(xd, xs, os_))


# ---- generic rules ----------------------------------------------------------------------------
def no_rule(a, node):
    """Unknown op: the widths it touches keep their size, and the op is named as the reason."""
    op = _op(a, node)
    why = f"reaches {op} (node {node.name}), which has no width rule"
    for x in _tensors(a, node):
        for label in a.dims(x):
            a.fix(label, why, no_rule=op)
    tm = node.meta["tensor_meta"]
    if hasattr(tm, "shape"):
        return tuple(a.fresh(s, why) for s in tm.shape)
    return [tuple(a.fresh(s, why) for s in t.shape) if hasattr(t, "shape") else None for t in tm]


def placeholder(a, node):
    return tuple(a.fresh(s, "model input") for s in a.shape(node))


def output(a, node):
    for x in _tensors(a, node):
        for label in a.dims(x):
            a.fix(label, "model output")


def param(a, node):
    """A parameter or buffer used directly: its dimensions follow whatever they meet."""
    dims = tuple(a.fresh(s) for s in a.shape(node))
    a.use(node.target, **{f"dim{i}": l for i, l in enumerate(dims)})
    return dims


def factory(a, node):
    """torch.arange / zeros / ones: sizes given as numbers, not widths."""
    return tuple(a.fresh(s, f"size set by {_op(a, node)}", structural=True) for s in a.shape(node))


def same(a, node):
    """Elementwise, activations, dropout, pooling: channels pass through, spatial sizes may change."""
    return _keep(a, _tensors(a, node)[0], node)


def broadcast(a, node):
    """add / mul / where...: dimensions that meet (not broadcast) are the same dimension."""
    xs = _tensors(a, node)
    out_shape = a.shape(node)
    out = []
    for i in range(1, len(out_shape) + 1):
        meet = [a.dims(x)[-i] for x in xs if len(a.shape(x)) >= i and a.shape(x)[-i] == out_shape[-i]]
        for other in meet[1:]:
            a.tie(meet[0], other, f"{node.name} adds dims of different widths")
        out.append(meet[0] if meet else a.fresh(out_shape[-i], "broadcast", structural=True))
    return tuple(reversed(out))


def cat(a, node):
    xs, d = node.args[0], _arg(node, 1, "dim", 0)
    dims = [a.dims(x) for x in xs]
    d = _dim(d, len(dims[0]))
    for i in range(len(dims[0])):
        if i != d:
            for other in dims[1:]:
                a.tie(dims[0][i], other[i], f"{node.name} concatenates tensors of different widths")
    stacked = tuple(p for dd in dims for p in dd[d])  # the pieces side by side
    return dims[0][:d] + (stacked,) + dims[0][d + 1:]


def stack(a, node):
    xs, d = node.args[0], _arg(node, 1, "dim", 0)
    dims = [a.dims(x) for x in xs]
    for other in dims[1:]:
        for l, m in zip(dims[0], other):
            a.tie(l, m, f"{node.name} stacks tensors of different widths")
    d = _dim(d, len(dims[0]) + 1)
    return dims[0][:d] + (a.fresh(len(xs), "stacked count", structural=True),) + dims[0][d:]


def reduce(a, node):
    """mean / sum over dims: those dims go (or become 1 with keepdim)."""
    x = node.args[0]
    xd = a.dims(x)
    d, keep = _arg(node, 1, "dim"), _arg(node, 2, "keepdim", False)
    d = range(len(xd)) if d is None else (d if isinstance(d, (list, tuple)) else (d,))
    gone = {_dim(i, len(xd)) for i in d}
    out = []
    for i, l in enumerate(xd):
        if i not in gone:
            out.append(l)
        elif keep:
            out.append(a.fresh(1, "reduced", structural=True))
    return tuple(out)


def transpose(a, node):
    xd = list(a.dims(node.args[0]))
    i, j = (_dim(_arg(node, k, n), len(xd)) for k, n in ((1, "dim0"), (2, "dim1")))
    xd[i], xd[j] = xd[j], xd[i]
    return tuple(xd)


def permute(a, node):
    xd = a.dims(node.args[0])
    order = node.args[1:] if len(node.args) > 2 else node.args[1] if len(node.args) > 1 else node.kwargs["dims"]
    return tuple(xd[_dim(i, len(xd))] for i in order)


def getitem(a, node):
    src, idx = node.args
    dims = a.dims(src)
    if isinstance(dims, list):  # one output of split / chunk
        return dims[idx]
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(not (i is None or i is Ellipsis or isinstance(i, (int, slice))) for i in idx):
        return no_rule(a, node)  # tensor (advanced) indexing
    cover = len(dims) - sum(i is not None and i is not Ellipsis for i in idx)
    out, k = [], 0
    for i in idx:
        if i is None:
            out.append(a.fresh(1, "new axis", structural=True))
        elif i is Ellipsis:
            out += dims[k:k + cover]
            k += cover
        elif isinstance(i, slice) and i == slice(None):
            out.append(dims[k])
            k += 1
        else:
            a.fix(dims[k], f"indexed or sliced by {node.name}")
            if isinstance(i, slice):
                out.append(a.fresh(a.shape(node)[len(out)], "sliced", structural=True))
            k += 1
    return tuple(out) + dims[k:]


def matmul(a, node):
    x, y = node.args[:2]
    xd, yd = a.dims(x), a.dims(y)
    if len(xd) < 2 or len(yd) < 2:
        return no_rule(a, node)
    a.tie(xd[-1], yd[-2], f"{node.name} multiplies mismatched widths")
    batch = _batch(a, [x, y], len(a.shape(node)) - 2)
    return batch + (xd[-2], yd[-1])


def _batch(a, xs, n):
    """Leading (batch) dims of several tensors, broadcast together, `n` of them."""
    out = []
    for i in range(n, 0, -1):
        meet = [a.dims(x)[-2 - i] for x in xs if len(a.dims(x)) >= 2 + i and a.shape(x)[-2 - i] != 1]
        for other in meet[1:]:
            a.tie(meet[0], other, "batch dims of a product differ")
        out.append(meet[0] if meet else a.fresh(1, "broadcast", structural=True))
    return tuple(out)


def attention(a, node):
    """scaled_dot_product_attention(q, k, v): q.k over head_dim; output has v's head_dim."""
    q, k, v = node.args[:3]
    qd, kd, vd = a.dims(q), a.dims(k), a.dims(v)
    a.tie(qd[-1], kd[-1], f"{node.name}: q and k head widths differ")
    a.tie(kd[-2], vd[-2], f"{node.name}: k and v lengths differ")
    return _batch(a, [q, k, v], len(qd) - 2) + (qd[-2], vd[-1])


def split(a, node):
    """split / chunk along a width: the width becomes the sum of new groups, one per piece."""
    x = node.args[0]
    xd = a.dims(x)
    d = _dim(_arg(node, 2, "dim", 0), len(xd))
    sections = [t.shape[d] for t in node.meta["tensor_meta"]]
    labels = a.split(xd[d], sections)
    if labels is None:
        a.fix(xd[d], f"{node.name} cuts a combined width at other places")
        labels = [a.fresh(s, f"cut by {node.name}") for s in sections]
    if node.target in ("chunk", torch.chunk):
        for other in labels[1:]:  # chunk needs equal pieces at every width
            a.tie(labels[0], other, f"{node.name} chunks unequal pieces")
    elif isinstance(node.args[1], (int, list, tuple)):
        a.rewrites.append((node, "split"))
    else:
        a.fix(xd[d], f"{node.name} splits at a computed size")
    return [xd[:d] + (l,) + xd[d + 1:] for l in labels]


# ---- reshapes ---------------------------------------------------------------------------------
def flatten(a, node):
    return _regroup(a, node, rewrite=False)


def view(a, node):
    """view / reshape: the size arguments are rewritten to the new widths, so they must be plain."""
    shape = node.args[1:] if node.target != torch.reshape else node.args[1:2]
    if len(shape) == 1 and isinstance(shape[0], (list, tuple)):
        shape = shape[0]
    plain = not node.kwargs and all(isinstance(s, int) or not isinstance(a.dims(s), (tuple, list))
                                    for s in shape)
    dims = _regroup(a, node, rewrite=plain)
    if not plain:
        for label in a.dims(node.args[0]) + dims:
            a.fix(label, f"{node.name} reshapes to a computed shape")
    return dims


def _regroup(a, node, rewrite: bool):
    """Match input and output dims by products of sizes (size-1 dims aside), then per match:
    1 -> 1 keeps the label, 1 -> n splits a width into heads, n -> 1 merges (flatten)."""
    x = node.args[0]
    xd, ins, outs = a.dims(x), a.shape(x), a.shape(node)
    out = [a.fresh(1, "size-1 dim", structural=True) if s == 1 else None for s in outs]
    for i, s in enumerate(ins):
        if s == 1 and a.is_width(xd[i]):
            a.fix(xd[i], f"{node.name} drops or moves a width of size 1")
    ii = [i for i, s in enumerate(ins) if s != 1]
    oo = [j for j, s in enumerate(outs) if s != 1]
    p = q = 0
    while p < len(ii):
        si, sj = [ii[p]], [oo[q]]
        pa, pb = ins[ii[p]], outs[oo[q]]
        p, q = p + 1, q + 1
        while pa != pb:
            if pa < pb:
                pa, p = pa * ins[ii[p]], p + 1
                si.append(ii[p - 1])
            else:
                pb, q = pb * outs[oo[q]], q + 1
                sj.append(oo[q - 1])
        _match(a, node, [xd[i] for i in si], [ins[i] for i in si], sj, outs, out)
    if rewrite:
        a.rewrites.append((node, "shape"))
    return tuple(out)


def _match(a, node, labels, sizes, sj, outs, out):
    if len(labels) == 1 and len(sj) == 1:
        out[sj[0]] = labels[0]
    elif len(labels) == 1:  # one dim into several: heads x head_dim
        label, n = labels[0], math.prod(outs[j] for j in sj[:-1])
        pieces = a.resolve(label)
        if a.is_width(label) and a.widen_heads and len(pieces) == 1 and pieces[0][1] == 1:
            head = a.fresh(outs[sj[-1]])
            a.groups[head[0][0]].scale = n  # --round-to applies to heads x head_dim
            a.tie(label, tuple((g, n) for g, _ in head), f"{node.name} splits a width")
            out[sj[-1]] = head
        else:
            if a.is_width(label):
                a.fix(label, HEADS if len(pieces) == 1 else f"{node.name} splits a combined width")
            out[sj[-1]] = a.fresh(outs[sj[-1]], a.groups[pieces[0][0]].fixed)
        for j in sj[:-1]:
            out[j] = a.fresh(outs[j], "number of heads", structural=True)
    elif len(sj) == 1:  # several dims into one: flatten, merge heads
        wide = [i for i, l in enumerate(labels) if a.is_width(l)]
        if len(wide) == 1:
            rest = math.prod(s for i, s in enumerate(sizes) if i != wide[0])
            out[sj[0]] = tuple((g, m * rest) for g, m in labels[wide[0]])
            return
        for label in labels:
            a.fix(label, f"{node.name} merges two widths into one dim")
        reasons = [a.groups[g].fixed for l in labels for g, _ in a.resolve(l) if not a.groups[g].structural]
        out[sj[0]] = a.fresh(outs[sj[0]], reasons[0] if reasons else "merged fixed dims",
                             structural=not reasons)
    else:
        for label in labels:
            a.fix(label, f"{node.name} regroups dims")
        for j in sj:
            out[j] = a.fresh(outs[j], f"regrouped by {node.name}")


# ---- modules ----------------------------------------------------------------------------------
def _out(a, node, size):
    """The out side of a weight layer: a new group it produces (the same one on a second call)."""
    used = a.uses.get(node.target)
    return used["out"] if used and "out" in used else a.fresh(size, sourced=True)


def linear(a, node):
    mod = a.gm.get_submodule(node.target)
    xd = a.dims(node.args[0])
    out = _out(a, node, mod.out_features)
    a.use(node.target, **{"in": xd[-1], "out": out})
    return xd[:-1] + (out,)


def conv2d(a, node):
    mod = a.gm.get_submodule(node.target)
    x = node.args[0]
    xd = a.dims(x)
    if len(xd) != 4:
        return no_rule(a, node)
    spatial = _keep(a, x, node)[2:]
    if mod.groups == 1:
        out = _out(a, node, mod.out_channels)
        a.use(node.target, **{"in": xd[1], "out": out})
    elif mod.groups == mod.in_channels:  # depthwise: groups and outputs scale with the channels
        mult = mod.out_channels // mod.in_channels
        a.use(node.target, **{"in": xd[1]})
        out = tuple((g, m * mult) for g, m in xd[1])
    else:  # grouped: both sides stay multiples of the group count
        out = _out(a, node, mod.out_channels)
        a.use(node.target, **{"in": xd[1], "out": out})
        a.divide(xd[1], mod.groups)
        a.divide(out, mod.groups)
    return (xd[0], out) + spatial


def embedding(a, node):
    mod = a.gm.get_submodule(node.target)
    out = _out(a, node, mod.embedding_dim)
    a.use(node.target, out=out)
    return a.dims(node.args[0]) + (out,)


def channel_norm(a, node):
    """BatchNorm / GroupNorm: statistics and affine parameters per channel (dim 1)."""
    mod = a.gm.get_submodule(node.target)
    xd = a.dims(node.args[0])
    a.use(node.target, c=xd[1])
    if isinstance(mod, nn.GroupNorm):
        a.divide(xd[1], mod.num_groups)
    return xd


def layer_norm(a, node):
    mod = a.gm.get_submodule(node.target)
    xd = a.dims(node.args[0])
    n = len(mod.normalized_shape)
    a.use(node.target, **{f"d{i}": l for i, l in enumerate(xd[-n:])})
    return xd


def layer_norm_fn(a, node):
    """F.layer_norm(x, normalized_shape, weight, bias): the parameters follow x's last dims."""
    xd = a.dims(node.args[0])
    shape = _arg(node, 1, "normalized_shape")
    for p in (_arg(node, 2, "weight"), _arg(node, 3, "bias")):
        if a.dims(p) is not None:
            for l, m in zip(xd[-len(a.dims(p)):], a.dims(p)):
                a.tie(l, m, f"{node.name}: layer_norm parameters do not match")
    if isinstance(shape, (list, tuple)) and all(isinstance(s, int) for s in shape):
        a.rewrites.append((node, "normalized_shape"))
    elif not isinstance(shape, torch.fx.Node):
        return no_rule(a, node)
    return xd


# ---- the tables -------------------------------------------------------------------------------
_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid,
                        nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softmax, nn.Identity, nn.Dropout, nn.Dropout2d,
                        nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
MODULE_RULES = {
    nn.Linear: linear, nn.Conv2d: conv2d, nn.Embedding: embedding,
    nn.BatchNorm1d: channel_norm, nn.BatchNorm2d: channel_norm, nn.GroupNorm: channel_norm,
    nn.LayerNorm: layer_norm, nn.Flatten: flatten,
    **{m: same for m in _ELEMENTWISE_MODULES},
}

_ELEMENTWISE_FUNCTIONS = (F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.leaky_relu, F.elu, F.dropout, F.softmax,
                          F.log_softmax, F.adaptive_avg_pool2d, F.avg_pool2d, F.max_pool2d, torch.relu,
                          torch.tanh, torch.sigmoid, torch.softmax, torch.exp, torch.tril, torch.triu,
                          operator.neg, torch.neg, torch.sqrt, torch.rsqrt)
FUNCTION_RULES = {
    **{f: broadcast for f in (operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub,
                              torch.mul, torch.div, torch.where, torch.maximum, torch.minimum)},
    **{f: same for f in _ELEMENTWISE_FUNCTIONS},
    **{f: factory for f in (torch.arange, torch.zeros, torch.ones, torch.full, torch.empty)},
    torch.cat: cat, torch.concat: cat, torch.stack: stack, torch.flatten: flatten, torch.reshape: view,
    torch.transpose: transpose, torch.permute: permute, torch.split: split, torch.chunk: split,
    torch.unsqueeze: flatten, torch.squeeze: flatten, torch.mean: reduce, torch.sum: reduce,
    operator.getitem: getitem, torch.matmul: matmul, operator.matmul: matmul, torch.bmm: matmul,
    F.scaled_dot_product_attention: attention, F.layer_norm: layer_norm_fn,
}

METHOD_RULES = {
    **{m: same for m in ("relu", "sigmoid", "tanh", "softmax", "contiguous", "float", "half", "to", "type_as",
                         "clone", "detach", "exp", "neg", "tril", "triu")},
    **{m: broadcast for m in ("add", "sub", "mul", "div", "masked_fill")},
    "view": view, "reshape": view, "flatten": flatten, "unsqueeze": flatten, "squeeze": flatten,
    "transpose": transpose, "permute": permute, "split": split, "chunk": split,
    "mean": reduce, "sum": reduce, "matmul": matmul,
}

NODE_RULES = {"placeholder": placeholder, "get_attr": param, "output": output}


def rule_for(gm, node):
    """The rule for `node` (and extra arguments): a table look-up, `no_rule` when it is missing."""
    if node.op in NODE_RULES:
        return NODE_RULES[node.op], ()
    if node.op == "call_module":
        for cls in type(gm.get_submodule(node.target)).__mro__:
            if cls in MODULE_RULES:
                return MODULE_RULES[cls], ()
        return no_rule, ()
    table = FUNCTION_RULES if node.op == "call_function" else METHOD_RULES
    try:
        return table.get(node.target, no_rule), ()
    except TypeError:  # an unhashable target
        return no_rule, ()
