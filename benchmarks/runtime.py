"""Sparse training runtime, measured side by side in one run: prints one table, saves benchmarks/results/runtime.json.

    flock /tmp/siftc-bench.lock python benchmarks/runtime.py      # the full table (about 15 minutes)
    python benchmarks/runtime.py --resnet-only --patterns unstructured,block:16x1,block:4x4   # the step per pattern
    python benchmarks/runtime.py --quick                           # 3 repeats, no ResNet-18 row

Every cell is a median wall time over --reps repeats. Within a row the columns are interleaved: each
repeat runs every column once (in a rotating order), so load from other processes on the machine falls on
all columns alike. Ratios are to the row's *dense base*: the dense 2048x2048 Linear for the Linear rows,
the dense 128->128 conv for the conv rows, the dense ResNet-18 step for the ResNet-18 row.
  dense        plain nn.Linear / nn.Conv2d of the row's shape (for a wide row: the wide layer, dense)
  masked       siftc --backend torch: W*mask then the dense op (computes all the zeros)
  csr          torch.sparse CSR weight @ X^T (Linear only)
  sparseprop   SparseProp's kernels (install: siftc.runtime.sparseprop_backend.INSTALL), through siftc's sparseprop backend
  native       siftc's kernels
A "wide" row is the iso-FLOP Sparse Wide layer: width * sqrt(1/(1-s)), non-zeros = the dense layer's
weight count, so its ideal cost is 1.0x the dense base. The ResNet-18 row is one training step (forward,
backward, SGD step) of siftc.convert(resnet18_cifar(), kind="wide", sparsity=0.9).

Memory settings: the process's own, as a user of siftc has them (glibc's allocator, PyTorch's defaults);
this script sets nothing process-wide. It once turned on huge pages (THP_MEM_ALLOC_ENABLE=1) and had glibc
keep freed memory (mallopt), when the native backward wrote a dense weight gradient page-faulted in fresh
on every backward; since the kernels write the gradient at the non-zeros only, the Wide Linear s=0.9
fwd+bwd measured the same with and without them (within 5%, 2 threads and 1 thread, AMD EPYC), so neither
belongs in the product, and neither is here.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from siftc.bench.runner import machine as bench_machine
from siftc.nn.sparse import SPARSE_LAYERS, SparseConv2d, SparseLinear
from siftc.nn.sparse import set_backend

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "runtime.json"
OUT_RESNET = ROOT / "benchmarks" / "results" / "runtime_resnet.json"  # --resnet-only: that row's own run
COLUMNS = ["dense", "masked", "csr", "sparseprop", "native"]
BACKEND = {"masked": "torch", "sparseprop": "sparseprop", "native": "native"}


def machine() -> dict:
    """The inference benchmark's machine record (CPU model, cores), plus torch's threads and settings."""
    return {**bench_machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def interleaved(fns: dict, reps: int) -> dict:
    """{name: median ms}; every repeat runs each fn once, the order rotated each repeat. A fn that raises
    is reported as "n/a (...)" and dropped from later repeats."""
    times = {k: [] for k in fns}
    live = dict(fns)
    for rep in range(reps + 1):  # repeat 0 is the warm-up (builds indexes, touches memory)
        names = list(live)
        names = names[rep % len(names):] + names[:rep % len(names)] if names else names
        for name in names:
            t = time.perf_counter()
            try:
                live[name]()
            except Exception as e:  # a peer that cannot run this row is reported, not fatal
                times[name] = f"n/a ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
                del live[name]
                continue
            if rep:
                times[name].append(time.perf_counter() - t)
    return {k: v if isinstance(v, str) else 1e3 * statistics.median(v) for k, v in times.items()}


def passes(module, params, x):
    """(forward, forward+backward) callables of y = module(x); the backward computes input and param grads."""
    xg = x.detach().clone().requires_grad_()
    with torch.no_grad():
        g = torch.randn_like(module(x))

    def fwd():
        with torch.no_grad():
            module(x)

    def fwd_bwd():
        for p in params:
            p.grad = None
        xg.grad = None
        module(xg).backward(g)
    return fwd, fwd_bwd


def with_backend(layer, name, fn):
    def run():
        set_backend(layer, name)
        fn()
    return run


def csr_module(layer):
    """y = x W^T with W a torch.sparse CSR tensor (weight gradient through the CSR values)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        w = layer.weight.detach().to_sparse_csr().requires_grad_()  # the derived dense weight: zero off the mask
    return (lambda x: (w @ x.t()).t()), [w]  # (B, in) -> (B, out)


