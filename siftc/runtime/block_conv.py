"""Block-sparse and N:M Conv2d on siftc's block kernels (csrc/block_conv.cpp), with autograd.

The pattern geometry is siftc.sparse.patterns' Tiling: the weight (O, I, kh, kw) is read as (O, I, K),
K = kh*kw, and a block is R output channels x C input channels at one kernel position (N:M: M consecutive
input channels at one kernel position, 1 x 1 blocks to the kernels). The kernels see the weight as the
(O, K*I) matrix W[o, k*I + i] = weight[o, i, k], where every block is a plain R x C block, and hold it as
block.py's layout: `blocks` (nblocks, R, C) in that matrix's block-row-major order, with block.py's
BlockIndex over it; the input gradient walks the (I, K*O) matrix, whose index is built alongside:

    >>> ix, blocks = prepare(layer.values, layer.positions, (64, 32, 3, 3), "block:4x1")
    >>> y = conv2d(x, blocks, ix, layer.bias, stride=2, padding=1)   # = F.conv2d(x, layer.weight, ...)
    >>> torch.equal(ix.to_values(blocks), layer.values)
    True

Autograd: `block_conv2d` differentiates through `block_conv2d_backward` (input gradient, and the blocks'
gradient (nblocks, R, C) at the non-zeros only); the bias gradient is a plain sum.
"""
import math
from dataclasses import dataclass

import torch
from torch.nn.modules.utils import _pair

from siftc.errors import UsageError
from siftc.runtime import block
from siftc.runtime._ops import batch_pad

_registered = False


@dataclass(frozen=True, eq=False)
class ConvBlockIndex:
    """A conv weight of `shape` (O, I, kh, kw) as R x C blocks: `view` indexes the (O, K*I) matrix (its perm
    into the layer's values), tptr / tcol the (I, K*O) matrix's C x R blocks, whose flat entries are the
    forward blocks' flat entries tperm."""
    shape: tuple
    view: block.BlockIndex
    tptr: torch.Tensor   # (I/C + 1,) int64
    tcol: torch.Tensor   # (nblocks,) int32
    tperm: torch.Tensor  # (nnz,) int32

    @property
    def rows(self) -> int:
        return self.view.rows

    @property
    def cols(self) -> int:
        return self.view.cols

    def to_blocks(self, values: torch.Tensor) -> torch.Tensor:
        return self.view.to_blocks(values)

    def to_values(self, blocks: torch.Tensor) -> torch.Tensor:
        return self.view.to_values(blocks)


def _view_index(keys: torch.Tensor, shape, r: int, c: int):
    """block_index of the flat `keys` (one per value, any order) into a (shape) matrix of r x c blocks:
    (ptr, bcol, perm into the values' order, tptr, trow, tblk)."""
    order = keys.argsort()
    ptr, bcol, perm, tptr, trow, tblk = torch.ops.siftc.block_index(keys[order].to(torch.int32), list(shape), r, c)
    return ptr, bcol, order[perm.long()].to(torch.int32), tptr, trow, tblk


def index(positions: torch.Tensor, weight_shape, pattern) -> ConvBlockIndex:
    """The kernels' index for a Conv2d's `positions` (int32, ascending) that have `pattern`'s structure."""
    from siftc.sparse.patterns import Pattern, check_structure
    block.load()
    _register()
    p = pattern if isinstance(pattern, Pattern) else Pattern.parse(str(pattern))
    shape = tuple(weight_shape)
    if len(shape) != 4:
        raise UsageError(f"block_conv takes a Conv2d's (out, in, kh, kw) weight shape, got {shape}")
    wrong = check_structure(positions, shape, p)
    if wrong:
        raise UsageError(f"positions of a {shape} weight do not have pattern {p}: {wrong}")
    r, c = block.block_shape(p)
    o, i, k = shape[0], shape[1], shape[2] * shape[3]
    flat = positions.long()
    oo, ii, kk = flat // (i * k), flat // k % i, flat % k
    ptr, bcol, perm, tptr0, trow, tblk = _view_index(oo * (k * i) + kk * i + ii, (o, k * i), r, c)
    view = block.BlockIndex(r, c, (o, k * i), ptr, bcol, perm, tptr0, trow, tblk)
    tptr, tcol, tvalues = _view_index(ii * (k * o) + kk * o + oo, (i, k * o), c, r)[:3]
    inverse = torch.empty_like(perm).index_put_((perm.long(),), torch.arange(perm.numel(), dtype=torch.int32))
    return ConvBlockIndex(shape, view, tptr, tcol, inverse[tvalues.long()])


