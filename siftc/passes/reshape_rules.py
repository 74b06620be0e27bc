"""Width rules for reshapes: flatten, view and reshape. Input and output dimensions are matched by
products of sizes; a width that becomes several dims is a split into attention heads, several dims that
become one are a flatten (channels x spatial size).

    x.view(B, T, n_head, C // n_head)   C's group is fixed (heads keep heads x head_dim), or with
                                        --widen-heads tied to n_head x a new head_dim group
    torch.flatten(x, 1)                 (B, C, H, W) -> (B, C*H*W): label ((g_C, H*W),)
"""
import math
import operator

import torch
import torch.fx

HEADS = "attention heads keep their width heads x head_dim (pass --widen-heads to widen them)"


def flatten(a, node):
    return _regroup(a, node, rewrite=False)


def view(a, node):
    """view / reshape: the size arguments are rewritten to the new widths, so they must be plain. A
    shape built as one tuple (`(-1,) + x.shape[1:] + (h.size(-1),)`, as HF writes it) is spelled out
    first, one argument per dim."""
    shape = node.args[1:] if node.target != torch.reshape else node.args[1:2]
    if len(shape) == 1 and isinstance(shape[0], torch.fx.Node) and len(a.shape(node)) > 1:
        elements = _elements(shape[0])
        if elements is not None:
            node.args = (node.args[0], *_spell(node, elements))
            shape = node.args[1:]
    if len(shape) == 1 and isinstance(shape[0], (list, tuple)):
        shape = shape[0]
    plain = not node.kwargs and all(isinstance(s, int) or not isinstance(a.dims(s), (tuple, list))
                                    for s in shape)
    dims = _regroup(a, node, rewrite=plain)
    if not plain:
        for label in a.dims(node.args[0]) + dims:
            a.fix(label, f"{node.name} reshapes to a computed shape")
    return dims


def _elements(arg):
    """The items of a shape tuple computed in the graph, as ints, scalar size nodes and (shape node, i)
    for an item of a whole shape (`x.size()`, `x.shape`); None if it is built another way."""
    if isinstance(arg, (tuple, list)):
        return list(arg)
    if not isinstance(arg, torch.fx.Node):
        return None
    if arg.op == "call_function" and arg.target is operator.add:
        left, right = (_elements(x) for x in arg.args)
        return None if left is None or right is None else left + right
    if arg.op == "call_function" and arg.target is operator.getitem and isinstance(arg.args[1], slice):
        items = _elements(arg.args[0])
        return None if items is None else items[arg.args[1]]
    rank = _whole_shape_rank(arg)
    return None if rank is None else [(arg, i) for i in range(rank)]


def _whole_shape_rank(arg):
    """The rank of the tensor whose whole shape `arg` is, or None."""
    if arg.op == "call_method" and arg.target == "size" and len(arg.args) == 1 or \
            arg.op == "call_function" and arg.target is getattr and arg.args[1] == "shape":
        meta = arg.args[0].meta.get("tensor_meta")
        return len(meta.shape) if hasattr(meta, "shape") else None
    return None


def _spell(node, elements):
    """The shape's items as view arguments: an item of a whole shape becomes its own getitem node."""
    out = []
    for e in elements:
        if isinstance(e, tuple):
            with node.graph.inserting_before(node):
                e = node.graph.call_function(operator.getitem, e)
        out.append(e)
    return out


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
