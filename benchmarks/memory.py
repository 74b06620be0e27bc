"""What training a Sparse-IFT model costs in memory, next to the dense model it came from (issue 12): prints
one table, saves benchmarks/results/memory.json.

    flock /tmp/siftc-bench.lock python benchmarks/memory.py     # every configuration (27 min, 2 loaded cores)
    python benchmarks/memory.py --quick                          # batch-8 ResNet-18 and the GPT example only
    python benchmarks/memory.py --only gpt3-small-wide75         # one configuration (comma-separate more)

Every configuration runs in its own fresh Python process, so its peak RSS is its own: VmHWM from
/proc/self/status, read by the process right after its training steps (imports, model build or
siftc.convert, and training inside it), and the OS's ru_maxrss for the whole process (os.wait4, which also
covers writing the checkpoint and the artifact). No allocator settings are changed: this is what a user
gets. Models are the shipped examples (examples/resnet.py:resnet18_cifar, examples/gpt.py), converted by
siftc.convert and trained on the native backend with torch.optim.AdamW; a dense row is the example
model itself.

Columns, each sparse row also as a ratio to its dense row of the same run:
  params        stored parameter elements (a sparse layer stores its nnz values, not its dense shape)
  weight state  bytes of parameters + gradients + AdamW state (exp_avg, exp_avg_sq, step) + buffers
                (the sparse layers' int32 positions, BatchNorm statistics) + the native backend's cached
                index tensors (BACKENDS["native"]._index), counted from the tensors after the last step;
                a storage shared by two tensors counts once; the JSON has it by kind
  peak RSS      VmHWM after the training steps
  step          median seconds of one training step (zero_grad, forward, loss, backward, AdamW step)
  opt step      median seconds of the AdamW step inside those same steps
  checkpoint    bytes on disk of siftc.train.checkpoint.save (the training checkpoint's writer) of the
                model and optimizer state dicts (+ run id and step; no scheduler or RNG state)
  artifact      bytes on disk of siftc.save (a dense row: torch.save of its state_dict, its weights file)
Targets (issue 12), per sparse row against its dense row: weight state <= 1.2x, checkpoint <= 1.3x,
opt step <= 1.5x (the issue's "AdamW step", its table's optimizer-step column).

Scale demonstration: one AdamW step (after one warm-up step) of the paper's GPT-3 Small Sparse Wide 75%
(Table 14): examples/gpt.py's GPT at 12 layers, d_model 768, 12 heads x 64, vocabulary 50257, sequence
256, converted by wide at 0.75 to d_model 1536 and d_ff 6144 (the heads keep 12 x 64), batch 1, random
init. Beside it, the dense-shaped estimate, computed from the shapes and never allocated: every sparse
layer holding a dense-shaped fp32 weight, gradient, exp_avg and exp_avg_sq and a bool mask in place of
what it holds now (its values, their gradient and AdamW state, positions and native index).
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "memory.json"
sys.path.insert(0, str(ROOT / "examples"))
TARGETS = {"weight_state": 1.2, "checkpoint": 1.3, "opt_step_s": 1.5}  # max ratio to dense (issue 12)
DENSE_SHAPED_BYTES = 4 * 4 + 1  # fp32 weight, grad, exp_avg, exp_avg_sq + a bool mask, per dense entry


@dataclass(frozen=True)
class Config:
    model: str                # a MODELS key
    batch: int
    kind: str | None = None   # None: the dense example model, unconverted
    sparsity: float = 0.0
    dense: str | None = None  # the row the ratios divide by
    quick: bool = False       # part of --quick
    steps: int | None = None  # timed steps; None: --reps
    scale: bool = False       # the scale demonstration (reported with its dense-shaped estimate)


CONFIGS = {
    "resnet18-b128-dense": Config("resnet18_cifar", 128),
    "resnet18-b128-wide90": Config("resnet18_cifar", 128, "wide", 0.9, dense="resnet18-b128-dense"),
    "resnet18-b8-dense": Config("resnet18_cifar", 8, quick=True),
    "resnet18-b8-wide90": Config("resnet18_cifar", 8, "wide", 0.9, dense="resnet18-b8-dense", quick=True),
    "gpt-b16-dense": Config("gpt", 16, quick=True),
    "gpt-b16-wide75": Config("gpt", 16, "wide", 0.75, dense="gpt-b16-dense", quick=True),
    "gpt3-small-wide75": Config("gpt3_small", 1, "wide", 0.75, steps=1, scale=True),
}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------- the models

def resnet18_cifar(batch):
    """The example ResNet-18 (CIFAR stem), a random (B, 3, 32, 32) batch and 10-class labels."""
    from resnet import resnet18_cifar as build
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    return build(), x, y, nn.functional.cross_entropy


def gpt_model(batch, **sizes):
    """The example GPT (default: its shipped GPTConfig), random token ids and next-token targets."""
    from gpt import GPT, GPTConfig
    cfg = GPTConfig(**sizes)
    idx = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size + 1))

    def loss(logits, y):  # (B, T, V), (B, T)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
    return GPT(cfg), idx[:, :-1], idx[:, 1:], loss


MODELS = {
    "resnet18_cifar": resnet18_cifar,
    "gpt": gpt_model,
    # GPT-3 Small (Brown et al. 2020) at sequence 256; wide 0.75 makes it the paper's Table 14 shapes
    "gpt3_small": lambda batch: gpt_model(batch, vocab_size=50257, block_size=256, n_layer=12, n_head=12,
                                          n_embd=768),
}


# ------------------------------------------------------------------------------- inside one child

def peak_rss() -> int:
    """This process's peak resident set (VmHWM), bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (not Linux?)")


