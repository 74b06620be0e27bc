"""The checks every ONNX export passes before it is reported done, and `siftc.export.verify` re-runs:

    onnx checker          the file is valid ONNX
    check_outputs         ONNX Runtime's outputs against PyTorch's, within ATOL + RTOL*|y| elementwise
    check_sparsity        each sparse weight, as stored in the file, is exactly zero off the model's mask,
                          and a structured layer's mask has its pattern's structure (the folded layer's
                          `pattern`, siftc.sparse.patterns.check_structure), so the file's zeros do too
    check_layer_outputs   only when the model's outputs do not vary with its inputs (so a wrong file
                          would give the same outputs): each weight layer's output (the sparse ones and
                          the dense), exposed as an extra output of the file's own graph, against
                          PyTorch's, relative to its scale

Each raises ExportCheckError naming the file and what is off, or returns what it measured. `check`'s
result says what was compared and whether that could tell a wrong file from a right one
("discriminates").
"""
import numpy as np
import torch
from torch import nn

from siftc.errors import SiftcError
from siftc.layers import counted
from siftc.source import make_inputs

ATOL = 1e-4        # |onnx - torch| <= ATOL + RTOL * |torch|, elementwise, float32
RTOL = 1e-3
DYNAMIC_CHECK_BATCH = 3  # a dynamic-batch export is also run at this batch, to prove the axis is free
# A layer whose outputs are all below this in magnitude cannot tell a right file from a wrong one:
# float32 nears its subnormal range (1.2e-38), where errors relative to the scale stop meaning anything.
TINY = 1e-30


class ExportCheckError(SiftcError):
    """An exported file failed a check: invalid ONNX, outputs or a layer's output off, or a
    weight's zeros not the mask's."""


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
    if not varies:  # equal outputs for a wrong file too: look inside, at the weight layers
        layers, skipped = check_layer_outputs(model, path, folded, inputs, masks, atol, rtol)
        found.update(compared="outputs and weight layer outputs" if layers else "outputs",
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
        return flat_outputs(folded(*inputs))


def flat_outputs(y) -> list[np.ndarray]:
    """A model's outputs (a tensor, a tuple, a dict or a HuggingFace ModelOutput) as the list of arrays an
    ONNX file returns: the tensor leaves in order, None entries dropped, as the exporter flattens them."""
    from torch.utils import _pytree as pytree
    return [t.detach().numpy() for t in pytree.tree_leaves(y) if isinstance(t, torch.Tensor)]


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
    off the mask, whose structure must be the layer's pattern's. Returns one record per sparse layer:
    name, initializer, shape, nnz, density (and pattern, when structured)."""
    inits = _initializers(model)
    records = []
    for name, mask in masks.items():
        layer = folded.get_submodule(name)
        w = layer.weight.detach().numpy()
        m = mask.numpy()
        pattern = _check_pattern(layer, mask, name, path)
        found = _stored_weight(inits, name, w, m)
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
                        "mask_nnz": int(m.sum()), "density": nnz / arr.size, **pattern})
    return records


def _check_pattern(layer: nn.Module, mask: torch.Tensor, name: str, path) -> dict:
    """{"pattern": text} when the folded `layer` records a structured pattern its `mask` has, {} when
    it records none; ExportCheckError naming the layer when the mask lacks the structure."""
    from siftc.sparse.patterns import check_structure
    pattern = getattr(layer, "pattern", None)
    if pattern is None or not pattern.structured:
        return {}
    wrong = check_structure(mask.reshape(-1).nonzero().squeeze(1), tuple(mask.shape), pattern)
    if wrong:
        raise ExportCheckError(f"{path}: sparse layer {name} has pattern {pattern} but its mask does not: "
                               f"{wrong}; the model's mask was changed outside siftc (impose the pattern "
                               f"again with siftc.sparse.impose_pattern)")
    return {"pattern": str(pattern)}


def _initializers(model) -> dict:
    """The file's initializers by shape."""
    inits = {}
    for t in model.graph.initializer:
        inits.setdefault(tuple(t.dims), []).append(t)
    return inits


def _stored_weight(inits: dict, name: str, w: np.ndarray, m: np.ndarray):
    """(initializer name, stored array, mask as stored) of the initializer holding layer `name`'s weight
    `w` where mask `m` is True, as is or transposed; None if no initializer does."""
    from onnx import numpy_helper
    for cand, cmask in ((w, m), (w.T, m.T)) if w.ndim == 2 else ((w, m),):
        named = [t for t in inits.get(cand.shape, []) if t.name == f"{name}.weight"]  # the usual case
        for t in named + inits.get(cand.shape, []):
            arr = numpy_helper.to_array(t)
            if np.array_equal(arr[cmask], cand[cmask]):
                return t.name, arr, cmask
    return None


def check_layer_outputs(model, path, folded: nn.Module, inputs: tuple, masks: dict, atol=ATOL,
                        rtol=RTOL) -> tuple[list[dict], dict]:
    """Each weight layer's output (Linear, Conv; sparse or not) in ONNX Runtime against PyTorch's on
    `inputs`. The values are the outputs of the file's own nodes that consume the layer's weight
    initializer, added as extra graph outputs; the file on disk is not changed. A layer's tolerance is
    ATOL times its largest |y| + RTOL*|y|, so a layer whose activations have shrunk to 1e-20 is
    compared as finely as one at 1. Returns (one record per layer compared, {layer: why not compared})."""
    import onnxruntime as ort
    from onnx import helper
    values, skipped, users, inits = {}, {}, {}, _initializers(model)
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    for name, layer in folded.named_modules():
        if not counted(layer):
            continue
        w = layer.weight.detach().numpy()
        found = _stored_weight(inits, name, w, masks[name].numpy() if name in masks else np.ones(w.shape, bool))
        value = found and _layer_value(users, found[0], layer.bias is not None)
        if not value:
            skipped[name] = (f"no single Conv/Gemm/MatMul node computes it from {found[0]}" if found else
                             "no initializer stores its weight as is")
        else:
            values[name] = value
    found_twice = {v for v in values.values() if list(values.values()).count(v) > 1}
    for name in [k for k, v in values.items() if v in found_twice]:
        skipped[name] = "another layer's weight has the same values, so which node is whose is unknown"
        del values[name]
    want, calls = _layer_outputs(folded, inputs, values)
    for name, n in calls.items():
        if n != 1:
            skipped[name] = f"called {n} times in one forward"
            del values[name]
    if not values:
        return [], skipped
    outputs = {o.name for o in model.graph.output}
    for value in set(values.values()) - outputs:
        model.graph.output.append(helper.make_empty_tensor_value_info(value))  # type and shape: the runtime's
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
                f"{path}: {'sparse' if name in masks else 'dense'} layer {name}'s output (ONNX value {value}) "
                f"differs from PyTorch by up to {diff.max():.3g} at {int(bad.sum())} elements (allowed "
                f"{atol:g}*{scale:.3g} + {rtol:g}*|y|); the model's outputs do not vary with its inputs, so "
                f"only this per-layer check sees it")
        records.append({"name": name, "sparse": name in masks, "value": value,
                        "max_abs_error": float(diff.max(initial=0.0)), "scale": scale})
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
