"""convert: trace a dense model (its pretrained weights loaded first, if given), run one pass, verify its
FLOPs (iso-FLOP for the Sparse-IFT kinds; the kept fraction for same-shape sparse), and report.

The converted model is a torch.fx GraphModule carrying `siftc_info` (config, source, report, example
inputs): everything `siftc.artifact.save` needs. The report says per layer whether it kept the dense
model's values ("init": "kept") or was initialised fresh at a new shape ("fresh").
"""
import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from siftc import flops, pretrained
from siftc.config import ConvertConfig
from siftc.errors import UsageError
from siftc.memory import check_fits
from siftc.nn.attention import split_attention
from siftc.passes import KINDS, patterns
from siftc.passes.select import weight_layers
from siftc.source import Source
from siftc.trace import kept_whole, trace

FLOP_TOLERANCE = 0.005  # whole-model weight FLOPs must equal the dense model's within 0.5%


@dataclass
class ConversionInfo:
    config: ConvertConfig
    report: dict
    example_inputs: tuple
    source: Source | None = None
    warnings: list = field(default_factory=list)


def convert_module(model: nn.Module, example_inputs: tuple | dict, cfg: ConvertConfig,
                   source: Source | None = None, weights=None) -> torch.fx.GraphModule:
    """Convert a copy of `model` (the user's model is left untouched), with the state dict in the file
    `weights` loaded into it first. The converted model takes the example's inputs in the graph's
    placeholder order (also by name)."""
    state = pretrained.read_state(weights) if weights is not None else None  # bad files fail before any work
    model = copy.deepcopy(model)
    if state is not None:
        pretrained.load_into(model, state, weights)
    if not isinstance(model, torch.fx.GraphModule):  # a GraphModule is used as given
        # every supported nn.MultiheadAttention the trace enters as four Linear layers the kinds transform
        split_attention(model, keep=kept_whole(model, cfg.leaf))
    with flops.counting(model) as dense:  # the dense count rides on trace's shape propagation
        traced = trace(model, example_inputs, cfg.leaf)  # says plainly when the inputs do not fit the model
    gm, example_inputs = traced.gm, traced.inputs
    dense_params = sum(p.numel() for p in model.parameters())
    solving = patterns.solving_cfg(cfg)  # N:M: the pass solves at the sparsity N/M gives
    check_fits(gm, solving)  # a conversion too large for this machine is refused here, not killed by the OS
    dense_weights = pretrained.snapshot(gm, [name for name, _ in weight_layers(gm)])
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)  # new layers' weight init is reproducible too
        generator = torch.Generator().manual_seed(cfg.seed)
        gm, result = KINDS[cfg.kind](gm, solving, generator)
        patterned = patterns.impose(gm, cfg, generator)  # whole blocks, drawn before the FLOPs are counted
    if not any(r.kind == cfg.kind for r in result.layers):
        left = ", ".join(f"{r.name} ({r.reason or r.kind})" for r in result.layers[:4])
        raise UsageError(f"{cfg.kind}: nothing to transform: every weight layer is left as it is ({left}); "
                         f"keep fewer dense (--keep-dense PATTERN or --no-keep-dense) or use a model with "
                         f"hidden Linear/Conv layers")
    report = build_report(gm, cfg, result.layers, dense, dense_params)
    report.update(result.report_entries())  # a pass's own report entries (wide: "groups")
    report.update(patterned)
    report["trace"] = trace_report(traced)
    _check_flops(report, result, cfg)
    init = pretrained.origins(gm, dense_weights)
    for r in report["layers"]:
        if r["name"] in init:
            r["init"] = init[r["name"]]
    report["weights"] = pretrained.provenance(weights) if weights is not None else None
    report["notes"] = _notes(report, result)
    gm.siftc_info = ConversionInfo(cfg, report, tuple(example_inputs), source)
    return gm


def _check_flops(report: dict, result, cfg: ConvertConfig):
    """A Sparse-IFT kind must cost the dense FLOPs; same-shape sparse what its layers' non-zeros add up
    to. Both counted on the converted graph by `siftc.flops`, independently of the pass's records."""
    want = report["dense_flops"] if result.iso_flop else \
        report["dense_flops"] - sum(r.dense_flops - r.flops for r in result.layers)
    ratio = report["flops"] / want if want else 1.0
    if abs(ratio - 1) > FLOP_TOLERANCE:
        raise RuntimeError(f"siftc bug: {cfg.kind} at sparsity {cfg.sparsity} gives {ratio:.4f}x the FLOPs "
                           f"it should have ({'the dense model' if result.iso_flop else 'its layers summed'}; "
                           f"allowed {FLOP_TOLERANCE:.1%}); please report it with the model")


def _notes(report: dict, result) -> list[str]:
    """Lines `siftc convert` and `siftc inspect` print under the table."""
    notes = patterns.notes(report)
    if not result.iso_flop:
        notes.append(f"not iso-FLOP: every layer keeps its shape, so the model runs {report['flop_ratio']:.4f}x "
                     f"the dense model's weight FLOPs (the kept fraction of its weights; a Sparse-IFT kind would "
                     f"spend them all)")
    if report["weights"] is not None:
        w = report["weights"]
        notes.append(f"weights: {w['file']} (sha256 {w['sha256'][:16]}...) loaded before converting")
        notes.append(pretrained.summary(report["layers"], w))
    return notes


def build_report(gm, cfg: ConvertConfig, records, dense: flops.FlopCount,
                 dense_params: int) -> dict:
    """Total FLOPs from `siftc.flops` (the converted model at the dense positions); the records carry
    their own, counted by the pass with the same functions."""
    fc = flops.count_transformed(gm, dense, extra_under=tuple(r.name for r in records))
    return {
        "kind": cfg.kind,
        "sparsity": cfg.sparsity,  # a pass's entries may set it (sparse, --mask-from zeros: what they give)
        "config": cfg.to_json(),
        "dense_flops": dense.total,
        "flops": fc.total,
        "flop_ratio": fc.total / dense.total if dense.total else 1.0,
        "extra_flops": fc.extra_total,
        "dense_params": dense_params,
        "params": sum(p.numel() for p in gm.parameters()),
        "nonzero_params": _nonzero_params(gm),
        "transformed": sum(r.kind == cfg.kind for r in records),
        "layers": [r.to_json() for r in records],
    }


def trace_report(traced) -> dict:
    """How the model was traced and what that fixed: `siftc inspect` shows it."""
    guards = traced.guards
    return {"how": traced.how,
            "inputs": [n.target for n in traced.gm.graph.nodes if n.op == "placeholder"],
            "input_shapes": [list(t.shape) for t in traced.inputs],
            "specializations": [s.to_json() for s in guards.specializations] if guards else [],
            "constants": {k: repr(v) for k, v in guards.constants.items()} if guards else {}}


def _nonzero_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # a sparse layer's parameters are its non-zeros
