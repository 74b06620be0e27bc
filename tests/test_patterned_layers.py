"""Structured sparse layers end to end (issue 13): a layer with a pattern (siftc.sparse.impose_pattern)
runs on the block kernels under the native backend with the masked-dense reference's outputs and
gradients, keeps its structure and count through SET / RigL with the native index following the masks,
keeps its pattern through state dicts, artifacts and checkpoints, and export checks its structure."""
import copy

import pytest
import torch
from torch import nn

import siftc
from siftc.artifact import pack_state, unpack_state
from siftc.export_checks import ExportCheckError
from siftc.nn.sparse import SparseConv1d, SparseConv2d, SparseLinear, set_backend
from siftc.runtime import BACKENDS
from siftc.sparse import RigL, SET, Pattern, check_structure, impose_pattern, sparse_layers
from siftc.train.checkpoint import model_state

NATIVE = BACKENDS["native"]
KERNEL_PATTERNS = ["block:4x1", "block:8x1", "block:16x1", "block:1x4", "block:4x4", "nm:2:4", "nm:1:4",
                   "nm:4:8:t"]


def out_of_its_block(positions: torch.Tensor, numel: int) -> torch.Tensor:
    """The same count of positions with the first one moved to the first unused position."""
    used = set(positions.tolist())
    spare = next(i for i in range(numel) if i not in used)
    return torch.tensor(sorted(used - {min(used)} | {spare}), dtype=torch.int32)


def patterned_linear(pattern: str, seed: int, i=64, o=48, density=0.3) -> SparseLinear:
    g = torch.Generator().manual_seed(seed)
    layer = SparseLinear(i, o, nnz=int(density * i * o), generator=g)
    fitted = impose_pattern(layer, Pattern.parse(pattern), generator=g)
    assert fitted.pattern == Pattern.parse(pattern) and fitted.reason is None
    return layer


def fwd_bwd(layer, backend: str, x: torch.Tensor, gy: torch.Tensor):
    layer = copy.deepcopy(layer)
    layer.backend = backend
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(gy)
    return layer, y.detach(), x.grad, layer.values.grad, layer.bias.grad


@pytest.mark.parametrize("pattern", KERNEL_PATTERNS)
@pytest.mark.parametrize("batch", [1, 37])
def test_native_block_kernels_equal_masked_dense(pattern, batch):
    layer = patterned_linear(pattern, seed=batch)
    x, gy = torch.randn(batch, 64), torch.randn(batch, 48)
    _, *want = fwd_bwd(layer, "torch", x, gy)
    native, *got = fwd_bwd(layer, "native", x, gy)
    assert "block" in NATIVE._index[native]  # it ran on the block kernels, not the unstructured ones
    for name, w, g in zip(("output", "input grad", "values grad", "bias grad"), want, got):
        assert g.shape == w.shape, name
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=name)


def test_a_pattern_the_block_kernels_lack_runs_on_the_unstructured_native_kernels():
    layer = patterned_linear("block:2x2", seed=0)  # a block shape with no kernel
    x = torch.randn(5, 64)
    gy = torch.randn(5, 48)
    _, *want = fwd_bwd(layer, "torch", x, gy)
    native, *got = fwd_bwd(layer, "native", x, gy)
    assert "block" not in NATIVE._index[native] and NATIVE.block_index(native) is None
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls, pattern, x", [
    (SparseConv2d, "block:4x1", torch.randn(2, 8, 6, 6)),
    (SparseConv2d, "nm:2:4", torch.randn(3, 8, 5, 7)),
    (SparseConv1d, "block:4x4", torch.randn(2, 8, 9)),
])
def test_patterned_convs_run_on_the_block_conv_kernels_equal_to_masked_dense(cls, pattern, x):
    g = torch.Generator().manual_seed(1)
    conv = cls(8, 16, 3, stride=1, padding=1, nnz=192, generator=g)
    impose_pattern(conv, Pattern.parse(pattern), generator=g)
    gy = torch.randn_like(conv(x))
    _, *want = fwd_bwd(conv, "torch", x, gy)
    native, *got = fwd_bwd(conv, "native", x, gy)
    assert "block" in NATIVE._index[native]
    for name, w, g in zip(("output", "input grad", "values grad", "bias grad"), want, got):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=name)


def test_auto_times_the_block_kernels_against_torch():
    layer = patterned_linear("block:8x1", seed=6)
    layer.backend = "auto"
    x = torch.randn(32, 64, requires_grad=True)
    layer(x).sum().backward()
    assert set(layer.auto_choice["ms"]) == {"native", "torch"} and "errors" not in layer.auto_choice
    assert "block" in NATIVE._index[layer]  # native's candidate was the block kernels


class MLP(nn.Sequential):
    PATTERNS = ("block:4x1", "nm:2:4", "block:1x4")

    def __init__(self, seed: int):
        g = torch.Generator().manual_seed(seed)
        layers = [SparseLinear(32, 64, nnz=512, generator=g), SparseLinear(64, 64, nnz=1024, generator=g),
                  SparseLinear(64, 8, nnz=128, generator=g)]
        for layer, p in zip(layers, self.PATTERNS):
            impose_pattern(layer, Pattern.parse(p), generator=g)
        super().__init__(layers[0], nn.ReLU(), layers[1], nn.ReLU(), layers[2])


