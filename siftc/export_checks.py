"""The checks every ONNX export passes before it is reported done, and `siftc.export.verify` re-runs:

    onnx checker          the file is valid ONNX
    check_outputs         ONNX Runtime's outputs against PyTorch's, within ATOL + RTOL*|y| elementwise
    check_sparsity        each sparse weight, as stored in the file, is exactly zero off the model's mask
    check_layer_outputs   only when the model's outputs do not vary with its inputs (so a wrong file
                          would give the same outputs): each sparse layer's output, exposed as an extra
                          output of the file's own graph, against PyTorch's, relative to its scale

Each raises ExportCheckError naming the file and what is off, or returns what it measured. `check`'s
result says what was compared and whether that could tell a wrong file from a right one
("discriminates").
"""
import numpy as np
import torch
from torch import nn

from siftc.errors import SiftcError
from siftc.source import make_inputs

ATOL = 1e-4        # |onnx - torch| <= ATOL + RTOL * |torch|, elementwise, float32
RTOL = 1e-3
DYNAMIC_CHECK_BATCH = 3  # a dynamic-batch export is also run at this batch, to prove the axis is free
# A sparse layer whose outputs are all below this in magnitude cannot tell a right file from a wrong one:
# float32 nears its subnormal range (1.2e-38), where errors relative to the scale stop meaning anything.
TINY = 1e-30


class ExportCheckError(SiftcError):
    """An exported file failed a check: invalid ONNX, outputs off, or a weight's zeros not the mask's."""


def check(path, folded: nn.Module, inputs: tuple, masks: dict, *, atol=ATOL, rtol=RTOL, want=None,
          other_batch: int | None = None, example_inputs: tuple | None = None) -> dict:
    """All the checks on the file at `path`; raises ExportCheckError on the first failure and returns
    what it measured. `want`: `reference_outputs(folded, inputs)` if already computed; `example_inputs`:
    the model's example tensors (default `inputs`), which the other inputs are made like."""
    import onnx
    model = onnx.load(str(path))
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise ExportCheckError(f"{path} fails the onnx checker: {str(e).splitlines()[0]}") from e
    like = inputs if example_inputs is None else example_inputs
    weights = check_sparsity(model, folded, masks, path)
    err = check_outputs(path, folded, inputs, atol, rtol, want=want)
    if other_batch is not None:
        err = max(err, check_outputs(path, folded, make_inputs(like, other_batch, seed=1), atol, rtol))
    varies, spread = output_spread(folded, like, atol, rtol)
    found = {"outputs_vary": varies, "output_spread": spread, "compared": "outputs", "discriminates": varies}
    if not varies:  # equal outputs for a wrong file too: look inside, at the sparse layers
        layers, skipped = check_layer_outputs(model, path, folded, inputs, weights, atol, rtol)
        found.update(compared="outputs and sparse layer outputs" if layers else "outputs",
                     discriminates=any(r["scale"] > TINY for r in layers),
                     layers_compared=layers, layers_not_compared=skipped)
    return {"onnx_checker": "passed", "max_abs_error": err, "atol": atol, "rtol": rtol,
            "sparsity": "passed", "weights": weights, **found}


def output_spread(folded: nn.Module, like: tuple, atol=ATOL, rtol=RTOL) -> tuple[bool, float]:
    """Whether the model's outputs vary with its inputs: its outputs for two random inputs made like
    `like` (at its batch: one the model serves) differ beyond the check's tolerance somewhere. Returns
    (varies, largest |y(x1) - y(x2)|). A model whose outputs do not vary (activations that vanish at
    random init, a zero head) gives the same outputs from a wrong file, so its output check proves nothing."""
    batch = like[0].shape[0]
    y1, y2 = (reference_outputs(folded, make_inputs(like, batch, seed=s)) for s in (11, 12))
    diffs = [np.abs(a.astype(np.float64) - b) for a, b in zip(y1, y2)]
    varies = any((d > atol + rtol * np.abs(a)).any() for d, a in zip(diffs, y1))
    return bool(varies), max((float(d.max(initial=0.0)) for d in diffs), default=0.0)


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