def measure_row(name, base, dense, sparse, x, reps, csr):
    """One table row: base and every column, forward and forward+backward, interleaved."""
    print(f"  {name} ...", file=sys.stderr, flush=True)
    base_mod, base_x = base
    cols = {"base": passes(base_mod, list(base_mod.parameters()), base_x),
            "dense": passes(dense, list(dense.parameters()), x)}
    if csr:
        cols["csr"] = passes(*csr_module(sparse), x)
    for col in ("masked", "sparseprop", "native"):
        fwd, fb = passes(sparse, list(sparse.parameters()), x)
        cols[col] = (with_backend(sparse, BACKEND[col], fwd), with_backend(sparse, BACKEND[col], fb))
    row = {"row": name}
    for i, pas in enumerate(("fwd", "fwd+bwd")):
        row[pas] = interleaved({k: v[i] for k, v in cols.items()}, reps)
        print(f"    {pas}: {row[pas]}", file=sys.stderr, flush=True)
    return row


def wide_linear(s, base=2048) -> tuple[int, int]:
    """(width, nnz) of the iso-FLOP Sparse Wide Linear for a dense base x base layer at sparsity s."""
    return round(base * math.sqrt(1 / (1 - s))), base * base


def linear_rows(sparsities, batch, reps):
    base = 2048
    rows = []
    for wide in (False, True):
        for s in sparsities:
            width, nnz = wide_linear(s, base) if wide else (base, round(base * base * (1 - s)))
            torch.manual_seed(0)
            rows.append(measure_row(f"{'Wide ' if wide else ''}Linear {width} s={s}",
                                    (nn.Linear(base, base), torch.randn(batch, base)), nn.Linear(width, width),
                                    SparseLinear(width, width, nnz=nnz), torch.randn(batch, width), reps, csr=True))
    return rows


CONV_BASE, CONV_HW = 128, 16
"""The conv rows: a dense 128 -> 128 3x3 conv (padding 1) on 16 x 16 inputs."""


def wide_conv(s, base=CONV_BASE) -> tuple[int, int]:
    """(channels, nnz) of the iso-FLOP Sparse Wide 3x3 conv for a dense base -> base one at sparsity s."""
    return round(base * math.sqrt(1 / (1 - s))), base * base * 9


def conv_rows(batch, reps, s=0.9):
    c, hw = CONV_BASE, CONV_HW
    rows = []
    for wide in (False, True):
        ch, nnz = wide_conv(s, c) if wide else (c, round(c * c * 9 * (1 - s)))
        torch.manual_seed(0)
        rows.append(measure_row(f"{'Wide ' if wide else ''}Conv2d {ch}->{ch} 3x3 {hw}x{hw} b{batch} s={s}",
                                (nn.Conv2d(c, c, 3, padding=1), torch.randn(batch, c, hw, hw)),
                                nn.Conv2d(ch, ch, 3, padding=1), SparseConv2d(ch, ch, 3, padding=1, nnz=nnz),
                                torch.randn(batch, ch, hw, hw), reps, csr=False))
    return rows


