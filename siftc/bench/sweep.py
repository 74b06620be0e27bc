"""The paper's experiment: one model, one kind, several sparsities, every point converted, exported
and benchmarked on every engine, read as latency relative to the dense model on the same engine.

    out_dir/dense.onnx (+ .json)          the model.py itself (sparsity 0)
    out_dir/wide90/                       artifact of the 90% point (so the torch engine can rebuild it)
    out_dir/wide90.onnx (+ .json)

A point whose file already exists with the same settings is reused, so a re-run only measures.
"""
from pathlib import Path

from siftc.export import DEFAULT_OPSET, export as export_onnx
from siftc.bench.runner import BenchConfig, bench
from siftc.config import ConvertConfig
from siftc.errors import UsageError
from siftc.store import check_parent, file_sha256, os_errors, read_sidecar

ROUND_TO = ConvertConfig.round_to  # the dataclass default: a sweep point is what `siftc convert` would make


def point_paths(out_dir: Path, kind: str, sparsity: float) -> tuple[Path | None, Path]:
    """(artifact dir or None for the dense point, onnx file) of one sweep point."""
    if sparsity == 0:
        return None, out_dir / "dense.onnx"
    stem = f"{kind}{round(sparsity * 100)}"
    return out_dir / stem, out_dir / f"{stem}.onnx"


def _same_model(src: dict, spec: str) -> bool:
    """Whether a sidecar's model source is `spec`: the same file (path and content) and factory, not
    just a file of the same name."""
    target, _, factory = spec.partition(":")
    if factory and src.get("spec", "").rpartition(":")[2] != factory:
        return False
    if not Path(target).is_file():  # pkg.module:factory
        return src.get("spec") == spec
    return src.get("path") == str(Path(target).resolve()) and src.get("sha256") == file_sha256(target)


def _reusable(onnx_path: Path, spec: str, kind: str, sparsity: float, batch, opset: int, round_to: int) -> bool:
    meta = read_sidecar(onnx_path) if onnx_path.is_file() else None
    if meta is None:
        return False
    src = meta["source"].get("model") or meta["source"]  # artifact -> its model source
    return (_same_model(src, spec)
            and meta["kind"] == (kind if sparsity else "dense") and meta["sparsity"] == sparsity
            and meta["batch"] == batch and meta["opset"] == opset
            and (not sparsity or (meta.get("config") or {}).get("round_to") == round_to))


def build_points(spec: str, kind: str, sparsities, out_dir, *, batch: int | None, opset: int = DEFAULT_OPSET,
                 round_to: int = ROUND_TO, force: bool = False, progress=None, dense: bool = True) -> list[Path]:
    """Convert and export each sparsity point (reusing up-to-date files); returns the ONNX paths,
    dense first. `batch=None` exports a dynamic batch. `dense=False`: only the points asked for."""
    import siftc
    say = progress or (lambda label: None)
    sparsities = sorted(set(float(s) for s in sparsities))
    if not sparsities or any(not 0 <= s < 1 for s in sparsities):
        raise UsageError(f"--sparsities {sparsities} must lie in [0, 1), e.g. 0,0.5,0.75,0.9")
    if dense and sparsities[0] != 0:
        sparsities.insert(0, 0.0)  # everything is read relative to the dense model
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out-dir {out_dir} is a file; name a directory for the sweep's files")
    check_parent(out_dir / "dense.onnx")
    with os_errors(out_dir):
        out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in sparsities:
        art, path = point_paths(out_dir, kind, s)
        if not force and _reusable(path, spec, kind, s, batch, opset, round_to):
            say(f"reusing {path}")
            paths.append(path)
            continue
        source = spec
        if art is not None:
            say(f"converting {spec} to {kind} at sparsity {s:g}")
            siftc.save(siftc.convert(spec, kind=kind, sparsity=s, round_to=round_to), art, force=True)
            source = art
        say(f"exporting {path.name}")
        export_onnx(source, path, batch=batch or 1, dynamic_batch=batch is None, opset=opset, force=True)
        paths.append(path)
    return paths


def run_sweep(spec: str, kind: str, sparsities, out_dir, cfg: BenchConfig, *, opset: int = DEFAULT_OPSET,
              round_to: int = ROUND_TO, dynamic_batch: bool = False, force: bool = False, progress=None,
              step=None) -> dict:
    """build_points then bench them all together (interleaved). Returns bench's result plus a
    "sweep" section: the points and, per engine, p50 relative to the dense model."""
    batch = None if dynamic_batch or len(cfg.batches) > 1 else cfg.batches[0]
    paths = build_points(spec, kind, sparsities, out_dir, batch=batch, opset=opset, round_to=round_to,
                         force=force, progress=step)
    result = bench(paths, cfg, progress=progress)
    result["sweep"] = {"model": spec, "kind": kind, "round_to": round_to, "opset": opset,
                       "dynamic_batch": batch is None, "points": relative(result)}
    return result


def relative(result: dict) -> list[dict]:
    """Per (batch, sparsity): each engine's p50 relative to the dense file's p50 on the same engine,
    and DeepSparse's speed-up over ONNX Runtime on the same file. `stable[engine]` says whether that
    ratio may be read: False when this row or the dense row it divides by is unstable (see
    runner.stability), as the CLI table marks it; `deepsparse_speedup_stable` likewise."""
    ok = [r for r in result["results"] if r["status"] == "ok"]
    dense = {(r["engine"], r["batch"]): r for r in ok if not r["sparsity"]}
    points = {}
    for r in ok:
        p = points.setdefault((r["batch"], r["sparsity"]), {"batch": r["batch"], "sparsity": r["sparsity"],
                                                            "file": r["model"], "p50_ms": {}, "relative": {},
                                                            "stable": {}, "_rows": {}})
        p["p50_ms"][r["engine"]] = r["p50_ms"]
        p["_rows"][r["engine"]] = r
        base = dense.get((r["engine"], r["batch"]))
        if base is not None:
            p["relative"][r["engine"]] = r["p50_ms"] / base["p50_ms"]
            p["stable"][r["engine"]] = bool(r["stable"] and base["stable"])
    for p in points.values():
        rows = p.pop("_rows")
        if {"deepsparse", "onnxruntime"} <= rows.keys():
            p["deepsparse_speedup_vs_onnxruntime"] = p["p50_ms"]["onnxruntime"] / p["p50_ms"]["deepsparse"]
            p["deepsparse_speedup_stable"] = bool(rows["onnxruntime"]["stable"] and rows["deepsparse"]["stable"])
    return sorted(points.values(), key=lambda p: (p["batch"], p["sparsity"]))
