"""Sparse training runtime, measured side by side in one run: prints one table, saves benchmarks/results/runtime.json.

    python benchmarks/runtime.py                 # full table, medians of --reps runs, all cores
    python benchmarks/runtime.py --quick         # fewer repeats, no ResNet-18 rows

Columns, each a median wall time of forward (no grad) and forward+backward (input and weight gradients),
and its ratio to the *dense base layer* (the 2048x2048 Linear, the 128->128 conv, the dense ResNet-18):
  dense        plain nn.Linear / nn.Conv2d of the row's shape (for a wide row: the wide layer, dense)
  masked       siftc --backend torch: W*mask then the dense op (computes all the zeros)
  csr          torch.sparse CSR weight @ X^T (Linear only)
  sparseprop   SparseProp's kernels (pip install sparseprop), through siftc's sparseprop backend
  native       siftc's kernels
A "wide" row is the iso-FLOP Sparse Wide layer: width * sqrt(1/(1-s)), non-zeros = the dense layer's
weight count, so its ideal cost is 1.0x the dense base layer.

Large weight-gradient buffers are page-faulted in fresh on every backward; the benchmark sets PyTorch's
THP_MEM_ALLOC_ENABLE=1 (transparent huge pages for big allocations) for every column alike, and records
it; --no-thp measures without.
"""
import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

if "--no-thp" not in sys.argv:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # read by PyTorch's CPU allocator

import torch  # noqa: E402
from torch import nn  # noqa: E402

from siftc.nn.sparse import SPARSE_LAYERS, SparseConv2d, SparseLinear  # noqa: E402
from siftc.runtime import set_backend  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "runtime.json"


def median_ms(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def time_module(fwd, params, x, reps):
    """(forward ms, forward+backward ms) of y = fwd(x), gradients for x and params."""
    with torch.no_grad():
        t_fwd = median_ms(lambda: fwd(x), reps)
    xg = x.detach().clone().requires_grad_()
    g = torch.randn_like(fwd(x.detach()).detach())

    def step():
        for p in params:
            p.grad = None
        xg.grad = None
        fwd(xg).backward(g)
    return t_fwd, median_ms(step, reps)


def csr_linear(layer):
    """y = x W^T with W a torch.sparse CSR tensor (weight gradient through the CSR values)."""
    w = (layer.weight.detach() * layer.mask).to_sparse_csr().requires_grad_()

    def fwd(x):  # (B, in) -> (B, out)
        return (w @ x.t()).t()
    return fwd, [w]


def columns_for(make_sparse, make_dense, x, reps, csr: bool):
    row = {}
    print(f"  measuring {tuple(x.shape)} ...", file=sys.stderr, flush=True)
    dense = make_dense()
    row["dense"] = time_module(dense, list(dense.parameters()), x, reps)
    layer = make_sparse()
    for name in ("masked", "csr", "sparseprop", "native"):
        try:
            if name == "csr":
                if not csr:
                    continue
                fwd, params = csr_linear(layer)
                row[name] = time_module(fwd, params, x, reps)
            else:
                set_backend(layer, {"masked": "torch"}.get(name, name))
                row[name] = time_module(layer, list(layer.parameters()), x, reps)
        except Exception as e:  # a peer that cannot run this row is reported, not fatal
            row[name] = f"n/a ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
        print(f"    {name}: {row[name]}", file=sys.stderr, flush=True)
    return row


def linear_rows(sparsities, batch, reps):
    rows = []
    base = 2048
    for s in sparsities:
        nnz = round(base * base * (1 - s))
        x = torch.randn(batch, base)
        ref = nn.Linear(base, base)
        ref_ms = time_module(ref, list(ref.parameters()), x, reps)
        cols = columns_for(lambda: SparseLinear(base, base, nnz=nnz), lambda: nn.Linear(base, base), x, reps, True)
        rows.append({"row": f"Linear {base} s={s}", "ref_ms": ref_ms, "cols": cols})
    for s in sparsities:
        width = round(base * math.sqrt(1 / (1 - s)))
        x = torch.randn(batch, width)
        xb = torch.randn(batch, base)
        ref = nn.Linear(base, base)
        ref_ms = time_module(ref, list(ref.parameters()), xb, reps)
        cols = columns_for(lambda: SparseLinear(width, width, nnz=base * base), lambda: nn.Linear(width, width),
                           x, reps, True)
        rows.append({"row": f"Wide Linear {width} s={s}", "ref_ms": ref_ms, "cols": cols})
    return rows


def conv_rows(batch, reps, s=0.9):
    rows = []
    c, hw = 128, 16
    for wide in (False, True):
        ch = round(c * math.sqrt(1 / (1 - s))) if wide else c
        nnz = c * c * 9 if wide else round(c * c * 9 * (1 - s))
        x = torch.randn(batch, ch, hw, hw)
        ref = nn.Conv2d(c, c, 3, padding=1)
        ref_ms = time_module(ref, list(ref.parameters()), torch.randn(batch, c, hw, hw), reps)
        cols = columns_for(lambda: SparseConv2d(ch, ch, 3, padding=1, nnz=nnz),
                           lambda: nn.Conv2d(ch, ch, 3, padding=1), x, reps, False)
        rows.append({"row": f"{'Wide ' if wide else ''}Conv2d {ch}->{ch} 3x3 {hw}x{hw} s={s}", "ref_ms": ref_ms,
                     "cols": cols})
    return rows


def standin_wide_resnet(s):
    """Stand-in for siftc.convert(kind="wide") while that pass is unavailable: every width times
    sqrt(1/(1-s)), every conv but the stem a SparseConv2d holding the dense ResNet-18 conv's weight count."""
    sys.path.insert(0, str(ROOT / "examples"))
    from resnet import ResNet
    k = math.sqrt(1 / (1 - s))
    base = ResNet("cifar", 10)
    wide = ResNet("cifar", 10, widths=tuple(round(w * k) for w in (64, 128, 256, 512)))
    dense_convs = [m for m in base.modules() if isinstance(m, nn.Conv2d)][1:]
    wide_convs = [(n, m) for n, m in wide.named_modules() if isinstance(m, nn.Conv2d)][1:]
    for (name, m), d in zip(wide_convs, dense_convs):
        sp = SparseConv2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                          bias=m.bias is not None, nnz=d.weight.numel())
        parent = wide.get_submodule(name.rsplit(".", 1)[0]) if "." in name else wide
        setattr(parent, name.rsplit(".", 1)[-1], sp)
    return wide


