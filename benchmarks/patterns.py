"""Structured-sparsity kernels (issue 13) against dense and the unstructured native kernels, side by side in
one run: prints one table, saves benchmarks/results/patterns.json.

    flock /tmp/siftc-bench.lock python benchmarks/patterns.py            # s = 0.5, 0.75, 0.9
    python benchmarks/patterns.py --reps 3 --sparsities 0.9               # one Linear row and the conv row
    python benchmarks/patterns.py --no-linear      # the conv row only, to benchmarks/results/patterns_conv.json

Rows: the iso-FLOP Sparse Wide Linear of benchmarks/runtime.py (its `wide_linear`: a dense 2048 x 2048
layer widened by sqrt(1/(1-s)), holding 2048^2 non-zeros), batch 256; and its wide conv row at s = 0.9
(`wide_conv`: ResNet-18 CIFAR's 128 -> 128 3x3 conv at 16 x 16, widened to 405 channels holding 128^2 * 9
non-zeros), batch 64, the patterns on siftc.runtime.block_conv (channels rounded up to the block or M).
Columns, interleaved within a row
(runtime.interleaved: every repeat runs each column once, the order rotated, so load from other processes
falls on all alike); every cell a median wall time:
  base        the dense 2048 x 2048 nn.Linear (conv row: the dense 128 -> 128 conv): the iso-FLOP target,
              every ratio is to it
  masked      SparseLinear of the wide shape on --backend torch (W*mask, then the dense op)
  native      SparseLinear on siftc's unstructured kernels (random positions)
  block:RxC   siftc.runtime.block on a random mask of whole R x C blocks, 2048^2 non-zeros to whole blocks;
              the width rounded up to a multiple of the block (6476 -> 6480 at s = 0.9)
  nm:N:M      the same kernels on an N:M mask with N/M = 1 - s (2:4, 1:4, 1:10), the width rounded up to M
GFLOP/s (the roofline view): useful FLOPs over the median time, 2 * batch * nnz a pass, three passes for
fwd+bwd (forward, input gradient, weight gradient at the non-zeros); the base's rate is the dense GEMM's.
Targets (issue 13): the best pattern's s = 0.9 fwd+bwd <= 1.5x the base; at s = 0.5 the best pattern's
fwd+bwd faster than masked. The conv row has none of its own (the issue's conv target is the ResNet-18 step's).
"""
import argparse
import math
import os
import sys
from pathlib import Path

import torch
from torch import nn

from siftc.nn.sparse import SparseConv2d, SparseLinear
from siftc.runtime import block, block_conv
from siftc.sparse.patterns import Pattern
from siftc.store import write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runtime import CONV_BASE, CONV_HW, interleaved, machine, passes, wide_conv, wide_linear, with_backend  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "patterns.json"
OUT_CONV = ROOT / "benchmarks" / "results" / "patterns_conv.json"  # --no-linear: the conv row's own run
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


class BlockConv(nn.Module):
    """A 3x3 conv (padding 1) on the block conv kernels: `blocks` (nblocks, R, C) at a random mask of
    `pattern` (blocks of R output x C input channels at one kernel position)."""

    def __init__(self, channels: int, pattern: str, nnz: int, generator: torch.Generator):
        super().__init__()
        shape = (channels, channels, 3, 3)
        positions = block.random_positions(shape, pattern, nnz, generator)
        bound = 1 / math.sqrt(channels * 9)
        values = torch.empty(positions.numel()).uniform_(-bound, bound, generator=generator)
        self.ix, blocks = block_conv.prepare(values, positions, shape, pattern)
        self.blocks = nn.Parameter(blocks.detach())
        self.bias = nn.Parameter(torch.zeros(channels))
        self.nnz = positions.numel()

    def forward(self, x):  # (B, channels, H, W) -> (B, channels, H, W)
        return block_conv.conv2d(x, self.blocks, self.ix, self.bias, padding=1)


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
    shapes = {"base": (BASE, BASE * BASE)}
    for pattern in patterns:
        w = rounded(width, pattern)
        layer = BlockLinear(w, pattern, nnz, gen)
        cols[pattern] = passes(layer, list(layer.parameters()), torch.randn(batch, w))
        shapes[pattern] = (w, layer.nnz)
    row = {"row": f"Wide Linear {width} s={s}", "kind": "linear", "sparsity": s, "batch": batch}
    return timed(row, cols, shapes, sparse, x, (width, nnz), batch, reps)


