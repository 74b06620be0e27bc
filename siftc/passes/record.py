"""What a pass did: one record per layer, and the pass's own report entries. Reports, `siftc inspect`
and tests read these."""
from dataclasses import asdict, dataclass, field


@dataclass
class LayerRecord:
    name: str                  # module path in the model, e.g. "layer1.0.conv1"
    kind: str                  # the transformation applied, or "dense" / "skipped"
    dense_shape: list          # the dense weight's shape
    new_shape: str = ""        # what replaced it, e.g. "4 x [64, 64, 3, 3]"
    structure: dict = field(default_factory=dict)   # {"branches": N} or {"rank": d} or {"width": ...}
    density: float = 1.0       # non-zeros / weights over the layer's sparse parts
    search_space: int = 0      # weights a sparse trainer can explore (docs/design.md section 2)
    reason: str = ""           # why a layer was kept dense or skipped
    dense_flops: int = 0       # the dense layer's weight FLOPs (`siftc.flops`), at its output positions
    flops: int = 0             # what replaced it, at the same positions

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class PassResult:
    """Everything a pass returns besides the rewritten graph."""
    layers: list               # one LayerRecord per weight layer, in call order
    groups: list | None = None              # wide: the width groups, old and new widths, why fixed
    non_weight_flops: dict | None = None    # wide: norm and attention FLOPs, dense and widened
    iso_flop: bool = True   # the pass keeps the dense model's FLOPs (sparse, same shape: it does not)
    entries: dict = field(default_factory=dict)  # its other report entries (sparse: mask_from, ...)

    def report_entries(self) -> dict:
        """The entries this pass adds to the conversion report (only those it has)."""
        return {**{k: v for k, v in (("groups", self.groups), ("non_weight_flops", self.non_weight_flops))
                   if v is not None}, **self.entries}
