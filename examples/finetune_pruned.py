"""Fine-tune a pruned model (same-shape sparse, SparseProp's case), all offline, with accuracy measured
before and after:

    1. train the MLP of examples/mlp.py dense on the digits (plain PyTorch, here) -> dense.pt
    2. siftc convert examples/mlp.py --kind sparse --sparsity 0.9 --weights dense.pt --mask-from magnitude
                                                                  # one-shot magnitude pruning, 90%
    3. siftc train ... --method static                            # fine-tune the fixed mask, sparse runtime
    4. siftc export ... ; siftc bench ... --engine deepsparse      # sparse ONNX against the dense one

Every siftc command is printed as it runs, and the accuracies (the validation split `siftc train` uses)
are printed at the end and written to OUT/summary.json.

    python examples/finetune_pruned.py                       # ~1 min on 2 cores
    python examples/finetune_pruned.py --quick --out /tmp/ft # what tests/test_kind_sparse.py runs
"""
import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
MODEL = "examples/mlp.py"
DATA = "data/digits.npz"


def sh(*args) -> str:
    """Run `siftc ARGS` from the repository root, printing the command; its stdout."""
    shown = [str(Path(a).relative_to(ROOT)) if isinstance(a, Path) and a.is_relative_to(ROOT) else str(a)
             for a in args]
    print("$ " + shlex.join(["siftc", *shown]), flush=True)
    proc = subprocess.run([sys.executable, "-m", "siftc", *map(str, args)], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def train_dense(out: Path, epochs: int, seed: int = 0) -> tuple[Path, float]:
    """The dense MLP trained with AdamW on the training split siftc train uses; (dense.pt, val acc)."""
    from siftc.source import load_model
    from siftc.train.data import load
    from siftc.train.loop import evaluate

    torch.manual_seed(seed)
    loaded = load_model(str(ROOT / MODEL))
    model, x0 = loaded.model, loaded.example_inputs
    data = load(ROOT / DATA, x0, model(*x0).shape)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = 32
    print(f"# training {MODEL} dense for {epochs} epochs (plain PyTorch)", flush=True)
    for step in range(epochs * data.steps_per_epoch(batch)):
        x, y = data.batch(step, batch, seed)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = out / "dense.pt"
    torch.save(model.state_dict(), path)
    return path, evaluate(model, data)["val_acc"]


def accuracy(artifact: Path) -> float:
    """Validation accuracy of an artifact, on the same split."""
    import siftc
    from siftc.train.data import load
    from siftc.train.loop import evaluate

    gm = siftc.load(artifact)
    x0 = gm.siftc_info.example_inputs
    return evaluate(gm, load(ROOT / DATA, x0, gm(*x0).shape))["val_acc"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "out" / "finetune"))
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--dense-epochs", type=int, default=30)
    ap.add_argument("--epochs", type=float, default=10, help="fine-tuning epochs")
    ap.add_argument("--bench-time", type=float, default=5.0, help="seconds per (file, engine)")
    ap.add_argument("--quick", action="store_true", help="3 dense epochs, 1 fine-tuning epoch, 10 bench calls")
    args = ap.parse_args()
    if args.quick:
        args.dense_epochs, args.epochs = 3, 1
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    dense_pt, dense_acc = train_dense(out, args.dense_epochs)
    art, run = out / f"mlp-sparse{round(args.sparsity * 100)}", out / "run"
    sh("convert", MODEL, "--kind", "sparse", "--sparsity", args.sparsity, "--weights", dense_pt,
       "--mask-from", "magnitude", "-o", art, "--force")
    pruned_acc = accuracy(art)
    sh("train", art, "--data", DATA, "--method", "static", "--epochs", args.epochs, "-o", run, "--force", "--quiet")
    tuned_acc = json.loads((run / "summary.json").read_text())["val_acc"]
    sparse_onnx, dense_onnx = out / "mlp-sparse.onnx", out / "mlp-dense.onnx"
    sh("export", run / "model", "-o", sparse_onnx, "--batch", 64, "--force")
    sh("export", MODEL, "-o", dense_onnx, "--batch", 64, "--force")
    timing = ["--iterations", 10, "--turns", 1] if args.quick else ["--time", args.bench_time]
    print(sh("bench", dense_onnx, sparse_onnx, "--engine", "deepsparse", "--batch", 64, *timing,
             "--json", out / "bench.json", "--force"))

    summary = {"sparsity": args.sparsity, "dense_epochs": args.dense_epochs, "finetune_epochs": args.epochs,
               "val_acc": {"dense": dense_acc, "pruned": pruned_acc, "fine_tuned": tuned_acc}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"val acc: dense {dense_acc:.2%}; pruned {args.sparsity:.0%} by magnitude {pruned_acc:.2%}; "
          f"fine-tuned (static, {args.epochs:g} epochs) {tuned_acc:.2%}")


if __name__ == "__main__":
    main()
