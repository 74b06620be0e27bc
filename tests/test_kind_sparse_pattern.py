"""--kind sparse --pattern P: one-shot pruning of given weights into a block or N:M pattern (issue 13 with
issue 14's same-shape kind). Every expected mask here is computed from the dense weight in the test, not
by siftc's own functions; the kept values must be the dense weights; the result trains under RigL and
exports with its structure."""
import json

import onnx
import pytest
import torch

import siftc
from siftc.config import ConvertConfig
from siftc.errors import UsageError
from siftc.nn.sparse import SPARSE_LAYERS
from siftc.sparse.patterns import Pattern, check_structure
from conftest import ROOT, spec_path
from test_weights_in import MLP, dense_pt, one_line_error, pretrained_mlp, siftc_cli  # noqa: F401 (fixture)

RESNET = spec_path("examples/resnet.py:resnet18_cifar")
DIGITS = ROOT / "data" / "digits.npz"


def sparse_layers(gm):
    return {n: m for n, m in gm.named_modules() if isinstance(m, SPARSE_LAYERS)}


def kept_count(numel: int, sparsity: float, block: int) -> int:
    """What the pass keeps at `sparsity`: the whole number of blocks nearest numel * (1 - s)."""
    return int((numel - round(sparsity * numel)) / block + 0.5) * block


