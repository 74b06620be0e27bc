"""Width rules for ops that keep, tie, stack, reduce or cut tensor dimensions (elementwise ops, add,
cat, split, indexing, products), and `no_rule` for ops that have none. The table that picks a rule for
an op is `siftc.passes.width_rules`; each rule gets the analysis `a` (`siftc.passes.groups.Analysis`)
and a node whose inputs are labelled, and returns the labels of the node's output dimensions.

    h = a(x) + b(x)        broadcast: a's out group and b's out group become one group
    h = cat([a(x), b(x)])  cat: h's channel label is a's pieces then b's, ((g_a, 1), (g_b, 1))
"""
import operator

import torch
import torch.fx


def node_arg(node, i, name, default=None):
    """Argument `i` of an fx node, passed by position or as keyword `name`."""
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def positive_dim(d, rank):
    """A dim index counted from the front (-1 -> rank - 1)."""
    return d + rank if d < 0 else d


def _tensors(a, node):
    """Input nodes of `node` that carry one tensor's labels, in argument order."""
    out = []
    for arg in list(node.args) + list(node.kwargs.values()):
        for x in arg if isinstance(arg, (list, tuple)) else (arg,):
            if isinstance(a.dims(x), tuple):
                out.append(x)
    return out


def _op(a, node) -> str:
    """The op a node calls, as a reader names it: Conv2d, Tensor.view, cumsum."""
    if node.op == "call_module":
        return type(a.gm.get_submodule(node.target)).__name__
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return getattr(node.target, "__name__", str(node.target))


def keep_dims(a, x, node, out_shape=None):
    """Same rank: dimensions of equal size keep their labels; resized ones (spatial) are new."""
    xd, xs, os_ = a.dims(x), a.shape(x), out_shape or a.shape(node)
    if len(xs) != len(os_):
        return no_rule(a, node)
    return tuple(l if s == o else a.fresh(o, "spatial size", structural=True) for l, s, o in zip(xd, xs, os_))


# ---- rules ----------------------------------------------------------------------------------
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
    """A parameter or buffer used directly: its dimensions follow whatever they meet (an empty one, a
    key/value cache before its first step, has no values to resize)."""
    empty = 0 in a.shape(node)
    dims = tuple(a.fresh(s, "empty tensor" if empty else None, structural=empty) for s in a.shape(node))
    a.use(node.target, **{f"dim{i}": l for i, l in enumerate(dims)})
    return dims


def factory(a, node):
    """torch.arange / zeros / ones: sizes given as numbers, not widths."""
    return tuple(a.fresh(s, f"size set by {_op(a, node)}", structural=True) for s in a.shape(node))


def same(a, node):
    """Elementwise, activations, dropout, pooling: channels pass through, spatial sizes may change."""
    return keep_dims(a, _tensors(a, node)[0], node)


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
    """Dims other than `dim` are tied; along `dim` the pieces are laid side by side. A 1-D empty tensor
    is skipped, as torch.cat skips it (an empty key/value cache before its first step)."""
    xs, d = node.args[0], node_arg(node, 1, "dim", 0)
    xs = [x for x in xs if tuple(a.shape(x)) != (0,)] or xs
    dims = [a.dims(x) for x in xs]
    d = positive_dim(d, len(dims[0]))
    for i in range(len(dims[0])):
        if i != d:
            for other in dims[1:]:
                a.tie(dims[0][i], other[i], f"{node.name} concatenates tensors of different widths")
    stacked = tuple(p for dd in dims for p in dd[d])  # the pieces side by side
    return dims[0][:d] + (stacked,) + dims[0][d + 1:]


def expand(a, node):
    """x.expand(*sizes): aligned from the right, a dim that keeps its size keeps its label; a size-1 dim
    grown to n (grouped-query attention's repeat_kv, a broadcast table) gets n from the arguments, so
    it is not a width. The size arguments are rewritten with the widths, like a view's."""
    xd, xs, outs = a.dims(node.args[0]), a.shape(node.args[0]), a.shape(node)
    sizes = node.args[1:] if len(node.args) > 2 or not isinstance(node.args[1], (list, tuple)) else node.args[1]
    lead = len(outs) - len(xs)
    out = []
    for j, o in enumerate(outs):
        if j >= lead and xs[j - lead] == o:
            out.append(xd[j - lead])
        else:  # a new or grown dim: the size read from another tensor is that tensor's dim
            out.append(size_label(a, sizes[j]) or a.fresh(o, f"size set by {node.name}", structural=True))
    a.rewrites.append((node, "shape"))
    return tuple(out)


def size_label(a, arg):
    """The label of the tensor dim a size argument reads (`x.size(0)`, `x.shape[0]`), or None."""
    if not isinstance(arg, torch.fx.Node):
        return None
    if arg.op == "call_method" and arg.target == "size" and len(arg.args) == 2 and isinstance(arg.args[1], int):
        dims = a.dims(arg.args[0])
        return dims[arg.args[1]] if isinstance(dims, tuple) else None
    if arg.op == "call_function" and arg.target is operator.getitem and isinstance(arg.args[1], int):
        shape = arg.args[0]
        whole = isinstance(shape, torch.fx.Node) and (
            shape.op == "call_method" and shape.target == "size" and len(shape.args) == 1 or
            shape.op == "call_function" and shape.target is getattr and shape.args[1] == "shape")
        dims = a.dims(shape.args[0]) if whole else None
        return dims[arg.args[1]] if isinstance(dims, tuple) else None
    return None


