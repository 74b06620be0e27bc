"""The native backend against the masked-dense reference: outputs and every gradient, on random shapes,
sparsities 0..0.99, odd batches, non-contiguous and channels-last inputs; gradcheck in double; opcheck;
the index built from the positions; mask changes (regrown-at-zero weights get gradient); training with a
mask scheduler; no dense-shaped tensor in a step."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from siftc.nn.sparse import SparseConv2d, SparseLinear, random_mask, set_backend
from siftc.runtime import BACKENDS, build

from conftest import kernels_or_skip

_kernels = kernels_or_skip(build.load, "native kernels")

RTOL, ATOL = 1e-4, 1e-5


def run(layer, x, backend, grad_seed=1):
    """Output, input grad, values grad (nnz,), bias grad of `layer(x)` on `backend`, for a fixed output grad."""
    set_backend(layer, backend)
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    y.backward(output_grad(y, grad_seed))
    return y.detach(), x.grad, layer.values.grad, None if layer.bias is None else layer.bias.grad


def output_grad(y, seed):
    return torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)


def dense_weight_grad_at_positions(layer, x, grad_seed=1):
    """The plain dense op's weight gradient (F.linear / the layer's conv on the same dense weight as a leaf),
    read at the layer's positions: what the values' gradient must be."""
    w = layer.weight.detach().requires_grad_()
    b = None if layer.bias is None else layer.bias.detach()
    y = F.linear(x.detach(), w, b) if isinstance(layer, SparseLinear) else layer._conv_forward(x.detach(), w, b)
    y.backward(output_grad(y, grad_seed))
    return w.grad.reshape(-1)[layer.positions.long()]


def assert_close_scaled(got, ref, name):
    scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL * scale, msg=lambda m: f"{name}: {m}")


def assert_parity(layer, x):
    ref = run(layer, x, "torch")
    got = run(layer, x, "native")
    assert got[2].shape == (layer.nnz,), "the weight gradient is values-shaped"
    for name, r, g in zip(("output", "grad input", "grad values", "grad bias"), ref, got):
        if r is None:
            assert g is None
            continue
        assert_close_scaled(g, r, name)
    assert_close_scaled(got[2], dense_weight_grad_at_positions(layer, x), "grad values vs dense layer")


def nnz_for(shape_numel, sparsity):
    return round(shape_numel * (1 - sparsity))


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 40), fin=st.integers(1, 70), fout=st.integers(1, 70),
       sparsity=st.sampled_from([0.0, 0.3, 0.75, 0.9, 0.99]), bias=st.booleans(), layout=st.sampled_from(
           ["contiguous", "transposed", "sliced"]))
def test_linear_matches_masked_dense(batch, fin, fout, sparsity, bias, layout):
    layer = SparseLinear(fin, fout, bias=bias, nnz=nnz_for(fin * fout, sparsity))
    if layout == "contiguous":
        x = torch.randn(batch, fin)
    elif layout == "transposed":
        x = torch.randn(fin, batch).t()
    else:
        x = torch.randn(batch, 2 * fin + 1)[:, 1::2]
    assert_parity(layer, x)


@pytest.mark.parametrize("batch", [1, 3, 5, 7, 8, 12, 17, 64, 257, 300])
def test_linear_any_batch(batch):
    # multiples of 16 and not, below and above the 256-element register tile, batch 1
    layer = SparseLinear(48, 40, nnz=400)
    assert_parity(layer, torch.randn(batch, 48))


def test_linear_3d_input():
    layer = SparseLinear(24, 10, nnz=100)
    assert_parity(layer, torch.randn(3, 5, 24))


CONV_CASES = [
    # cin, cout, kernel, stride, padding, dilation, hw
    (3, 5, 3, 1, 1, 1, (8, 8)),
    (4, 6, 3, 2, 1, 1, (9, 7)),
    (5, 4, 1, 1, 0, 1, (6, 5)),
    (4, 4, (3, 2), (2, 1), (1, 2), (2, 1), (11, 10)),
    (6, 8, 5, 1, 2, 1, (7, 9)),
    (3, 3, 3, 3, 0, 2, (13, 12)),
    (2, 3, 7, 2, 3, 1, (15, 15)),
    (5, 7, 1, 2, 0, 1, (9, 8)),            # 1x1 stride 2: three of dX's four stride phases get no kernel position
    (4, 5, (2, 3), (3, 2), (0, 1), 1, (10, 9)),  # stride larger than the kernel, unequal phases
    (3, 4, 3, 2, 1, 1, (4, 4)),            # 4x4: the padded border of dX is most of it
    (3, 4, 1, 1, 2, 1, (5, 3)),            # padding wider than the kernel: input positions outside dX's sum
]


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("batch", [1, 3, 5, 12, 16, 33])
def test_conv_matches_masked_dense(case, batch):
    # batches that are not multiples of 8 are where SparseProp's convolutions go wrong
    cin, cout, k, s, p, d, (h, w) = case
    layer = SparseConv2d(cin, cout, k, stride=s, padding=p, dilation=d, nnz=None)
    layer.set_mask(random_mask(layer.weight_shape, math.prod(layer.weight_shape) // 3))
    assert_parity(layer, torch.randn(batch, cin, h, w))


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_conv_sparsity_and_layout(sparsity, layout):
    layer = SparseConv2d(8, 12, 3, padding=1, bias=sparsity != 0.5, nnz=nnz_for(12 * 8 * 9, sparsity))
    x = torch.randn(7, 8, 10, 9)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = torch.randn(7, 16, 10, 18)[:, ::2, :, ::2]
    assert_parity(layer, x)


def test_conv_large_batch_uses_several_vector_chunks():
    layer = SparseConv2d(3, 4, 3, padding=1, nnz=60)
    assert_parity(layer, torch.randn(300, 3, 5, 4))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_conv_full_transpose_tiles(layout):
    # width and batch of at least 16 take the vector-register transposes when packing and unpacking
    layer = SparseConv2d(5, 6, 3, stride=(1, 2), padding=1, nnz=90)
    x = torch.randn(35, 5, 4, 37)
    assert_parity(layer, x.to(memory_format=torch.channels_last) if layout == "channels_last" else x)


def test_grouped_conv_falls_back_to_masked_dense():
    # SparseProp gives NaNs on grouped convolutions; siftc's kernels take groups=1 and hand the rest to
    # the masked-dense path, so a grouped layer is still exact.
    layer = SparseConv2d(2, 6, 3, padding=1, nnz=60)  # weight (6, 2, 3, 3): 4 input channels in 2 groups
    layer.groups, layer.in_channels = 2, 4
    x = torch.randn(5, 4, 6, 6)
    ref, got = run(layer, x, "torch"), run(layer, x, "native")
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r)
    assert_close_scaled(got[2], dense_weight_grad_at_positions(layer, x), "grad values vs dense layer")


def test_unsupported_dtype_falls_back():
    layer = SparseLinear(8, 6, nnz=20).to(torch.bfloat16)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    set_backend(layer, "native")
    torch.testing.assert_close(layer(x), BACKENDS["torch"].linear(layer, x))


def test_gradcheck_linear_double():
    layer = SparseLinear(7, 5, nnz=15).double()
    nat = BACKENDS["native"]
    ptrs = nat.indexes(layer, 4, 2)[:6] + nat.index(layer, 1, False)
    x = torch.randn(3, 7, dtype=torch.double, requires_grad=True)
    v = layer.values.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    shape = list(layer.weight_shape)
    assert torch.autograd.gradcheck(lambda x, v, b: torch.ops.siftc.sparse_linear(x, v, shape, b, *ptrs)[0], (x, v, b))


@pytest.mark.parametrize("stride,padding,dilation", [((1, 1), (1, 1), (1, 1)), ((2, 1), (0, 1), (1, 2))])
def test_gradcheck_conv_double(stride, padding, dilation):
    layer = SparseConv2d(3, 4, 3, nnz=50).double()
    nat = BACKENDS["native"]
    ptrs = nat.indexes(layer, 2, 3)[:6] + nat.index(layer, 1, False)
    x = torch.randn(2, 3, 6, 5, dtype=torch.double, requires_grad=True)
    v = layer.values.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()

    def f(x, v, b):
        return torch.ops.siftc.sparse_conv2d(x, v, list(layer.weight_shape), b, list(stride), list(padding),
                                             list(dilation), *ptrs)[0]
    assert torch.autograd.gradcheck(f, (x, v, b))


def test_opcheck_ops():
    lin = SparseLinear(20, 12, nnz=90)
    nat = BACKENDS["native"]
    idx = nat.indexes(lin, 8, 4)
    x = torch.randn(5, 20, requires_grad=True)
    lshape = list(lin.weight_shape)
    torch.library.opcheck(torch.ops.siftc.sparse_linear.default, (x, lin.values, lshape, lin.bias, *idx))
    conv = SparseConv2d(3, 5, 3, stride=2, padding=1, nnz=60)
    cshape = list(conv.weight_shape)
    cidx = nat.indexes(conv, 2, 2)[:6] + nat.index(conv, 1, False)
    xc = torch.randn(3, 3, 7, 6, requires_grad=True)
    torch.library.opcheck(torch.ops.siftc.sparse_conv2d.default,
                          (xc, conv.values, cshape, conv.bias, [2, 2], [1, 1], [1, 1], *cidx))
    g = torch.randn(5, 12)
    _, xp = torch.ops.siftc.sparse_linear(x.detach(), lin.values.detach(), lshape, lin.bias.detach(), *idx)
    torch.library.opcheck(torch.ops.siftc.sparse_linear_backward.default,
                          (g, x.detach(), xp, lin.values.detach(), lshape, *idx[3:], True, True))
    gc = torch.randn(3, 5, 4, 3)
    _, xp = torch.ops.siftc.sparse_conv2d(xc.detach(), conv.values.detach(), cshape, None, [2, 2], [1, 1], [1, 1],
                                          *cidx)
    torch.library.opcheck(torch.ops.siftc.sparse_conv2d_backward.default,
                          (gc, xc.detach(), xp, conv.values.detach(), cshape, [2, 2], [1, 1], [1, 1], *cidx[3:], True,
                           True))
    torch.library.opcheck(torch.ops.siftc.build_index.default, (conv.positions, cshape, 2, True))


def test_index_rebuilt_on_mask_change_and_regrown_zero_weights_get_gradient():
    layer = SparseLinear(30, 20, nnz=150)
    x = torch.randn(9, 30)
    assert_parity(layer, x)
    grown = ~layer.mask
    new_mask = layer.mask.clone()
    new_mask.view(-1)[layer.mask.view(-1).nonzero()[:40, 0]] = False          # drop 40
    new_mask.view(-1)[grown.view(-1).nonzero()[:40, 0]] = True                  # regrow 40, at zero
    _, kept = layer.set_mask(new_mask)
    assert (~kept).sum() == 40 and (layer.values[~kept] == 0).all()
    _, _, gv, _ = run(layer, x, "native")
    assert (gv[~kept] != 0).all(), "weights regrown at zero must be in the index and get gradient"
    assert_parity(layer, x)


def test_state_dict_load_rebuilds_index():
    a, b = SparseLinear(16, 8, nnz=40), SparseLinear(16, 8, nnz=40)
    x = torch.randn(4, 16)
    set_backend(b, "native")
    b(x)  # caches b's index
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(x), BACKENDS["torch"].linear(a, x))


def test_training_with_set_scheduler_matches_masked_dense():
    from siftc.sparse import SET

    def train(backend):
        torch.manual_seed(0)
        model = torch.nn.Sequential(SparseConv2d(3, 8, 3, padding=1, nnz=100), torch.nn.ReLU(),
                                    torch.nn.Flatten(), SparseLinear(8 * 6 * 6, 10, nnz=300))
        set_backend(model, backend)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        sched = SET(model, opt, total_steps=12, update_every=3, seed=0)
        data = torch.Generator().manual_seed(1)
        for _ in range(8):
            x, y = torch.randn(6, 3, 6, 6, generator=data), torch.randint(0, 10, (6,), generator=data)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        return model

    ref, got = train("torch"), train("native")
    for (name, r), (_, g) in zip(ref.state_dict().items(), got.state_dict().items()):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    for m in got.modules():
        if isinstance(m, (SparseConv2d, SparseLinear)):
            assert m.values.shape == (m.nnz,) and m.nnz == m.positions.numel()


@pytest.mark.parametrize("l2_bytes", [2048, 64 * 1024])
@pytest.mark.parametrize("batch", [1, 20])
def test_conv_many_panels(monkeypatch, l2_bytes, batch):
    # many column panels and hundreds of rows, strided phases: the tile-major loop order and the
    # cross-tile accumulation of the weight gradient that small layers never reach
    import siftc.runtime.native as native
    monkeypatch.setattr(native, "L2_BYTES", l2_bytes)
    monkeypatch.setitem(BACKENDS, "native", native.Native())  # fresh index cache for the patched panel size
    for stride in (1, 2):
        layer = SparseConv2d(150, 300, 3, stride=stride, padding=1, nnz=nnz_for(300 * 150 * 9, 0.97))
        assert_parity(layer, torch.randn(batch, 150, 7, 6))


@pytest.mark.parametrize("batch", [257, 520])
def test_linear_several_batch_tiles_many_panels(monkeypatch, batch):
    import siftc.runtime.native as native
    monkeypatch.setattr(native, "L2_BYTES", 4096)
    monkeypatch.setitem(BACKENDS, "native", native.Native())
    layer = SparseLinear(300, 290, nnz=nnz_for(300 * 290, 0.9))
    assert_parity(layer, torch.randn(batch, 300))


def two_layers(kind):
    if kind == "linear":
        return SparseLinear(40, 30, nnz=300), torch.randn(9, 40)
    return SparseConv2d(5, 7, 3, stride=2, padding=1, nnz=120), torch.randn(5, 5, 9, 8)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_backward_uses_each_forwards_own_values(kind):
    # the backward reads the values its forward read (and the input it packed), not the layer's values at
    # backward time: two forwards with different values Parameters, one backward, all gradients exact
    layer, x = two_layers(kind)
    v1 = layer.values.detach().clone()
    v2 = torch.randn_like(v1)
    grads = []
    for backend in ("torch", "native"):
        set_backend(layer, backend)
        xg = x.clone().requires_grad_()
        p1, p2 = torch.nn.Parameter(v1.clone()), torch.nn.Parameter(v2.clone())
        layer.values = p1
        y1 = layer(xg)
        layer.values = p2
        y2 = layer(xg)
        (y1.square().sum() + 3 * y2.sum()).backward()
        grads.append((xg.grad, p1.grad, p2.grad))
    for name, g, r in zip(("grad input", "grad values 1", "grad values 2"), *grads[::-1]):
        assert_close_scaled(g, r, name)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_values_changed_in_place_before_backward_is_autograd_s_error(kind):
    # the backward reads `values` as saved by its forward: an in-place change in between is refused (as for
    # any saved tensor, nn.Linear's weight included), never silently differentiated at the new values
    layer, x = two_layers(kind)
    set_backend(layer, "native")
    y = layer(x.requires_grad_())
    layer.set_weight(torch.randn(layer.weight_shape))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def reference_index(positions, shape, panel, transpose):
    """build_index's contract in plain torch: entries bucketed by (panel, row) in ascending position order."""
    o_n, c_n, kk = shape[0], shape[1], math.prod(shape[2:])
    p = positions.long()
    o, c, k = p // (c_n * kk), p // kk % c_n, p % kk
    rows, groups, row, group = (c_n, o_n, c, o) if transpose else (o_n, c_n, o, c)
    npanels = -(-groups // panel)
    panel = -(-groups // npanels)  # balanced panels
    bucket = group // panel * rows + row
    order = torch.sort(bucket, stable=True).indices
    ptr = torch.zeros(npanels * rows + 1, dtype=torch.long)
    ptr[1:] = torch.bincount(bucket, minlength=npanels * rows).cumsum(0)
    code = (group << 8 | k)[order]
    return ptr, code.int(), order.int()


@pytest.mark.parametrize("shape", [(20, 30), (9, 6, 3, 3), (7, 5, 1, 4), (3, 40, 2, 3)])
@pytest.mark.parametrize("panel", [1, 4, 1000])
@pytest.mark.parametrize("transpose", [False, True])
def test_build_index_from_positions(shape, panel, transpose):
    numel = math.prod(shape)
    for nnz in (0, 1, numel // 7, numel):
        pos = random_mask((numel,), nnz, generator=torch.Generator().manual_seed(nnz)).nonzero().squeeze(1).int()
        got = torch.ops.siftc.build_index(pos, list(shape), panel, transpose)
        for name, g, r in zip(("ptr", "code", "widx"), got, reference_index(pos, shape, panel, transpose)):
            assert torch.equal(g, r), f"{name} differs at nnz={nnz}"
        # every entry's widx names the value at its (row, group, kernel position)
        ptr, code, widx = got
        rows = shape[1] if transpose else shape[0]
        row = torch.repeat_interleave(torch.arange(ptr.numel() - 1) % rows, ptr.diff())
        group, k = code.long() >> 8, code.long() & 255
        o, c = (group, row) if transpose else (row, group)
        assert torch.equal(pos[widx.long()].long(), (o * shape[1] + c) * math.prod(shape[2:]) + k)


def test_forward_index_with_one_panel_is_position_order():
    # the forward reads the values in place (no gather) when the index has one panel: widx must be 0..nnz-1
    layer = SparseConv2d(6, 9, 3, padding=1, nnz=150)
    _, _, widx = torch.ops.siftc.build_index(layer.positions, list(layer.weight_shape), 1000, False)
    assert torch.equal(widx, torch.arange(150, dtype=torch.int32))


@pytest.mark.parametrize("positions,match", [([3, 1, 5], "ascending"), ([1, 1, 5], "distinct"),
                                             ([0, 600], "in \\[0, 600\\)"), ([-1, 2], "ascending")])
def test_build_index_rejects_bad_positions(positions, match):
    with pytest.raises(RuntimeError, match="positions must be ascending, distinct and in"):
        torch.ops.siftc.build_index(torch.tensor(positions, dtype=torch.int32), [20, 30], 4, False)


def test_ops_reject_an_index_of_another_layer():
    a, b = SparseLinear(12, 8, nnz=40), SparseLinear(12, 8, nnz=30)
    idx = BACKENDS["native"].indexes(b, 4, 4)
    with pytest.raises(RuntimeError, match="forward index has 30 entries for 40 values"):
        torch.ops.siftc.sparse_linear(torch.randn(5, 12), a.values.detach(), [8, 12], None, *idx)


@pytest.mark.parametrize("panels", [(1, 3), (3, 1), (2, 2)])
def test_conv_indexes_rebuilt_on_mask_change(panels):
    # the indexes are cached per mask version and panel width, and must follow a new mask (here of another
    # count, which replaces the values Parameter)
    layer = SparseConv2d(6, 9, 3, padding=1, nnz=150).double()
    nat = BACKENDS["native"]
    x = torch.randn(2, 6, 4, 3, dtype=torch.double, requires_grad=True)  # gradcheck time grows with x
    for step in range(2):
        idx = nat.indexes(layer, *panels)
        assert idx[1].numel() == idx[4].numel() == layer.nnz
        v = layer.values.detach().clone().requires_grad_()
        shape = list(layer.weight_shape)
        assert torch.autograd.gradcheck(
            lambda x, v: torch.ops.siftc.sparse_conv2d(x, v, shape, None, [1, 1], [1, 1], [1, 1], *idx)[0], (x, v))
        layer.set_mask(random_mask(layer.weight_shape, 200 - 100 * step, generator=torch.Generator().manual_seed(3)))
    assert_parity(layer, x.detach())


def test_backward_rejects_a_packed_input_of_another_shape():
    layer = SparseLinear(12, 8, nnz=40)
    idx = BACKENDS["native"].indexes(layer, 4, 4)
    x = torch.randn(5, 12)
    values = layer.values.detach()
    _, xp = torch.ops.siftc.sparse_linear(x, values, [8, 12], None, *idx)
    with pytest.raises(RuntimeError, match="packed input"):
        torch.ops.siftc.sparse_linear_backward(torch.randn(5, 8), x, xp[:6], values, [8, 12], *idx[3:], True, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fin", [16, 37, 203])
def test_weight_gradient_any_row_length_and_dtype(dtype, fin):
    # rows whose length is not a multiple of a vector, in both precisions
    layer = SparseLinear(fin, 23, nnz=nnz_for(fin * 23, 0.5)).to(dtype)
    assert_parity(layer, torch.randn(6, fin, dtype=dtype))


def largest_allocation(layer, x) -> int:
    """Bytes of the largest allocation any op made (inclusive of the ops it called) in one forward+backward."""
    from torch.profiler import ProfilerActivity, profile
    layer(x).sum().backward()  # indexes built, kernels loaded
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        layer(x).sum().backward()
    return max(e.cpu_memory_usage for e in prof.events())


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_native_step_allocates_nothing_dense_shaped(kind):
    # the kernels read `values` and write the gradient at the non-zeros: no op of a forward+backward
    # allocates a quarter of the dense weight's bytes (the activations here are far smaller), while the
    # masked-dense backend, measured the same way, does
    if kind == "linear":
        layer, x = SparseLinear(2000, 2000, nnz=4000), torch.randn(4, 2000, requires_grad=True)
    else:
        layer, x = SparseConv2d(600, 600, 3, padding=1, nnz=3000), torch.randn(2, 600, 2, 2, requires_grad=True)
    dense_bytes = math.prod(layer.weight_shape) * 4
    set_backend(layer, "native")
    assert largest_allocation(layer, x) < dense_bytes / 4
    assert layer.values.grad.shape == (layer.nnz,)
    set_backend(layer, "torch")
    assert largest_allocation(layer, x) >= dense_bytes


def test_register_tiles_fit_the_machines_vector_registers():
    """-march=native: 64-byte vectors x 16 accumulators where the CPU has AVX-512 (32 zmm registers), else
    32-byte x 8 (AVX2's 16 ymm): a 64-byte tile on AVX2 spilled its accumulators on every FMA."""
    from siftc.runtime.native import register_tile
    flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "").split()
    assert register_tile() == ((64, 16) if "avx512f" in flags else (32, 8))
