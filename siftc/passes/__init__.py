"""Sparse-IFT passes. Each is `run(gm, cfg, generator) -> (gm, [LayerRecord])`, keyed by the CLI's
`--kind` name."""
from siftc.passes import layerwise

KINDS = {
    "parallel": layerwise.run,
    "factorized": layerwise.run,
    "doped": layerwise.run,
}
