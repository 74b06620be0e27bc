"""The width rules: a table from op to what it does to the widths that flow through it.

Each rule takes the analysis (`siftc.passes.groups.Analysis`) and a node whose inputs are labelled and
returns the labels of the node's output dimensions. An op missing from the tables gets `no_rule`: every
width it touches keeps its size and the report names the op. Example, a residual block:

    y = relu(bn(conv(x)) + shortcut(x))
    conv: in = x's channels; out = a new group that widens     (MODULE_RULES[nn.Conv2d] = conv)
    bn, relu: pass the channel group through                    (same)
    +: ties the conv's out group and the shortcut's into one   (broadcast)

The rules themselves live by kind: `tensor_rules` (elementwise, add, cat, split, products),
`reshape_rules` (flatten, view into heads), `layer_rules` (weight layers and norms).
"""
import operator

import torch
import torch.nn.functional as F
from torch import nn

from siftc import layers
from siftc.passes.layer_rules import (channel_norm, conv, embedding, layer_norm, layer_norm_fn, linear,
                                      packed_attention)
from siftc.passes.reshape_rules import flatten, view
from siftc.passes.tensor_rules import (attention, broadcast, cat, expand, factory, getitem, matmul, no_rule, output,
                                       param, permute, placeholder, reduce, same, split, stack, transpose)

_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid,
                        nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softmax, nn.Identity, nn.Dropout, nn.Dropout2d,
                        nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.MaxPool1d,
                        nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d)
# Weight layers by their entry in the layer table (`siftc.layers`), so a type entered there (HF's Conv1D,
# a Linear) needs no row here.
WEIGHT_RULES = {layers.Linear: linear, layers.Conv: conv, layers.Embedding: embedding,
                layers.PackedAttention: packed_attention}
MODULE_RULES = {
    nn.BatchNorm1d: channel_norm, nn.BatchNorm2d: channel_norm, nn.GroupNorm: channel_norm,
    nn.LayerNorm: layer_norm, nn.RMSNorm: layer_norm, nn.Flatten: flatten,
    **{m: same for m in _ELEMENTWISE_MODULES},
}

_ELEMENTWISE_FUNCTIONS = (F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.leaky_relu, F.elu, F.dropout, F.softmax,
                          F.log_softmax, F.adaptive_avg_pool2d, F.avg_pool2d, F.max_pool2d, torch.relu,
                          torch.tanh, torch.sigmoid, torch.softmax, torch.exp, torch.tril, torch.triu,
                          operator.neg, torch.neg, torch.sqrt, torch.rsqrt, torch.cos, torch.sin, torch.abs,
                          torch.square, torch.erf, F.mish, F.hardsigmoid, F.sigmoid, F.tanh)
FUNCTION_RULES = {
    **{f: broadcast for f in (operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub,
                              torch.mul, torch.div, torch.where, torch.maximum, torch.minimum, operator.pow,
                              torch.pow, torch.masked_fill, operator.eq, operator.ne, operator.lt, operator.le,
                              operator.gt, operator.ge, torch.eq, torch.ne, torch.lt, torch.le, torch.gt, torch.ge,
                              torch.logical_and, torch.logical_or, operator.and_, operator.or_)},
    **{f: same for f in _ELEMENTWISE_FUNCTIONS},
    **{f: factory for f in (torch.arange, torch.zeros, torch.ones, torch.full, torch.empty)},
    torch.cat: cat, torch.concat: cat, torch.stack: stack, torch.flatten: flatten, torch.reshape: view,
    torch.transpose: transpose, torch.permute: permute, torch.split: split, torch.chunk: split,
    torch.unsqueeze: flatten, torch.squeeze: flatten, torch.mean: reduce, torch.sum: reduce,
    operator.getitem: getitem, torch.matmul: matmul, operator.matmul: matmul, torch.bmm: matmul,
    F.scaled_dot_product_attention: attention, F.layer_norm: layer_norm_fn,
}

METHOD_RULES = {
    **{m: same for m in ("relu", "sigmoid", "tanh", "softmax", "contiguous", "float", "half", "to", "type", "type_as",
                         "clone", "detach", "exp", "neg", "tril", "triu", "cos", "sin", "rsqrt", "sqrt", "abs",
                         "square", "erf", "bool", "long", "int", "double", "bfloat16")},
    **{m: broadcast for m in ("add", "sub", "mul", "div", "pow", "masked_fill", "eq", "ne", "lt", "le", "gt",
                              "ge")},
    "view": view, "reshape": view, "flatten": flatten, "unsqueeze": flatten, "squeeze": flatten,
    "transpose": transpose, "permute": permute, "split": split, "chunk": split,
    "mean": reduce, "sum": reduce, "matmul": matmul, "expand": expand,
}

NODE_RULES = {"placeholder": placeholder, "get_attr": param, "output": output}


def rule_for(gm, node):
    """The rule for `node`: a table look-up, `no_rule` when it is missing."""
    if node.op in NODE_RULES:
        return NODE_RULES[node.op]
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        t = layers.layer_type(mod)
        return layers.lookup(MODULE_RULES, mod) or (t and layers.lookup(WEIGHT_RULES, t)) or no_rule
    table = FUNCTION_RULES if node.op == "call_function" else METHOD_RULES
    try:
        return table.get(node.target, no_rule)
    except TypeError:  # an unhashable target
        return no_rule
