"""The Sparse-IFT replacement modules: pure PyTorch, exportable, built from a solved `Shape`.

Each replaces one dense Linear or Conv2d and takes and returns tensors of the same shapes:

    parallel    y = sum_i g(W_i x)         N sparse copies of the dense layer
    factorized  y = V g(U x)               U: D_in->d (the dense kernel), V: d->D_out (1x1 for a conv)
    doped       y = V U x + M x            U, V dense of rank d; M sparse, of the dense shape

g is BatchNorm+activation after a conv and the activation after a linear layer.
"""
import torch
from torch import nn

from siftc.nn.sparse import SparseConv2d, SparseLinear

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "identity": nn.Identity}


def sparse_copy(dense: nn.Module, nnz: int, bias: bool, generator, out_features: int | None = None,
                in_features: int | None = None, kernel_1x1: bool = False) -> nn.Module:
    """A sparse layer shaped like `dense` (optionally with other in/out widths, or a 1x1 kernel)."""
    if isinstance(dense, nn.Linear):
        return SparseLinear(in_features or dense.in_features, out_features or dense.out_features,
                            bias=bias, nnz=nnz, generator=generator)
    if kernel_1x1:
        return SparseConv2d(in_features or dense.in_channels, out_features or dense.out_channels, 1,
                            bias=bias, nnz=nnz, generator=generator)
    return SparseConv2d(in_features or dense.in_channels, out_features or dense.out_channels,
                        dense.kernel_size, stride=dense.stride, padding=dense.padding,
                        dilation=dense.dilation, bias=bias, nnz=nnz, generator=generator)


def nonlinearity(dense: nn.Module, width: int, act: str) -> nn.Module:
    """g: BatchNorm + activation after a conv, the activation alone after a linear layer."""
    if isinstance(dense, nn.Conv2d):
        return nn.Sequential(nn.BatchNorm2d(width), ACTIVATIONS[act]())
    return ACTIVATIONS[act]()


class SparseParallel(nn.Module):
    """y = sum_i g(W_i x) (+ b): N sparse branches of the dense shape. N=1 is the dense layer itself."""

    def __init__(self, dense: nn.Module, shape, act: str, generator=None):
        super().__init__()
        n, conv = shape.structure, isinstance(dense, nn.Conv2d)
        has_bias = dense.bias is not None
        width = dense.out_channels if conv else dense.out_features
        branches = []
        for nnz in shape.nnz:
            layer = sparse_copy(dense, nnz, bias=has_bias and not (conv and n > 1), generator=generator)
            branches.append(nn.Sequential(layer, nonlinearity(dense, width, act)) if n > 1 else layer)
        self.branches = nn.ModuleList(branches)
        # A BatchNorm after each conv branch would cancel a branch bias; the dense bias goes after the sum.
        self.bias = nn.Parameter(torch.zeros(width)) if has_bias and conv and n > 1 else None

    def forward(self, x):
        y = self.branches[0](x)
        for branch in self.branches[1:]:
            y = y + branch(x)
        if self.bias is not None:
            y = y + self.bias.view(-1, 1, 1)  # (B, C, H, W)
        return y


class SparseFactorized(nn.Module):
    """y = V g(U x): U the dense kernel into d hidden channels, V a 1x1 (or linear) map back out."""

    def __init__(self, dense: nn.Module, shape, act: str, generator=None):
        super().__init__()
        d = shape.structure
        self.u = sparse_copy(dense, shape.nnz[0], bias=False, generator=generator, out_features=d)
        self.g = nonlinearity(dense, d, act)
        self.v = sparse_copy(dense, shape.nnz[1], bias=dense.bias is not None, generator=generator,
                             in_features=d, kernel_1x1=True)

    def forward(self, x):
        return self.v(self.g(self.u(x)))  # (.., D_in) -> (.., d) -> (.., D_out)


def _dense_like(dense: nn.Module, out_features=None, in_features=None, kernel_1x1=False) -> nn.Module:
    if isinstance(dense, nn.Linear):
        return nn.Linear(in_features or dense.in_features, out_features or dense.out_features, bias=False)
    if kernel_1x1:
        return nn.Conv2d(in_features or dense.in_channels, out_features or dense.out_channels, 1, bias=False)
    return nn.Conv2d(dense.in_channels, out_features, dense.kernel_size, stride=dense.stride,
                     padding=dense.padding, dilation=dense.dilation, bias=False)


class SparseDoped(nn.Module):
    """y = V U x + M x: a dense rank-d path (U then V, no non-linearity) beside a sparse M."""

    def __init__(self, dense: nn.Module, shape, act: str = "identity", generator=None):
        super().__init__()
        d = shape.structure
        self.u = _dense_like(dense, out_features=d)
        self.v = _dense_like(dense, in_features=d, kernel_1x1=True)
        self.m = sparse_copy(dense, shape.nnz[0], bias=dense.bias is not None, generator=generator)

    def forward(self, x):
        return self.v(self.u(x)) + self.m(x)


BLOCKS = {"parallel": SparseParallel, "factorized": SparseFactorized, "doped": SparseDoped}
