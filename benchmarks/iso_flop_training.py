"""Iso-FLOP training: dense vs the four Sparse-IFT kinds (wide, parallel, factorized, doped) at 50% and 75%
unstructured sparsity (RigL), same steps, batch and lr, and Sparse Wide with structured patterns (issue 13;
PATTERNS below, the fastest kernels in benchmarks/patterns.py) at PATTERN_SPARSITIES (75%).

Two tasks on the shipped data (examples/make_data.py writes it, offline): the MLP on 8x8 digits and the
byte-level GPT on Python standard-library text. Three seeds each (the seed sets the conversion's masks
and init, the data order and RigL's draws). Prints, per configuration, the final validation loss and
accuracy (mean and standard deviation over seeds), training steps/s (median of REPEATS timing windows) on
the native sparse runtime and on masked dense ("torch"), and the training FLOPs (sparse forward + backward
+ RigL's dense-gradient steps) next to the dense model's. Writes benchmarks/results/iso_flop_training.json.

    python benchmarks/iso_flop_training.py            # the full table (~21 min at the load of the 3-row run
                                                      # that took 280 s; several times that while other
                                                      # jobs load the 2 cores)
    python benchmarks/iso_flop_training.py --quick -o /tmp/iso.json   # a smoke run: 1 seed, few steps
    python benchmarks/iso_flop_training.py --kinds wide,doped --patterns ''   # a subset

Every run uses one intra-op thread: the machine's 2 cores are shared, and one thread per run is both
faster under load and the same for every backend. If a kind cannot convert a model, its row records the
error and the table says so; no other kind is run in its place.
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
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
KINDS = ("wide", "parallel", "factorized", "doped")  # the paper's four Sparse-IFT kinds (DESIGN.md section 2)
SPARSITIES = (0.5, 0.75)  # the unstructured rows of every kind
PATTERNS = ("block:16x1", "block:4x4")  # the two fastest block kernels (benchmarks/results/patterns*.json)
PATTERN_SPARSITIES = (0.75,)  # the Sparse Wide pattern rows
SEEDS = (0, 1, 2)
REPEATS = 5  # timing windows per backend; steps/s is their median


@dataclass(frozen=True)
class Config:
    """One row of the table: `kind` converted at `sparsity` with `pattern`, trained with `method`."""
    name: str
    kind: str  # "dense", or a key of siftc.passes.KINDS
    sparsity: float
    method: str
    pattern: str = "unstructured"


def configs(kinds=KINDS, patterns=PATTERNS, pattern_sparsities=PATTERN_SPARSITIES) -> list[Config]:
    """dense; every kind in `kinds` at SPARSITIES (RigL, unstructured); if wide is among them, RigL Sparse
    Wide per (pattern sparsity, pattern)."""
    pct = lambda s: f"{round(100 * s)}%"
    return ([Config("dense", "dense", 0.0, "static")]
            + [Config(f"{k}-{pct(s)}", k, s, "rigl") for k in kinds for s in SPARSITIES]
            + [Config(f"wide-{pct(s)} {p}", "wide", s, "rigl", p)
               for s in pattern_sparsities for p in patterns if "wide" in kinds])


def convert(spec: str, config: Config, seed: int, out: Path):
    """Save `config`'s conversion of `spec` to `out` (dense: wide at sparsity 0, the dense layers back);
    the SiftcError of a kind that cannot convert it propagates, naming why."""
    kind = "wide" if config.kind == "dense" else config.kind
    siftc.save(siftc.convert(str(ROOT / spec), kind, config.sparsity, seed=seed, pattern=config.pattern), out)


def steps_per_s(artifact: Path, backend: str, batch: int, timed: int, repeats: int = REPEATS) -> float:
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


def train_config(task: str, config: Config, seeds, quick: bool, tmp: Path) -> dict:
    """One row: `config` converted, trained and evaluated per seed, timed on seed 0's artifact; a kind that
    cannot convert the task's model gives a row with its error and nothing else."""
    t = TASKS[task]
    steps, t0 = (40 if quick else t["steps"]), time.perf_counter()
    head = {"config": config.name, "kind": config.kind, "sparsity": config.sparsity, "method": config.method,
            "pattern": config.pattern}
    runs, arts = [], []
    for seed in seeds:
        arts.append(tmp / f"{task}-{config.name.replace(':', '-').replace(' ', '-')}-{seed}")
        try:
            convert(t["model"], config, seed, arts[-1])
        except SiftcError as e:
            print(f"  {task} {config.name} seed {seed}: {config.kind} cannot convert it: {e}", file=sys.stderr)
            return {**head, "error": str(e)}
        cfg = TrainConfig(str(arts[-1]), str(ROOT / t["data"]), str(tmp / f"run-{arts[-1].name}"),
                          method=config.method, steps=steps, batch_size=t["batch"], lr=t["lr"], backend="torch",
                          seed=seed, threads=1, checkpoint_every=steps, eval_every=steps)
        t_seed = time.perf_counter()
        runs.append({**train(cfg), "train_s": time.perf_counter() - t_seed})
        print(f"  {task} {config.name} seed {seed}: val loss {runs[-1]['val_loss']:.4f}, "
              f"acc {runs[-1]['val_acc']:.4f}, {runs[-1]['train_s']:.1f} s", file=sys.stderr, flush=True)
    timed = 3 if quick else t["timed"]
    speed = {be: steps_per_s(arts[0], be, t["batch"], timed)
             for be in (("torch",) if config.kind == "dense" else ("native", "torch"))}
    flops = runs[0]["flops"]
    report = siftc.load(arts[0]).siftc_info.report
    fit = {"pattern_fit": pattern_fit(report, config.pattern)} if config.pattern != "unstructured" else {}
    return {**head, **fit, "steps": steps, "batch": t["batch"], "lr": t["lr"],
            "val_loss": mean_sd([r["val_loss"] for r in runs]), "val_acc": mean_sd([r["val_acc"] for r in runs]),
            "val_loss_runs": [r["val_loss"] for r in runs], "val_acc_runs": [r["val_acc"] for r in runs],
            "train_s_runs": [r["train_s"] for r in runs], "steps_per_s": speed, "train_flops": flops["total"],
            "dense_model_train_flops": flops["dense_model_total"], "flop_ratio": flops["ratio_to_dense"],
            "dense_grad_steps": flops["dense_grad_steps"], "params": report["params"],
            "nonzero_params": report["nonzero_params"], "wall_s": time.perf_counter() - t0}