def stack(a, node):
    xs, d = node.args[0], node_arg(node, 1, "dim", 0)
    dims = [a.dims(x) for x in xs]
    for other in dims[1:]:
        for l, m in zip(dims[0], other):
            a.tie(l, m, f"{node.name} stacks tensors of different widths")
    d = positive_dim(d, len(dims[0]) + 1)
    return dims[0][:d] + (a.fresh(len(xs), "stacked count", structural=True),) + dims[0][d:]


def reduce(a, node):
    """mean / sum over dims: those dims go (or become 1 with keepdim)."""
    x = node.args[0]
    xd = a.dims(x)
    d, keep = node_arg(node, 1, "dim"), node_arg(node, 2, "keepdim", False)
    d = range(len(xd)) if d is None else (d if isinstance(d, (list, tuple)) else (d,))
    gone = {positive_dim(i, len(xd)) for i in d}
    out = []
    for i, l in enumerate(xd):
        if i not in gone:
            out.append(l)
        elif keep:
            out.append(a.fresh(1, "reduced", structural=True))
    return tuple(out)


def transpose(a, node):
    xd = list(a.dims(node.args[0]))
    i, j = (positive_dim(node_arg(node, k, n), len(xd)) for k, n in ((1, "dim0"), (2, "dim1")))
    xd[i], xd[j] = xd[j], xd[i]
    return tuple(xd)


def permute(a, node):
    xd = a.dims(node.args[0])
    order = node.args[1:] if len(node.args) > 2 else node.args[1] if len(node.args) > 1 else node.kwargs["dims"]
    return tuple(xd[positive_dim(i, len(xd))] for i in order)


def _int_list(i) -> bool:
    return isinstance(i, list) and all(isinstance(j, int) for j in i)


def getitem(a, node):
    """x[idx]: `:` keeps a dim, None adds one; an int, a slice or one list of ints (`h[:, [-1], :]`)
    picks positions along a dim, which fixes it if it is a width. Tensor indexes have no rule."""
    src, idx = node.args
    dims = a.dims(src)
    if isinstance(dims, list):  # one output of split / chunk
        return dims[idx]
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(not (i is None or i is Ellipsis or isinstance(i, (int, slice)) or _int_list(i)) for i in idx) \
            or sum(map(_int_list, idx)) > 1:
        return no_rule(a, node)  # tensor (advanced) indexing, or lists broadcast together
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
            if not isinstance(i, int):
                out.append(a.fresh(a.shape(node)[len(out)], f"sliced by {node.name}", structural=True))
            k += 1
    return tuple(out) + dims[k:]


def matmul(a, node):
    x, y = node.args[:2]
    xd, yd = a.dims(x), a.dims(y)
    if len(xd) < 2 or len(yd) < 2:
        return no_rule(a, node)
    a.tie(xd[-1], yd[-2], f"{node.name} multiplies mismatched widths")
    batch = _batch(a, node, [x, y])
    return batch + (xd[-2], yd[-1])


def _batch(a, node, xs):
    """The output's leading (batch) dims, aligned from the right over the inputs' own (all but their
    last two): an input dim of the output's size is that dim; one of another size is broadcast (1) or
    repeated (grouped-query attention's fewer key/value heads), and ties nothing."""
    out_shape = a.shape(node)
    out = []
    for i in range(len(out_shape) - 2, 0, -1):
        meet = [a.dims(x)[-2 - i] for x in xs if len(a.dims(x)) >= 2 + i and a.shape(x)[-2 - i] == out_shape[-2 - i]]
        for other in meet[1:]:
            a.tie(meet[0], other, "batch dims of a product differ")
        out.append(meet[0] if meet else a.fresh(out_shape[-2 - i], "broadcast", structural=True))
    return tuple(out)


def attention(a, node):
    """scaled_dot_product_attention(q, k, v): q.k over head_dim; output has v's head_dim."""
    q, k, v = node.args[:3]
    qd, kd, vd = a.dims(q), a.dims(k), a.dims(v)
    a.tie(qd[-1], kd[-1], f"{node.name}: q and k head widths differ")
    a.tie(kd[-2], vd[-2], f"{node.name}: k and v lengths differ")
    return _batch(a, node, [q, k, v]) + (qd[-2], vd[-1])


def split(a, node):
    """split / chunk along a width: the width becomes the sum of new groups, one per piece. The split
    sizes are rewritten to the pieces' new widths (unless a computed size cuts a batch or sequence
    dim: that size follows the input)."""
    x = node.args[0]
    xd = a.dims(x)
    d = positive_dim(node_arg(node, 2, "dim", 0), len(xd))
    sections = [t.shape[d] for t in node.meta["tensor_meta"]]
    labels = a.split(xd[d], sections)
    if labels is None:
        a.fix(xd[d], f"{node.name} cuts a combined width at other places")
        labels = [a.fresh(s, f"cut by {node.name}") for s in sections]
    if node.target in ("chunk", torch.chunk):
        for other in labels[1:]:  # chunk needs equal pieces at every width
            a.tie(labels[0], other, f"{node.name} chunks unequal pieces")
    elif isinstance(node.args[1], (int, list, tuple)) or not all(a.groups[g].structural for g, _ in a.resolve(xd[d])):
        a.rewrites.append((node, "split"))  # a size computed from a width (C of x.size()) changes with it
    return [xd[:d] + (l,) + xd[d + 1:] for l in labels]
