"""ONNX export and its checks.

A Sparse-IFT model is exported as plain ONNX that any engine can run: every SparseLinear/SparseConv2d
becomes a plain nn.Linear/nn.Conv2d with its mask folded into the weight as exact zeros (no
weight*mask nodes), the replacement blocks are ordinary ops (Conv, Gemm/MatMul, Add, Relu, ...), and
BatchNorm stays a BatchNormalization node for the engine to fold (DeepSparse fuses it itself).

    before (siftc.load)                         after (model.onnx)
    SparseParallel                              Conv(W1 with 90% exact zeros) -> BatchNormalization -> Relu
      branches.0: SparseConv2d + BN + ReLU  ->  Conv(W2 ...)                  -> BatchNormalization -> Relu
      branches.1: SparseConv2d + BN + ReLU      Add

Every export is checked before it is reported done (`check`): the onnx checker, ONNX Runtime outputs
against the PyTorch model within ATOL + RTOL*|y|, and each sparse weight as stored in the file has
zeros exactly where the model's mask has them. A sidecar `<file>.json` records the source, kind,
sparsity, inputs, per-layer densities and FLOPs; `verify(path)` re-runs the checks from it.
"""
import contextlib
import copy
import json
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from siftc import flops
from siftc.errors import SiftcError, UsageError

FORMAT = "siftc-onnx"
VERSION = 1
# 17: LayerNorm is one op, SDPA exports (>= 14); DeepSparse 1.8 and ORT both run it. See the README's
# export-settings table for the opsets measured.
DEFAULT_OPSET = 17
# DESIGN section 6's floor. A model with scaled_dot_product_attention (the GPT example) needs >= 14: below,
# the exporter fails with ExportCheckError naming the op and the opset.
MIN_OPSET = 11
ATOL = 1e-4        # |onnx - torch| <= ATOL + RTOL * |torch|, elementwise, float32
RTOL = 1e-3
SEED = 0           # torch seed while building a model.py's dense model, so rebuild() gets the same weights
DYNAMIC_CHECK_BATCH = 3  # a dynamic-batch export is also run at this batch, to prove the axis is free


class ExportCheckError(SiftcError):
    """An exported file failed a check: invalid ONNX, outputs off, or a weight's zeros not the mask's."""


@dataclass
class Exported:
    path: Path
    sidecar: Path
    meta: dict


def sidecar_path(path) -> Path:
    """model.onnx -> model.onnx.json"""
    return Path(str(path) + ".json")


# ---------------------------------------------------------------------------------------- sources

@dataclass
class Source:
    model: nn.Module          # unfolded (sparse layers keep their masks)
    example_inputs: tuple
    meta: dict                # {"type": "artifact"|"model", "spec"/"path", ...}
    report: dict | None       # the conversion report, for an artifact


def resolve(source) -> Source:
    """An artifact directory, a "model.py[:factory]" spec (the dense baseline), or a model returned
    by siftc.convert / siftc.load."""
    from siftc.artifact import read_meta
    from siftc.trace import load_model

    if isinstance(source, nn.Module):
        info = getattr(source, "siftc_info", None)
        if info is None:
            raise UsageError("export takes a model from siftc.convert/siftc.load, an artifact directory "
                             "or a 'model.py[:factory]' spec; for a plain nn.Module pass its spec")
        # Only its artifact could rebuild it (bench's torch engine, verify): save it and export that.
        src = {"type": "in-memory", "converted_from": info.source.spec if info.source else None}
        return Source(source, tuple(info.example_inputs), src, info.report)
    text = str(source)
    path = Path(text)
    if path.is_dir():
        import siftc
        meta = read_meta(path)
        gm = siftc.load(path)
        src = {"type": "artifact", "path": str(path.resolve()), "model": meta.get("source")}
        return Source(gm, tuple(gm.siftc_info.example_inputs), src, gm.siftc_info.report)
    file_part = text.partition(":")[0]
    if not Path(file_part).exists() and (file_part.endswith(".py") or "/" in file_part):
        raise UsageError(f"{text} not found; pass an artifact directory (siftc convert -o) or model.py[:factory]")
    if Path(file_part).is_file() and Path(file_part).suffix != ".py":
        raise UsageError(f"{file_part} is neither an artifact directory nor a model.py; pass what siftc convert -o "
                         f"wrote, or the dense model.py[:factory]")
    with torch.random.fork_rng():
        torch.manual_seed(SEED)  # the dense baseline's weights are its factory's init: make them reproducible
        loaded = load_model(text)
    return Source(loaded.model, tuple(loaded.example_inputs),
                  {"type": "model", **loaded.source.to_json(), "seed": SEED}, None)


# ------------------------------------------------------------------------------------------- fold

