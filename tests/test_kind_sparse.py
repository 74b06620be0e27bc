"""--kind sparse: every transformable layer keeps its shape and becomes a sparse layer, its mask from the
weights' magnitudes, their zeros or random; it is not iso-FLOP (the report says so and counts the kept
fraction), and it trains (static keeps the mask), exports and benches like every kind."""
import json
import math

import pytest
import torch

import siftc
from siftc.errors import UsageError
from siftc.nn.sparse import SPARSE_LAYERS
from conftest import ROOT, spec_path
from test_weights_in import MLP, dense_pt, one_line_error, pretrained_mlp, siftc_cli  # noqa: F401 (fixture)

RESNET = spec_path("examples/resnet.py:resnet18_cifar")
DIGITS = ROOT / "data" / "digits.npz"


def sparse_layers(gm):
    return {n: m for n, m in gm.named_modules() if isinstance(m, SPARSE_LAYERS)}


def test_magnitude_keeps_the_largest_and_their_values(dense_pt):
    model, path = dense_pt
    gm = siftc.convert(MLP, "sparse", 0.9, weights=path)
    layers = sparse_layers(gm)
    assert set(layers) == {"net.2", "net.4"}  # the first and last stay dense, as for every kind
    for name, layer in layers.items():
        w = model.get_submodule(name).weight.detach()
        assert layer.weight_shape == tuple(w.shape)
        assert layer.nnz == w.numel() - round(0.9 * w.numel())
        kept = torch.zeros(w.numel(), dtype=torch.bool)
        kept[layer.positions.long()] = True
        assert w.reshape(-1).abs()[kept].min() >= w.reshape(-1).abs()[~kept].max()  # one-shot magnitude
        assert torch.equal(layer.values, w.reshape(-1)[kept])
    report = gm.siftc_info.report
    assert report["kind"] == "sparse" and report["mask_from"] == "magnitude"
    rows = {r["name"]: r for r in report["layers"]}
    assert rows["net.2"]["new_shape"] == "256x256" and rows["net.2"]["flops"] == 2 * layers["net.2"].nnz
    # not iso-FLOP: the whole model's count is the dense one less what the sparse layers dropped
    dropped = sum(r["dense_flops"] - r["flops"] for r in report["layers"])
    assert report["flops"] == report["dense_flops"] - dropped and report["flop_ratio"] < 0.25
    assert any(n.startswith("not iso-FLOP") and f"{report['flop_ratio']:.4f}x" in n for n in report["notes"])


def test_sparsity_zero_is_the_dense_model(dense_pt):
    model, path = dense_pt
    gm = siftc.convert(MLP, "sparse", 0.0, weights=path)
    x = torch.randn(5, 64)
    torch.testing.assert_close(gm(x), model(x))
    assert gm.siftc_info.report["flop_ratio"] == pytest.approx(1.0)


def pruned_elsewhere(tmp_path, keep=0.2):
    """A checkpoint pruned by another tool: 80% of the hidden layers' weights exactly zero."""
    model = pretrained_mlp()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name in ("net.2", "net.4"):
            w = model.get_submodule(name).weight
            w.mul_(torch.rand(w.shape, generator=g) < keep)
    path = tmp_path / "pruned.safetensors"
    from safetensors.torch import save_file
    save_file(model.state_dict(), path)
    return model, path


def test_mask_from_zeros_takes_the_sparsity_from_the_weights(tmp_path):
    model, path = pruned_elsewhere(tmp_path)
    gm = siftc.convert(MLP, "sparse", None, weights=path, mask_from="zeros")
    for name, layer in sparse_layers(gm).items():
        w = model.get_submodule(name).weight.detach()
        assert torch.equal(layer.mask, w != 0)
        assert torch.equal(layer.weight, w)
    measured = gm.siftc_info.report["sparsity"]
    assert 0.78 < measured < 0.82 and gm.siftc_info.report["measured_sparsity"] == measured
    x = torch.randn(4, 64)
    siftc.set_backend(gm, "torch")  # exactness against dense: masked dense (auto may time native kernels)
    torch.testing.assert_close(gm(x), model(x))  # nothing pruned that was not zero
    assert siftc.convert(MLP, "sparse", round(measured, 3), weights=path, mask_from="zeros")  # a matching check
    with pytest.raises(UsageError, match=r"zeros give sparsity 0\.[78]\d+.*not 0\.5"):
        siftc.convert(MLP, "sparse", 0.5, weights=path, mask_from="zeros")


