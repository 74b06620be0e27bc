"""The block / N:M Conv2d kernels (siftc/runtime/block_conv.py, csrc/block_conv.cpp) against masked dense
F.conv2d: output, input gradient, blocks' gradient and bias gradient for every pattern at batch 1 / odd,
3x3 stride 1 and 2 with padding, dilation, 1x1 convs and ResNet-18 CIFAR shapes; gradcheck in double;
opcheck; refusals."""
import pytest
import torch
import torch.nn.functional as F

from siftc.errors import UsageError
from siftc.runtime import block, block_conv

from conftest import kernels_or_skip

_kernels = kernels_or_skip(block.load, "block kernels")

PATTERNS = ["block:4x1", "block:8x1", "block:16x1", "block:1x4", "block:4x4", "nm:2:4", "nm:1:8"]
RTOL, ATOL = 1e-4, 1e-5

# (name, (O, I, kh, kw), (H, W), stride, padding, dilation)
CASES = [
    ("3x3 s1 p1", (16, 16, 3, 3), (9, 7), 1, 1, 1),
    ("3x3 s2 p1", (16, 16, 3, 3), (9, 8), 2, 1, 1),
    ("3x3 s(2,1) p(1,0) d(1,2)", (16, 8, 3, 3), (10, 11), (2, 1), (1, 0), (1, 2)),
    ("1x1", (32, 16, 1, 1), (5, 6), 1, 0, 1),
    ("1x1 s2 (downsample)", (32, 16, 1, 1), (8, 8), 2, 0, 1),
    ("2x3 p(0,2)", (16, 8, 2, 3), (6, 5), 1, (0, 2), 1),
]
RESNET = [  # ResNet-18 CIFAR: a stage's 3x3, a stage-entry 3x3 stride 2, its 1x1 downsample, the last stage
    ("layer1 3x3", (64, 64, 3, 3), (32, 32), 1, 1, 1),
    ("layer2 entry 3x3 s2", (128, 64, 3, 3), (32, 32), 2, 1, 1),
    ("layer2 downsample 1x1 s2", (128, 64, 1, 1), (32, 32), 2, 0, 1),
    ("layer4 3x3", (512, 512, 3, 3), (4, 4), 1, 1, 1),
]


def outputs(conv, x, weight, bias, g):
    """(y, dx, dweight, dbias) of conv(x, weight, bias) against grad g."""
    x, weight, bias = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
    y = conv(x, weight, bias)
    y.backward(g)
    return y.detach(), x.grad, weight.grad, bias.grad


def assert_parity(pattern, shape, hw, stride, padding, dilation, batch, density=0.3, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    numel = shape[0] * shape[1] * shape[2] * shape[3]
    pos = block.random_positions(shape, pattern, round(density * numel), gen)
    values = torch.randn(pos.numel(), generator=gen, dtype=dtype)
    ix, blocks = block_conv.prepare(values, pos, shape, pattern)
    x = torch.randn(batch, shape[1], *hw, generator=gen, dtype=dtype)
    bias = torch.randn(shape[0], generator=gen, dtype=dtype)
    dense = values.new_zeros(numel).index_put((pos.long(),), values).view(shape)
    ref = outputs(lambda x, w, b: F.conv2d(x, w, b, stride, padding, dilation), x, dense, bias,
                  g := torch.randn(F.conv2d(x, dense, None, stride, padding, dilation).shape, generator=gen,
                                   dtype=dtype))
    got = outputs(lambda x, w, b: block_conv.conv2d(x, w, ix, b, stride, padding, dilation), x, blocks, bias, g)
    assert got[2].shape == blocks.shape, "the weight gradient is blocks-shaped"
    ref = ref[:2] + (ix.to_blocks(ref[2].flatten()[pos.long()]), ref[3])
    for name, r, o in zip(("output", "grad input", "grad blocks", "grad bias"), ref, got):
        scale = max(1.0, r.abs().max().item()) if r.numel() else 1.0
        torch.testing.assert_close(o, r, rtol=RTOL, atol=ATOL * scale,
                                   msg=lambda m: f"{pattern} {shape} b{batch} {name}: {m}")


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("batch", [1, 7])
def test_parity_with_masked_dense(pattern, case, batch):
    assert_parity(pattern, *case[1:], batch)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("case", RESNET, ids=[c[0] for c in RESNET])
def test_parity_resnet18_cifar_shapes(pattern, case):
    assert_parity(pattern, *case[1:], batch=3, density=0.1)


@pytest.mark.parametrize("pattern", ["block:4x1", "block:4x4", "nm:2:4"])
def test_float64_parity_batch_over_one_pad(pattern):
    assert_parity(pattern, (16, 8, 3, 3), (7, 7), 2, 1, 1, batch=19, dtype=torch.float64)


@pytest.mark.parametrize("pattern", ["block:4x1", "block:1x4", "block:4x4", "nm:2:4"])
def test_empty_and_full_masks(pattern):
    assert_parity(pattern, (8, 8, 3, 3), (5, 5), 1, 1, 1, batch=2, density=0.0)
    assert_parity(pattern, (8, 8, 3, 3), (5, 5), 2, 1, 1, batch=2, density=1.0)


@pytest.mark.parametrize("pattern", ["block:4x1", "block:1x4", "block:4x4", "nm:2:4"])
@pytest.mark.parametrize("stride", [1, 2])
def test_gradcheck_double(pattern, stride):
    shape = (8, 8, 3, 3)
    pos = block.random_positions(shape, pattern, 200, torch.Generator().manual_seed(0))
    ix, w = block_conv.prepare(torch.randn(pos.numel(), dtype=torch.float64), pos, shape, pattern)
    x = torch.randn(2, 8, 4, 3, dtype=torch.float64, requires_grad=True)  # gradcheck time grows with x
    b = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: block_conv.conv2d(x, w, ix, b, stride, 1),
                                    (x, w.detach().requires_grad_(), b))


