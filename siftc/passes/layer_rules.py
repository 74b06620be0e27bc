"""Width rules for weight layers and norms. A weight layer's out side is a new group that widens (its
`sourced` width); its in side takes the label of its input. Norms carry per-channel parameters, so they
record the width of the dimension they normalise. Every module records its sides with `a.use`, which
is what Sparse Wide rebuilds it from.

    conv = nn.Conv2d(16, 32, 3)    a.use("conv", in=x's channel label, out=new group of 32)
    bn = nn.BatchNorm2d(32)        a.use("bn", c=its input's channel label)
"""
import torch.fx
from torch import nn

from siftc.layers import PackedAttention, channel_multiplier, depthwise, layer_type
from siftc.passes.tensor_rules import keep_dims, no_rule, node_arg


def _out(a, node, size):
    """The out side of a weight layer: a new group it produces (the same one on a second call)."""
    used = a.uses.get(node.target)
    return used["out"] if used and "out" in used else a.fresh(size, sourced=True)


def linear(a, node):
    """nn.Linear and any layer the table says is one (HF's Conv1D): over the last dim."""
    mod = a.gm.get_submodule(node.target)
    xd = a.dims(node.args[0])
    out = _out(a, node, layer_type(mod).out_channels(mod))
    a.use(node.target, **{"in": xd[-1], "out": out})
    return xd[:-1] + (out,)


def conv(a, node):
    """nn.Conv1d / nn.Conv2d on a batched input (B, C, *spatial); spatial sizes are not widths."""
    mod = a.gm.get_submodule(node.target)
    x = node.args[0]
    xd = a.dims(x)
    if len(xd) != 2 + len(mod.kernel_size):
        return no_rule(a, node)
    spatial = keep_dims(a, x, node)[2:]
    if mod.groups == 1:
        out = _out(a, node, mod.out_channels)
        a.use(node.target, **{"in": xd[1], "out": out})
    elif depthwise(mod):  # groups and outputs scale with the channels
        mult = channel_multiplier(mod)
        a.use(node.target, **{"in": xd[1]})
        out = tuple((g, m * mult) for g, m in xd[1])
    else:  # grouped: the group count widens, each group keeps its width (in/groups in, out/groups out)
        per_in, per_out = mod.in_channels // mod.groups, mod.out_channels // mod.groups
        used = a.uses.get(node.target)
        count = ((used["out"][0][0], 1),) if used else a.fresh(mod.groups, sourced=True)
        a.groups[count[0][0]].scale = per_out  # --round-to applies to its channels
        a.tie(xd[1], tuple((g, per_in) for g, _ in count), f"{node.name}: a grouped conv's input is groups x "
                                                            f"{per_in} channels")
        out = tuple((g, per_out) for g, _ in count)
        a.use(node.target, **{"in": xd[1], "out": out})
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
    shape = node_arg(node, 1, "normalized_shape")
    for p in (node_arg(node, 2, "weight"), node_arg(node, 3, "bias")):
        if a.dims(p) is not None:
            for l, m in zip(xd[-len(a.dims(p)):], a.dims(p)):
                a.tie(l, m, f"{node.name}: layer_norm parameters do not match")
    if isinstance(shape, (list, tuple)) and all(isinstance(s, int) for s in shape):
        a.rewrites.append((node, "normalized_shape"))
    elif not isinstance(shape, torch.fx.Node):
        return no_rule(a, node)
    return xd


def packed_attention(a, node):
    """nn.MultiheadAttention (`siftc.layers.PackedAttention`): query, key and value keep their embed
    widths; the output has the query's dims, the attention weights (or None) no widths."""
    q, k, v = (node_arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
    for x in (q, k, v):
        a.fix(a.dims(x)[-1], PackedAttention.WHY)
    weights = node.meta["tensor_meta"][1]
    wd = tuple(a.fresh(s, "attention weights", structural=True) for s in weights.shape) \
        if hasattr(weights, "shape") else None
    return [a.dims(q), wd]
