"""Inference benchmark: the paper's latency-vs-sparsity picture on this machine.

Sparse Wide ResNet-18 (ImageNet stem, 224x224) and the small GPT (T=64), each at sparsity 0, 50, 75
and 90%, batch 64, exported by `siftc export` and run on DeepSparse and ONNX Runtime in interleaved
turns. Writes benchmarks/results/inference.json (one entry per model, written as each finishes) and
inference.png. Converted points are kept in benchmarks/results/points/ and reused on a re-run (delete
it, or pass --force, to rebuild). Run it under `flock /tmp/siftc-bench.lock` so benchmarks do not overlap.

    python benchmarks/inference.py                      # 10-60 min on 2 cores (ORT at 90% is the slow part)
    python benchmarks/inference.py --models gpt         # re-measure one model, keep the other's entry
    python benchmarks/inference.py --time 60 --engines deepsparse,onnxruntime,torch
"""
import argparse
import json
import sys
import time
from pathlib import Path

from siftc.bench.plot import plot_sweeps
from siftc.bench.runner import BenchConfig
from siftc.bench.sweep import run_sweep

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODELS = {  # name -> (spec, round_to, measured calls per (file, engine)): ~0.2 s GPT calls need more of them
    "resnet18": (str(ROOT / "examples/resnet.py:resnet18_imagenet"), 1, 6),
    "gpt": (str(ROOT / "examples/gpt.py:gpt"), 1, 60),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--kind", default="wide")
    p.add_argument("--sparsities", default="0,0.5,0.75,0.9")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--engines", default="deepsparse,onnxruntime")
    p.add_argument("--iterations", type=int, default=None,
                   help="measured calls per (file, engine)  [default: resnet18 6, gpt 60]")
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--time", type=float, default=None, help="measured seconds instead of --iterations")
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    out = RESULTS / "inference.json"
    # --models gpt re-measures the GPT and keeps the other models' results.
    results = json.loads(out.read_text()) if out.is_file() else {}
    t0 = time.time()
    for name in args.models.split(","):
        spec, round_to, iterations = MODELS[name]
        cfg = BenchConfig(engines=tuple(args.engines.split(",")), batches=(args.batch,), warmup=2, turns=args.turns,
                          time_s=args.time, iterations=None if args.time else (args.iterations or iterations))
        log = lambda label, name=name: print(f"[{time.time() - t0:6.0f}s] {name}: {label}", file=sys.stderr, flush=True)
        results[name] = run_sweep(spec, args.kind, [float(s) for s in args.sparsities.split(",")],
                                  RESULTS / "points" / f"{name}-{args.kind}", cfg, round_to=round_to,
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
