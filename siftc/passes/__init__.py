"""Sparse-IFT passes. Each is `run(gm, cfg, generator) -> (gm, PassResult)`, keyed by the CLI's
`--kind` name: the rewritten graph, one LayerRecord per weight layer (with its FLOPs, dense and new),
and the pass's own report entries (wide: "groups", "non_weight_flops"). All but "sparse" are Sparse-IFT
(iso-FLOP); "sparse" keeps every shape and runs the kept fraction of the FLOPs (PassResult.iso_flop)."""
from siftc.passes import layerwise, same_shape, wide

KINDS = {
    "wide": wide.run,
    "parallel": layerwise.run,
    "factorized": layerwise.run,
    "doped": layerwise.run,
    "sparse": same_shape.run,
}
