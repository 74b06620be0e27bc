"""How long `siftc.convert` takes on every shipped example and on HuggingFace's GPT-2 small at its real
size (124M parameters, 12 layers, d 768, random init from GPT2Config(); sequence 64), for every kind, at
sparsity 0.9, and how long `siftc.load` takes on the artifact saved from it: prints a table with each
conversion's iso-FLOP ratio and saves benchmarks/results/convert_time.json (rows measured again
replace their old ones; the others stay).

    flock /tmp/siftc-bench.lock nice -n 0 python benchmarks/convert_time.py            # medians of 3
    python benchmarks/convert_time.py --reps 5 --kinds parallel,wide --models resnet18_cifar,gpt2_small

Timed: `siftc.convert(model, kind, 0.9, example_inputs)` alone (trace, rewrite, masks, FLOP check,
report), and `siftc.load(artifact)` alone (read and verify the files, build the model from graph.json,
load the tensors; no conversion, no forward). Not timed: Python start-up, imports, building the dense
model, `siftc.save`. One untimed MLP conversion and load first pay for the lazy imports. Targets:
ResNet-18 conversion under 2 s, GPT-2 small under 5 s (issue 11); loading the 90% Sparse Wide ResNet-18
artifact under 0.3 s (issue 14).
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import siftc
from siftc.errors import SiftcError
from siftc.passes import KINDS
from siftc.source import load_model

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "convert_time.json"
MODELS = ["mlp.py:mlp", "resnet.py:resnet18_cifar", "resnet.py:resnet18_imagenet",
          "mobilenetv2.py:mobilenetv2", "gpt.py:gpt", "gpt.py:gpt_tied"]
HF = ["gpt2_small"]
SPARSITY = 0.9
TARGETS_S = {"resnet18": 2.0, "gpt2_small": 5.0}  # model-name prefix -> target, from the issues
LOAD_TARGETS_S = {"resnet18_cifar/wide": 0.3}  # model/kind -> siftc.load target (issue 14)


def gpt2_small():
    """HF GPT-2 small at its real size, random init (no download), and a (1, 64) token batch."""
    import transformers
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    return model, {"input_ids": torch.randint(0, 50257, (1, 64))}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def time_convert(model, inputs, kind: str, reps: int) -> tuple[list[float], float, list[float]]:
    """Seconds of each conversion, the converted model's weight FLOPs over the dense model's, and the
    seconds of each `siftc.load` of its artifact."""
    times = []
    for _ in range(reps):
        gm = None  # a 90% parallel ResNet holds 10x the dense weights; do not keep two alive
        t = time.perf_counter()
        gm = siftc.convert(model, kind, SPARSITY, inputs)
        times.append(time.perf_counter() - t)
    return times, gm.siftc_info.report["flop_ratio"], time_load(gm, reps)


def time_load(gm, reps: int) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        art = siftc.save(gm, Path(tmp) / "art")
        del gm
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            loaded = siftc.load(art)
            times.append(time.perf_counter() - t)
            del loaded
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3, help="timed conversions per cell (median reported)")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--models", default=",".join([m.split(":")[1] for m in MODELS] + HF),
                    help="factory names, comma-separated")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    kinds = args.kinds.split(",")
    wanted = args.models.split(",")
    specs = [m for m in MODELS if m.split(":")[1] in wanted] + [m for m in HF if m in wanted]

    warm = load_model(str(ROOT / "examples" / MODELS[0]))
    time_load(siftc.convert(warm.model, "parallel", SPARSITY, warm.example_inputs), 1)

    rows = []
    print(f"siftc.convert and siftc.load at sparsity {SPARSITY}: median of {args.reps} (s), torch threads "
          f"{torch.get_num_threads()}")
    print(f"{'model':<20}" + "".join(f"{k + ' s, ratio, load s':>30}" for k in kinds))
    for spec in specs:
        if spec in HF:
            name, (model, inputs) = spec, globals()[spec]()
        else:
            loaded = load_model(str(ROOT / "examples" / spec))
            name, model, inputs = spec.split(":")[1], loaded.model, loaded.example_inputs
        cells = []
        for kind in kinds:
            try:
                times, ratio, loads = time_convert(model, inputs, kind, args.reps)
            except SiftcError as e:  # a kind the model cannot take at this sparsity: say why, go on
                rows.append({"model": name, "kind": kind, "error": str(e)})
                cells.append(f"{'n/a':>30}")
                continue
            rows.append({"model": name, "kind": kind, "median_s": statistics.median(times), "times_s": times,
                         "flop_ratio": ratio, "load_median_s": statistics.median(loads), "load_times_s": loads,
                         "reps": args.reps, "loadavg_1min": os.getloadavg()[0]})  # others' work on the machine
            cells.append(f"{statistics.median(times):>15.3f} {ratio:.4f} {statistics.median(loads):>6.3f}")
        print(f"{name:<20}" + "".join(cells), flush=True)
        del model
    for r in rows:
        if "error" in r:
            print(f"n/a {r['model']} {r['kind']}: {r['error']}")
    for prefix, target in TARGETS_S.items():
        mine = [r for r in rows if r["model"].startswith(prefix)]
        slow = [r for r in mine if r.get("median_s", 0) > target]
        if mine:
            print(f"target {prefix} < {target} s: " + ("met" if not slow else "missed by " + ", ".join(
                f"{r['model']}/{r['kind']} ({r['median_s']:.1f} s)" for r in slow)))
    for cell, target in LOAD_TARGETS_S.items():
        row = next((r for r in rows if f"{r['model']}/{r['kind']}" == cell and "load_median_s" in r), None)
        if row:
            print(f"target load {cell} < {target} s: {'met' if row['load_median_s'] < target else 'missed'} "
                  f"({row['load_median_s']:.3f} s)")

    meta = {"sparsity": SPARSITY, "reps": args.reps, "statistic": "median s of siftc.convert",
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": sys.version.split()[0],
            "machine": platform.machine(), "cpu": cpu_model(), "targets_s": TARGETS_S,
            "load_targets_s": LOAD_TARGETS_S,
            "columns": "median seconds of siftc.convert, the converted model's weight FLOPs / dense, and median "
                       "seconds of siftc.load of its artifact"}
    measured = {(r["model"], r["kind"]) for r in rows}
    old = json.loads(args.out.read_text())["rows"] if args.out.is_file() else []
    rows = [r for r in old if (r["model"], r["kind"]) not in measured] + rows  # the other rows stay
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