def fold(model: nn.Module) -> tuple[nn.Module, dict]:
    """An eval-mode deep copy with every sparse layer replaced by its plain `.to_dense()` twin.

    Returns (folded, masks) where masks maps the layer's qualified name to its boolean mask.
    """
    from siftc.nn.sparse import SPARSE_LAYERS

    folded = copy.deepcopy(model).eval()
    masks = {}
    for name, mod in list(folded.named_modules()):
        if isinstance(mod, SPARSE_LAYERS):
            parent_name, _, attr = name.rpartition(".")
            parent = folded.get_submodule(parent_name) if parent_name else folded
            setattr(parent, attr, mod.to_dense().eval())
            masks[name] = mod.mask.detach().clone()
    for p in folded.parameters():
        p.requires_grad_(False)
    return folded, masks


def make_inputs(example_inputs: tuple, batch: int, seed: int = 0) -> tuple:
    """Inputs like the example's with batch `batch` on dim 0: floats ~ N(0, 1), integers (token ids)
    uniform over the example's range, booleans repeated."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for x in example_inputs:
        shape = (batch, *x.shape[1:])
        if x.dtype.is_floating_point:
            out.append(torch.randn(shape, generator=g, dtype=x.dtype))
        elif x.dtype == torch.bool:
            out.append(x[:1].expand(shape).clone())
        else:
            lo, hi = int(x.min()), int(x.max())
            out.append(torch.randint(lo, hi + 1, shape, generator=g, dtype=x.dtype))
    return tuple(out)


def input_specs(example_inputs: tuple, names: list[str], batch) -> list[dict]:
    """What bench needs to make valid inputs: name, shape (dim 0 is "batch" if dynamic), dtype, range."""
    specs = []
    for name, x in zip(names, example_inputs):
        spec = {"name": name, "shape": [batch, *x.shape[1:]], "dtype": str(x.dtype).removeprefix("torch.")}
        if not x.dtype.is_floating_point and x.dtype != torch.bool:
            spec["low"], spec["high"] = int(x.min()), int(x.max())
        specs.append(spec)
    return specs


def _input_names(model: nn.Module, n: int) -> list[str]:
    if isinstance(model, torch.fx.GraphModule):
        names = [node.target for node in model.graph.nodes if node.op == "placeholder"]
    else:
        import inspect
        names = [p.name for p in inspect.signature(model.forward).parameters.values()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = [str(s) for s in names[:n]]
    return names if len(names) == n else [f"input_{i}" for i in range(n)]


# ------------------------------------------------------------------------------------------ export

def export(source, out, *, batch: int | None = 1, dynamic_batch: bool = False, opset: int = DEFAULT_OPSET,
           force: bool = False, atol: float = ATOL, rtol: float = RTOL, progress=None) -> Exported:
    """Export `source` (artifact dir, "model.py[:factory]", or a converted model) to ONNX at `out`.

    The batch is static (`batch`, default 1) unless `dynamic_batch`. The file and its sidecar are
    written to a temporary name and renamed into place only after every check passed.
    `progress(step: str)` is called before each step, for a CLI to show.
    """
    say = progress or (lambda step: None)
    out = Path(out)
    if dynamic_batch and batch not in (None, 1):
        raise UsageError("--batch and --dynamic-batch contradict each other; pass one of them")
    if not dynamic_batch and (batch is None or batch < 1):
        raise UsageError(f"batch {batch!r} must be a positive integer, e.g. --batch 64")
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise UsageError(f"opset {opset!r} is too old; siftc exports opset >= {MIN_OPSET}, e.g. --opset 17")
    for p in (out, sidecar_path(out)):
        if p.exists() and not force:
            raise UsageError(f"output {p} already exists; choose another -o or pass --force to replace it")

    say("loading model")
    src = resolve(source)
    folded, masks = fold(src.model)
    trace_batch = 2 if dynamic_batch else batch
    inputs = make_inputs(src.example_inputs, trace_batch)
    in_names = _input_names(folded, len(inputs))
    # The PyTorch reference for the check, computed once: on a 90% Sparse Wide ResNet-18 at batch 64 a
    # forward (dense kernels, ~10x the dense model's work) is a third of the export's time.
    want = reference_outputs(folded, inputs)
    out_names = ["output"] if len(want) == 1 else [f"output_{i}" for i in range(len(want))]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tmp_onnx = tmp / out.name
        say(f"exporting ONNX opset {opset}")
        _torch_export(folded, inputs, tmp_onnx, in_names, out_names, opset, dynamic_batch)
        say("checking (onnx checker, ONNX Runtime vs PyTorch, stored sparsity)")
        checks = check(tmp_onnx, folded, inputs, masks, atol=atol, rtol=rtol, want=want,
                       other_batch=DYNAMIC_CHECK_BATCH if dynamic_batch else None,
                       example_inputs=src.example_inputs)
        meta = _sidecar(src, masks, folded, in_names, out_names, None if dynamic_batch else batch,
                        opset, checks, out.name)
        tmp_side = sidecar_path(tmp_onnx)
        tmp_side.write_text(json.dumps(meta, indent=1))
        os.replace(tmp_side, sidecar_path(out))
        os.replace(tmp_onnx, out)  # last: a model.onnx on disk always has its sidecar
    finally:
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    return Exported(out, sidecar_path(out), meta)


def _torch_export(model, inputs, path, in_names, out_names, opset, dynamic_batch):
    # training=PRESERVE on an eval-mode model exports eval semantics (no dropout, BatchNorm on running
    # statistics) without the EVAL-mode peephole that folds BatchNorm into the preceding Conv; constant
    # folding still pre-transposes Linear weights so every weight is one initializer.
    axes = {n: {0: "batch"} for n in in_names + out_names} if dynamic_batch else None
    with warnings.catch_warnings(), _stdout_to_devnull():
        warnings.simplefilter("ignore")  # the legacy-exporter deprecation and the PRESERVE hint
        try:
            torch.onnx.export(model, inputs, str(path), dynamo=False, opset_version=opset,
                              input_names=in_names, output_names=out_names, dynamic_axes=axes,
                              training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=True)
        except Exception as e:
            msg = " ".join(str(e).split())[:300]
            raise ExportCheckError(f"torch.onnx.export (TorchScript, opset {opset}) failed: {msg}; "
                                   f"try another --opset, or run with --debug") from e


@contextlib.contextmanager
def _stdout_to_devnull():
    """File descriptor 1 to /dev/null: on a failure the TorchScript exporter's C++ logger writes the
    whole Torch IR graph to stdout (torch 2.x enables its ONNX log during every export), burying the
    one-line error."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