def resnet_row(batch, reps, s=0.9, patterns=("unstructured",)):
    """The ResNet-18 CIFAR Sparse Wide training step: dense (base), masked and native, plus one native
    column per structured pattern (`siftc.convert(..., pattern=P)`, column "native P"), all interleaved."""
    sys.path.insert(0, str(ROOT / "examples"))
    from resnet import resnet18_cifar
    import siftc
    from siftc.errors import SiftcError
    torch.manual_seed(0)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    dense = resnet18_cifar()
    wide = siftc.convert(resnet18_cifar(), kind="wide", sparsity=s, example_inputs=(x[:2],))

    def step_fn(model, backend=None):
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def step():
            if backend:
                set_backend(model, backend)
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return step

    steps, fitted = {"base": step_fn(dense), "masked": step_fn(wide, "torch"), "native": step_fn(wide, "native")}, {}
    for pattern in (p for p in patterns if p != "unstructured"):
        print(f"  converting ResNet-18 wide s={s} --pattern {pattern} ...", file=sys.stderr, flush=True)
        try:
            model = siftc.convert(resnet18_cifar(), kind="wide", sparsity=s, example_inputs=(x[:2],), pattern=pattern)
        except SiftcError as e:  # a pattern convert refuses: the column says why
            fitted[pattern] = f"n/a ({str(e).splitlines()[0][:120]})"
            continue
        steps[f"native {pattern}"] = step_fn(model, "native")
        report = model.siftc_info.report  # "patterns": per sparse layer the pattern fitted (or a fallback)
        fitted[pattern] = {"sparse_layers": len(report["patterns"]),
                           "as_requested": sum(r["pattern"] == pattern for r in report["patterns"]),
                           "effective_sparsity": report["effective_sparsity"]}
    print(f"  ResNet-18 wide s={s} ...", file=sys.stderr, flush=True)
    times = interleaved(steps, reps)
    times.update({f"native {p}": v for p, v in fitted.items() if isinstance(v, str)})
    return {"row": f"ResNet-18 CIFAR Sparse Wide s={s} (batch {batch})", "step": times,
            "patterns": fitted,
            "sparse_layers": sum(isinstance(m, SPARSE_LAYERS) for m in wide.modules()),
            "params_stored": sum(p.numel() for p in wide.parameters()),  # sparse layers: values (nnz) + bias
            "params_dense_model": sum(p.numel() for p in dense.parameters())}


