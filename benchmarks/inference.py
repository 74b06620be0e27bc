"""Inference benchmark: the paper's latency-vs-sparsity picture on this machine.

Sparse Wide ResNet-18 (ImageNet stem, 224x224) and the small GPT (T=64), each at sparsity 0, 50, 75
and 90%, batch 64, exported by `siftc export` and run on DeepSparse and ONNX Runtime in interleaved
turns. Writes benchmarks/results/inference.json (one entry per model, written as each finishes) and
inference.png. Converted points are kept in benchmarks/results/points/ and reused on a re-run (delete
it, or pass --force, to rebuild). Run it under `flock /tmp/siftc-bench.lock` so benchmarks do not overlap.

    python benchmarks/inference.py                      # 10-60 min on 2 cores (ORT at 90% is the slow part)
    python benchmarks/inference.py --models gpt         # re-measure one model, keep the other's entry
    python benchmarks/inference.py --time 60 --engines deepsparse,onnxruntime,torch
    python benchmarks/inference.py --patterns unstructured,block:16x1,block:4x4   # issue 13 (below)

--patterns P1,P2,...: instead of the sparsity sweep, the 90% Sparse Wide ResNet-18 (--pattern-sparsity)
converted once per pattern (`siftc.convert(pattern=P)`, `unstructured` the sweep's own point), exported at
--batch and benched together with the dense file in interleaved turns on --engines (default: deepsparse);
p50 relative to dense per engine, the issue's target (<= 1.5x for one block pattern) and the machine record
go to benchmarks/results/inference_patterns.json; points are kept in points/resnet18-wide-patterns/.
"""
import argparse
import json
import sys
import time
from pathlib import Path

from siftc.bench.plot import plot_sweeps
from siftc.bench.runner import BenchConfig, bench
from siftc.bench.sweep import build_points, run_sweep
from siftc.errors import UsageError
from siftc.export import export as export_onnx
from siftc.sparse.patterns import Pattern
from siftc.store import read_sidecar, write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODELS = {  # name -> (spec, round_to, measured calls per (file, engine)): ~0.2 s GPT calls need more of them
    "resnet18": (str(ROOT / "examples/resnet.py:resnet18_imagenet"), 1, 6),
    "gpt": (str(ROOT / "examples/gpt.py:gpt"), 1, 60),
}


def pattern_points(spec: str, kind: str, s: float, patterns: list[str], out_dir: Path, batch: int, *,
                   round_to: int, force: bool, step) -> dict:
    """{label: onnx path}: the dense file and the sweep's own point (pattern `unstructured`) from
    build_points, and one converted and exported file per other pattern, reused when its sidecar has the
    same pattern, sparsity and batch."""
    import siftc
    dense, plain = build_points(spec, kind, [s], out_dir, batch=batch, round_to=round_to, force=force, progress=step)
    paths = {"dense": dense, **({"unstructured": plain} if "unstructured" in patterns else {})}
    for pattern in (p for p in patterns if p != "unstructured"):
        stem = f"{kind}{round(s * 100)}-{pattern.replace(':', '-')}"
        art, path = out_dir / stem, out_dir / f"{stem}.onnx"
        meta = read_sidecar(path) if path.is_file() and not force else None
        if not (meta and (meta.get("config") or {}).get("pattern") == pattern and meta["sparsity"] == s
                and meta["batch"] == batch):
            step(f"converting {spec} to {kind} at sparsity {s:g} --pattern {pattern}")
            siftc.save(siftc.convert(spec, kind=kind, sparsity=s, round_to=round_to, pattern=pattern), art, force=True)
            step(f"exporting {path.name}")
            export_onnx(art, path, batch=batch, force=True)
        else:
            step(f"reusing {path}")
        paths[pattern] = path
    return paths