@pytest.mark.parametrize("pattern", ["block:8x1", "block:1x4", "nm:2:4"])
def test_opcheck(pattern):
    shape = (16, 8, 3, 3)
    pos = block.random_positions(shape, pattern, 300, torch.Generator().manual_seed(0))
    ix, w = block_conv.prepare(torch.randn(pos.numel()), pos, shape, pattern)
    index = (ix.view.ptr, ix.view.bcol, ix.tptr, ix.tcol, ix.tperm)
    x = torch.randn(3, 8, 6, 5, requires_grad=True)
    w.requires_grad_()
    for bias, stride in ((torch.randn(16, requires_grad=True), [2, 1]), (None, [1, 1])):
        torch.library.opcheck(torch.ops.siftc.block_conv2d.default,
                              (x, w, list(shape), bias, stride, [1, 1], [1, 1], *index))


def test_values_blocks_round_trip_and_index_layout():
    """to_values(to_blocks(v)) == v; blocks are R output channels x C input channels at one kernel position,
    in the (O, K*I) view's block-row-major order."""
    shape, pattern = (8, 8, 3, 3), "block:4x1"
    pos = block.random_positions(shape, pattern, 100, torch.Generator().manual_seed(3))
    values = torch.randn(pos.numel())
    ix, blocks = block_conv.prepare(values, pos, shape, pattern)
    assert torch.equal(ix.to_values(blocks), values)
    dense = torch.zeros(8 * 8 * 9).index_put((pos.long(),), values).view(8, 8, 9)
    view = dense.permute(0, 2, 1).reshape(8, 72)  # (O, K*I)
    ptr, bcol = ix.view.ptr.tolist(), ix.view.bcol.tolist()
    for i in range(2):
        for e in range(ptr[i], ptr[i + 1]):
            assert torch.equal(blocks[e, :, 0], view[4 * i:4 * i + 4, bcol[e]])


def test_unstructured_positions_are_refused():
    shape = (8, 8, 3, 3)
    with pytest.raises(UsageError, match="do not have pattern block:4x1"):
        block_conv.index(torch.tensor([0, 5, 17], dtype=torch.int32), shape, "block:4x1")
    with pytest.raises(UsageError, match="weight shape"):
        block_conv.index(torch.tensor([0], dtype=torch.int32), (8, 8), "nm:1:8")
    with pytest.raises(UsageError, match="block:3x1"):
        block_conv.index(torch.tensor([0], dtype=torch.int32), shape, "block:3x1")


def test_index_of_another_layer_is_refused():
    pos = block.random_positions((8, 8, 3, 3), "block:4x1", 100, torch.Generator().manual_seed(0))
    ix, w = block_conv.prepare(torch.randn(pos.numel()), pos, (8, 8, 3, 3), "block:4x1")
    other = block_conv.index(block.random_positions((16, 8, 3, 3), "block:4x1", 200), (16, 8, 3, 3), "block:4x1")
    with pytest.raises(RuntimeError, match="not this weight's"):
        block_conv.conv2d(torch.randn(1, 8, 4, 4), w, other)
