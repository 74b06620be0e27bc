"""Block-sparse and N:M Linear on siftc's block kernels (csrc/block_ops.cpp), with autograd.

A structured layer's non-zeros are held in the kernels' layout: `blocks` (nblocks, R, C), block-row-major,
and a `BlockIndex` built once from the layer's flat ascending `positions` in O(nnz). An N:M weight is the
same layout with 1 x 1 blocks (plain column indices, every row the same length). The layer's `values`
(nnz,) follow its positions; `to_blocks` / `to_values` permute between the two orders in O(nnz):

    >>> ix, blocks = prepare(layer.values, layer.positions, (64, 32), "block:4x1")   # blocks (128, 4, 1)
    >>> y = linear(x, blocks, ix, layer.bias)        # (N, 32) -> (N, 64), = F.linear(x, layer.weight, bias)
    >>> torch.equal(ix.to_values(blocks), layer.values)
    True

Autograd: `block_linear` differentiates through `block_linear_backward`, which returns the input gradient
and the blocks' gradient (nblocks, R, C), written at the non-zeros only; the bias gradient is a plain sum.
"""
from dataclasses import dataclass

import torch

from siftc.errors import UsageError
from siftc.runtime import build
from siftc.runtime._ops import batch_pad

LIBRARY = "siftc_block"
BLOCKS = ((4, 1), (8, 1), (16, 1), (1, 4), (4, 4))
"""Block shapes (rows, cols) the kernels take, besides the 1 x 1 blocks of an N:M layout."""
_registered = False


def load():
    """Build (first time) and load the block kernels; afterwards torch.ops.siftc.block_* exist."""
    build.load_library(LIBRARY)
    _register()


@dataclass(frozen=True, eq=False)
class BlockIndex:
    """A weight of `shape` (O, I) as R x C blocks: block row i's blocks are ptr[i]..ptr[i+1] at block
    columns bcol; the transposed lists tptr / trow / tblk (block column j's blocks: their rows and their
    indexes in `blocks`); blocks.flatten()[k] = values[perm[k]]."""
    rows: int
    cols: int
    shape: tuple
    ptr: torch.Tensor   # (O/R + 1,) int64
    bcol: torch.Tensor  # (nblocks,) int32
    perm: torch.Tensor  # (nnz,) int32
    tptr: torch.Tensor  # (I/C + 1,) int64
    trow: torch.Tensor  # (nblocks,) int32
    tblk: torch.Tensor  # (nblocks,) int32

    @property
    def nblocks(self) -> int:
        return self.bcol.numel()

    def tensors(self) -> tuple:
        """The five index tensors the ops take."""
        return self.ptr, self.bcol, self.tptr, self.trow, self.tblk

    def to_blocks(self, values: torch.Tensor) -> torch.Tensor:
        """(nnz,) values in position order -> (nblocks, R, C) blocks; differentiable."""
        return values.index_select(0, self.perm).view(self.nblocks, self.rows, self.cols)

    def to_values(self, blocks: torch.Tensor) -> torch.Tensor:
        """(nblocks, R, C) blocks -> (nnz,) values in position order; differentiable."""
        flat = blocks.reshape(-1)
        return flat.new_empty(flat.shape).index_put((self.perm,), flat)


def kernel_block(pattern) -> tuple[int, int] | None:
    """(R, C) of the kernels' blocks for a pattern (a siftc.sparse.patterns.Pattern or its text): a block
    pattern's own, (1, 1) for N:M; None for a pattern the kernels do not take (unstructured too)."""
    from siftc.sparse.patterns import Pattern
    p = pattern if isinstance(pattern, Pattern) else Pattern.parse(str(pattern))
    if p.kind == "nm":
        return 1, 1
    if p.kind == "block" and (p.rows, p.cols) in BLOCKS:
        return p.rows, p.cols
    return None


def block_shape(pattern) -> tuple[int, int]:
    """`kernel_block(pattern)`, or a one-line UsageError for a pattern the kernels do not take."""
    rc = kernel_block(pattern)
    if rc is not None:
        return rc
    from siftc.sparse.patterns import Pattern
    p = pattern if isinstance(pattern, Pattern) else Pattern.parse(str(pattern))
    raise UsageError(f"the block kernels take block:{', block:'.join(f'{r}x{c}' for r, c in BLOCKS)} and nm:N:M "
                     f"patterns, not {p}; use --backend native (unstructured kernels) or torch for it")


