"""Structured-sparsity kernels (issue 13) against dense and the unstructured native kernels, side by side in
one run: prints one table, saves benchmarks/results/patterns.json.

    flock /tmp/siftc-bench.lock python benchmarks/patterns.py            # s = 0.5, 0.75, 0.9
    python benchmarks/patterns.py --reps 3 --sparsities 0.9               # one row

Rows: the iso-FLOP Sparse Wide Linear of benchmarks/runtime.py (its `wide_linear`: a dense 2048 x 2048
layer widened by sqrt(1/(1-s)), holding 2048^2 non-zeros), batch 256. Columns, interleaved within a row
(runtime.interleaved: every repeat runs each column once, the order rotated, so load from other processes
falls on all alike); every cell a median wall time:
  base        the dense 2048 x 2048 nn.Linear: the iso-FLOP target, every ratio is to it
  masked      SparseLinear of the wide shape on --backend torch (W*mask, then the dense op)
  native      SparseLinear on siftc's unstructured kernels (random positions)
  block:RxC   siftc.runtime.block on a random mask of whole R x C blocks, 2048^2 non-zeros to whole blocks;
              the width rounded up to a multiple of the block (6476 -> 6480 at s = 0.9)
  nm:N:M      the same kernels on an N:M mask with N/M = 1 - s (2:4, 1:4, 1:10), the width rounded up to M
GFLOP/s (the roofline view): useful FLOPs over the median time, 2 * batch * nnz a pass, three passes for
fwd+bwd (forward, input gradient, weight gradient at the non-zeros); the base's rate is the dense GEMM's.
Targets (issue 13): the best pattern's s = 0.9 fwd+bwd <= 1.5x the base; at s = 0.5 the best pattern's
fwd+bwd faster than masked.
"""
import argparse
import math
import os
import sys
from pathlib import Path

import torch
from torch import nn

from siftc.nn.sparse import SparseLinear
from siftc.runtime import block
from siftc.sparse.patterns import Pattern
from siftc.store import write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runtime import interleaved, machine, passes, wide_linear, with_backend  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "patterns.json"
BASE = 2048
BLOCKS = [f"block:{r}x{c}" for r, c in block.BLOCKS]


class BlockLinear(nn.Module):
    """A Linear on the block kernels: `blocks` (nblocks, R, C) at a random mask of `pattern`."""

    def __init__(self, width: int, pattern: str, nnz: int, generator: torch.Generator):
        super().__init__()
        positions = block.random_positions((width, width), pattern, nnz, generator)
        bound = 1 / math.sqrt(width)
        values = torch.empty(positions.numel()).uniform_(-bound, bound, generator=generator)
        self.ix, blocks = block.prepare(values, positions, (width, width), pattern)
        self.blocks = nn.Parameter(blocks.detach())
        self.bias = nn.Parameter(torch.zeros(width))
        self.nnz = positions.numel()

    def forward(self, x):  # (N, width) -> (N, width)
        return block.linear(x, self.blocks, self.ix, self.bias)


def nm_pattern(s: float) -> str:
    """The N:M pattern of density 1 - s with the smallest M >= 4 (0.5 -> nm:2:4, 0.9 -> nm:1:10)."""
    for m in range(4, 65):
        n = round((1 - s) * m)
        if 0 < n < m and abs(n / m - (1 - s)) < 1e-9:
            return f"nm:{n}:{m}"
    raise ValueError(f"no N:M pattern with M <= 64 has density {1 - s}")