def native_index(layer) -> list:
    """The tensors the native backend caches for `layer` (its index structures), if any."""
    from siftc.runtime import BACKENDS
    entry = BACKENDS["native"]._index.get(layer) or {}
    return [t for v in entry.values() if isinstance(v, tuple) for t in v if isinstance(t, torch.Tensor)]


def weight_state(model, opt) -> dict:
    """Bytes held for the weights, by what holds them; a storage counts once, under the first kind."""
    from siftc.nn.sparse import SPARSE_LAYERS
    sparse = [m for m in model.modules() if isinstance(m, SPARSE_LAYERS)]
    params = list(model.parameters())
    positions = [m.positions for m in sparse]
    kinds = {"parameters": params,
             "gradients": [p.grad for p in params if p.grad is not None],
             "optimizer": [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)],
             "positions": positions,
             "native_index": [t for m in sparse for t in native_index(m)],
             "other_buffers": [b for b in model.buffers() if all(b is not q for q in positions)]}
    seen, out = set(), {}
    for kind, tensors in kinds.items():
        out[kind] = 0
        for t in tensors:
            st = t.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                out[kind] += st.nbytes()
    out["total"] = sum(out.values())
    # What the sparse layers would hold dense-shaped: weight, grad and AdamW moments of their dense
    # shape and a bool mask, instead of values (+ grad + 2 moments, fp32), positions and native index.
    nnz = sum(m.values.numel() for m in sparse)
    dense_numel = sum(math.prod(m.weight_shape) for m in sparse)
    now = 16 * nnz + out["positions"] + out["native_index"]
    out["dense_shaped_estimate"] = out["total"] - now + DENSE_SHAPED_BYTES * dense_numel
    out["sparse_layers"] = {"count": len(sparse), "nnz": nnz, "dense_shaped_numel": dense_numel}
    return out


