"""ONNX export: fold the masks into plain layers, export, check.

A Sparse-IFT model is exported as plain ONNX that any engine can run: every SparseLinear/SparseConv2d
becomes a plain nn.Linear/nn.Conv2d with its mask folded into the weight as exact zeros (no
weight*mask nodes), the replacement blocks are ordinary ops (Conv, Gemm/MatMul, Add, Relu, ...), and
BatchNorm stays a BatchNormalization node for the engine to fold (DeepSparse fuses it itself).

    before (siftc.load)                         after (model.onnx)
    SparseParallel                              Conv(W1 with 90% exact zeros) -> BatchNormalization -> Relu
      branches.0: SparseConv2d + BN + ReLU  ->  Conv(W2 ...)                  -> BatchNormalization -> Relu
      branches.1: SparseConv2d + BN + ReLU      Add

Every export is checked before it is reported done (siftc.export_checks: the onnx checker, ONNX Runtime
outputs against the PyTorch model within ATOL + RTOL*|y|, each sparse weight as stored in the file
has zeros exactly where the model's mask has them, and, when the model's outputs do not vary with its
inputs, each sparse layer's output too; the checks record what they compared and whether that could
tell a wrong file apart). A sidecar `<file>.json` (siftc.store) records the
source, kind, sparsity, inputs, per-layer densities and FLOPs; `verify(path)` re-runs the checks from it.
"""
import contextlib
import copy
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from siftc import flops, store
from siftc import layers as layers_table
from siftc.errors import UsageError
from siftc.export_checks import ATOL, DYNAMIC_CHECK_BATCH, RTOL, ExportCheckError, check, reference_outputs
from siftc.source import LoadedModel, input_specs, make_inputs, resolve
from siftc.store import read_sidecar, sidecar_path

# 17: LayerNorm is one op, SDPA exports (>= 14); DeepSparse 1.8 and ORT both run it. See the README's
# export-settings table for the opsets measured.
DEFAULT_OPSET = 17
# The floor of docs/design.md section 1.3. A model with scaled_dot_product_attention (the GPT example) needs >= 14: below,
# the exporter fails with ExportCheckError naming the op and the opset.
MIN_OPSET = 11


@dataclass
class Exported:
    path: Path
    sidecar: Path
    meta: dict


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
        store.check_output(p, force)

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

    with store.scratch_dir(out) as tmp:
        tmp_onnx = tmp / out.name
        say(f"exporting ONNX opset {opset}")
        _torch_export(folded, inputs, tmp_onnx, in_names, out_names, opset, dynamic_batch)
        say("checking (onnx checker, ONNX Runtime vs PyTorch, stored sparsity)")
        checks = check(tmp_onnx, folded, inputs, masks, atol=atol, rtol=rtol, want=want,
                       other_batch=DYNAMIC_CHECK_BATCH if dynamic_batch else None,
                       example_inputs=src.example_inputs)
        meta = store.write_sidecar(out, _sidecar(src, masks, folded, in_names, out_names,
                                                 None if dynamic_batch else batch, opset, checks, out.name))
        store.place(tmp_onnx, out)  # last: a model.onnx on disk always has its sidecar
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


# ----------------------------------------------------------------------------------------- sidecar

def _sidecar(src: LoadedModel, masks, folded, in_names, out_names, batch, opset, checks, filename) -> dict:
    fc = flops.count(src.model, src.example_inputs)
    per_weight = {r["name"]: r for r in checks["weights"]}
    layers = []
    for name, mod in folded.named_modules():
        if layers_table.counted(mod):
            rec = per_weight.get(name)
            layers.append({"name": name, "type": type(mod).__name__, "shape": list(layers_table.shape(mod)),
                           "density": rec["density"] if rec else 1.0,
                           "initializer": rec["initializer"] if rec else None,
                           "flops": fc.layers.get(name, 0),
                           **({"pattern": rec["pattern"]} if rec and "pattern" in rec else {})})
    report = src.report or {}
    params = sum(p.numel() for p in folded.parameters())
    return {
        "file": filename,
        "source": src.origin,
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
