"""The block / N:M kernels (siftc/runtime/block.py, csrc/block_ops.cpp) against masked dense: output, input
gradient, blocks' gradient and bias gradient for every pattern, batches 1 / odd / large, shapes that take
several column and row panels; gradcheck in double; opcheck; the index and the values <-> blocks
permutation against plain torch; refusals; the block library's cache key is its own."""
import pytest
import torch
import torch.nn.functional as F

from siftc.errors import UsageError
from siftc.runtime import block, build
from siftc.sparse.patterns import Pattern

from conftest import kernels_or_skip

_kernels = kernels_or_skip(block.load, "block kernels")

PATTERNS = ["block:4x1", "block:8x1", "block:16x1", "block:1x4", "block:4x4", "nm:2:4", "nm:1:8", "nm:2:4:t"]
RTOL, ATOL = 1e-4, 1e-5


def structured_positions(shape, pattern, density, seed=0):
    """(nnz,) int32 ascending positions of an (O, I) weight with `pattern`'s structure: block.random_positions
    (whole blocks, or N random inputs a group); nm:N:M:t as N shifted diagonals of every M x M tile."""
    g = torch.Generator().manual_seed(seed)
    p, (o, i) = Pattern.parse(pattern), shape
    if not p.transposable:
        return block.random_positions(shape, p, round(density * o * i), g)
    r, c = torch.arange(o)[:, None] % p.m, torch.arange(i)[None, :] % p.m
    shift = torch.randint(p.m, (o // p.m, i // p.m), generator=g)
    shift = shift.repeat_interleave(p.m, 0).repeat_interleave(p.m, 1)
    mask = (c - r - shift) % p.m < p.n
    return mask.flatten().nonzero().squeeze(1).to(torch.int32)


def dense_weight(values, positions, shape):
    flat = values.new_zeros(shape[0] * shape[1])
    return flat.index_put((positions.long(),), values).view(shape)


def outputs_block(x, blocks, ix, bias, g):
    x = x.clone().requires_grad_()
    blocks = blocks.detach().clone().requires_grad_()
    bias = bias.detach().clone().requires_grad_()
    y = block.linear(x, blocks, ix, bias)
    y.backward(g)
    return y.detach(), x.grad, blocks.grad, bias.grad


def outputs_dense(x, w, bias, g, ix, positions):
    """Masked dense: F.linear on the dense weight; its weight gradient read at the blocks."""
    x, w, bias = (t.detach().clone().requires_grad_() for t in (x, w, bias))
    y = F.linear(x, w, bias)
    y.backward(g)
    return y.detach(), x.grad, ix.to_blocks(w.grad.flatten()[positions.long()]), bias.grad


def assert_parity(shape, pattern, batch, density=0.3, dtype=torch.float32, seed=0):
    pos = structured_positions(shape, pattern, density, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    values = torch.randn(pos.numel(), generator=gen, dtype=dtype)
    ix, blocks = block.prepare(values, pos, shape, pattern)
    x = torch.randn(batch, shape[1], generator=gen, dtype=dtype)
    g = torch.randn(batch, shape[0], generator=gen, dtype=dtype)
    bias = torch.randn(shape[0], generator=gen, dtype=dtype)
    got = outputs_block(x, blocks, ix, bias, g)
    ref = outputs_dense(x, dense_weight(values, pos, shape), bias, g, ix, pos)
    assert got[2].shape == blocks.shape, "the weight gradient is blocks-shaped"
    for name, r, o in zip(("output", "grad input", "grad blocks", "grad bias"), ref, got):
        scale = max(1.0, r.abs().max().item()) if r.numel() else 1.0
        torch.testing.assert_close(o, r, rtol=RTOL, atol=ATOL * scale, msg=lambda m: f"{pattern} b{batch} {name}: {m}")


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("batch", [1, 7, 37, 300])
def test_parity_with_masked_dense(pattern, batch):
    assert_parity((64, 48), pattern, batch)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_parity_across_panels(pattern):
    # batch 300 rows are 1216 B: a 256 KiB panel is ~215 inputs (or outputs), so 512 takes three
    assert_parity((512, 528), pattern, 300, density=0.2)


@pytest.mark.parametrize("pattern,density", [(p, d) for p in ("block:4x1", "block:1x4", "block:4x4")
                                               for d in (0.0, 0.02, 1.0)])
def test_parity_empty_sparse_and_full(pattern, density):
    assert_parity((32, 64), pattern, 5, density=density)


def test_float64_parity():
    assert_parity((48, 32), "block:4x4", 9, dtype=torch.float64)


@pytest.mark.parametrize("pattern", PATTERNS)
def test_gradcheck_double(pattern):
    shape = (16, 16)
    pos = structured_positions(shape, pattern, 0.5)
    ix, blocks = block.prepare(torch.randn(pos.numel(), dtype=torch.double), pos, shape, pattern)
    x = torch.randn(3, 16, dtype=torch.double, requires_grad=True)
    b = torch.randn(16, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: block.linear(x, w, ix, b),
                                    (x, blocks.detach().requires_grad_(), b))


@pytest.mark.parametrize("pattern", ["block:8x1", "block:1x4", "nm:2:4"])
def test_opcheck(pattern):
    shape = (32, 24)
    pos = structured_positions(shape, pattern, 0.4)
    ix, blocks = block.prepare(torch.randn(pos.numel()), pos, shape, pattern)
    x = torch.randn(5, 24, requires_grad=True)
    w = blocks.detach().requires_grad_()
    bias = torch.randn(32, requires_grad=True)
    torch.library.opcheck(torch.ops.siftc.block_linear.default, (x, w, list(shape), bias, *ix.tensors()))
    torch.library.opcheck(torch.ops.siftc.block_linear.default, (x, w, list(shape), None, *ix.tensors()))
    r, c = ix.rows, ix.cols
    torch.library.opcheck(torch.ops.siftc.block_index.default, (pos, list(shape), r, c))


@pytest.mark.parametrize("pattern", PATTERNS)
def test_index_against_plain_torch(pattern):
    shape = (48, 64)
    pos = structured_positions(shape, pattern, 0.3)
    ix = block.index(pos, shape, pattern)
    r, c = ix.rows, ix.cols
    # block k's entry (a, b) is positions[perm[k * r * c + a * c + b]]; it lies in row i*r + a, column j*c + b
    rows = torch.repeat_interleave(torch.arange(shape[0] // r), ix.ptr.diff())            # block row of block k
    a, b = torch.arange(r).repeat_interleave(c), torch.arange(c).repeat(r)
    want = ((rows[:, None] * r + a) * shape[1] + ix.bcol.long()[:, None] * c + b).flatten()
    assert torch.equal(pos.long()[ix.perm.long()], want)
    assert torch.equal(torch.sort(ix.perm).values, torch.arange(pos.numel(), dtype=torch.int32))
    keys = rows * (shape[1] // c) + ix.bcol.long()
    assert bool((keys.diff() > 0).all()), "blocks in block-row-major order, columns ascending"
    # transposed lists: block column j's blocks, rows ascending, tblk naming each block
    cols = torch.repeat_interleave(torch.arange(shape[1] // c), ix.tptr.diff())
    assert torch.equal(ix.bcol.long()[ix.tblk.long()], cols)
    assert torch.equal(rows[ix.tblk.long()], ix.trow.long())
    tkeys = cols * shape[0] + ix.trow.long()
    assert bool((tkeys.diff() > 0).all())
    values = torch.randn(pos.numel())
    assert torch.equal(ix.to_values(ix.to_blocks(values)), values)


def test_nm_layout_is_position_order():
    shape = (8, 16)
    pos = structured_positions(shape, "nm:2:4", 0)
    ix = block.index(pos, shape, "nm:2:4")
    assert (ix.rows, ix.cols) == (1, 1)
    assert torch.equal(ix.perm, torch.arange(pos.numel(), dtype=torch.int32))
    assert torch.equal(ix.ptr.diff(), torch.full((8,), 8, dtype=torch.int64)), "every row N/M of the inputs"


def test_unblocked_positions_are_refused():
    shape = (8, 8)
    pos = structured_positions(shape, "block:4x1", 0.5)
    broken = pos[1:]  # one block loses an entry
    with pytest.raises(UsageError, match="do not have pattern block:4x1"):
        block.index(broken, shape, "block:4x1")
    with pytest.raises(RuntimeError, match="not a whole number of 4x1 blocks"):
        torch.ops.siftc.block_index(broken, list(shape), 4, 1)
    no_corner = torch.tensor([9, 17, 25, 41], dtype=torch.int32)  # column 1 of rows 1, 2, 3, 5: no block's first entry
    with pytest.raises(RuntimeError, match="not whole 4x1 blocks: 0 blocks have their first entry"):
        torch.ops.siftc.block_index(no_corner, list(shape), 4, 1)
    stray = torch.tensor([0, 8, 16, 25], dtype=torch.int32)  # block (0, 0) less (3, 0), plus (3, 1)
    with pytest.raises(RuntimeError, match=r"\(row 3, column 1\) is a non-zero but block \(0, 1\)"):
        torch.ops.siftc.block_index(stray, list(shape), 4, 1)


def test_random_positions_have_the_pattern():
    from siftc.sparse.patterns import check_structure
    g = torch.Generator().manual_seed(0)
    for pattern, nnz, want in (("block:4x4", 210, 208), ("block:16x1", 1010, 1008), ("nm:1:8", 0, 48 * 64 // 8)):
        pos = block.random_positions((48, 64), pattern, nnz, g)
        assert pos.numel() == want and check_structure(pos, (48, 64), Pattern.parse(pattern)) is None


def test_unsupported_pattern_is_a_usage_error():
    with pytest.raises(UsageError, match="block kernels take"):
        block.block_shape("block:2x2")
    with pytest.raises(UsageError, match="block kernels take"):
        block.block_shape("unstructured")


def test_index_of_another_layer_is_refused():
    pos = structured_positions((32, 16), "block:4x1", 0.2)
    ix, blocks = block.prepare(torch.randn(pos.numel()), pos, (32, 16), "block:4x1")
    other = block.index(structured_positions((32, 16), "block:4x1", 1.0), (32, 16), "block:4x1")
    assert other.nblocks != ix.nblocks
    with pytest.raises(RuntimeError, match="rebuild it with block_index"):
        torch.ops.siftc.block_linear(torch.randn(2, 16), blocks, [32, 16], None, *other.tensors())


def test_block_library_has_its_own_cache_key(tmp_path, monkeypatch):
    native = build.build_dir()
    assert build.library_sources(build.NAME) == [build.CSRC / "sparse_ops.cpp"]
    src = tmp_path / "block_ops.cpp"
    src.write_text("int f() { return 1; }")
    monkeypatch.setitem(build.LIBRARIES, block.LIBRARY, [str(src)])  # CSRC / an absolute path is that path
    first = build.build_dir(block.LIBRARY)
    src.write_text("int f() { return 2; }")
    assert build.build_dir(block.LIBRARY) != first
    assert build.build_dir() == native, "the unstructured library's key does not depend on the block sources"