def index(positions: torch.Tensor, weight_shape, pattern) -> BlockIndex:
    """The kernels' index for a Linear's `positions` (int32, ascending) that have `pattern`'s structure."""
    from siftc.sparse.patterns import Pattern, check_structure
    load()
    p = pattern if isinstance(pattern, Pattern) else Pattern.parse(str(pattern))
    wrong = check_structure(positions, weight_shape, p)
    if wrong:
        raise UsageError(f"positions of a {tuple(weight_shape)} weight do not have pattern {p}: {wrong}")
    r, c = block_shape(p)
    tensors = torch.ops.siftc.block_index(positions, list(weight_shape), r, c)
    ptr, bcol, perm, tptr, trow, tblk = tensors
    return BlockIndex(r, c, tuple(weight_shape), ptr, bcol, perm, tptr, trow, tblk)


def prepare(values: torch.Tensor, positions: torch.Tensor, weight_shape, pattern):
    """(BlockIndex, blocks): the index for `positions` and `values` (nnz,) in the kernels' block order."""
    ix = index(positions, weight_shape, pattern)
    return ix, ix.to_blocks(values)


def random_positions(shape, pattern, nnz: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(nnz',) int32 ascending: uniformly random whole blocks of a block pattern (nnz' = nnz rounded to
    whole blocks), or N random inputs in every group of an nm:N:M pattern (nnz' = O*I*N/M, `nnz` unused)
    -- the masks the kernels' tests and benchmarks run on."""
    from siftc.sparse.patterns import Pattern, Tiling
    p = pattern if isinstance(pattern, Pattern) else Pattern.parse(str(pattern))
    tiling = Tiling(shape, p)
    if p.kind == "block":
        count = min(tiling.n_tiles, round(nnz / p.unit))
        return tiling.expand(torch.randperm(tiling.n_tiles, generator=generator)[:count])
    if p.kind != "nm" or p.transposable:
        raise UsageError(f"random_positions draws block:RxC and nm:N:M masks, not {p}")
    top = torch.rand(tiling.n_tiles, p.m, generator=generator).topk(p.n, dim=1).indices  # (groups, N)
    cells = torch.zeros(tiling.n_tiles, p.m, dtype=torch.bool).scatter_(1, top, True)
    return tiling.positions_of(cells.view(tiling.n_tiles, 1, p.m))


def linear(x: torch.Tensor, blocks: torch.Tensor, ix: BlockIndex, bias: torch.Tensor | None = None):
    """y = x W^T + bias, W the (O, I) weight that `blocks` (nblocks, R, C) and `ix` stand for. x (*, I)."""
    load()
    x2 = x.reshape(-1, x.shape[-1])  # (N, I)
    y = torch.ops.siftc.block_linear(x2, blocks, list(ix.shape), bias, *ix.tensors())[0]  # (N, O)
    return y.view(*x.shape[:-1], ix.shape[0])


def _register():
    """Fake (shape-only) kernels and autograd for the block ops; once, after the library is loaded."""
    global _registered
    if _registered:
        return
    _registered = True
    lib = torch.library

    @lib.register_fake("siftc::block_index")
    def _(positions, shape, r, c):
        nnz = positions.shape[0]
        nb = nnz // (r * c)
        long, i32 = positions.new_empty(0, dtype=torch.int64), positions.new_empty(0)
        return (long.new_empty(shape[0] // r + 1), i32.new_empty(nb), i32.new_empty(nnz),
                long.new_empty(shape[1] // c + 1), i32.new_empty(nb), i32.new_empty(nb))

    @lib.register_fake("siftc::block_linear")
    def _(x, blocks, shape, bias, *index):
        n, i = x.shape
        return x.new_empty(n, shape[0]), x.new_empty(i, batch_pad(n))  # y, xp

    @lib.register_fake("siftc::block_linear_backward")
    def _(grad, x, xp, blocks, shape, ptr, bcol, tptr, trow, tblk, need_input, need_weight):
        return (x.new_empty(x.shape) if need_input else x.new_empty(0),
                x.new_empty(blocks.shape) if need_weight else x.new_empty(0))

    def setup(ctx, inputs, output):
        x, blocks, shape, bias, *index = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(x, output[1], blocks, *index)
        ctx.shape, ctx.has_bias = shape, bias is not None

    def backward(ctx, grad, _grad_xp):
        x, xp, blocks, *index = ctx.saved_tensors
        need_x, need_w, _, need_b = ctx.needs_input_grad[:4]
        dx, dw = torch.ops.siftc.block_linear_backward(grad.contiguous(), x, xp, blocks, ctx.shape, *index, need_x,
                                                       need_w)
        db = grad.sum(0) if need_b and ctx.has_bias else None
        return (dx if need_x else None, dw if need_w else None, None, db) + (None,) * 5

    lib.register_autograd("siftc::block_linear", backward, setup_context=setup)