# ------------------------------------------------------------------------------------------ checks

def check(path, folded: nn.Module, inputs: tuple, masks: dict, *, atol=ATOL, rtol=RTOL, want=None,
          other_batch: int | None = None, example_inputs: tuple | None = None) -> dict:
    """All three checks on the file at `path`; raises ExportCheckError on the first failure and
    returns what it measured. `want`: `reference_outputs(folded, inputs)` if already computed."""
    import onnx
    model = onnx.load(str(path))
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise ExportCheckError(f"{path} fails the onnx checker: {str(e).splitlines()[0]}") from e
    weights = check_sparsity(model, folded, masks, path)
    err = check_outputs(path, folded, inputs, atol, rtol, want=want)
    if other_batch is not None:
        err = max(err, check_outputs(path, folded, make_inputs(example_inputs, other_batch, seed=1), atol, rtol))
    return {"onnx_checker": "passed", "max_abs_error": err, "atol": atol, "rtol": rtol,
            "sparsity": "passed", "weights": weights}


def reference_outputs(folded: nn.Module, inputs: tuple) -> list[np.ndarray]:
    """The PyTorch model's outputs on `inputs`, as a list of arrays."""
    with torch.no_grad():
        y = folded(*inputs)
    return [t.numpy() for t in (y if isinstance(y, (tuple, list)) else (y,))]


def check_outputs(path, folded: nn.Module, inputs: tuple, atol=ATOL, rtol=RTOL, want=None) -> float:
    """ONNX Runtime against PyTorch on `inputs` (`want`: the PyTorch outputs, if already computed);
    returns the largest absolute error."""
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs)}
    got = sess.run(None, feed)
    if want is None:
        want = reference_outputs(folded, inputs)
    worst = 0.0
    for i, (g, w) in enumerate(zip(got, want)):
        if g.shape != w.shape:
            raise ExportCheckError(f"{path}: output {i} has shape {g.shape} in ONNX Runtime, {w.shape} in PyTorch")
        diff = np.abs(g.astype(np.float64) - w)
        worst = max(worst, float(diff.max(initial=0.0)))
        bad = diff > atol + rtol * np.abs(w)
        if bad.any():
            raise ExportCheckError(f"{path}: output {i} differs from PyTorch by up to {diff.max():.3g} at "
                                   f"{int(bad.sum())} elements (allowed {atol:g} + {rtol:g}*|y|)")
    return worst