def train(model, x, y, loss_fn, steps: int) -> tuple[torch.optim.Optimizer, list, list]:
    """One warm-up step, then `steps` timed ones: (optimizer, step seconds, AdamW-step seconds)."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step_s, opt_s = [], []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        log(f"    step {i}{' (warm-up)' if i == 0 else ''}: {t2 - t0:.2f} s (AdamW {t2 - t1:.3f} s)")
        if i:
            step_s.append(t2 - t0)
            opt_s.append(t2 - t1)
    return opt, step_s, opt_s


def disk_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def files(model, opt, sparse: bool) -> dict:
    """Checkpoint and artifact bytes on disk, written to a temporary directory and removed."""
    import siftc
    from siftc.train import checkpoint
    with tempfile.TemporaryDirectory(prefix="siftc-memory-") as tmp:
        run = Path(tmp) / "run"
        run.mkdir()
        checkpoint.save(run, {"run_id": "memory-benchmark", "step": 1, "model": checkpoint.model_state(model),
                              "optimizer": opt.state_dict()})
        art = Path(tmp) / "artifact"
        if sparse:
            siftc.save(model, art)
        else:  # siftc.save takes converted models only; a dense model's artifact would be its weights
            torch.save(model.state_dict(), art)
        return {"checkpoint": disk_bytes(run / "checkpoint.pt"), "artifact": disk_bytes(art),
                "artifact_is": "siftc.save" if sparse else "torch.save(state_dict)"}


def child(name: str, reps: int) -> dict:
    """Measure one configuration in this process."""
    import siftc
    from siftc.nn.sparse import set_backend
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    peak_imports = peak_rss()
    model, x, y, loss_fn = MODELS[cfg.model](cfg.batch)
    out = {"name": name, "config": asdict(cfg), "peak_rss_after_imports": peak_imports}
    if cfg.kind:
        log(f"  converting {cfg.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M dense "
            f"parameters) to {cfg.kind} {cfg.sparsity} ...")
        t = time.perf_counter()
        model = siftc.convert(model, cfg.kind, cfg.sparsity, (x[:2],))
        out["convert_s"] = time.perf_counter() - t
        log(f"  converted in {out['convert_s']:.1f} s")
        set_backend(model, "native")
        out["sparse_shapes"] = sorted({str(m.weight_shape) for m in model.modules() if hasattr(m, "weight_shape")})
    out["peak_rss_before_training"] = peak_rss()  # includes siftc.convert
    opt, step_s, opt_s = train(model, x, y, loss_fn, cfg.steps or reps)
    out["peak_rss"] = peak_rss()
    out["params"] = sum(p.numel() for p in model.parameters())
    out["weight_state"] = weight_state(model, opt)
    out.update(step_s=statistics.median(step_s), opt_step_s=statistics.median(opt_s), step_times_s=step_s,
               opt_step_times_s=opt_s)
    out.update(files(model, opt, sparse=cfg.kind is not None))
    return out


# ------------------------------------------------------------------------------------- the parent

def run_child(name: str, reps: int) -> dict:
    """Run one configuration in a fresh process; its result, plus the OS's ru_maxrss of that process."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        t = time.perf_counter()
        p = subprocess.Popen([sys.executable, __file__, "--child", name, "--reps", str(reps), "--child-out", f.name])
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode:
            return {"name": name, "config": asdict(CONFIGS[name]), "error": f"exit {p.returncode}"}
        out = json.loads(Path(f.name).read_text())
    out["ru_maxrss"] = usage.ru_maxrss * 1024  # kB on Linux
    out["wall_s"] = time.perf_counter() - t
    return out


RATIOS = {"params": "params", "weight_state": "weight state", "peak_rss": "peak RSS", "step_s": "step",
          "opt_step_s": "opt step", "checkpoint": "checkpoint", "artifact": "artifact"}


KINDS = ("parameters", "gradients", "optimizer", "positions", "native_index", "other_buffers")


def value(r, key):
    return r["weight_state"]["total"] if key == "weight_state" else r[key]


def compare(rows: dict) -> None:
    """Add each sparse row's ratios to its dense row, and the targets met or missed (when both ran)."""
    for r in rows.values():
        if r["config"]["scale"] and "error" not in r:  # the same process with dense-shaped sparse layers
            ws = r["weight_state"]
            r["dense_shaped_peak_rss_estimate"] = r["peak_rss"] - ws["total"] + ws["dense_shaped_estimate"]
        base = rows.get(r["config"]["dense"] or "")
        if "error" in r or not base or "error" in base:
            continue
        r["ratios"] = {k: value(r, k) / value(base, k) for k in RATIOS}
        r["targets"] = {k: {"ratio": r["ratios"][k], "max": v, "met": r["ratios"][k] <= v}
                        for k, v in TARGETS.items()}


