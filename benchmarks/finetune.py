"""Fine-tuning a pruned model, SparseProp's setting: one training step (forward, backward, SGD step) of
ResNet-18 (CIFAR stem, batch 128) made 90% sparse at its own shapes (`--kind sparse`, magnitude masks;
the first conv and the classifier kept dense, as for every kind), on siftc's native kernels, against the
same step of the dense model. Prints one table, saves benchmarks/results/finetune.json.

    flock /tmp/siftc-bench.lock python benchmarks/finetune.py          # ~2-5 minutes on 2 cores
    python benchmarks/finetune.py --reps 3 --batch 32                  # a quicker look

The two steps alternate within each repeat (the order rotated every repeat, repeat 0 a warm-up), so load
from other processes falls on both; the ratio is of the medians. Target: the sparse step at least 2x
faster than the dense one. Same-shape sparse is not iso-FLOP: its weight FLOPs are ~0.1x the dense
model's, which is the most a 90% sparse step could gain on its weight layers.
"""
import argparse
import os
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples"))
from runtime import interleaved, machine  # noqa: E402  the runtime benchmark's timing loop and machine record

import siftc  # noqa: E402
from siftc.nn.sparse import SPARSE_LAYERS, set_backend  # noqa: E402
from siftc.store import write_json  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "finetune.json"
TARGET = 2.0  # the sparse step at least this many times faster than the dense step


def training_step(model: nn.Module, x, y):
    """A closure running one SGD step of `model` on (x, y)."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step():
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5, help="timed repeats (median reported)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("-o", "--out", default=str(OUT))
    args = ap.parse_args()
    from resnet import resnet18_cifar

    load_before = os.getloadavg()
    torch.manual_seed(0)
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    dense = resnet18_cifar()
    sparse = siftc.convert(dense, "sparse", args.sparsity, (x[:2],), mask_from="magnitude")
    set_backend(sparse, "native")
    report = sparse.siftc_info.report
    print(f"ResNet-18 CIFAR, batch {args.batch}: dense vs same-shape sparse {args.sparsity:g} (native), "
          f"{args.reps} repeats ...", file=sys.stderr, flush=True)
    ms = interleaved({"dense": training_step(dense, x, y), "sparse": training_step(sparse, x, y)}, args.reps)
    speedup = ms["dense"] / ms["sparse"]
    result = {
        "machine": machine(),
        "settings": {"model": "examples/resnet.py:resnet18_cifar", "batch": args.batch, "sparsity": args.sparsity,
                     "kind": "sparse", "mask_from": "magnitude", "backend": "native", "optimizer": "SGD(momentum=0.9)",
                     "reps": args.reps, "statistic": "median wall ms, the two steps alternating",
                     "loadavg_1m_before_after": [load_before[0], os.getloadavg()[0]]},
        "step_ms": ms, "speedup": speedup, "target": TARGET, "met": speedup >= TARGET,
        "flop_ratio": report["flop_ratio"],
        "sparse_layers": sum(isinstance(m, SPARSE_LAYERS) for m in sparse.modules()),
        "params_stored": sum(p.numel() for p in sparse.parameters()),
        "params_dense": sum(p.numel() for p in dense.parameters()),
    }
    print(f"{'step':28s} {'median ms':>10s}")
    print(f"{'dense ResNet-18':28s} {ms['dense']:10.1f}")
    print(f"{'sparse 90% same shape':28s} {ms['sparse']:10.1f}")
    print(f"speed-up {speedup:.2f}x (target >= {TARGET:g}x: {'met' if result['met'] else 'MISSED'}); weight FLOPs "
          f"{report['flop_ratio']:.3f}x the dense model's; load average {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)  # atomically
    print(f"saved {out}")


if __name__ == "__main__":
    main()