def check_sparsity(model, folded: nn.Module, masks: dict, path="model") -> list[dict]:
    """Each masked weight as stored in the file: found by its values on the mask (as is or
    transposed, which is how a Linear's weight lands in a MatMul), then required to be exactly zero
    off the mask. Returns one record per sparse layer: name, initializer, shape, nnz, density."""
    from onnx import numpy_helper
    inits = {}
    for t in model.graph.initializer:
        inits.setdefault(tuple(t.dims), []).append(t)
    records = []
    for name, mask in masks.items():
        w = folded.get_submodule(name).weight.detach().numpy()
        m = mask.numpy()
        found = None
        for cand, cmask in ((w, m), (w.T, m.T)) if w.ndim == 2 else ((w, m),):
            named = [t for t in inits.get(cand.shape, []) if t.name == f"{name}.weight"]  # the usual case
            for t in named + inits.get(cand.shape, []):
                arr = numpy_helper.to_array(t)
                if np.array_equal(arr[cmask], cand[cmask]):
                    found = (t.name, arr, cmask)
                    break
            if found:
                break
        if found is None:
            raise ExportCheckError(f"{path}: no initializer stores the weight of sparse layer {name} "
                                   f"(shape {tuple(w.shape)}); the file does not match the model")
        init_name, arr, cmask = found
        off = int(np.count_nonzero(arr[~cmask]))
        if off:
            raise ExportCheckError(f"{path}: weight of {name} (initializer {init_name}) has {off} non-zeros "
                                   f"outside the mask ({np.count_nonzero(arr)} stored, mask allows "
                                   f"{int(cmask.sum())}); the file is not the model's sparse weight")
        nnz = int(np.count_nonzero(arr))
        records.append({"name": name, "initializer": init_name, "shape": list(w.shape), "nnz": nnz,
                        "mask_nnz": int(m.sum()), "density": nnz / arr.size})
    return records


# ----------------------------------------------------------------------------------------- sidecar

def _sidecar(src: Source, masks, folded, in_names, out_names, batch, opset, checks, filename) -> dict:
    fc = flops.count(src.model, src.example_inputs)
    per_weight = {r["name"]: r for r in checks["weights"]}
    layers = []
    for name, mod in folded.named_modules():
        if isinstance(mod, flops.WEIGHT_LAYERS):
            rec = per_weight.get(name)
            layers.append({"name": name, "type": type(mod).__name__, "shape": list(mod.weight.shape),
                           "density": rec["density"] if rec else 1.0,
                           "initializer": rec["initializer"] if rec else None,
                           "flops": fc.layers.get(name, 0)})
    report = src.report or {}
    params = sum(p.numel() for p in folded.parameters())
    return {
        "format": FORMAT, "version": VERSION, "file": filename,
        "source": src.meta,
        "kind": report.get("kind", "dense"),
        "sparsity": report.get("sparsity", 0.0),
        "config": report.get("config"),
        "batch": batch, "dynamic_batch": batch is None, "opset": opset,
        "inputs": input_specs(src.example_inputs, in_names, "batch" if batch is None else batch),
        "outputs": out_names,
        "flops": fc.total, "dense_flops": report.get("dense_flops", fc.total),
        "params": params, "nonzero_params": params - sum(int((~m).sum()) for m in masks.values()),
        "layers": layers,
        "checks": {k: v for k, v in checks.items() if k != "weights"},
        "versions": {"torch": torch.__version__, "onnx": __import__("onnx").__version__},
    }


def read_sidecar(path) -> dict | None:
    """The sidecar of an exported file, or None for an ONNX file siftc did not write."""
    side = sidecar_path(path)
    if not side.is_file():
        return None
    try:
        meta = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{side} is corrupt ({e}); export the model again") from e
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def rebuild(path) -> tuple[nn.Module, dict, tuple]:
    """The folded PyTorch model an exported file came from, rebuilt from its sidecar's source:
    (folded model, masks, example inputs)."""
    meta = read_sidecar(path)
    if meta is None:
        raise UsageError(f"{path} has no siftc sidecar ({sidecar_path(path).name}); export it with siftc export")
    src = meta["source"]
    if src.get("type") == "artifact":
        target = src["path"]
    elif src.get("type") == "model" and src.get("spec"):
        target = src["spec"]
    else:
        raise UsageError(f"{path} was exported from an in-memory model; its PyTorch model cannot be rebuilt")
    s = resolve(target)
    folded, masks = fold(s.model)
    return folded, masks, s.example_inputs


def verify(path, atol=ATOL, rtol=RTOL) -> dict:
    """Re-run every check on an exported file against the model its sidecar names."""
    meta = read_sidecar(path)
    folded, masks, example = rebuild(path)
    batch = meta["batch"]
    inputs = make_inputs(example, batch or 2, seed=2)
    return check(path, folded, inputs, masks, atol=atol, rtol=rtol,
                 other_batch=DYNAMIC_CHECK_BATCH if batch is None else None, example_inputs=example)