def mb(b):
    return f"{b / 1e6:,.1f}"


def print_table(rows: dict) -> None:
    cols = ["params", "weight MB", "peak RSS MB", "step s", "opt step s", "ckpt MB", "artifact MB"]
    fmt = {"params": lambda v: f"{v / 1e6:.2f}M", "weight_state": mb, "peak_rss": mb, "step_s": lambda v: f"{v:.3f}",
           "opt_step_s": lambda v: f"{v:.4f}", "checkpoint": mb, "artifact": mb}
    print(f"{'configuration':22s} " + " ".join(f"{c:>19s}" for c in cols) + "  targets (ws/ckpt/opt)")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:22s} failed: {r['error']}")
            continue
        ratios = r.get("ratios", {})
        cells = [fmt[k](value(r, k)) + (f" {ratios[k]:5.2f}x" if k in ratios else " " * 7) for k in RATIOS]
        goals = " ".join(f"{'pass' if t['met'] else 'MISS'}" for t in r.get("targets", {}).values())
        print(f"{name:22s} " + " ".join(f"{c:>19s}" for c in cells) + f"  {goals}")
    for name, r in rows.items():
        for k, t in r.get("targets", {}).items():
            if not t["met"]:
                print(f"MISS {name}: {RATIOS[k]} {t['ratio']:.2f}x the dense row's, target <= {t['max']}x "
                      f"(over by {t['ratio'] - t['max']:.2f}x)")
        if r.get("config", {}).get("scale") and "error" not in r:
            ws, est_peak = r["weight_state"], r["dense_shaped_peak_rss_estimate"]
            print(f"scale {name}: one AdamW step {r['step_s']:.1f} s, peak RSS {r['peak_rss'] / 1e9:.2f} GB, "
                  f"weight state {ws['total'] / 1e9:.2f} GB; dense-shaped sparse layers (estimate, not "
                  f"allocated): weight state {ws['dense_shaped_estimate'] / 1e9:.2f} GB, peak RSS about "
                  f"{est_peak / 1e9:.2f} GB")
    for name, r in rows.items():
        if "weight_state" in r:
            ws = r["weight_state"]
            print(f"  {name}: weight state " + ", ".join(
                f"{k} {mb(ws[k])}" for k in KINDS) + " MB")


def machine() -> dict:
    from siftc.bench.runner import machine as bench_machine
    return {**bench_machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "mem_total_gb": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1e9}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5, help="timed training steps per configuration after one "
                                                        "warm-up step (median reported)")
    ap.add_argument("--quick", action="store_true", help="only the configurations marked quick (batch-8 "
                                                         "ResNet-18, the GPT example)")
    ap.add_argument("--only", help=f"comma-separated configuration names: {', '.join(CONFIGS)}")
    ap.add_argument("--json", type=Path, default=OUT, help="where the results go")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.child_out.write_text(json.dumps(child(args.child, args.reps)))
        return
    names = args.only.split(",") if args.only else [n for n, c in CONFIGS.items() if c.quick or not args.quick]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown configuration {unknown[0]!r}; choose from {', '.join(CONFIGS)}")
    load_before = os.getloadavg()
    rows = {}
    for name in names:
        log(f"{name} ...")
        rows[name] = run_child(name, args.reps)
    compare(rows)
    print_table(rows)
    from siftc.store import write_json
    args.json.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.json, {
        "machine": machine(),
        "settings": {"reps": args.reps, "optimizer": "torch.optim.AdamW(lr=1e-4)", "backend": "native",
                     "statistic": "median s over the timed steps, after one warm-up step",
                     "targets_max_ratio": TARGETS, "units": "bytes, seconds",
                     "loadavg_1m_before_after": [load_before[0], os.getloadavg()[0]]},
        "rows": rows})
    print(f"saved {args.json}")


if __name__ == "__main__":
    main()