def test_mask_from_zeros_cli(tmp_path):
    _, path = pruned_elsewhere(tmp_path)
    out = tmp_path / "art"
    ok = siftc_cli("convert", MLP, "--kind", "sparse", "--weights", path, "--mask-from", "zeros", "-o", out, "--json")
    assert ok.returncode == 0, ok.stderr
    assert 0.78 < json.loads(ok.stdout)["sparsity"] < 0.82
    one_line_error(siftc_cli("convert", MLP, "--kind", "sparse", "--sparsity", "0.95", "--weights", path,
                             "--mask-from", "zeros", "-o", tmp_path / "b"), "zeros give sparsity", "drop --sparsity")
    assert not (tmp_path / "b").exists()


def test_mask_from_random_keeps_values_and_is_seeded(dense_pt):
    model, path = dense_pt
    a = siftc.convert(MLP, "sparse", 0.9, weights=path, mask_from="random", seed=1)
    b = siftc.convert(MLP, "sparse", 0.9, weights=path, mask_from="random", seed=1)
    m = siftc.convert(MLP, "sparse", 0.9, weights=path)
    la, lb, lm = (g.get_submodule("net.2") for g in (a, b, m))
    assert torch.equal(la.positions, lb.positions) and not torch.equal(la.positions, lm.positions)
    assert torch.equal(la.values, model.net[2].weight.reshape(-1)[la.positions.long()])


def test_erk_on_resnet_keeps_uniform_total_flops():
    from siftc.source import load_model
    loaded = load_model(RESNET)
    model, x = loaded.model, loaded.example_inputs
    uniform = siftc.convert(model, "sparse", 0.9, x)
    erk = siftc.convert(model, "sparse", 0.9, x, distribution="erk")
    du = {n: m.density for n, m in sparse_layers(uniform).items()}
    de = {n: m.density for n, m in sparse_layers(erk).items()}
    assert all(abs(d - 0.1) < 1e-3 for d in du.values())
    assert max(de.values()) > 0.15 and min(de.values()) < 0.08  # ERK: small layers denser
    assert erk.siftc_info.report["flops"] == pytest.approx(uniform.siftc_info.report["flops"], rel=1e-3)
    for name, layer in sparse_layers(erk).items():  # each layer's largest |w| at its own count
        w = model.get_submodule(name).weight.detach().reshape(-1).abs()
        kept = torch.zeros(w.numel(), dtype=torch.bool)
        kept[layer.positions.long()] = True
        assert kept.all() or w[kept].min() >= w[~kept].max()  # ERK may make a small layer dense


@pytest.mark.parametrize("args,words", [
    (["--kind", "sparse"], ["sparsity is required"]),
    (["--kind", "sparse", "-s", "0.9", "--mask-from", "zeros", "--distribution", "erk"], ["drop --distribution"]),
    (["--kind", "wide", "-s", "0.5", "--mask-from", "random"], ["--kind sparse"]),
    (["--kind", "sparse", "-s", "0.9", "--mask-from", "nope"], []),
])
def test_bad_sparse_options_one_line_exit_2(tmp_path, args, words):
    proc = siftc_cli("convert", MLP, *args, "-o", tmp_path / "o")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    if words:
        one_line_error(proc, *words)
    assert not (tmp_path / "o").exists()