def run_patterns(args, t0) -> None:
    """The --patterns axis: every pattern's file and the dense one benched together, p50 relative to dense."""
    spec, round_to, iterations = MODELS["resnet18"]
    engines = tuple((args.engines or "deepsparse").split(","))
    cfg = BenchConfig(engines=engines, batches=(args.batch,), warmup=2, turns=args.turns, time_s=args.time,
                      iterations=None if args.time else (args.iterations or iterations))
    log = lambda label: print(f"[{time.time() - t0:6.0f}s] resnet18 patterns: {label}", file=sys.stderr, flush=True)
    paths = pattern_points(spec, args.kind, args.pattern_sparsity, args.patterns,
                           Path(args.points_dir).resolve() / f"resnet18-{args.kind}-patterns", args.batch,
                           round_to=round_to, force=args.force, step=log)
    result = bench(list(paths.values()), cfg, progress=lambda a, t, label: label and log(label))
    label = {str(q): name for name, p in paths.items() for q in (p, p.resolve())}
    ok = {(label[r["model"]], r["engine"]): r for r in result["results"] if r["status"] == "ok"}
    rows = []
    for name in paths:
        for engine in engines:
            r, d = ok.get((name, engine)), ok.get(("dense", engine))
            rows.append({"pattern": name, "engine": engine, "file": str(paths[name]),
                         "p50_ms": r and r["p50_ms"], "relative": r and d and r["p50_ms"] / d["p50_ms"],
                         "stable": bool(r and d and r["stable"] and d["stable"]),
                         "supported_fraction": r and r.get("supported_fraction")})
    blocks = [r for r in rows if r["pattern"].startswith("block:") and r["engine"] == "deepsparse" and r["relative"]]
    best = min(blocks, key=lambda r: r["relative"], default=None)
    target = {"target": f"DeepSparse Sparse Wide {round(100 * args.pattern_sparsity)}% ResNet-18 (224, batch "
                        f"{args.batch}): one block pattern within 1.5x of dense",
              "pattern": best and best["pattern"], "value": best and best["relative"],
              "met": bool(best and best["relative"] <= 1.5)}
    print(f"{'pattern':14s} {'engine':12s} {'p50 ms':>10s} {'÷ dense':>8s}  stable")
    for r in rows:
        ms, rel = r["p50_ms"], r["relative"]
        print(f"{r['pattern']:14s} {r['engine']:12s} {f'{ms:.1f}' if ms else 'n/a':>10s} "
              f"{f'{rel:.2f}x' if rel else 'n/a':>8s}  {r['stable']}")
    value = "n/a" if target["value"] is None else f"{target['pattern']} {target['value']:.2f}x"
    print(f"{'MET   ' if target['met'] else 'MISSED'} {target['target']}: {value}")
    out = Path(args.out or RESULTS / "inference_patterns.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, {"machine": result["machine"], "settings": {**result["settings"], "model": spec,
                     "kind": args.kind, "sparsity": args.pattern_sparsity, "patterns": args.patterns,
                     "statistic": "p50 ms per (file, engine), files in interleaved turns",
                     "ratio_to": "the dense model's p50 on the same engine"},
                     "rows": rows, "targets": [target], "notes": result.get("notes"), "bench": result})
    print(f"wrote {out}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--kind", default="wide")
    p.add_argument("--sparsities", default="0,0.5,0.75,0.9")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--engines", default=None, help="[default: deepsparse,onnxruntime; with --patterns deepsparse]")
    p.add_argument("--iterations", type=int, default=None,
                   help="measured calls per (file, engine)  [default: resnet18 6, gpt 60]")
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--time", type=float, default=None, help="measured seconds instead of --iterations")
    p.add_argument("--force", action="store_true")
    p.add_argument("--patterns", type=lambda v: [x for x in v.split(",") if x], default=None,
                   help="the pattern axis instead of the sweep (see above), e.g. unstructured,block:16x1,block:4x4")
    p.add_argument("--pattern-sparsity", type=float, default=0.9)
    p.add_argument("--points-dir", default=str(RESULTS / "points"), help="where converted points are kept")
    p.add_argument("-o", "--out", default=None, help="with --patterns [default: results/inference_patterns.json]")
    args = p.parse_args(argv)
    t0 = time.time()
    if args.patterns is not None:
        for pattern in args.patterns:
            try:
                Pattern.parse(pattern)
            except UsageError as e:
                p.error(f"--patterns {pattern}: {e}")
        if not args.patterns or not 0 < args.pattern_sparsity < 1:
            p.error("--patterns needs at least one pattern and --pattern-sparsity in (0, 1)")
        return run_patterns(args, t0)
    out = RESULTS / "inference.json"
    # --models gpt re-measures the GPT and keeps the other models' results.
    results = json.loads(out.read_text()) if out.is_file() else {}
    for name in args.models.split(","):
        spec, round_to, iterations = MODELS[name]
        cfg = BenchConfig(engines=tuple((args.engines or "deepsparse,onnxruntime").split(",")), batches=(args.batch,), warmup=2, turns=args.turns,
                          time_s=args.time, iterations=None if args.time else (args.iterations or iterations))
        log = lambda label, name=name: print(f"[{time.time() - t0:6.0f}s] {name}: {label}", file=sys.stderr, flush=True)
        results[name] = run_sweep(spec, args.kind, [float(s) for s in args.sparsities.split(",")],
                                  Path(args.points_dir) / f"{name}-{args.kind}", cfg, round_to=round_to,
                                  force=args.force, step=log, progress=lambda a, t, label: label and log(label))
        for pt in results[name]["sweep"]["points"]:
            print(name, json.dumps({k: pt[k] for k in ("sparsity", "p50_ms", "relative")}
                                   | {"speedup": pt.get("deepsparse_speedup_vs_onnxruntime")}), flush=True)
        RESULTS.mkdir(parents=True, exist_ok=True)  # after each model: a later failure keeps what was measured
        out.write_text(json.dumps(results, indent=1))
    plot_sweeps(list(results.values()), RESULTS / "inference.png",
                [f"Sparse {r['sweep']['kind'].capitalize()} {n}, batch {r['settings']['batches'][0]}"
                 for n, r in results.items()])
    print(f"wrote {out} and {RESULTS / 'inference.png'}")


if __name__ == "__main__":
    main()
