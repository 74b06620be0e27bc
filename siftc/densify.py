"""Densify: a sparse-trained model whose every weight trains again, as in the Sparse-IFT paper's
dense fine-tuning (section 3.7, SPDF).

    before   fc1: SparseLinear(64, 512), 3,277 of 32,768 weights held (values + positions)
    after    fc1: nn.Linear(64, 512) holding the folded weight: the 3,277 non-zeros keep their values,
             the other 29,491 start at exactly zero and receive gradients from the first step on

The wide shapes stay. Each sparse layer (siftc.nn.sparse) becomes the plain torch layer of its shape
(`to_dense()`: nn.Linear, nn.Conv1d, nn.Conv2d) at the same place in the graph, so the outputs are
unchanged and an artifact stores it like any torch.nn layer. The FLOPs become the dense-shaped ones,
counted with siftc.flops, and the report says so: a densified Sparse Wide 90% model computes about 10x
the dense model's FLOPs.

    >>> dense = siftc.densify(siftc.load("runs/mlp-rigl/model"))
    >>> densify_artifact("runs/mlp-rigl/model", "out/mlp-densified")   # what `siftc densify` runs
"""
import copy
import dataclasses
import os
from pathlib import Path

from torch import nn

from siftc import artifact, flops, graph_data
from siftc.errors import UsageError
from siftc.sparse import sparse_layers
from siftc.store import check_output

KIND = "densified"  # the report's kind once densified; report["densified"] keeps what it was


def densify(model: nn.Module) -> nn.Module:
    """A copy of `model` with every sparse layer replaced by the dense layer of its shape holding its
    weight (zeros where the mask was off). A converted model's `siftc_info` gets the densified report."""
    if not sparse_layers(model):
        raise UsageError("the model has no sparse layers, so there is nothing to densify (siftc densified "
                         "it already, or it was never converted); pass a model from siftc.convert or siftc train")
    out = copy.deepcopy(model)
    sparse = sparse_layers(out)
    for name, layer in sparse.items():
        parent, _, attr = name.rpartition(".")
        setattr(out.get_submodule(parent), attr, _dense_twin(layer))
    info = getattr(model, "siftc_info", None)
    if info is not None:
        out.siftc_info = dataclasses.replace(info, report=densified_report(out, info.report, info.example_inputs,
                                                                            len(sparse)))
    return out


def _dense_twin(layer: nn.Module) -> nn.Module:
    """`layer.to_dense()` on the layer's device, in its mode, its parameters as trainable as before."""
    dense = layer.to_dense().to(layer.values.device).train(layer.training)
    dense.weight.requires_grad_(layer.values.requires_grad)
    if layer.bias is not None:
        dense.bias.requires_grad_(layer.bias.requires_grad)
    return dense


def densified_report(model: nn.Module, before: dict, example_inputs: tuple, sparse: int) -> dict:
    """The conversion report of `model`, densified from the model `before` describes (`sparse` sparse
    layers): every transformed layer dense at its new shape, with its dense-shaped FLOPs; `densified`
    records what the model was."""
    fc = flops.count(model, example_inputs)
    layers = []
    for r in before["layers"]:
        if r["kind"] in ("dense", "skipped"):
            layers.append(r)
            continue
        inside = [v for k, v in fc.layers.items() if k == r["name"] or k.startswith(r["name"] + ".")]
        layers.append({**r, "kind": "dense", "density": 1.0, "flops": sum(inside),
                       "reason": f"densified (was {r['kind']} at density {r['density']:.4f}, {r['flops']:,} "
                                 f"FLOPs): every weight trains, FLOPs are the dense-shaped ones"})
    params = sum(p.numel() for p in model.parameters())
    dense_flops = before["dense_flops"]
    return {**before, "kind": KIND, "sparsity": 0.0, "flops": fc.total,
            "flop_ratio": fc.total / dense_flops if dense_flops else 1.0,
            "params": params, "nonzero_params": params, "layers": layers,
            "densified": {"sparse_layers": sparse, "kind": before["kind"], "sparsity": before["sparsity"], "flops": before["flops"],
                          "flop_ratio": before["flop_ratio"], "nonzero_params": before["nonzero_params"],
                          "note": f"densified from {before['kind']} at sparsity {before['sparsity']:g}: every "
                                  f"weight trains and the FLOPs are the dense-shaped ones, {fc.total:,} "
                                  f"({fc.total / dense_flops if dense_flops else 1.0:.2f}x the dense "
                                  f"model's; {before['flops']:,} before)"}}


def densify_artifact(path: str | os.PathLike, out: str | os.PathLike, force: bool = False) -> nn.Module:
    """Load the artifact `path`, densify it and save it as the artifact `out` (atomically; `force`
    replaces only a siftc artifact that is not `path`). Returns the densified model."""
    path, out = Path(path), Path(out)
    check_output(out, force, want=artifact.FORMAT, inputs=(path,))  # before the (slow) loading
    model = artifact.load(path)
    if not sparse_layers(model):
        was = model.siftc_info.report.get("kind")
        raise UsageError(f"{path} has no sparse layers, so there is nothing to densify"
                         f"{' (siftc densified it already)' if was == KIND else ''}; pass a sparse artifact "
                         f"from siftc convert or siftc train")
    dense = densify(model)
    try:
        graph_data.to_data(dense)
    except graph_data.NotData as e:  # it would need its model file, whose conversion is the sparse model
        raise UsageError(f"{path} cannot be densified: the densified model cannot be stored as data ({e}); "
                         f"densify needs an artifact whose graph is stored in graph.json") from e
    artifact.save(dense, out, force=force, inputs=(path,))
    return dense
