"""nn.Conv1d, added by its entry in the layer table (siftc.layers) and a SparseConv1d: every kind converts
a small 1-D conv net iso-FLOP, the sparse Conv1d runs on the native 2-D kernels with the masked-dense
reference's outputs and gradients, and the converted model exports to ONNX that passes its checks."""
import numpy as np
import onnx
import pytest
import torch
from torch import nn

import siftc
from siftc.export import ATOL, RTOL, export as export_onnx
from siftc import flops, layers
from siftc.nn.sparse import SparseConv1d, set_backend
from siftc.passes import KINDS
from siftc.runtime import BACKENDS, build
from siftc.source import make_inputs


class Conv1dNet(nn.Module):
    """A sequence classifier: a strided conv, a residual conv without bias, BatchNorm1d, a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv1d(4, 16, 3, padding=1)
        self.bn = nn.BatchNorm1d(16)
        self.down = nn.Conv1d(16, 32, 5, stride=2, padding=2)
        self.mix = nn.Conv1d(32, 32, 3, padding=2, dilation=2, bias=False)
        self.head = nn.Linear(32, 6)

    def forward(self, x):  # (B, 4, L)
        x = torch.relu(self.bn(self.stem(x)))  # (B, 16, L)
        x = torch.relu(self.down(x))  # (B, 32, L/2)
        x = torch.relu(self.mix(x)) + x
        return self.head(x.mean(-1))  # (B, 6)


def _inputs():
    return (torch.randn(3, 4, 24, generator=torch.Generator().manual_seed(0)),)


def test_conv1d_is_in_the_table_and_counted():
    conv = nn.Conv1d(8, 12, 5, stride=2, padding=2)
    assert layers.fan_in_out(conv) == (8 * 5, 12)
    x = torch.randn(2, 8, 20)  # out (2, 12, 10): 20 positions per channel
    assert flops.count(conv, (x,)).total == 2 * conv.weight.numel() * 2 * 10
    sparse = SparseConv1d(8, 12, 5, stride=2, padding=2, nnz=100)
    assert flops.count(sparse, (x,)).total == 2 * 100 * 20
    assert sparse(x).shape == conv(x).shape and isinstance(sparse.to_dense(), nn.Conv1d)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_converts_conv1d_at_its_flops(kind):
    torch.manual_seed(0)
    dense, x = Conv1dNet().eval(), _inputs()
    gm = siftc.convert(dense, kind=kind, sparsity=0.75, example_inputs=x)
    report = gm.siftc_info.report
    if kind == "sparse":  # same shape, not iso-FLOP: the transformed layers run at their density
        by_layer = {r["name"]: r for r in report["layers"]}
        assert report["dense_flops"] - report["flops"] == \
            sum(by_layer[n]["dense_flops"] - by_layer[n]["flops"] for n in ("down", "mix"))
        assert report["flop_ratio"] < 1
    else:
        assert abs(report["flop_ratio"] - 1) <= 0.005
    assert report["dense_flops"] == flops.count(dense, x).total
    forward = flops.count(gm, x)
    assert report["flops"] == forward.total
    by_name = {r["name"]: r for r in report["layers"]}
    assert by_name["down"]["kind"] == by_name["mix"]["kind"] == kind  # stem and head kept dense
    for name in ("down", "mix"):
        assert any(isinstance(m, SparseConv1d) for m in gm.get_submodule(name).modules())
        inside = [k for k in forward.layers if k == name or k.startswith(name + ".")]
        assert by_name[name]["flops"] == sum(forward.layers[k] for k in inside)
    if kind == "wide":  # the channels widened by k = 2; the input (4) and the classes (6) did not
        assert gm.get_submodule("stem").weight.shape == (32, 4, 3)
        assert gm.get_submodule("mix").weight.shape == (64, 64, 3)
        assert gm.get_submodule("head").weight.shape == (6, 64)
    gm.train()
    out = gm(*x)
    assert out.shape == (3, 6)
    out.pow(2).mean().backward()
    for m in gm.modules():
        if isinstance(m, SparseConv1d):
            assert m.values.grad.shape == (m.nnz,) and m.values.grad.abs().sum() > 0


def _step(model, x, backend):
    set_backend(model, backend)
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = model(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
    return [y.detach(), x.grad] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("stride,padding,dilation,bias", [(1, 0, 1, True), (2, 2, 1, False), (1, 3, 2, True),
                                                          (3, 1, 1, True)])
def test_native_matches_masked_dense(stride, padding, dilation, bias):
    try:
        build.load()
    except build.BuildError as e:  # pragma: no cover - machines without a compiler
        pytest.skip(f"native kernels unavailable: {e}")
    torch.manual_seed(0)
    layer = SparseConv1d(6, 10, 4, stride=stride, padding=padding, dilation=dilation, bias=bias, nnz=70)
    x = torch.randn(5, 6, 17)
    ref, got = _step(layer, x, "torch"), _step(layer, x, "native")
    assert layer in BACKENDS["native"]._index  # the kernels ran (built an index), not the fallback
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    dense = layer.to_dense()  # the plain Conv1d with the same weights: its gradient at the non-zeros
    _step(dense, x, "torch")
    torch.testing.assert_close(layer.values.grad, dense.weight.grad.reshape(-1)[layer.positions.long()],
                               rtol=1e-4, atol=1e-5)


def test_converted_model_on_native_matches_torch():
    try:
        build.load()
    except build.BuildError as e:  # pragma: no cover
        pytest.skip(f"native kernels unavailable: {e}")
    torch.manual_seed(0)
    gm = siftc.convert(Conv1dNet(), kind="wide", sparsity=0.9, example_inputs=_inputs())
    gm.eval()
    ref, got = _step(gm, _inputs()[0], "torch"), _step(gm, _inputs()[0], "native")
    for r, g in zip(ref, got):
        if r is not None:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_conv1d_model_exports_to_onnx(tmp_path, kind):
    torch.manual_seed(0)
    gm = siftc.convert(Conv1dNet(), kind=kind, sparsity=0.5, example_inputs=_inputs())
    done = export_onnx(gm, tmp_path / "m.onnx", batch=2)
    model = onnx.load(str(done.path))
    onnx.checker.check_model(model)
    assert "Conv" in {n.op_type for n in model.graph.node}
    assert done.meta["checks"]["sparsity"] == "passed"
    assert done.meta["flops"] == gm.siftc_info.report["flops"]
    import onnxruntime as ort
    inputs = make_inputs(gm.siftc_info.example_inputs, 2, seed=5)
    sess = ort.InferenceSession(str(done.path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, gm.eval()(*inputs).numpy(), atol=ATOL, rtol=RTOL)