def measure_conv_row(s: float, batch: int, reps: int, patterns: list[str]) -> dict:
    """The iso-FLOP Sparse Wide 3x3 conv of benchmarks/runtime.py (ResNet-18 CIFAR's layer2 conv, 128
    channels at 16 x 16, widened by sqrt(1/(1-s))): its base the dense 128 -> 128 conv."""
    channels, nnz = wide_conv(s)
    hw = CONV_HW
    print(f"  Wide Conv2d {channels} s={s} ...", file=sys.stderr, flush=True)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    base = nn.Conv2d(CONV_BASE, CONV_BASE, 3, padding=1)
    sparse = SparseConv2d(channels, channels, 3, padding=1, nnz=nnz)
    x = torch.randn(batch, channels, hw, hw)
    cols = {"base": passes(base, list(base.parameters()), torch.randn(batch, CONV_BASE, hw, hw))}
    shapes = {"base": (CONV_BASE, CONV_BASE * CONV_BASE * 9)}
    for pattern in patterns:
        c = rounded(channels, pattern)
        layer = BlockConv(c, pattern, nnz, gen)
        cols[pattern] = passes(layer, list(layer.parameters()), torch.randn(batch, c, hw, hw))
        shapes[pattern] = (c, layer.nnz)
    row = {"row": f"Wide Conv2d {channels} 3x3 {hw}x{hw} s={s}", "kind": "conv", "sparsity": s, "batch": batch}
    return timed(row, cols, shapes, sparse, x, (channels, nnz), batch * hw * hw, reps)


def timed(row: dict, cols: dict, shapes: dict, sparse, x, sparse_shape, per_nnz: int, reps: int) -> dict:
    """Fill `row` with the fwd and fwd+bwd medians of every column, interleaved; the masked and native
    columns are `sparse` on those backends. A pass's useful FLOPs are 2 * per_nnz * nnz (per_nnz: the
    batch, times the output positions for a conv)."""
    for col, backend in (("masked", "torch"), ("native", "native")):
        fwd, fb = passes(sparse, list(sparse.parameters()), x)
        cols[col] = (with_backend(sparse, backend, fwd), with_backend(sparse, backend, fb))
        shapes[col] = sparse_shape
    row["shapes"] = {k: {"width": w, "nnz": n} for k, (w, n) in shapes.items()}
    for i, pas in enumerate(("fwd", "fwd+bwd")):
        ms = interleaved({k: v[i] for k, v in cols.items()}, reps)
        flop_passes = 1 if pas == "fwd" else 3
        row[pas] = {k: {"ms": t, "vs_base": t / ms["base"] if isinstance(t, float) else None,
                        "gflops": 2 * per_nnz * shapes[k][1] * flop_passes / t / 1e6 if isinstance(t, float) else None}
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
        if cell is None or r["kind"] != "linear":  # the issue's targets are the Linear rows'; conv: ratios only
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
    print(f"{'row':34s} {'pass':8s} " + " ".join(f"{c:>22s}" for c in columns))
    for r in rows:
        for pas in ("fwd", "fwd+bwd"):
            cells = []
            for c in columns:
                v = r[pas].get(c)
                cells.append(f"{'n/a':>22s}" if v is None or not isinstance(v["ms"], float) else
                             f"{v['ms']:7.1f} {v['vs_base']:5.2f}x {v['gflops']:5.1f}GF")
            print(f"{r['row']:34s} {pas:8s} " + " ".join(cells))
    print(f"cells: median ms, ratio to base (the row's dense layer: {BASE} Linear / {CONV_BASE}->{CONV_BASE} 3x3 conv), "
          "useful GFLOP/s")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5, help="repeats per cell (median reported)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    ap.add_argument("--conv-batch", type=int, default=64, help="batch of the wide conv row (s = 0.9); 0: no conv row")
    ap.add_argument("--no-linear", action="store_true", help="only the conv row")
    ap.add_argument("-o", "--out", help=f"default {OUT.relative_to(ROOT)}, with --no-linear {OUT_CONV.relative_to(ROOT)}")
    args = ap.parse_args()
    block.load()
    load_before = os.getloadavg()
    rows, all_patterns = [], []
    for s in [] if args.no_linear else args.sparsities:
        patterns = BLOCKS + [nm_pattern(s)]
        all_patterns += [p for p in patterns if p not in all_patterns]
        rows.append(measure_row(s, args.batch, args.reps, patterns))
    if args.conv_batch > 0:
        patterns = BLOCKS + [nm_pattern(0.9)]
        all_patterns += [p for p in patterns if p not in all_patterns]
        rows.append(measure_conv_row(0.9, args.conv_batch, args.reps, patterns))
    columns = ["base", "masked", "native"] + all_patterns
    print_table(rows, columns)
    goals = [g for r in rows for g in targets([r], BLOCKS + [nm_pattern(r["sparsity"])])]
    for g in goals:
        value = "n/a" if g["value"] is None else f"{g['value']:.2f}"
        print(f"{'MET   ' if g['met'] else 'MISSED'} {g['target']}: {g['pattern']} {value}")
    result = {"machine": machine(), "settings": {
        "reps": args.reps, "batch": args.batch, "conv_batch": args.conv_batch,
        "statistic": "median wall ms, columns interleaved",
        "ratio_to": f"dense {BASE}x{BASE} nn.Linear, or the dense {CONV_BASE}->{CONV_BASE} 3x3 conv for the conv row "
                    "('base')",
        "gflops": "useful FLOPs: 2 * batch * nnz per pass (conv: times the 16x16 output positions); fwd+bwd is 3 "
                  "passes",
        "loadavg_1m_before_after": [load_before[0], os.getloadavg()[0]]},
        "rows": rows, "targets": goals}
    out = Path(args.out or (OUT_CONV if args.no_linear else OUT))
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"saved {write_json(out, result)}")


if __name__ == "__main__":
    main()