def run(quick: bool, kinds=KINDS, patterns=PATTERNS, pattern_sparsities=PATTERN_SPARSITIES) -> dict:
    torch.set_num_threads(1)
    seeds = SEEDS[:1] if quick else SEEDS
    plan = configs(kinds, patterns, pattern_sparsities)
    results = {"machine": machine()["cpu"], "machine_record": machine(), "python": sys.version.split()[0],
               "torch": torch.__version__, "threads": 1, "seeds": list(seeds), "commit": _commit(),
               "kinds": list(kinds), "configs": [c.name for c in plan], "timing_repeats": REPEATS, "tasks": {}}
    with tempfile.TemporaryDirectory(prefix="siftc-bench-") as tmp:
        for task in TASKS:
            results["tasks"][task] = [train_config(task, c, seeds, quick, Path(tmp)) for c in plan]
    return results


def kind_cell(row: dict) -> str:
    """The kind column: the kind, a pattern row's fit (how many sparse layers took the pattern, the others a
    fallback), or that the kind could not convert the model."""
    if "error" in row:
        return f"{row['kind']}: could not convert ({row['error']})"
    fit = row.get("pattern_fit")
    return row["kind"] + (f" ({fit['as_requested']}/{fit['sparse_layers']} layers {row['pattern']})" if fit else "")


def table(results: dict) -> str:
    lines = ["| task | config | kind | val loss (mean ± sd) | val acc (mean ± sd) | steps/s native | "
             "steps/s masked dense | training FLOPs | vs dense |",
             "|---|---|---|---|---|---|---|---|---|"]
    for task, rows in results["tasks"].items():
        for r in rows:
            if "error" in r:
                lines.append(f"| {task} | {r['config']} | {kind_cell(r)} |" + " - |" * 6)
                continue
            native = r["steps_per_s"].get("native")
            lines.append(f"| {task} | {r['config']} | {kind_cell(r)} | "
                         f"{r['val_loss'][0]:.4f} ± {r['val_loss'][1]:.4f} | "
                         f"{r['val_acc'][0]:.2%} ± {r['val_acc'][1]:.2%} | "
                         f"{f'{native:.1f}' if native else '-'} | {r['steps_per_s']['torch']:.1f} | "
                         f"{r['train_flops']:.3e} | {r['flop_ratio']:.3f}x |")
    return "\n".join(lines)


def _names(value: str) -> list[str]:
    return [v for v in value.split(",") if v]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="1 seed, 40 steps: check the script runs (writes no JSON unless -o is given)")
    ap.add_argument("-o", "--out", default=None,
                    help="JSON to write [default: benchmarks/results/iso_flop_training.json for a full run]")
    ap.add_argument("--kinds", default=",".join(KINDS), type=_names,
                    help="Sparse-IFT kinds of the unstructured rows, comma-separated (dense always runs; the "
                         f"pattern rows need wide) [default: {','.join(KINDS)}]")
    ap.add_argument("--patterns", default=",".join(PATTERNS), type=_names,
                    help="structured patterns of the extra Sparse Wide rows, comma-separated ('' for none) "
                         f"[default: {','.join(PATTERNS)}]")
    ap.add_argument("--pattern-sparsities", default=",".join(map(str, PATTERN_SPARSITIES)),
                    type=lambda v: [float(s) for s in v.split(",") if s],
                    help=f"sparsities of the pattern rows [default: {','.join(map(str, PATTERN_SPARSITIES))}]")
    args = ap.parse_args()
    unknown = [k for k in args.kinds if k not in KINDS]
    if unknown:
        ap.error(f"--kinds {','.join(unknown)}: not a Sparse-IFT kind; choose from {','.join(KINDS)}")
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
    results = run(args.quick, args.kinds, args.patterns, args.pattern_sparsities)
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