def prepare(values: torch.Tensor, positions: torch.Tensor, weight_shape, pattern):
    """(ConvBlockIndex, blocks): the index for `positions` and `values` (nnz,) in the kernels' block order."""
    ix = index(positions, weight_shape, pattern)
    return ix, ix.to_blocks(values)


def conv2d(x: torch.Tensor, blocks: torch.Tensor, ix: ConvBlockIndex, bias: torch.Tensor | None = None,
           stride=1, padding=0, dilation=1) -> torch.Tensor:
    """F.conv2d(x, W, bias, stride, padding, dilation), W the (O, I, kh, kw) weight `blocks` and `ix` stand
    for; x (B, I, H, W), zero padding given as numbers, groups 1."""
    block.load()
    _register()
    if isinstance(padding, str):
        raise UsageError(f"block_conv.conv2d takes numeric padding, not {padding!r}")
    return torch.ops.siftc.block_conv2d(x, blocks, list(ix.shape), bias, list(_pair(stride)), list(_pair(padding)),
                                        list(_pair(dilation)), ix.view.ptr, ix.view.bcol, ix.tptr, ix.tcol,
                                        ix.tperm)[0]


def _out_size(n, k, s, p, d):
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def _register():
    """Fake (shape-only) kernels and autograd for the conv ops; once, after the library is loaded."""
    global _registered
    if _registered:
        return
    _registered = True
    lib = torch.library

    @lib.register_fake("siftc::block_conv2d")
    def _(x, blocks, shape, bias, stride, padding, dilation, *index):
        b, i, h, w = x.shape
        hp, wp = h + 2 * padding[0], w + 2 * padding[1]
        y = x.new_empty(b, shape[0], _out_size(h, shape[2], stride[0], padding[0], dilation[0]),
                        _out_size(w, shape[3], stride[1], padding[1], dilation[1]))
        return y, x.new_empty(i, stride[0], stride[1], math.ceil(hp / stride[0]), math.ceil(wp / stride[1]),
                              batch_pad(b))

    @lib.register_fake("siftc::block_conv2d_backward")
    def _(grad, x, xs, blocks, shape, stride, padding, dilation, *rest):
        need_input, need_weight = rest[-2:]
        return (x.new_empty(x.shape) if need_input else x.new_empty(0),
                x.new_empty(blocks.shape) if need_weight else x.new_empty(0))

    def setup(ctx, inputs, output):
        x, blocks, shape, bias, stride, padding, dilation, *index = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(x, output[1], blocks, *index)
        ctx.geometry, ctx.has_bias = (shape, stride, padding, dilation), bias is not None

    def backward(ctx, grad, _grad_xs):
        x, xs, blocks, *index = ctx.saved_tensors
        need_x, need_w, _, need_b = ctx.needs_input_grad[:4]
        dx, dw = torch.ops.siftc.block_conv2d_backward(grad.contiguous(), x, xs, blocks, *ctx.geometry, *index,
                                                       need_x, need_w)
        db = grad.sum((0, 2, 3)) if need_b and ctx.has_bias else None
        return (dx if need_x else None, dw if need_w else None, None, db) + (None,) * 8

    lib.register_autograd("siftc::block_conv2d", backward, setup_context=setup)
