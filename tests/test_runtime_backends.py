"""The backend registry, the "auto" and "sparseprop" backends, and the build's cache and error path."""
import importlib.util
import os

import pytest
import torch

from siftc.errors import UsageError
from siftc.nn.sparse import SparseConv2d, SparseLinear, set_backend
import siftc.runtime.auto as auto_module
from siftc.runtime import BACKENDS, build, get_backend

HAS_SPARSEPROP = importlib.util.find_spec("sparseprop") is not None


def outputs(layer, x, backend):
    """Output, input grad and values grad (nnz,) of `layer(x)` on `backend`."""
    set_backend(layer, backend)
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    y.backward(torch.ones_like(y))
    assert layer.values.grad.shape == (layer.nnz,)
    return y.detach(), x.grad, layer.values.grad


def test_registry_names_the_cli_choices():
    assert {"torch", "native", "auto", "sparseprop"} <= set(BACKENDS)
    with pytest.raises(UsageError, match="unknown backend 'cuda'"):
        get_backend("cuda")


def test_missing_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(build, "_loaded", False)
    monkeypatch.setenv("CXX", "no-such-compiler-siftc")
    with pytest.raises(build.BuildError, match="no C\\+\\+ compiler.*--backend torch"):
        build.load()


def test_build_dir_follows_the_sources_contents(tmp_path, monkeypatch):
    # torch's own rebuild check compares file times; the cache directory is named by the contents instead
    src = tmp_path / "ops.cpp"
    src.write_text("int f() { return 1; }")
    monkeypatch.setattr(build, "SOURCES", [src])
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "cache"))
    first = build.build_dir()
    stat = src.stat()
    src.write_text("int f() { return 2; }")
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same time, new contents
    assert build.build_dir() != first and build.build_dir().parent == first.parent
    src.write_text("int f() { return 1; }")
    assert build.build_dir() == first


def test_auto_picks_a_backend_records_it_and_matches_reference(monkeypatch):
    monkeypatch.setattr(auto_module, "DROP_ABOVE_MS", 1e9)  # both timed in full, even on a loaded machine
    layer = SparseConv2d(4, 6, 3, padding=1, nnz=40)
    x = torch.randn(5, 4, 7, 7)
    ref = outputs(layer, x, "torch")
    got = outputs(layer, x, "auto")
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    record = layer.auto_choice
    assert record["choice"] in ("native", "torch")
    assert set(record["ms"]) == {"native", "torch"} and all(t > 0 for t in record["ms"].values())
    assert record["choice"] == min(record["ms"], key=record["ms"].get)
    # the timing did not leave gradients behind: one backward's worth only
    torch.testing.assert_close(layer.values.grad, ref[2], rtol=1e-4, atol=1e-5)


def test_auto_times_once_per_shape():
    auto = BACKENDS["auto"]
    layer = SparseLinear(16, 8, nnz=50)
    set_backend(layer, "auto")
    layer(torch.randn(4, 16))
    layer(torch.randn(4, 16))
    assert len(auto.choices[layer]) == 1
    layer(torch.randn(9, 16))
    assert len(auto.choices[layer]) == 2


@pytest.mark.skipif(not HAS_SPARSEPROP, reason="sparseprop not installed (the README's test command installs it)")
class TestSparseProp:
    def test_linear_matches_masked_dense_including_zero_weights_in_mask(self):
        layer = SparseLinear(40, 24, nnz=300)
        with torch.no_grad():
            layer.values[:10] = 0  # in the mask, at zero
        x = torch.randn(16, 40)
        ref, got = outputs(layer, x, "torch"), outputs(layer, x, "sparseprop")
        for r, g in zip(ref, got):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
        assert (got[2][:10] != 0).all(), "non-zeros at zero value keep their gradient"

    def test_conv_matches_when_batch_is_a_multiple_of_8(self):
        layer = SparseConv2d(8, 8, 3, padding=1, bias=False, nnz=200)
        x = torch.randn(16, 8, 8, 8)
        ref, got = outputs(layer, x, "torch"), outputs(layer, x, "sparseprop")
        for r, g in zip(ref, got):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-3)

    @pytest.mark.parametrize("batch", [12, 5, 1])
    def test_conv_batch_not_a_multiple_of_8_is_refused(self, batch):
        """SparseProp's own conv is wrong at these batches (max error ~1 against masked dense)."""
        layer = SparseConv2d(8, 8, 3, padding=1, bias=False, nnz=200)
        set_backend(layer, "sparseprop")
        with pytest.raises(UsageError, match=f"not a multiple of 8 \\(got batch {batch}\\).*--backend native"):
            layer(torch.randn(batch, 8, 8, 8))

    def test_unsupported_conv_is_a_clear_error(self):
        layer = SparseConv2d(4, 4, 3, dilation=2)
        set_backend(layer, "sparseprop")
        with pytest.raises(UsageError, match="sparseprop.*--backend native"):
            layer(torch.randn(8, 4, 9, 9))


def test_sparseprop_missing_names_the_install(monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_sparseprop(name, *args, **kwargs):
        if name.startswith("sparseprop"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_sparseprop)
    layer = SparseLinear(4, 4)
    set_backend(layer, "sparseprop")
    with pytest.raises(UsageError, match="pip install --no-build-isolation sparseprop"):
        layer(torch.randn(2, 4))


INPLACE_BACKENDS = ["torch", "native", "auto",
                    pytest.param("sparseprop", marks=pytest.mark.skipif(not HAS_SPARSEPROP, reason="not installed"))]


def _train_step(model, x, backend):
    """One SGD step of `model` on `backend`: (loss, every parameter's gradient, the parameters after)."""
    set_backend(model, backend)
    model.zero_grad(set_to_none=True)
    loss = model(x).square().mean()
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
    return loss.detach(), grads, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("backend", INPLACE_BACKENDS)
@pytest.mark.parametrize("layer", ["linear", "linear-3d", "conv"])
def test_inplace_op_right_after_a_sparse_layer_trains_like_masked_dense(backend, layer):
    """nn.ReLU(inplace=True) after a sparse layer (every VGG classifier head) once crashed the native
    backend: its output was a view made inside the op. Gradients and the step equal the reference's."""
    torch.manual_seed(0)
    if layer == "conv":
        model = torch.nn.Sequential(SparseConv2d(4, 8, 3, padding=1, nnz=120), torch.nn.ReLU(inplace=True),
                                    torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 3))
        x = torch.randn(16, 4, 6, 6)
    else:
        model = torch.nn.Sequential(SparseLinear(12, 32, nnz=150), torch.nn.ReLU(inplace=True), torch.nn.Linear(32, 3))
        x = torch.randn(16, 12) if layer == "linear" else torch.randn(2, 8, 12)
    initial = [p.detach().clone() for p in model.parameters()]
    ref = _train_step(model, x, "torch")
    with torch.no_grad():
        for p, p0 in zip(model.parameters(), initial):
            p.copy_(p0)
    got = _train_step(model, x, backend)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    for g, r in zip(got[1] + got[2], ref[1] + ref[2]):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
    values_grad = got[1][[name for name, _ in model.named_parameters()].index("0.values")]
    assert values_grad.shape == (model[0].nnz,)  # the sparse layer's gradient is its values'

