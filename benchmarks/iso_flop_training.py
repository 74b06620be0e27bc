"""Iso-FLOP training: dense vs Sparse Wide at 50% and 75% sparsity (RigL), same steps, batch and lr, and
Sparse Wide with structured patterns (issue 13; --patterns, default block:16x1 and block:4x4, the fastest
kernels in benchmarks/patterns.py) at --pattern-sparsities (default 75%).

Two tasks on the shipped data (examples/make_data.py writes it, offline): the MLP on 8x8 digits and the
byte-level GPT on Python standard-library text. Three seeds each (the seed sets the conversion's masks
and init, the data order and RigL's draws). Prints, per configuration, the final validation loss and
accuracy (mean and standard deviation over seeds), training steps/s (median of 5 timing windows) on the
native sparse runtime and on masked dense ("torch"), and the training FLOPs (sparse forward + backward
+ RigL's dense-gradient steps) next to the dense model's. Writes benchmarks/results/iso_flop_training.json.

    python benchmarks/iso_flop_training.py            # the full table (< 30 min on 2 shared cores)
    python benchmarks/iso_flop_training.py --quick    # a smoke run: 1 seed, few steps
    python benchmarks/iso_flop_training.py --patterns ''   # the unstructured rows only, as before issue 13

Every run uses one intra-op thread: the machine's 2 cores are shared, and one thread per run is both
faster under load and the same for every backend. If a kind cannot convert a model (a Sparse Wide rule
missing for an op), the configuration falls back to Sparse Parallel and the table says so.
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import siftc
from siftc.bench.runner import machine
from siftc.errors import SiftcError, UsageError
from siftc.nn.sparse import set_backend
from siftc.sparse.patterns import Pattern
from siftc.train import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent
TASKS = {
    # name: model spec, data, steps, batch, lr, timing steps
    "digits-mlp": dict(model="examples/mlp.py:mlp", data="data/digits.npz", steps=600, batch=64, lr=2e-3,
                       timed=30),
    "stdlib-gpt": dict(model="examples/gpt.py:gpt", data="data/stdlib.txt", steps=300, batch=16, lr=2e-3,
                       timed=8),
}
CONFIGS = [  # name, sparsity, method, pattern
    ("dense", 0.0, "static", "unstructured"),
    ("wide-50%", 0.5, "rigl", "unstructured"),
    ("wide-75%", 0.75, "rigl", "unstructured"),
]
PATTERNS = ("block:16x1", "block:4x4")  # the two fastest block kernels (benchmarks/results/patterns*.json)
PATTERN_SPARSITIES = (0.75,)
SEEDS = (0, 1, 2)


def configs(patterns, sparsities) -> list[tuple]:
    """CONFIGS plus one RigL Sparse Wide row per (sparsity, pattern)."""
    return CONFIGS + [(f"wide-{round(100 * s)}% {p}", s, "rigl", p) for s in sparsities for p in patterns]


def convert(spec: str, sparsity: float, seed: int, out: Path, pattern: str = "unstructured") -> str:
    """Sparse Wide at `sparsity` (dense at 0) with `pattern`; Sparse Parallel if wide cannot convert it."""
    for kind in ("wide", "parallel"):
        try:
            siftc.save(siftc.convert(str(ROOT / spec), kind, sparsity, seed=seed,
                                     pattern=pattern if sparsity else "unstructured"), out)
            return kind
        except SiftcError as e:
            error = e
    raise error


def steps_per_s(artifact: Path, backend: str, batch: int, timed: int, repeats: int = 5) -> float:
    """Training steps/s of the model on `backend` (forward, backward, AdamW) after warm-up: the median of
    `repeats` windows of `timed` steps."""
    model = set_backend(siftc.load(artifact), backend)
    x0 = model.siftc_info.example_inputs[0]
    if torch.is_floating_point(x0):
        x, y = torch.randn(batch, *x0.shape[1:]), torch.randint(0, 10, (batch,))
    else:
        x = torch.randint(0, 256, (batch, *x0.shape[1:]))
        y = torch.randint(0, 256, x.shape)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step():
        out = model(x)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(max(3, timed // 5)):
        step()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(timed):
            step()
        rates.append(timed / (time.perf_counter() - t0))
    return statistics.median(rates)


def _commit() -> str | None:
    """The checkout's commit, so a table can say which kernels it measured."""
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def mean_sd(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def pattern_fit(report: dict, pattern: str) -> dict:
    """What convert fitted: sparse layers, how many got `pattern` (the rest a fallback), effective sparsity."""
    layers = report.get("patterns") or []
    return {"sparse_layers": len(layers), "as_requested": sum(r["pattern"] == pattern for r in layers),
            "effective_sparsity": report.get("effective_sparsity")}


def run(quick: bool, patterns=PATTERNS, pattern_sparsities=PATTERN_SPARSITIES) -> dict:
    torch.set_num_threads(1)
    seeds = SEEDS[:1] if quick else SEEDS
    results = {"machine": machine()["cpu"], "machine_record": machine(), "python": sys.version.split()[0],
               "torch": torch.__version__, "threads": 1, "seeds": list(seeds), "commit": _commit(), "tasks": {}}
    with tempfile.TemporaryDirectory(prefix="siftc-bench-") as tmp:
        tmp = Path(tmp)
        for task, t in TASKS.items():
            steps = 40 if quick else t["steps"]
            rows = []
            for name, sparsity, method, pattern in configs(patterns, pattern_sparsities):
                runs, kind = [], None
                for seed in seeds:
                    art = tmp / f"{task}-{name.replace(':', '-').replace(' ', '-')}-{seed}"
                    kind = convert(t["model"], sparsity, seed, art, pattern)
                    cfg = TrainConfig(str(art), str(ROOT / t["data"]), str(tmp / f"run-{art.name}"),
                                      method=method, steps=steps, batch_size=t["batch"], lr=t["lr"],
                                      backend="torch", seed=seed, threads=1, checkpoint_every=steps,
                                      eval_every=steps)
                    runs.append(train(cfg))
                    print(f"  {task} {name} seed {seed}: val loss {runs[-1]['val_loss']:.4f}, "
                          f"acc {runs[-1]['val_acc']:.4f}", file=sys.stderr, flush=True)
                art0 = tmp / f"{task}-{name.replace(':', '-').replace(' ', '-')}-{seeds[0]}"
                timed = 3 if quick else t["timed"]
                speed = {be: steps_per_s(art0, be, t["batch"], timed)
                         for be in (("torch",) if sparsity == 0 else ("native", "torch"))}
                loss, acc = mean_sd([r["val_loss"] for r in runs]), mean_sd([r["val_acc"] for r in runs])
                flops = runs[0]["flops"]
                report = siftc.load(art0).siftc_info.report
                rows.append({"config": name, "kind": kind if sparsity else "dense", "sparsity": sparsity,
                             "method": method, "pattern": pattern,
                             **({"pattern_fit": pattern_fit(report, pattern)} if pattern != "unstructured" else {}), "steps": steps, "batch": t["batch"], "lr": t["lr"],
                             "val_loss": loss, "val_acc": acc,
                             "val_loss_runs": [r["val_loss"] for r in runs],
                             "val_acc_runs": [r["val_acc"] for r in runs],
                             "steps_per_s": speed, "train_flops": flops["total"],
                             "dense_model_train_flops": flops["dense_model_total"],
                             "flop_ratio": flops["ratio_to_dense"],
                             "dense_grad_steps": flops["dense_grad_steps"],
                             "params": report["params"], "nonzero_params": report["nonzero_params"]})
            results["tasks"][task] = rows
    return results


def table(results: dict) -> str:
    lines = ["| task | config | kind | val loss (mean ± sd) | val acc (mean ± sd) | steps/s native | "
             "steps/s masked dense | training FLOPs | vs dense |",
             "|---|---|---|---|---|---|---|---|---|"]
    for task, rows in results["tasks"].items():
        for r in rows:
            native = r["steps_per_s"].get("native")
            fit = r.get("pattern_fit")  # a pattern row: how many sparse layers took the pattern (others: a fallback)
            kind = r["kind"] + (f" ({fit['as_requested']}/{fit['sparse_layers']} layers {r['pattern']})" if fit else "")
            lines.append(f"| {task} | {r['config']} | {kind} | "
                         f"{r['val_loss'][0]:.4f} ± {r['val_loss'][1]:.4f} | "
                         f"{r['val_acc'][0]:.2%} ± {r['val_acc'][1]:.2%} | "
                         f"{f'{native:.1f}' if native else '-'} | {r['steps_per_s']['torch']:.1f} | "
                         f"{r['train_flops']:.3e} | {r['flop_ratio']:.3f}x |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="1 seed, 40 steps: check the script runs (writes no JSON unless --out is given)")
    ap.add_argument("--out", default=None,
                    help="JSON to write [default: benchmarks/results/iso_flop_training.json for a full run]")
    ap.add_argument("--patterns", default=",".join(PATTERNS), type=lambda v: [p for p in v.split(",") if p],
                    help="structured patterns of the extra Sparse Wide rows, comma-separated ('' for none) "
                         f"[default: {','.join(PATTERNS)}]")
    ap.add_argument("--pattern-sparsities", default=",".join(map(str, PATTERN_SPARSITIES)),
                    type=lambda v: [float(s) for s in v.split(",") if s],
                    help=f"sparsities of the pattern rows [default: {','.join(map(str, PATTERN_SPARSITIES))}]")
    args = ap.parse_args()
    for p in args.patterns:
        try:
            Pattern.parse(p)
        except UsageError as e:
            ap.error(f"--patterns {p}: {e}")
    if any(not 0 < s < 1 for s in args.pattern_sparsities):
        ap.error(f"--pattern-sparsities {args.pattern_sparsities}: each must lie in (0, 1), e.g. 0.5,0.75")
    for t in TASKS.values():
        if not (ROOT / t["data"]).is_file():
            sys.exit(f"{t['data']} is missing; run python examples/make_data.py first")
    t0 = time.perf_counter()
    results = run(args.quick, args.patterns, args.pattern_sparsities)
    results["elapsed_s"] = time.perf_counter() - t0
    print(table(results))
    out = args.out or (None if args.quick else ROOT / "benchmarks" / "results" / "iso_flop_training.json")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=1))
    print(f"\n{len(results['seeds'])} seed(s), {results['elapsed_s'] / 60:.1f} min; "
          f"{f'wrote {out}' if out else 'no JSON written (--quick)'}")


if __name__ == "__main__":
    main()