def test_finetune_static_export_bench(tmp_path, dense_pt):
    """The pipeline on the CLI: static training keeps the pruned mask and moves the values; export's
    sparsity checks pass; bench runs the file."""
    _, path = dense_pt
    art, run, onnx = tmp_path / "art", tmp_path / "run", tmp_path / "m.onnx"
    assert siftc_cli("convert", MLP, "--kind", "sparse", "-s", "0.9", "--weights", path, "-o", art).returncode == 0
    proc = siftc_cli("train", art, "--data", DIGITS, "--method", "static", "--steps", "20", "--batch-size", "32",
                     "--backend", "native", "-o", run, "--quiet")
    assert proc.returncode == 0, proc.stderr
    before, after = siftc.load(art), siftc.load(run / "model")
    for name, layer in sparse_layers(before).items():
        trained = after.get_submodule(name)
        assert torch.equal(trained.positions, layer.positions)  # static: the magnitude mask stays
        assert not torch.equal(trained.values, layer.values)    # fine-tuned
    summary = json.loads((run / "summary.json").read_text())
    assert summary["flops"]["ratio_to_dense"] < 0.5  # it trains on the kept fraction of the FLOPs
    proc = siftc_cli("export", run / "model", "-o", onnx, "--batch", "8")
    assert proc.returncode == 0, proc.stderr
    side = json.loads(onnx.with_suffix(".onnx.json").read_text()) if onnx.with_suffix(".onnx.json").exists() else \
        json.loads(next(tmp_path.glob("m.onnx*.json")).read_text())
    assert side["kind"] == "sparse" and side["checks"]["sparsity"] == "passed"
    dens = {r["name"]: r["density"] for r in side["layers"]}
    assert dens["net.2"] == pytest.approx(0.1, abs=1e-3) and dens["net.0"] == 1.0
    proc = siftc_cli("bench", onnx, "--engine", "onnxruntime", "--batch", "8", "--iterations", "3", "--turns", "1",
                     "--json", tmp_path / "b.json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "b.json").read_text())["results"]
    assert rows and all(math.isfinite(r["p50_ms"]) for r in rows if r.get("p50_ms") is not None)


def test_rigl_trains_same_shape(tmp_path, dense_pt):
    """Sparse training from a pruned start (SET/RigL move the mask; the count per layer stays)."""
    _, path = dense_pt
    art, run = tmp_path / "art", tmp_path / "run"
    assert siftc_cli("convert", MLP, "--kind", "sparse", "-s", "0.9", "--weights", path, "-o", art).returncode == 0
    proc = siftc_cli("train", art, "--data", DIGITS, "--method", "rigl", "--steps", "12", "--update-every", "4",
                     "--batch-size", "32", "-o", run, "--quiet")
    assert proc.returncode == 0, proc.stderr
    before, after = siftc.load(art), siftc.load(run / "model")
    layer, trained = before.get_submodule("net.2"), after.get_submodule("net.2")
    assert trained.nnz == layer.nnz and not torch.equal(trained.positions, layer.positions)


def test_resnet_conv_round_trip(tmp_path):
    gm = siftc.convert(RESNET, "sparse", 0.9)
    siftc.save(gm, tmp_path / "art")
    again = siftc.load(tmp_path / "art")
    x = torch.randn(2, 3, 32, 32)
    gm.eval(), again.eval()
    siftc.set_backend(gm, "torch"), siftc.set_backend(again, "torch")  # exact: one backend on both sides
    torch.testing.assert_close(again(x), gm(x), rtol=0, atol=0)
    assert sum(isinstance(m, SPARSE_LAYERS) for m in again.modules()) == 19  # 21 convs/linear less stem, fc


README_SECTION = "## Fine-tune a pruned model (same-shape sparse)"
TIMING = {"--time", "--iterations", "--turns"}  # the quick run benches by count


def readme_commands() -> list[list[str]]:
    """The `siftc ...` lines of the README's fine-tuning section, as token lists."""
    import shlex
    text = (ROOT / "README.md").read_text()
    section = text[text.index(README_SECTION):]
    section = section[:section.index("\n## ", 1)]
    return [shlex.split(line.split("#")[0])[1:] for line in section.splitlines() if line.startswith("siftc ")]


def test_readme_finetune_example_runs(tmp_path):
    """examples/finetune_pruned.py --quick: the README's commands (same subcommands and flags) run in
    order, the pruned model trains, and the accuracies are written."""
    import shlex
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "finetune_pruned.py"), "--quick", "--out",
                           str(tmp_path / "ft")], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ran = [shlex.split(line[2:])[1:] for line in proc.stdout.splitlines() if line.startswith("$ siftc ")]
    flags = lambda cmd: [cmd[0]] + [t for t in cmd if t.startswith("--") and t not in TIMING]
    documented = readme_commands()
    assert documented, "the README lost its fine-tuning commands"
    assert [flags(c) for c in ran] == [flags(c) for c in documented]
    acc = json.loads((tmp_path / "ft" / "summary.json").read_text())["val_acc"]
    assert acc["dense"] > 0.5 and acc["fine_tuned"] > 0.5  # 3 dense epochs already learn the digits
    assert (tmp_path / "ft" / "mlp-sparse.onnx").is_file() and (tmp_path / "ft" / "bench.json").is_file()
