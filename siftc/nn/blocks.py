"""The Sparse-IFT replacement modules: pure PyTorch, exportable, built from a solved `Shape`.

Each replaces one dense Linear or Conv2d and takes and returns tensors of the same shapes:

    parallel    y = sum_i g(W_i x)         N sparse copies of the dense layer
    factorized  y = V g(U x)               U: D_in->d (the dense kernel), V: d->D_out (1x1 for a conv)
    doped       y = V U x + M x            U, V dense of rank d; M sparse, of the dense shape

g is BatchNorm+activation after a conv and the activation after a linear layer.
"""
import torch
from torch import nn

from siftc.layers import layer_type

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "identity": nn.Identity}


def nonlinearity(dense: nn.Module, width: int, act: str) -> nn.Module:
    """g: BatchNorm + activation after a conv, the activation alone after a linear layer."""
    norm = layer_type(dense).norm(width)
    return ACTIVATIONS[act]() if norm is None else nn.Sequential(norm, ACTIVATIONS[act]())


class SparseParallel(nn.Module):
    """y = sum_i g(W_i x) (+ b): N sparse branches of the dense shape. N=1 is the dense layer itself."""
    has_g = True

    def __init__(self, dense: nn.Module, shape, generator=None, act: str = "relu"):
        super().__init__()
        n, t = shape.structure, layer_type(dense)
        width = t.fan_in_out(dense)[1]
        # A BatchNorm after each conv branch would cancel a branch bias; the dense bias goes after the sum.
        after_sum = dense.bias is not None and t.norm(width) is not None and n > 1
        branches = []
        for nnz in shape.nnz:
            layer = t.sparse_copy(dense, nnz, generator, bias=dense.bias is not None and not after_sum)
            branches.append(nn.Sequential(layer, nonlinearity(dense, width, act)) if n > 1 else layer)
        self.branches = nn.ModuleList(branches)
        self.bias = nn.Parameter(torch.zeros(width)) if after_sum else None

    def forward(self, x):
        y = self.branches[0](x)
        for branch in self.branches[1:]:
            y = y + branch(x)
        if self.bias is not None:
            y = y + self.bias.view(-1, *(1,) * (y.dim() - 2))  # (C, 1, 1) against (B, C, H, W)
        return y


class SparseFactorized(nn.Module):
    """y = V g(U x): U the dense kernel into d hidden channels, V a 1x1 (or linear) map back out."""
    has_g = True

    def __init__(self, dense: nn.Module, shape, generator=None, act: str = "relu"):
        super().__init__()
        d, t = shape.structure, layer_type(dense)
        self.u = t.sparse_copy(dense, shape.nnz[0], generator, d_out=d, bias=False)
        self.g = nonlinearity(dense, d, act)
        self.v = t.sparse_copy(dense, shape.nnz[1], generator, d_in=d, pointwise=True)

    def forward(self, x):
        return self.v(self.g(self.u(x)))  # (.., D_in) -> (.., d) -> (.., D_out)


class SparseDoped(nn.Module):
    """y = V U x + M x: a dense rank-d path (U then V, no non-linearity) beside a sparse M."""
    has_g = False

    def __init__(self, dense: nn.Module, shape, generator=None):
        super().__init__()
        d, t = shape.structure, layer_type(dense)
        self.u = t.dense_copy(dense, d_out=d, bias=False)
        self.v = t.dense_copy(dense, d_in=d, bias=False, pointwise=True)
        self.m = t.sparse_copy(dense, shape.nnz[0], generator)

    def forward(self, x):
        return self.v(self.u(x)) + self.m(x)


BLOCKS = {"parallel": SparseParallel, "factorized": SparseFactorized, "doped": SparseDoped}


def block(kind: str, dense: nn.Module, shape, act: str, generator=None) -> nn.Module:
    """The `kind` block replacing `dense`; `act` is g's activation in the blocks that have a g."""
    cls = BLOCKS[kind]
    return cls(dense, shape, generator, act=act) if cls.has_g else cls(dense, shape, generator)