def check_layer_outputs(model, path, folded: nn.Module, inputs: tuple, weights: list[dict], atol=ATOL,
                        rtol=RTOL) -> tuple[list[dict], dict]:
    """Each sparse layer's output in ONNX Runtime against PyTorch's on `inputs`. The values are the
    outputs of the file's own nodes that consume the layer's weight initializer (`weights`, from
    check_sparsity), added as extra graph outputs; the file on disk is not changed. A layer's tolerance
    is ATOL times its largest |y| + RTOL*|y|, so a layer whose activations have shrunk to 1e-20 is
    compared as finely as one at 1. Returns (one record per layer compared, {layer: why not compared})."""
    import onnxruntime as ort
    from onnx import TensorProto, helper
    values, skipped, users = {}, {}, {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    for rec in weights:
        value = _layer_value(users, rec["initializer"], folded.get_submodule(rec["name"]).bias is not None)
        if value is None:
            skipped[rec["name"]] = f"no single Conv/Gemm/MatMul node computes it from {rec['initializer']}"
        else:
            values[rec["name"]] = value
    want, calls = _layer_outputs(folded, inputs, values)
    for name, n in calls.items():
        if n != 1:
            skipped[name] = f"called {n} times in one forward"
            del values[name]
    outputs = {o.name for o in model.graph.output}
    for value in set(values.values()) - outputs:
        model.graph.output.append(helper.make_tensor_value_info(value, TensorProto.FLOAT, None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs)}
    names = list(dict.fromkeys(values.values()))
    got = dict(zip(names, sess.run(names, feed)))
    records = []
    for name, value in values.items():
        g, w = got[value], want[name]
        if g.shape != w.shape:
            skipped[name] = f"ONNX value {value} has shape {g.shape}, the layer's output {w.shape}"
            continue
        scale = float(np.abs(w).max(initial=0.0))
        diff = np.abs(g.astype(np.float64) - w)
        bad = diff > atol * scale + rtol * np.abs(w)
        if bad.any():
            raise ExportCheckError(
                f"{path}: sparse layer {name}'s output (ONNX value {value}) differs from PyTorch by up to "
                f"{diff.max():.3g} at {int(bad.sum())} elements (allowed {atol:g}*{scale:.3g} + {rtol:g}*|y|); "
                f"the model's outputs do not vary with its inputs, so only this per-layer check sees it")
        records.append({"name": name, "value": value, "max_abs_error": float(diff.max(initial=0.0)),
                        "scale": scale})
    return records, skipped


def _layer_value(users: dict, weight: str, has_bias: bool) -> str | None:
    """The name of the value a weight layer computes, given each value's consuming nodes (`users`):
    the output of the one Conv, Gemm or MatMul node that consumes initializer `weight` (through a
    Transpose if constant folding left one), and for a MatMul with a bias, of the Add after it. None
    when that is not one node."""
    nodes = users.get(weight, [])
    if len(nodes) == 1 and nodes[0].op_type == "Transpose":
        nodes = users.get(nodes[0].output[0], [])
    compute = [n for n in nodes if n.op_type in ("Conv", "Gemm", "MatMul")]
    if len(compute) != 1:
        return None
    node = compute[0]
    if node.op_type == "MatMul" and has_bias:
        after = users.get(node.output[0], [])
        if len(after) != 1 or after[0].op_type != "Add":
            return None
        node = after[0]
    return node.output[0]


def _layer_outputs(folded: nn.Module, inputs: tuple, names) -> tuple[dict, dict]:
    """PyTorch's output of each layer in `names` on `inputs` (its last call's) and how often it was called."""
    want, calls, hooks = {}, dict.fromkeys(names, 0), []

    def hook(name):
        def record(module, args, out):
            calls[name] += 1
            want[name] = out.detach().numpy()
        return record

    try:
        for name in names:
            hooks.append(folded.get_submodule(name).register_forward_hook(hook(name)))
        with torch.no_grad():
            folded(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return want, calls