def roofline(batch, reps, s=0.9):
    """Where the time of the wide Linear row goes: each pass's FLOP rate next to the dense GEMM's, and the
    bytes it must move. Grads are isolated by freezing the other operand (dX: weight frozen; dW: x frozen).
    Rates are over whole passes: value gathers and packing are inside the time."""
    base, width = 2048, round(2048 * math.sqrt(1 / (1 - s)))
    torch.manual_seed(0)
    dense, sparse = nn.Linear(base, base), SparseLinear(width, width, nnz=base * base)
    set_backend(sparse, "native")
    xd, xs = torch.randn(batch, base), torch.randn(batch, width)

    def parts(mod, x):
        w, b = (mod.values if isinstance(mod, SPARSE_LAYERS) else mod.weight), mod.bias  # the trained tensors
        g = torch.randn(batch, mod.out_features)
        xg = x.clone().requires_grad_()

        def fwd():
            with torch.no_grad():
                mod(x)

        def grad_x():  # forward + input gradient
            for p in (w, b):
                p.requires_grad_(False)
            xg.grad = None
            mod(xg).backward(g)
            for p in (w, b):
                p.requires_grad_(True)

        def grad_w():  # forward + weight (and bias) gradient
            w.grad = b.grad = None
            mod(x).backward(g)
        return fwd, grad_x, grad_w

    (df, dx, dw), (sf, sx, sw) = parts(dense, xd), parts(sparse, xs)
    w_big = torch.ones(width, width)  # a buffer the wide layer's dense weight would fill, to time memory streams
    t = interleaved({"dense fwd": df, "dense fwd+dX": dx, "dense fwd+dW": dw, "native fwd": sf,
                     "native fwd+dX": sx, "native fwd+dW": sw, "stream read W": lambda: w_big.sum(),
                     "stream write W": lambda: torch.zeros_like(w_big)}, reps)
    flop = 2 * batch * base * base  # per pass, dense and sparse alike (nnz = base^2)
    ms = {"fwd": (t["dense fwd"], t["native fwd"]),
          "dX": (t["dense fwd+dX"] - t["dense fwd"], t["native fwd+dX"] - t["native fwd"]),
          "dW": (t["dense fwd+dW"] - t["dense fwd"], t["native fwd+dW"] - t["native fwd"])}
    numel, nnz, bp = width * width, base * base, -(-batch // 16) * 16
    act = batch * width * 4  # one activation matrix, bytes
    dram = {  # bytes each pass must move to or from memory (lower bounds; kernel operands excluded)
        "fwd": nnz * 16 + 4 * act,  # values, code + widx, gathered values written and read; pack X, unpack Y
        "dX": nnz * 16 + 4 * act,   # the same on the transposed index
        "dW": nnz * 12 + 4 * act}   # code + widx, the values' gradient written; pack X and dY
    stream_gbs = {"read": numel * 4 / t["stream read W"] / 1e6, "write": numel * 4 / t["stream write W"] / 1e6}
    out = {"row": f"Wide Linear {width} s={s} (batch {batch})", "timings_ms": t, "passes": {}}
    for p, (d_ms, s_ms) in ms.items():
        out["passes"][p] = {
            "dense_ms": d_ms, "native_ms": s_ms, "dense_gflops": flop / d_ms / 1e6, "native_gflops": flop / s_ms / 1e6,
            "dram_bytes_min": dram[p], "dram_ms_at_stream_rate": dram[p] / (stream_gbs["read"] * 1e6),
            # the kernel's operand stream: every non-zero reads the batch's Bp floats of one input row
            "kernel_operand_bytes": nnz * bp * 4, "kernel_operand_gbs": nnz * bp * 4 / s_ms / 1e6}
    out["stream_gbs"] = stream_gbs
    out["arithmetic_intensity"] = {"native_kernel_flop_per_operand_byte": 2 / 4,
                                   "dense_gemm_flop_per_byte_from_memory":
                                       flop / ((2 * batch * base + base * base) * 4)}
    return out


def targets(rows, resnet):
    """The issue's targets, each with the measured ratio and met/missed."""
    out = []
    by = {r["row"]: r for r in rows}

    def ratio(r, pas, col):
        v, b = r[pas].get(col), r[pas]["base"]
        return v / b if isinstance(v, float) else None
    wide90 = next((r for n, r in by.items() if n.startswith("Wide Linear") and n.endswith("s=0.9")), None)
    if wide90:
        v = ratio(wide90, "fwd+bwd", "native")
        out.append({"target": "Wide Linear s=0.9 fwd+bwd native within 2.0x of dense 2048", "value": v,
                    "met": v is not None and v <= 2.0})
    for r in rows:
        s = float(r["row"].rsplit("s=", 1)[1])
        for pas in ("fwd", "fwd+bwd"):
            n, sp = r[pas].get("native"), r[pas].get("sparseprop")
            if s >= 0.75 and isinstance(n, float) and isinstance(sp, float):
                out.append({"target": f"{r['row']} {pas}: native >= 2x faster than sparseprop",
                            "value": sp / n, "met": sp / n >= 2.0})
        if "Conv2d" in r["row"]:
            v = ratio(r, "fwd+bwd", "native")
            out.append({"target": f"{r['row']} fwd+bwd native within 3x of dense conv", "value": v,
                        "met": v is not None and v <= 3.0})
    if resnet:
        st = resnet["step"]
        v = st["native"] / st["base"] if isinstance(st.get("native"), float) else None
        out.append({"target": "ResNet-18 Sparse Wide 0.9 step native within 3x of dense step", "value": v,
                    "met": v is not None and v <= 3.0})
        timed = {c: t / st["base"] for c, t in st.items() if c.startswith("native ") and isinstance(t, float)}
        if timed:  # issue 13: the best pattern's step
            col = min(timed, key=timed.get)
            out.append({"target": "ResNet-18 Sparse Wide 0.9 step, best pattern within 2x of dense step",
                        "pattern": col.removeprefix("native "), "value": timed[col], "met": timed[col] <= 2.0})
    return out


def cell(v, base):
    return f"{'n/a':>15s}" if not isinstance(v, float) else f"{v:8.1f} {v / base:5.2f}x"


def print_table(rows, resnet):
    print(f"{'row':40s} {'pass':8s} {'base ms':>8s} | " + " | ".join(f"{c:>15s}" for c in COLUMNS))
    for r in rows:
        for pas in ("fwd", "fwd+bwd"):
            b = r[pas]["base"]
            print(f"{r['row']:40s} {pas:8s} {b:8.1f} | " + " | ".join(cell(r[pas].get(c), b) for c in COLUMNS))
    if resnet:
        st = resnet["step"]
        b = st["base"]
        print(f"{resnet['row'][:40]:40s} {'step':8s} {b:8.1f} | "
              + " | ".join(cell(st.get(c), b) for c in COLUMNS))
        for col in (c for c in st if c.startswith("native ")):  # the --patterns axis, one line each
            print(f"{'  ' + col:40s} {'step':8s} {b:8.1f} | " + " | ".join(
                cell(st[col], b) if c == "native" else f"{'':>15s}" for c in COLUMNS)
                  + ("" if isinstance(st[col], float) else f"  {st[col]}"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=7, help="repeats per cell (median reported)")
    ap.add_argument("--resnet-reps", type=int, default=5, help="repeats of the ResNet-18 training step")
    ap.add_argument("--batch", type=int, default=256, help="batch of the Linear rows")
    ap.add_argument("--quick", action="store_true", help="3 repeats, no ResNet-18 row")
    ap.add_argument("--patterns", default="unstructured", type=lambda v: [p for p in v.split(",") if p],
                    help="ResNet-18 step per pattern, comma-separated (block:16x1,block:4x4,...): each converted "
                         "with siftc.convert(pattern=P), on native, interleaved with the other columns "
                         "[default: unstructured only, the native column]")
    ap.add_argument("--resnet-only", action="store_true",
                    help=f"only the ResNet-18 row(s), to {OUT_RESNET.relative_to(ROOT)} unless -o is given")
    ap.add_argument("--resnet-batch", type=int, default=128, help="batch of the ResNet-18 step")
    ap.add_argument("-o", "--out", default=None, help=f"[default: {OUT.relative_to(ROOT)}]")
    args = ap.parse_args()
    if args.quick and args.resnet_only:
        ap.error("--quick has no ResNet-18 row and --resnet-only only that: pass one of them")
    from siftc.errors import UsageError
    from siftc.sparse.patterns import Pattern
    for p in args.patterns:
        try:
            Pattern.parse(p)
        except UsageError as e:
            ap.error(f"--patterns {p}: {e}")
    reps = 3 if args.quick else args.reps
    load_before = os.getloadavg()  # other processes on the machine; the lock only keeps benchmarks apart
    rows = [] if args.resnet_only else linear_rows([0.5, 0.75, 0.9, 0.95], args.batch, reps) + conv_rows(64, reps)
    roof = None if args.resnet_only else roofline(args.batch, reps)
    resnet = None if args.quick else resnet_row(args.resnet_batch, args.resnet_reps, patterns=args.patterns)
    print_table(rows, resnet)
    goals = targets(rows, resnet)
    for g in goals:
        print(f"{'MET   ' if g['met'] else 'MISSED'} {g['target']}: {g['value'] if g['value'] is None else round(g['value'], 2)}")
    for p, v in (roof or {"passes": {}})["passes"].items():
        print(f"roofline {roof['row']} {p}: native {v['native_gflops']:.1f} GFLOP/s vs dense GEMM "
              f"{v['dense_gflops']:.1f}; >= {v['dram_bytes_min'] / 1e6:.0f} MB to memory "
              f"({v['dram_ms_at_stream_rate']:.1f} ms at {roof['stream_gbs']['read']:.1f} GB/s); kernel operands "
              f"{v['kernel_operand_bytes'] / 1e9:.2f} GB at {v['kernel_operand_gbs']:.0f} GB/s")
    result = {"machine": machine(), "settings": {"reps": reps, "resnet_reps": args.resnet_reps,
              "statistic": "median wall ms, columns interleaved", "ratio_to": "the row's dense base ('base')",
              "linear_batch": args.batch, "conv_batch": 64, "resnet_batch": args.resnet_batch,
              "patterns": args.patterns,
              "loadavg_1m_before_after": [load_before[0], os.getloadavg()[0]]},
              "rows": rows, "resnet": resnet, "targets": goals, "roofline": roof}
    out = Path(args.out or (OUT_RESNET if args.resnet_only else OUT))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
