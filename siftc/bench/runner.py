"""Measure ONNX files on several engines, fairly.

For each batch: every (file, engine) pair is compiled, warmed up (excluded from the numbers), then
measured in turns: turn 1 runs each pair for its slice, turn 2 again, and so on, so a drift in the
machine (another job, thermal state) hits every pair alike. Every engine gets the same input arrays.
Latencies are per call; items/s = batch x calls / measured seconds.

Every row says whether it is stable enough to compare (`stable`, `stability`: see MAX_P99_OVER_P50 and
MAX_TURN_SPREAD), and when several files are benched together each row's items/s is divided by the
baseline file's on the same engine and batch (`vs_baseline`; the baseline is the first file unless named).
"""
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from siftc import source
from siftc.bench.engine import ENGINES, get_engine
from siftc.errors import EngineError, UsageError

FORMAT = "siftc-bench"
DEFAULT_TIME_S = 5.0  # measured seconds when neither --time nor --iterations: a stable p50 on a small model
SETTLE_S = 0.2  # pause before each slice, so the previous engine's worker threads have gone idle
VERSION = 1

# A row is unstable, and no ratio is read from it, when either limit is passed. Measured on this machine
# (2 cores shared with other jobs, load average 3.5-7.6) with examples/mlp.py exported dense and
# parallel-90% at batch 4, five runs of 2-5 s x 5 turns: ONNX Runtime p99/p50 2.7-74 (its 0.06-0.4 ms calls
# lose whole scheduler slices) and turn spread 1.3-2.5; torch 2-28 and 1.8-10; DeepSparse, whose spinning
# workers lose their cores, p99/p50 10-3,000 and spread 1.5-3,000 (where the "0.00x" ratios came from).
# So on a busy machine most rows of a tiny model are flagged; that is what their numbers support.
# p99/p50 10: beyond it the slowest 1% of calls alone shift the mean, and so items/s, by over 9%.
MAX_P99_OVER_P50 = 10.0
# Turn medians 1.5x apart: the machine drifted under the measurement by as much as the sparse-vs-dense
# speed-ups being measured (1.2-3x), so a ratio read from the row would be mostly drift.
MAX_TURN_SPREAD = 1.5


