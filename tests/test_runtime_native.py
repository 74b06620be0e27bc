"""The native backend against the masked-dense reference: outputs and every gradient, on random shapes,
sparsities 0..0.99, odd batches, non-contiguous and channels-last inputs; gradcheck in double; opcheck;
mask changes (regrown-at-zero weights get gradient); training with a mask scheduler."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from siftc.nn.sparse import SparseConv2d, SparseLinear, random_mask, set_backend
from siftc.runtime import BACKENDS, build

try:
    build.load()
except build.BuildError as e:  # pragma: no cover - machines without a compiler
    pytest.skip(f"native kernels unavailable: {e}", allow_module_level=True)

RTOL, ATOL = 1e-4, 1e-5


def run(layer, x, backend, grad_seed=1):
    """Output, input grad, weight grad, bias grad of `layer(x)` on `backend`, for a fixed output grad."""
    set_backend(layer, backend)
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=y.dtype)
    y.backward(g)
    return y.detach(), x.grad, layer.weight.grad, None if layer.bias is None else layer.bias.grad


def assert_parity(layer, x):
    ref = run(layer, x, "torch")
    got = run(layer, x, "native")
    for name, r, g in zip(("output", "grad input", "grad weight", "grad bias"), ref, got):
        if r is None:
            assert g is None
            continue
        scale = max(1.0, r.abs().max().item())
        torch.testing.assert_close(g, r, rtol=RTOL, atol=ATOL * scale, msg=lambda m: f"{name}: {m}")
    assert (got[2][~layer.mask] == 0).all(), "weight gradient must be exactly zero outside the mask"


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
    layer.set_mask(random_mask(layer.weight.shape, layer.weight.numel() // 3))
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
    layer = SparseConv2d(4, 6, 3, padding=1)
    layer.groups = 2
    layer.weight = torch.nn.Parameter(torch.randn(6, 2, 3, 3))
    layer.mask = random_mask((6, 2, 3, 3), 60)
    layer.mask_version += 1
    x = torch.randn(5, 4, 6, 6)
    ref, got = run(layer, x, "torch"), run(layer, x, "native")
    torch.testing.assert_close(got[0], ref[0])
    assert torch.isfinite(got[2]).all()


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
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: torch.ops.siftc.sparse_linear(x, w, b, *ptrs)[0], (x, w, b))


@pytest.mark.parametrize("stride,padding,dilation", [((1, 1), (1, 1), (1, 1)), ((2, 1), (0, 1), (1, 2))])
def test_gradcheck_conv_double(stride, padding, dilation):
    layer = SparseConv2d(3, 4, 3, nnz=50).double()
    nat = BACKENDS["native"]
    ptrs = nat.indexes(layer, 2, 3)[:6] + nat.index(layer, 1, False)
    x = torch.randn(2, 3, 6, 5, dtype=torch.double, requires_grad=True)
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()

    def f(x, w, b):
        return torch.ops.siftc.sparse_conv2d(x, w, b, list(stride), list(padding), list(dilation), *ptrs)[0]
    assert torch.autograd.gradcheck(f, (x, w, b))


def test_opcheck_ops():
    lin = SparseLinear(20, 12, nnz=90)
    nat = BACKENDS["native"]
    idx = nat.indexes(lin, 8, 4)
    x = torch.randn(5, 20, requires_grad=True)
    torch.library.opcheck(torch.ops.siftc.sparse_linear.default, (x, lin.weight, lin.bias, *idx))
    conv = SparseConv2d(3, 5, 3, stride=2, padding=1, nnz=60)
    cidx = nat.indexes(conv, 2, 2)[:6] + nat.index(conv, 1, False)
    xc = torch.randn(3, 3, 7, 6, requires_grad=True)
    torch.library.opcheck(torch.ops.siftc.sparse_conv2d.default,
                          (xc, conv.weight, conv.bias, [2, 2], [1, 1], [1, 1], *cidx))
    g = torch.randn(5, 12)
    _, xp, vals = torch.ops.siftc.sparse_linear(x.detach(), lin.weight.detach(), lin.bias.detach(), *idx)
    torch.library.opcheck(torch.ops.siftc.sparse_linear_backward.default,
                          (g, x.detach(), xp, vals, lin.weight.detach(), *idx[3:], True, True))
    gc = torch.randn(3, 5, 4, 3)
    _, xp, vals = torch.ops.siftc.sparse_conv2d(xc.detach(), conv.weight.detach(), None, [2, 2], [1, 1], [1, 1], *cidx)
    torch.library.opcheck(torch.ops.siftc.sparse_conv2d_backward.default,
                          (gc, xc.detach(), xp, vals, conv.weight.detach(), [2, 2], [1, 1], [1, 1], *cidx[3:], True,
                           True))


def test_index_rebuilt_on_mask_change_and_regrown_zero_weights_get_gradient():
    layer = SparseLinear(30, 20, nnz=150)
    x = torch.randn(9, 30)
    assert_parity(layer, x)
    grown = ~layer.mask
    new_mask = layer.mask.clone()
    new_mask.view(-1)[layer.mask.view(-1).nonzero()[:40, 0]] = False          # drop 40
    new_mask.view(-1)[grown.view(-1).nonzero()[:40, 0]] = True                  # regrow 40, at zero
    layer.set_mask(new_mask)
    regrown = new_mask & grown
    assert (layer.weight[regrown] == 0).all()
    _, _, gw, _ = run(layer, x, "native")
    assert (gw[regrown] != 0).all(), "weights regrown at zero must be in the index and get gradient"
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
        if hasattr(m, "mask"):
            assert (m.weight[~m.mask] == 0).all()


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


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_backward_uses_each_forwards_own_values(kind):
    # the backward reads the values its forward gathered (and the input it packed), not the weight as it
    # is at backward time: two forwards with different weights, one backward, both input gradients exact
    if kind == "linear":
        layer, x = SparseLinear(40, 30, nnz=300), torch.randn(9, 40)
    else:
        layer, x = SparseConv2d(5, 7, 3, stride=2, padding=1, nnz=120), torch.randn(5, 5, 9, 8)
    w1 = layer.weight.detach().clone()
    w2 = torch.randn_like(w1)
    grads = []
    for backend in ("torch", "native"):
        set_backend(layer, backend)
        xg = x.clone().requires_grad_()
        layer.weight = torch.nn.Parameter(w1.clone())
        y1 = layer(xg)
        layer.weight = torch.nn.Parameter(w2.clone())
        y2 = layer(xg)
        (y1.square().sum() + 3 * y2.sum()).backward()
        grads.append(xg.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=RTOL, atol=ATOL * max(1.0, grads[0].abs().max().item()))


@pytest.mark.parametrize("panels", [(1, 3), (3, 1), (2, 2)])
def test_conv_transposed_source_rebuilt_on_mask_change(panels):
    # tsrc maps the transposed index to the forward's values; it is cached per mask version and per pair
    # of panel widths, and must follow a new mask
    layer = SparseConv2d(6, 9, 3, padding=1, nnz=150)
    nat = BACKENDS["native"]
    x = torch.randn(4, 6, 5, 5, dtype=torch.double, requires_grad=True)
    layer = layer.double()
    for step in range(2):
        idx = nat.indexes(layer, *panels)
        tptr, tcode, tsrc = idx[3:6]
        fwd_widx = idx[2]
        # entry by entry, the value tsrc points at is the weight at the transposed entry's position
        twidx = nat.index(layer, panels[1], True)[2]
        assert torch.equal(fwd_widx[tsrc.long()], twidx)
        w = layer.weight.detach().clone().requires_grad_()
        assert torch.autograd.gradcheck(
            lambda x, w: torch.ops.siftc.sparse_conv2d(x, w, None, [1, 1], [1, 1], [1, 1], *idx)[0], (x, w))
        layer.set_mask(random_mask(layer.weight.shape, 200 - 100 * step, generator=torch.Generator().manual_seed(3)))


def test_backward_rejects_a_packed_input_of_another_shape():
    layer = SparseLinear(12, 8, nnz=40)
    idx = BACKENDS["native"].indexes(layer, 4, 4)
    x = torch.randn(5, 12)
    _, xp, vals = torch.ops.siftc.sparse_linear(x, layer.weight.detach(), None, *idx)
    with pytest.raises(RuntimeError, match="packed input"):
        torch.ops.siftc.sparse_linear_backward(torch.randn(5, 8), x, xp[:6], vals, layer.weight.detach(), *idx[3:],
                                               True, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fin", [16, 37, 203])
def test_weight_gradient_rows_streamed_at_any_alignment(dtype, fin):
    # dW rows are streamed out with non-temporal stores from their first 64-byte boundary on: rows whose
    # length is not a multiple of a vector start at every alignment, and the scalar heads and tails must
    # meet the streamed middle exactly
    layer = SparseLinear(fin, 23, nnz=nnz_for(fin * 23, 0.5)).to(dtype)
    x = torch.randn(6, fin, dtype=dtype)
    ref, got = run(layer, x, "torch"), run(layer, x, "native")
    torch.testing.assert_close(got[2], ref[2], rtol=RTOL, atol=ATOL * max(1.0, ref[2].abs().max().item()))
    assert (got[2][~layer.mask] == 0).all()