@pytest.mark.parametrize("method", [SET, RigL])
def test_set_and_rigl_on_native_keep_structure_and_count_and_the_index_follows(method):
    torch.manual_seed(0)
    model = set_backend(MLP(seed=3), "native")
    layers = list(sparse_layers(model).values())
    nnz, start = [m.nnz for m in layers], [m.positions.clone() for m in layers]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = method(model, opt, total_steps=8, update_every=2, end_fraction=1.0, drop_fraction=0.3, seed=1)
    x, target = torch.randn(16, 32), torch.randint(0, 8, (16,))
    updates = 0
    for _ in range(8):
        loss = nn.functional.cross_entropy(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched.step() is not None:
            updates += 1
            y_native = model(x).detach()
            for m in layers:
                assert check_structure(m.positions, m.weight_shape, m.pattern) is None
                entry = NATIVE._index[m]  # the forward just run rebuilt it for the new mask
                assert entry["version"] == m.mask_version and "block" in entry
                ix = entry["block"]
                assert torch.equal(ix.to_values(ix.to_blocks(m.values)), m.values)
            torch.testing.assert_close(y_native, set_backend(copy.deepcopy(model), "torch")(x).detach(),
                                       atol=1e-5, rtol=1e-5)
    assert updates == 3
    assert [m.nnz for m in layers] == nnz
    assert [str(m.pattern) for m in layers] == list(MLP.PATTERNS)
    assert any(not torch.equal(m.positions, s) for m, s in zip(layers, start))  # the masks did move


@pytest.mark.parametrize("pattern", KERNEL_PATTERNS + ["block:2x1"])
def test_state_dict_round_trip_keeps_the_pattern(pattern):
    layer = patterned_linear(pattern, seed=1)
    fresh = SparseLinear(64, 48, nnz=5, generator=torch.Generator().manual_seed(9))
    fresh.load_state_dict(layer.state_dict())
    assert fresh.pattern == layer.pattern and torch.equal(fresh.positions, layer.positions)
    assert torch.equal(fresh.values, layer.values)
    assert f"pattern={pattern}" in repr(fresh)


def test_a_state_dict_without_a_pattern_loads_unstructured_and_a_broken_structure_is_refused():
    layer = patterned_linear("block:4x1", seed=2)
    old = {k: v for k, v in layer.state_dict().items() if k != "pattern"}  # a file from before patterns
    fresh = patterned_linear("nm:2:4", seed=3)
    fresh.load_state_dict(old)
    assert fresh.pattern is None and "pattern=" not in repr(fresh)
    broken = layer.state_dict()
    broken["positions"] = out_of_its_block(broken["positions"], 64 * 48)
    with pytest.raises(RuntimeError, match=r"positions do not have the layer's pattern block:4x1: block:4x1: the "
                                           r"block at"):
        patterned_linear("block:4x1", seed=4).load_state_dict(broken)
    with pytest.raises(ValueError, match="the new positions do not have it"):
        layer.set_positions(torch.arange(1, layer.nnz + 1))


def converted_patterned(pattern="block:4x1"):
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    gm = siftc.convert(dense, "wide", 0.75, (torch.randn(4, 32),))
    layers = sparse_layers(gm)
    assert layers
    for layer in layers.values():
        impose_pattern(layer, Pattern.parse(pattern), generator=torch.Generator().manual_seed(5))
    return gm, layers


def test_artifact_and_checkpoint_round_trips_keep_the_pattern(tmp_path):
    gm, layers = converted_patterned("nm:2:4")
    siftc.save(gm, tmp_path / "art")
    assert (tmp_path / "art" / "graph.json").is_file()  # still stored as data
    loaded = siftc.load(tmp_path / "art")
    for name, layer in layers.items():
        back = sparse_layers(loaded)[name]
        assert back.pattern == layer.pattern and torch.equal(back.positions, layer.positions)
    x = torch.randn(3, 32)
    torch.testing.assert_close(loaded(x), gm(x))
    # a checkpoint's model state (packed as weights.pt is), through torch.save / weights_only load
    torch.save(model_state(gm), tmp_path / "ckpt.pt")
    resumed = siftc.load(tmp_path / "art")
    for layer in sparse_layers(resumed).values():
        layer.pattern = None  # the resumed run's model must take the pattern from the checkpoint
    resumed.load_state_dict(unpack_state(torch.load(tmp_path / "ckpt.pt", weights_only=True), tmp_path))
    assert [m.pattern for m in sparse_layers(resumed).values()] == [m.pattern for m in layers.values()]
    assert set(pack_state(gm.state_dict())) >= {f"{n}.pattern" for n in layers}


def test_export_checks_the_structure_and_names_a_tampered_layer(tmp_path):
    import onnx
    from siftc.export import fold
    from siftc.export_checks import check_sparsity
    gm, layers = converted_patterned("block:4x1")
    siftc.export(gm, tmp_path / "ok.onnx")
    folded, masks = fold(gm)
    records = check_sparsity(onnx.load(str(tmp_path / "ok.onnx")), folded, masks)
    assert {r["name"]: r["pattern"] for r in records} == {n: "block:4x1" for n in layers}
    name, layer = next(iter(layers.items()))
    with torch.no_grad():  # behind the layer's back: set_positions would refuse
        layer.positions.copy_(out_of_its_block(layer.positions, layer.weight.numel()))
        layer.mask_version += 1
    assert check_structure(layer.positions, layer.weight_shape, layer.pattern) is not None
    with pytest.raises(ExportCheckError) as e:
        siftc.export(gm, tmp_path / "bad.onnx")
    msg = str(e.value)
    assert "\n" not in msg and f"sparse layer {name} has pattern block:4x1 but its mask does not" in msg
    assert not (tmp_path / "bad.onnx").exists()
