"""After a Sparse-IFT pass: give every sparse layer the conversion's sparsity pattern (`--pattern`).

    before   fc1 = SparseLinear(64, 256, nnz=4096)               (random unstructured mask)
    after    fc1 = SparseLinear(64, 256, nnz=4096), pattern block:4x1   (1024 whole 4x1 blocks)

Each layer gets the pattern or the best of its fallbacks that fits its shape (siftc.sparse.patterns.fit);
its count is rounded to whole blocks (within half a block of what the pass solved), so the model stays
iso-FLOP within the usual 0.5%. N:M fixes a layer's density at N/M, so the pass is run at that sparsity
(`solving_cfg`): the rank, branch count or widths are solved around it (wide: siftc.passes.wide), and
the report shows the effective sparsity next to the requested one. Wide makes each sparse layer's sides
multiples of the pattern's tile, so the widened layers take the pattern itself.
"""
import dataclasses
import math

from siftc.config import ConvertConfig
from siftc.sparse.distribution import impose_pattern, sparse_layers
from siftc.sparse.patterns import Pattern, effective_sparsity, fit


def solving_cfg(cfg: ConvertConfig) -> ConvertConfig:
    """The config the kind's pass solves with: the sparsity the pattern gives (N:M: 1 - N/M). (Wide
    reads `cfg.pattern` itself, for the tile its sparse layers' widths are multiples of.)"""
    pattern = Pattern.parse(cfg.pattern)
    if cfg.sparsity is None or pattern.density is None:
        return cfg
    return dataclasses.replace(cfg, sparsity=effective_sparsity(pattern, cfg.sparsity))


def impose(gm, cfg: ConvertConfig, generator) -> dict:
    """Give `gm`'s sparse layers `cfg.pattern` (fitted per layer; new structured random masks, values
    drawn as the layer's init). Returns the report entries: "pattern" (requested), "effective_sparsity"
    (of all sparse layers together) and "patterns" (per layer: requested, fitted, why not as asked)."""
    pattern = Pattern.parse(cfg.pattern)
    if not pattern.structured:
        return {"pattern": str(pattern)}
    rows, nnz, numel = [], 0, 0
    for name, layer in sparse_layers(gm).items():
        # a pass that chose the layer's structured mask itself (--kind sparse, from its weights) keeps it
        fitted = fit(pattern, layer.weight_shape) if layer.pattern is not None else \
            impose_pattern(layer, pattern, generator=generator)
        rows.append({"name": name, "requested": str(pattern), "pattern": str(fitted.pattern),
                     "reason": fitted.reason, "nnz": layer.nnz, "density": layer.density})
        nnz, numel = nnz + layer.nnz, numel + math.prod(layer.weight_shape)
    return {"pattern": str(pattern), "effective_sparsity": 1 - nnz / numel if numel else cfg.sparsity,
            "patterns": rows}


def notes(report: dict) -> list[str]:
    """Lines for convert and inspect: the effective sparsity an N:M pattern gives when it is not the
    requested one, and each layer that did not get the requested pattern, with why."""
    out = []
    eff, asked = report.get("effective_sparsity"), report.get("sparsity")
    nm = Pattern.parse(report.get("pattern", "unstructured")).density is not None
    if nm and eff is not None and asked is not None and abs(eff - asked) > 5e-4:
        out.append(f"pattern {report['pattern']}: effective sparsity {eff:.4f} (requested {asked:.4f})")
    out += [f"{r['name']}: {r['reason']}" for r in report.get("patterns", []) if r["reason"]]
    return out