def resnet_rows(batch, reps, s=0.9):
    sys.path.insert(0, str(ROOT / "examples"))
    from resnet import resnet18_cifar
    import siftc
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    try:
        wide = siftc.convert(resnet18_cifar(), kind="wide", sparsity=s, example_inputs=(x[:2],))
        source = "siftc.convert(kind='wide')"
    except Exception as e:  # the wide pass is being written; say so in the table
        wide = standin_wide_resnet(s)
        source = f"STAND-IN (siftc.convert wide unavailable: {type(e).__name__} {e})"

    def step_ms(model):
        model.train()
        params = list(model.parameters())

        def step():
            for p in params:
                p.grad = None
            nn.functional.cross_entropy(model(x), y).backward()
        return median_ms(step, reps)

    dense = resnet18_cifar()
    cols = {"dense": step_ms(dense)}
    for name, backend in (("masked", "torch"), ("native", "native")):
        set_backend(wide, backend)
        cols[name] = step_ms(wide)
    n_sparse = sum(isinstance(m, SPARSE_LAYERS) for m in wide.modules())
    return [{"row": f"ResNet-18 CIFAR Sparse Wide s={s} train step (batch {batch})", "source": source,
             "sparse_layers": n_sparse, "ref_ms": cols["dense"], "cols": cols}]


def fmt(v, ref):
    if isinstance(v, str):
        return "n/a"
    return f"{v:8.1f} {v / ref:5.2f}x"


def print_table(rows):
    names = ["dense", "masked", "csr", "sparseprop", "native"]
    print(f"{'row':44s} {'pass':7s} {'dense base':>10s} | " + " | ".join(f"{n:>15s}" for n in names))
    for r in rows:
        for i, pas in ((0, "fwd"), (1, "fwd+bwd")):
            ref = r["ref_ms"] if isinstance(r["ref_ms"], float) else r["ref_ms"][i]
            cells = []
            for n in names:
                v = r["cols"].get(n, "n/a")
                if isinstance(v, (list, tuple)):
                    v = v[i]
                elif isinstance(v, float) and i == 0:
                    v = "n/a"  # train-step rows have one number
                cells.append(f"{fmt(v, ref):>15s}")
            if isinstance(r["ref_ms"], float) and i == 0:
                continue
            label = "step" if isinstance(r["ref_ms"], float) else pas
            print(f"{r['row']:44s} {label:7s} {ref:10.1f} | " + " | ".join(cells))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=7, help="repeats per measurement (median reported)")
    ap.add_argument("--resnet-reps", type=int, default=3, help="repeats per ResNet-18 training step")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="3 repeats, no ResNet-18 rows")
    ap.add_argument("--only", choices=["linear", "conv", "resnet"], action="append")
    ap.add_argument("--no-thp", action="store_true", help="do not enable transparent huge pages")
    ap.add_argument("-o", "--out", default=str(OUT))
    args = ap.parse_args()
    reps = 3 if args.quick else args.reps
    only = set(args.only or (["linear", "conv"] if args.quick else ["linear", "conv", "resnet"]))
    torch.manual_seed(0)
    rows = []
    if "linear" in only:
        rows += linear_rows([0.5, 0.75, 0.9, 0.95], args.batch, reps)
    if "conv" in only:
        rows += conv_rows(64, reps)
    if "resnet" in only:
        rows += resnet_rows(128, args.resnet_reps)
    print_table(rows)
    meta = {"threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.processor() or
            platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "thp": os.environ.get("THP_MEM_ALLOC_ENABLE") == "1", "reps": reps, "statistic": "median ms",
            "ratio_to": "dense base layer (ref_ms)"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    tmp.replace(out)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