def default_threads() -> int:
    """The cores this process may use (an affinity mask or a container can give fewer than cpu_count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass(frozen=True)
class BenchConfig:
    engines: tuple[str, ...] = tuple(ENGINES)
    batches: tuple[int, ...] = (1,)
    # Default: every core this process may use; DeepSparse, ORT and torch are each given this many.
    threads: int = field(default_factory=default_threads)
    # Calls per pair before timing: first calls pay for allocation, caches and thread-pool start-up
    # (at least 1: the first call's outputs are compared across engines).
    warmup: int = 5
    # Measured seconds per (file, engine, batch), split over the turns; DEFAULT_TIME_S when neither is given.
    time_s: float | None = None
    # Measured calls per (file, engine, batch), split over the turns, instead of a time.
    iterations: int | None = None
    # Turns the measurement is split into; more turns spread drift more evenly.
    turns: int = 5
    # Seeds the input arrays.
    seed: int = 0

    def __post_init__(self):
        if not self.engines:
            raise UsageError("no engine given; pass e.g. --engine deepsparse,onnxruntime")
        unknown = [e for e in self.engines if e not in ENGINES]
        if unknown:
            raise EngineError(f"unknown engine {', '.join(unknown)}; choose from: {', '.join(ENGINES)}")
        if not self.batches or any(not isinstance(b, int) or b < 1 for b in self.batches):
            raise UsageError(f"batch sizes {self.batches} must be positive integers, e.g. --batch 1,64")
        if self.threads < 1:
            raise UsageError(f"threads {self.threads} must be >= 1, e.g. --threads {default_threads()}")
        if self.warmup < 1 or self.turns < 1:
            raise UsageError(f"--warmup (got {self.warmup}) and --turns (got {self.turns}) must be >= 1; the "
                             f"first warm-up call also compares the engines' outputs")
        if self.time_s is None and self.iterations is None:
            object.__setattr__(self, "time_s", DEFAULT_TIME_S)
        if (self.time_s is None) == (self.iterations is None):
            raise UsageError("pass exactly one of --time SECONDS and --iterations N")
        if (self.time_s is not None and not 0 < self.time_s < math.inf) or \
                (self.iterations is not None and self.iterations < 1):
            raise UsageError(f"--time must be a finite number of seconds > 0 (got {self.time_s}) and "
                             f"--iterations >= 1 (got {self.iterations})")


# ------------------------------------------------------------------------------------------ files

@dataclass
class ModelFile:
    path: Path
    inputs: list          # source.input_specs records: {"name", "shape" (dim 0 int or a name), "dtype", ...}
    static_batch: int | None
    meta: dict | None     # siftc sidecar, if any

    def label(self) -> str:
        if self.meta:
            return f"{self.path.name} ({self.meta['kind']} {self.meta['sparsity']:g})"
        return self.path.name


_ONNX_DTYPES = {1: "float32", 7: "int64", 6: "int32", 9: "bool", 10: "float16", 11: "float64"}


def open_model(path) -> ModelFile:
    """Read a file's inputs (from the ONNX graph) and siftc sidecar; errors name the file and the fix."""
    import onnx

    from siftc.store import read_sidecar
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"model file {path} not found; pass an .onnx file written by siftc export")
    try:
        model = onnx.load(str(path), load_external_data=False)
        graph = model.graph
        if not graph.node:
            raise ValueError("the graph has no nodes")
    except Exception as e:
        hint = (f"export it first: siftc export {path} -o {path.stem}.onnx" if path.suffix == ".py"
                else "pass an .onnx file, e.g. from siftc export")
        raise UsageError(f"{path} is not an ONNX model ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                         f"{hint}") from e
    init_names = {t.name for t in graph.initializer}
    meta = read_sidecar(path)
    by_name = {s["name"]: s for s in (meta or {}).get("inputs", [])}
    inputs = []
    for i in graph.input:
        if i.name in init_names:
            continue
        tt = i.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
        spec = {"name": i.name, "shape": shape, "dtype": _ONNX_DTYPES.get(tt.elem_type, "float32")}
        spec.update({k: v for k, v in by_name.get(i.name, {}).items() if k in ("low", "high", "bits")})
        inputs.append(spec)
    batch_dims = {s["shape"][0] for s in inputs if s["shape"]}
    static = next(iter(batch_dims)) if len(batch_dims) == 1 and isinstance(next(iter(batch_dims)), int) else None
    for s in inputs:
        if any(not isinstance(d, int) for d in s["shape"][1:]):
            raise UsageError(f"{path}: input {s['name']} has a free dimension other than the batch "
                             f"{s['shape']}; export it with fixed non-batch sizes")
    return ModelFile(path, inputs, static, meta)


def input_arrays(mf: ModelFile, batch: int, seed: int) -> list:
    """Arrays for `batch`, made as siftc.source.make_inputs makes them from the sidecar's input specs
    (integers over their range, a boolean input its example's pattern)."""
    if mf.static_batch is not None and mf.static_batch != batch:
        raise UsageError(f"batch {batch} does not fit {mf.path}, exported with static batch {mf.static_batch}; "
                         f"bench it with --batch {mf.static_batch}, or re-export with --batch {batch} "
                         f"or --dynamic-batch")
    return [x.numpy() for x in source.make_inputs(mf.inputs, batch, seed)]


# ------------------------------------------------------------------------------------------- stats

def summarize(turns_s: list[list[float]], batch: int) -> dict:
    """Statistics of per-call latencies (s), given turn by turn, and their stability. `turn_p50_ms` (one
    median per turn) lets a reader pair two files turn by turn, so a change in the machine between turns
    cancels out."""
    ms = np.concatenate([np.asarray(t, dtype=float) for t in turns_s]) * 1e3
    stats = {"iterations": int(ms.size),
             "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
             "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()),
             "items_per_s": float(batch * ms.size / (ms.sum() / 1e3)),
             "turn_p50_ms": [float(np.median(t) * 1e3) for t in turns_s]}
    stats["stability"] = stability(stats)
    stats["stable"] = stats["stability"]["stable"]
    return stats


def stability(stats: dict) -> dict:
    """Whether a row's numbers are steady enough to read a ratio from:

        {"stable": False, "p99_over_p50": 16.1, "turn_spread": 1.02, "reasons": ["p99/p50 16.1x > 10x"]}

    turn_spread is max/min of the per-turn medians (None with one turn: no drift to see)."""
    tail = stats["p99_ms"] / stats["p50_ms"]  # latencies are > 0: each is a timed call
    turns = stats["turn_p50_ms"]
    spread = max(turns) / min(turns) if len(turns) > 1 else None
    reasons = []
    if tail > MAX_P99_OVER_P50:
        reasons.append(f"p99/p50 {times(tail)} > {MAX_P99_OVER_P50:g}x")
    if spread is not None and spread > MAX_TURN_SPREAD:
        reasons.append(f"turn medians spread {times(spread)} > {MAX_TURN_SPREAD:g}x")
    return {"stable": not reasons, "p99_over_p50": tail, "turn_spread": spread, "reasons": reasons}


def times(ratio) -> str:
    """A ratio for people: 1,839x, 13.64x, 0.42x, 0.0042x (never 0.00x); "n/a" when there is none."""
    if ratio is None or not math.isfinite(ratio):
        return "n/a"
    if ratio >= 100:
        return f"{ratio:,.0f}x"
    return f"{ratio:.2f}x" if ratio >= 0.1 else f"{ratio:.2g}x"


def add_baseline(rows: list[dict], baseline: str) -> None:
    """Each measured row's items/s over the baseline file's on the same engine and batch, in place:

        row["vs_baseline"] = {"model": "dense.onnx", "items_per_s": 1.8, "stable": True}

    "items_per_s" is None when the baseline has no measured row there; "stable" is False unless both
    rows are stable (the ratio is then recorded but not solid)."""
    base = {(r["engine"], r["batch"]): r for r in rows if r["model"] == baseline and r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        b = base.get((r["engine"], r["batch"]))
        r["vs_baseline"] = {"model": baseline, "items_per_s": b and r["items_per_s"] / b["items_per_s"],
                            "stable": bool(b and r["stable"] and b["stable"])}


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "usable_cores": default_threads(),
            "platform": platform.platform(), "python": platform.python_version()}


# ---------------------------------------------------------------------------------------------- run

def bench(paths, cfg: BenchConfig, progress=None, baseline=None) -> dict:
    """Benchmark every file on every engine at every batch. Returns the JSON-able result.

    `progress(advance: int, total: int, label: str)` is called as work proceeds, for a progress bar.
    An engine that cannot run here (missing, unsupported CPU) or refuses a file is a note; the rest run.
    With several files, rows carry `vs_baseline` against `baseline` (default: the first file; one not
    among `paths` is benched first).
    """
    say = progress or (lambda advance, total, label: None)
    paths = [Path(p) for p in paths]
    if baseline is not None:
        baseline = Path(baseline)
        same = [p for p in paths if p.resolve() == baseline.resolve()]
        paths = same[:1] + [p for p in paths if p not in same[:1]] if same else [baseline, *paths]
    files = [open_model(p) for p in paths]
    inputs = {(f.path, b): input_arrays(f, b, cfg.seed) for b in cfg.batches for f in files}  # checks fit first

    notes, classes = [], {}
    for name in cfg.engines:
        try:
            classes[name] = get_engine(name)
        except EngineError as e:
            notes.append(f"{name}: {e}")
    rows = []
    per_turn = _slice(cfg)
    pairs_total = len(files) * len(classes) * len(cfg.batches)
    total = pairs_total * (1 + cfg.turns)  # one step per compile+warm-up, one per measured slice
    for batch in cfg.batches:
        live = []
        for f in files:
            ref = None
            for name, cls in classes.items():
                say(0, total, f"compiling {f.path.name} on {name}, batch {batch}")
                try:
                    eng = cls(f.path, batch, cfg.threads)
                    outs = None
                    for _ in range(cfg.warmup):
                        outs = eng.run(inputs[(f.path, batch)])
                except EngineError as e:
                    rows.append(_row(f, name, batch, cfg, status="skipped", note=str(e)))
                    notes.append(f"{name} on {f.path.name}: {e}")
                    say(1 + cfg.turns, total, "")
                    continue
                diff = None
                if ref is None:
                    ref = (name, outs)
                else:
                    diff = max(float(np.max(np.abs(np.asarray(a, np.float64) - b), initial=0.0))
                               for a, b in zip(outs, ref[1]))
                live.append({"file": f, "engine": eng, "name": name, "lat": [], "ref": ref[0], "diff": diff})
                say(1, total, f"compiled {f.path.name} on {name}")
        for turn in range(cfg.turns):
            for pair in live:
                time.sleep(SETTLE_S)
                say(0, total, f"turn {turn + 1}/{cfg.turns}: {pair['file'].path.name} on {pair['name']}, batch {batch}")
                pair["lat"].append(_measure(pair["engine"], inputs[(pair["file"].path, batch)], per_turn))
                say(1, total, "")
        for pair in live:
            row = _row(pair["file"], pair["name"], batch, cfg, status="ok", **summarize(pair["lat"], batch),
                       **pair["engine"].details())
            if pair["diff"] is not None:
                row["max_abs_diff"] = {"vs": pair["ref"], "value": pair["diff"]}
            rows.append(row)
            pair["engine"].close()
    result = {"format": FORMAT, "version": VERSION, "machine": machine(), "settings": asdict(cfg),
              "stability_limits": {"p99_over_p50": MAX_P99_OVER_P50, "turn_spread": MAX_TURN_SPREAD},
              "results": rows, "notes": notes}
    if len(files) > 1:
        result["baseline"] = str(files[0].path)
        add_baseline(rows, result["baseline"])
    return result


def _slice(cfg: BenchConfig) -> dict:
    if cfg.iterations is not None:
        return {"iterations": -(-cfg.iterations // cfg.turns)}
    return {"seconds": cfg.time_s / cfg.turns}


def _measure(engine, arrays, per_turn) -> list[float]:
    """Latencies (s) of calls for one slice: a count, or as many as fit in a time (at least one)."""
    lat = []
    deadline = time.perf_counter() + per_turn.get("seconds", 0.0)
    while True:
        t0 = time.perf_counter()
        engine.run(arrays)
        t1 = time.perf_counter()
        lat.append(t1 - t0)
        if "iterations" in per_turn:
            if len(lat) >= per_turn["iterations"]:
                return lat
        elif t1 >= deadline:
            return lat


def _row(f: ModelFile, engine: str, batch: int, cfg: BenchConfig, status: str, note: str | None = None, **stats):
    meta = f.meta or {}
    row = {"model": str(f.path), "kind": meta.get("kind"), "sparsity": meta.get("sparsity"),
           "engine": engine, "batch": batch, "threads": cfg.threads, "status": status}
    if note:
        row["note"] = note
    row.update(stats)
    return row
