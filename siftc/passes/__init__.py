"""Sparse-IFT passes. Each is `run(gm, cfg, generator) -> (gm, [LayerRecord])`, keyed by the CLI's
`--kind` name; a pass may return a third item, a dict of extra report entries (wide: "groups")."""
from siftc.passes import layerwise, wide

KINDS = {
    "wide": wide.run,
    "parallel": layerwise.run,
    "factorized": layerwise.run,
    "doped": layerwise.run,
}
