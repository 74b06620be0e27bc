"""The checks every ONNX export passes before it is reported done, and `siftc.export.verify` re-runs:

    onnx checker       the file is valid ONNX
    check_outputs      ONNX Runtime's outputs against PyTorch's, within ATOL + RTOL*|y| elementwise
    check_sparsity     each sparse weight, as stored in the file, is exactly zero off the model's mask

Each raises ExportCheckError naming the file and what is off, or returns what it measured.
"""
import numpy as np
import torch
from torch import nn

from siftc.errors import SiftcError
from siftc.source import make_inputs

ATOL = 1e-4        # |onnx - torch| <= ATOL + RTOL * |torch|, elementwise, float32
RTOL = 1e-3
DYNAMIC_CHECK_BATCH = 3  # a dynamic-batch export is also run at this batch, to prove the axis is free


class ExportCheckError(SiftcError):
    """An exported file failed a check: invalid ONNX, outputs off, or a weight's zeros not the mask's."""


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