def top_blocks_mask(w: torch.Tensor, r: int, c: int, nnz: int) -> torch.Tensor:
    """The expected block:RxC mask of `w` (out, in, *kernel): the nnz / (R*C) blocks of largest L1 norm,
    each R outputs x C inputs at one kernel position."""
    o, i = w.shape[:2]
    k = w[0, 0].numel()
    a = w.detach().abs().reshape(o // r, r, i // c, c, k)
    norms = a.sum((1, 3))                                            # (O/R, I/C, K)
    chosen = torch.zeros(norms.numel(), dtype=torch.bool)
    chosen[norms.reshape(-1).argsort(descending=True)[:nnz // (r * c)]] = True
    chosen = chosen.reshape(o // r, 1, i // c, 1, k).expand(-1, r, -1, c, -1)
    return chosen.reshape(w.shape)


def assert_kept_values(layer, w: torch.Tensor):
    """Kept positions hold the pretrained weights, and the layer is exactly the masked dense weight."""
    assert torch.equal(layer.values.detach(), w.detach().reshape(-1)[layer.positions.long()])
    assert torch.equal(layer.weight.detach(), w.detach() * layer.mask)


def test_the_old_refusal_is_gone():
    cfg = ConvertConfig(kind="sparse", sparsity=0.9, pattern="block:4x1")
    assert cfg.pattern == "block:4x1" and cfg.mask_from == "magnitude"


def test_block_magnitude_keeps_exactly_the_top_l1_blocks(dense_pt):
    model, path = dense_pt
    gm = siftc.convert(MLP, "sparse", 0.9, weights=path, pattern="block:4x4")
    layers = sparse_layers(gm)
    assert set(layers) == {"net.2", "net.4"}
    for name, layer in layers.items():
        w = model.get_submodule(name).weight
        nnz = kept_count(w.numel(), 0.9, 16)
        assert layer.pattern == Pattern.block(4, 4) and layer.nnz == nnz
        assert torch.equal(layer.mask, top_blocks_mask(w, 4, 4, nnz))
        assert_kept_values(layer, w)
    report = gm.siftc_info.report
    assert {r["name"]: (r["pattern"], r["reason"]) for r in report["patterns"]} == \
        {"net.2": ("block:4x4", None), "net.4": ("block:4x4", None)}
    assert {r["name"]: r["init"] for r in report["layers"]} == dict.fromkeys(["net.0", "net.2", "net.4", "net.6"],
                                                                           "kept")
    assert report["effective_sparsity"] == pytest.approx(1 - nnz / w.numel())


def test_nm_keeps_the_top_n_of_every_group_and_overrides_the_sparsity(dense_pt):
    model, path = dense_pt
    gm = siftc.convert(MLP, "sparse", 0.9, weights=path, pattern="nm:2:4")
    for name, layer in sparse_layers(gm).items():
        w = model.get_submodule(name).weight.detach()                         # (256, 256)
        groups = w.abs().reshape(w.shape[0], -1, 4)                           # (out, in/4, 4)
        expected = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, -1).indices, True)
        assert torch.equal(layer.mask, expected.reshape(w.shape))
        assert layer.density == 0.5
        assert_kept_values(layer, w)
    report = gm.siftc_info.report
    assert report["effective_sparsity"] == 0.5 and report["sparsity"] == 0.9
    assert "pattern nm:2:4: effective sparsity 0.5000 (requested 0.9000)" in report["notes"]


def tile_view(mask: torch.Tensor, m: int) -> torch.Tensor:
    """(out, in) -> (tiles, M, M), the M x M tiles of (outputs, inputs)."""
    o, i = mask.shape
    return mask.reshape(o // m, m, i // m, m).permute(0, 2, 1, 3).reshape(-1, m, m)


def lp_optimum(score: torch.Tensor, n: int) -> float:
    """The largest sum of `score` (M, M) over masks with n per row and per column. The LP over 0 <= x <= 1
    with those row and column sums is the bipartite b-matching polytope, whose vertices are integral,
    so its optimum is the best transposable mask's."""
    from scipy.optimize import linprog
    m = score.shape[0]
    rows = torch.kron(torch.eye(m), torch.ones(1, m))   # (M, M*M): row sums of the row-major x
    cols = torch.kron(torch.ones(1, m), torch.eye(m))   # column sums
    res = linprog(-score.reshape(-1).double().numpy(), A_eq=torch.cat([rows, cols]).numpy(),
                  b_eq=[n] * (2 * m), bounds=(0, 1), method="highs")
    assert res.status == 0
    return -res.fun


def test_transposable_is_nm_on_both_axes_and_near_the_optimum(dense_pt):
    """nm:N:M:t by magnitude (siftc.sparse.transposable: greedy by |w|, then completed by augmenting
    paths). Guaranteed: N per row and per column of every tile, so the transposed weight is N:M too.
    Measured here against the exact (LP) optimum, tile by tile: never below the half that Hubara et al.'s
    greedy bound promises, and within 5% of it over the layer."""
    model, path = dense_pt
    gm = siftc.convert(MLP, "sparse", 0.5, weights=path, pattern="nm:4:8:t")
    layer, w = gm.get_submodule("net.2"), model.net[2].weight.detach()
    assert layer.pattern == Pattern.nm(4, 8, transposable=True)
    tiles = tile_view(layer.mask, 8)
    assert (tiles.sum(2) == 4).all() and (tiles.sum(1) == 4).all()
    assert check_structure(torch.nonzero(layer.mask.t().reshape(-1)).squeeze(1), (256, 256), Pattern.nm(4, 8)) is None
    assert_kept_values(layer, w)
    scores = tile_view(w.abs(), 8)
    got = (scores * tiles).sum((1, 2))[:64]
    best = torch.tensor([lp_optimum(s, 4) for s in scores[:64]], dtype=got.dtype)
    assert (got <= best + 1e-4).all()              # the LP is the optimum: a sanity check of the oracle
    assert (got >= 0.5 * best).all() and got.sum() >= 0.95 * best.sum()


def test_transposable_finds_the_row_wise_optimum_when_it_is_transposable(tmp_path):
    """Guaranteed: when the top-N |w| of every row of a tile are also N per column, the mask is exactly
    those (the unconstrained N:M optimum, so the best transposable one). Planted: |w| large on a
    circulant 4:8 pattern of every tile, small elsewhere."""
    model = pretrained_mlp()
    r = torch.arange(256)
    planted = ((r[None, :] - r[:, None]) % 8 < 4)                             # (256, 256), 4 per row and column
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model.net[2].weight.copy_(torch.where(planted, 1 + torch.rand(256, 256, generator=g),
                                              torch.rand(256, 256, generator=g) * 0.5))
    path = tmp_path / "planted.pt"
    torch.save(model.state_dict(), path)
    gm = siftc.convert(MLP, "sparse", 0.5, weights=path, pattern="nm:4:8:t")
    assert torch.equal(gm.get_submodule("net.2").mask, planted)


def test_a_layer_the_pattern_does_not_fit_gets_the_fallback_and_the_report_says_so(dense_pt):
    model, path = dense_pt
    gm = siftc.convert(MLP, "sparse", 0.75, weights=path, pattern="block:4x4", keep_dense=())
    head, w = gm.get_submodule("net.6"), model.net[6].weight                  # (10, 256): 10 rows, not 4k
    assert head.pattern == Pattern.block(2, 4)
    assert torch.equal(head.mask, top_blocks_mask(w, 2, 4, kept_count(w.numel(), 0.75, 8)))
    assert_kept_values(head, w)
    rows = {r["name"]: r for r in gm.siftc_info.report["patterns"]}
    assert rows["net.6"]["pattern"] == "block:2x4" and "out=10 is not a multiple of 4" in rows["net.6"]["reason"]
    assert rows["net.0"]["pattern"] == "block:4x4" and rows["net.0"]["reason"] is None
    assert any(n.startswith("net.6: block:4x4 does not fit a 10x256 weight") for n in gm.siftc_info.report["notes"])


def test_erk_in_whole_blocks_keeps_uniform_total_flops(dense_pt):
    model, path = dense_pt
    uniform = siftc.convert(MLP, "sparse", 0.9, weights=path, pattern="block:4x4", keep_dense=())
    erk = siftc.convert(MLP, "sparse", 0.9, weights=path, pattern="block:4x4", keep_dense=(), distribution="erk")
    counts = {n: m.nnz for n, m in sparse_layers(erk).items()}
    assert counts != {n: m.nnz for n, m in sparse_layers(uniform).items()}
    for name, layer in sparse_layers(erk).items():
        w = model.get_submodule(name).weight
        unit = layer.pattern.unit
        assert layer.nnz % unit == 0
        assert torch.equal(layer.mask, top_blocks_mask(w, layer.pattern.rows, layer.pattern.cols, layer.nnz))
    assert erk.siftc_info.report["flops"] == pytest.approx(uniform.siftc_info.report["flops"], rel=2e-3)


def test_random_with_a_pattern_is_structured_seeded_and_keeps_values(dense_pt):
    model, path = dense_pt
    a, b, m = (siftc.convert(MLP, "sparse", 0.9, weights=path, pattern="block:4x1", mask_from=mf, seed=1)
               for mf in ("random", "random", "magnitude"))
    la, lb, lm = (g.get_submodule("net.2") for g in (a, b, m))
    assert torch.equal(la.positions, lb.positions) and not torch.equal(la.positions, lm.positions)
    assert check_structure(la.positions, la.weight_shape, Pattern.block(4, 1)) is None and la.nnz == lm.nnz
    assert_kept_values(la, model.net[2].weight)


def pruned_checkpoint(tmp_path, keep: torch.Tensor):
    """The pretrained MLP with net.2's weight zero outside `keep` (a checkpoint pruned elsewhere)."""
    model = pretrained_mlp()
    with torch.no_grad():
        model.net[2].weight.mul_(keep)
    path = tmp_path / "pruned.pt"
    torch.save(model.state_dict(), path)
    return model, path


def test_zeros_keep_a_checkpoint_pruned_to_the_pattern_exactly(tmp_path):
    g = torch.Generator().manual_seed(4)
    groups = torch.rand(256, 64, 4, generator=g)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, -1).indices, True).reshape(256, 256)
    model, path = pruned_checkpoint(tmp_path, keep)
    gm = siftc.convert(MLP, "sparse", None, weights=path, mask_from="zeros", pattern="nm:2:4",
                       keep_dense=("net.0", "net.4", "net.6"))
    layer = gm.get_submodule("net.2")
    assert torch.equal(layer.mask, keep) and layer.pattern == Pattern.nm(2, 4)
    assert gm.siftc_info.report["sparsity"] == 0.5
    x = torch.randn(4, 64)
    siftc.set_backend(gm, "torch")  # exactness against dense: masked dense (auto may time native kernels)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)  # nothing pruned that was not zero


def test_zeros_keep_every_block_holding_a_non_zero(tmp_path):
    """A block:4x4 checkpoint with a few kept weights exactly zero: the blocks holding a non-zero stay
    whole (so a zero may be stored), and the model computes what the checkpoint does."""
    g = torch.Generator().manual_seed(6)
    blocks = torch.rand(64, 64, generator=g) < 0.1
    keep = blocks.repeat_interleave(4, 0).repeat_interleave(4, 1) & (torch.rand(256, 256, generator=g) < 0.8)
    model, path = pruned_checkpoint(tmp_path, keep)
    gm = siftc.convert(MLP, "sparse", None, weights=path, mask_from="zeros", pattern="block:4x4",
                       keep_dense=("net.0", "net.4", "net.6"))
    layer = gm.get_submodule("net.2")
    held = keep.reshape(64, 4, 64, 4).any(3).any(1)                          # (64, 64) blocks holding one
    assert torch.equal(layer.mask, held.repeat_interleave(4, 0).repeat_interleave(4, 1))
    assert_kept_values(layer, model.net[2].weight)
    x = torch.randn(4, 64)
    siftc.set_backend(gm, "torch")  # exactness against dense: masked dense (auto may time native kernels)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    zeros_sparsity = 1 - float(keep.float().mean())  # what the zeros alone give: more than whole blocks do
    measured = gm.siftc_info.report["sparsity"]
    assert measured == pytest.approx(1 - layer.density) and measured < zeros_sparsity - 0.01
    says = r"the block:4x4 masks holding the weights' non-zeros give sparsity 0\.9\d+ .*not 0\.92"
    with pytest.raises(UsageError, match=says):
        siftc.convert(MLP, "sparse", round(zeros_sparsity, 3), weights=path, mask_from="zeros", pattern="block:4x4",
                      keep_dense=("net.0", "net.4", "net.6"))


def test_cli_resnet_block_magnitude_from_weights(tmp_path):
    """The shipped ResNet-18 (CIFAR) example on the CLI, its weights from a file: every sparse conv keeps
    the top-L1 4x4 blocks (4 output x 4 input channels at one kernel position) and their values."""
    from siftc.source import load_model
    torch.manual_seed(11)
    model = load_model(RESNET, inputs=False).model
    path = tmp_path / "resnet.pt"
    torch.save(model.state_dict(), path)
    out = tmp_path / "art"
    proc = siftc_cli("convert", RESNET, "--kind", "sparse", "--sparsity", "0.9", "--pattern", "block:4x4",
                     "--mask-from", "magnitude", "--weights", path, "-o", out, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["pattern"] == "block:4x4" and len(report["patterns"]) == 19
    assert all(r["pattern"] == "block:4x4" and r["reason"] is None for r in report["patterns"])
    art = siftc.load(out)
    for name, layer in sparse_layers(art).items():
        w = model.get_submodule(name).weight
        assert torch.equal(layer.mask, top_blocks_mask(w, 4, 4, kept_count(w.numel(), 0.9, 16))), name
        assert_kept_values(layer, w)


@pytest.mark.parametrize("pattern", ["block:4x4", "nm:2:4:t"])
def test_rigl_keeps_the_structure_and_export_checks_it(tmp_path, dense_pt, pattern):
    _, path = dense_pt
    art, run, onnx_file = tmp_path / "art", tmp_path / "run", tmp_path / "m.onnx"
    proc = siftc_cli("convert", MLP, "--kind", "sparse", "-s", "0.9", "--pattern", pattern, "--weights", path,
                     "-o", art)
    assert proc.returncode == 0, proc.stderr
    proc = siftc_cli("train", art, "--data", DIGITS, "--method", "rigl", "--steps", "12", "--update-every", "4",
                     "--batch-size", "32", "-o", run, "--quiet")
    assert proc.returncode == 0, proc.stderr
    before, after = sparse_layers(siftc.load(art)), sparse_layers(siftc.load(run / "model"))
    p = Pattern.parse(pattern)
    for name, layer in before.items():
        trained = after[name]
        assert trained.pattern == p and trained.nnz == layer.nnz
        assert check_structure(trained.positions, trained.weight_shape, p) is None
    assert any(not torch.equal(after[n].positions, before[n].positions) for n in before)  # RigL moved masks
    proc = siftc_cli("export", run / "model", "-o", onnx_file, "--batch", "4")
    assert proc.returncode == 0, proc.stderr
    side = json.loads(next(tmp_path.glob("m.onnx*.json")).read_text())
    assert side["checks"]["sparsity"] == "passed"  # export's own check includes each layer's structure
    stored = {t.name: t for t in onnx.load(str(onnx_file)).graph.initializer}
    for r in (r for r in side["layers"] if r["name"] in after):             # the file's weights, read back
        trained = after[r["name"]]
        assert r["pattern"] == str(p)  # the sidecar says each layer's checked structure
        arr = torch.from_numpy(onnx.numpy_helper.to_array(stored[r["initializer"]]).copy())
        arr = arr if tuple(arr.shape) == trained.weight_shape else arr.t()  # a MatMul stores (in, out)
        assert not arr[~trained.mask].any()  # exact zeros off the structured mask (regrown weights may be 0 too)
        assert torch.equal(arr[trained.mask], trained.values.detach())


@pytest.mark.parametrize("args,words", [
    (["--mask-from", "zeros", "--pattern", "nm:2:4"], ["--mask-from zeros --pattern nm:2:4: layer net.2",
                                                       "more than nm:2:4's 2", "--mask-from magnitude"]),
    (["-s", "0.9", "--pattern", "nm:4:4"], ["nm:4:4", "0 < N < M"]),
    (["-s", "0.9", "--pattern", "block:0x4"], ["block:0x4"]),
    (["--mask-from", "zeros", "--distribution", "erk", "--pattern", "block:4x4"], ["drop --distribution"]),
])
def test_bad_combinations_are_one_line_exit_2(tmp_path, args, words):
    """The first: a checkpoint pruned unstructured (80% zeros at random) has groups of 4 with more than 2
    non-zeros, so it was not pruned to nm:2:4 and keeping 2 would prune weights it kept."""
    model = pretrained_mlp()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name in ("net.2", "net.4"):
            model.get_submodule(name).weight.mul_(torch.rand(256, 256, generator=g) < 0.2)
    path = tmp_path / "pruned.pt"
    torch.save(model.state_dict(), path)
    proc = siftc_cli("convert", MLP, "--kind", "sparse", "--weights", path, *args, "-o", tmp_path / "o")
    one_line_error(proc, *words)
    assert not (tmp_path / "o").exists()


def test_zeros_complete_a_partly_zero_transposable_checkpoint():
    """containing() for nm:t: a 4:8:t mask with some kept weights exactly zero becomes an exact 4:8:t
    mask again holding every non-zero; a row of a tile with 5 non-zeros is refused, naming it."""
    from siftc.sparse.structured import containing
    r = torch.arange(16)
    planted = (r[None, :] - r[:, None]) % 8 < 4                               # (16, 16): 4 per row and column
    g = torch.Generator().manual_seed(8)
    w = torch.randn(16, 16, generator=g) * planted * (torch.rand(16, 16, generator=g) < 0.7)
    mask = torch.zeros(256, dtype=torch.bool)
    mask[containing(w, Pattern.nm(4, 8, transposable=True)).long()] = True
    tiles = tile_view(mask.reshape(16, 16), 8)
    assert (tiles.sum(2) == 4).all() and (tiles.sum(1) == 4).all()
    assert mask.reshape(16, 16)[w != 0].all()
    w[3, :5] = 1.0                                                            # row 3 of the first tile: 5 > 4
    with pytest.raises(ValueError, match=r"non-zeros in row 3 of the tile at rows 0-7, inputs 0-7, more than "
                                         r"nm:4:8:t's 4"):
        containing(w, Pattern.nm(4, 8, transposable=True))