def rounded(width: int, pattern: str) -> int:
    rows, cols = Pattern.parse(pattern).tile
    step = math.lcm(rows, cols)
    return -(-width // step) * step


def measure_row(s: float, batch: int, reps: int, patterns: list[str]) -> dict:
    width, nnz = wide_linear(s, BASE)
    print(f"  Wide Linear {width} s={s} ...", file=sys.stderr, flush=True)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    base = nn.Linear(BASE, BASE)
    sparse = SparseLinear(width, width, nnz=nnz)
    x = torch.randn(batch, width)
    cols = {"base": passes(base, list(base.parameters()), torch.randn(batch, BASE))}
    for col, backend in (("masked", "torch"), ("native", "native")):
        fwd, fb = passes(sparse, list(sparse.parameters()), x)
        cols[col] = (with_backend(sparse, backend, fwd), with_backend(sparse, backend, fb))
    shapes = {"base": (BASE, BASE * BASE), "masked": (width, nnz), "native": (width, nnz)}
    for pattern in patterns:
        w = rounded(width, pattern)
        layer = BlockLinear(w, pattern, nnz, gen)
        cols[pattern] = passes(layer, list(layer.parameters()), torch.randn(batch, w))
        shapes[pattern] = (w, layer.nnz)
    row = {"row": f"Wide Linear {width} s={s}", "sparsity": s, "batch": batch,
           "shapes": {k: {"width": w, "nnz": n} for k, (w, n) in shapes.items()}}
    for i, pas in enumerate(("fwd", "fwd+bwd")):
        ms = interleaved({k: v[i] for k, v in cols.items()}, reps)
        flop_passes = 1 if pas == "fwd" else 3
        row[pas] = {k: {"ms": t, "vs_base": t / ms["base"] if isinstance(t, float) else None,
                        "gflops": 2 * batch * shapes[k][1] * flop_passes / t / 1e6 if isinstance(t, float) else None}
                    for k, t in ms.items()}
        print(f"    {pas}: { {k: round(v, 1) if isinstance(v, float) else v for k, v in ms.items()} }",
              file=sys.stderr, flush=True)
    return row


def best(row: dict, pas: str, patterns: list[str]):
    """(pattern, cell) with the smallest time among the patterns."""
    timed = [(p, row[pas][p]) for p in patterns if isinstance(row[pas][p]["ms"], float)]
    return min(timed, key=lambda pc: pc[1]["ms"]) if timed else (None, None)


def targets(rows: list[dict], patterns: list[str]) -> list[dict]:
    out = []
    for r in rows:
        name, cell = best(r, "fwd+bwd", patterns)
        if cell is None:
            continue
        if r["sparsity"] == 0.9:
            out.append({"target": f"{r['row']} fwd+bwd: best pattern within 1.5x of dense {BASE}",
                        "pattern": name, "value": cell["vs_base"], "met": cell["vs_base"] <= 1.5})
        if r["sparsity"] == 0.5:
            masked = r["fwd+bwd"]["masked"]["ms"]
            v = cell["ms"] / masked if isinstance(masked, float) else None
            out.append({"target": f"{r['row']} fwd+bwd: best pattern faster than masked dense (ratio < 1)",
                        "pattern": name, "value": v, "met": v is not None and v < 1})
    return out


def print_table(rows: list[dict], columns: list[str]):
    print(f"{'row':28s} {'pass':8s} " + " ".join(f"{c:>22s}" for c in columns))
    for r in rows:
        for pas in ("fwd", "fwd+bwd"):
            cells = []
            for c in columns:
                v = r[pas].get(c)
                cells.append(f"{'n/a':>22s}" if v is None or not isinstance(v["ms"], float) else
                             f"{v['ms']:7.1f} {v['vs_base']:5.2f}x {v['gflops']:5.1f}GF")
            print(f"{r['row']:28s} {pas:8s} " + " ".join(cells))
    print("cells: median ms, ratio to base (dense 2048 Linear), useful GFLOP/s")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5, help="repeats per cell (median reported)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    ap.add_argument("-o", "--out", default=str(OUT))
    args = ap.parse_args()
    block.load()
    load_before = os.getloadavg()
    rows, all_patterns = [], []
    for s in args.sparsities:
        patterns = BLOCKS + [nm_pattern(s)]
        all_patterns += [p for p in patterns if p not in all_patterns]
        rows.append(measure_row(s, args.batch, args.reps, patterns))
    columns = ["base", "masked", "native"] + all_patterns
    print_table(rows, columns)
    goals = [g for r in rows for g in targets([r], BLOCKS + [nm_pattern(r["sparsity"])])]
    for g in goals:
        value = "n/a" if g["value"] is None else f"{g['value']:.2f}"
        print(f"{'MET   ' if g['met'] else 'MISSED'} {g['target']}: {g['pattern']} {value}")
    result = {"machine": machine(), "settings": {
        "reps": args.reps, "batch": args.batch, "statistic": "median wall ms, columns interleaved",
        "ratio_to": f"dense {BASE}x{BASE} nn.Linear ('base')",
        "gflops": "useful FLOPs: 2 * batch * nnz per pass; fwd+bwd is 3 passes",
        "loadavg_1m_before_after": [load_before[0], os.getloadavg()[0]]},
        "rows": rows, "targets": goals}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"saved {write_json(out, result)}")


if __name__ == "__main__":
    main()
