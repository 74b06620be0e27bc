"""What a pass did to one layer. Reports, `siftc inspect` and tests read these."""
from dataclasses import asdict, dataclass, field


@dataclass
class LayerRecord:
    name: str                  # module path in the model, e.g. "layer1.0.conv1"
    kind: str                  # the transformation applied, or "dense" / "skipped"
    dense_shape: list          # the dense weight's shape
    new_shape: str = ""        # what replaced it, e.g. "4 x [64, 64, 3, 3]"
    structure: dict = field(default_factory=dict)   # {"branches": N} or {"rank": d} or {"width": ...}
    density: float = 1.0       # non-zeros / weights over the layer's sparse parts
    search_space: int = 0      # weights a sparse trainer can explore (DESIGN.md section 2)
    reason: str = ""           # why a layer was kept dense or skipped
    dense_flops: int = 0       # filled from the FLOP count of the dense model
    flops: int = 0             # filled from the FLOP count of the converted model

    def to_json(self) -> dict:
        return asdict(self)
