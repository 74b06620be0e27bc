"""Conversion settings: one frozen dataclass, validated on construction."""
from dataclasses import dataclass

from siftc.errors import UsageError
from siftc.nn.blocks import ACTIVATIONS
from siftc.passes import KINDS
from siftc.passes.same_shape import MASKS
from siftc.sparse.distribution import DISTRIBUTIONS
from siftc.sparse.patterns import Pattern

BRANCH_ACTS = tuple(ACTIVATIONS)  # the non-linearities g a branch can use


@dataclass(frozen=True)
class ConvertConfig:
    kind: str
    # None only for kind "sparse" with mask_from "zeros": the sparsity is what the weights' zeros give.
    sparsity: float | None
    # None: the paper's default, first and last weight layer kept dense; () keeps none dense.
    keep_dense: tuple[str, ...] | None = None
    # The non-linearity g in parallel branches and the factorized middle (the paper's ablation: it matters).
    branch_act: str = "relu"
    # Seeds weight init and the random masks, so a conversion is reproducible.
    seed: int = 0
    # wide: widths become multiples of this (hardware-friendly shapes; the paper's GPT uses 12).
    round_to: int = 1
    # A layer or width group siftc cannot transform is an error instead of a reported skip.
    strict: bool = False
    # wide: widen the attention head dimension too (the paper keeps heads x head_dim).
    widen_heads: bool = False
    # Modules (fnmatch on their path or class name) traced as opaque leaves, left as they are: the fix
    # for a module that branches on tensor values.
    leaf: tuple[str, ...] = ()
    # sparse: where each layer's mask comes from (magnitude pruning of its weights, their zeros, random).
    mask_from: str = "magnitude"
    # sparse: how many non-zeros each layer keeps (uniform: s in every layer; erk: same total FLOPs).
    distribution: str = "uniform"
    # The sparse layers' pattern (siftc.sparse.patterns: unstructured, block:RxC, nm:N:M[:t]); N:M fixes
    # the density, so the pass solves at 1 - N/M (siftc.passes.patterns; wide solves its widths around it).
    pattern: str = "unstructured"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UsageError(f"unknown kind {self.kind!r}; choose one of: {', '.join(KINDS)}")
        if self.mask_from not in MASKS:
            raise UsageError(f"unknown mask source {self.mask_from!r}; choose one of: {', '.join(MASKS)}")
        if self.distribution not in DISTRIBUTIONS:
            raise UsageError(f"unknown distribution {self.distribution!r}; choose one of: {', '.join(DISTRIBUTIONS)}")
        if self.kind != "sparse" and (self.mask_from, self.distribution) != ("magnitude", "uniform"):
            raise UsageError(f"--mask-from and --distribution choose the masks of --kind sparse; {self.kind} draws "
                             f"random masks (pick a distribution at siftc train --distribution)")
        if self.mask_from == "zeros" and self.distribution != "uniform":
            raise UsageError("--mask-from zeros keeps each layer's own non-zeros; drop --distribution")
        zeros = self.kind == "sparse" and self.mask_from == "zeros"
        if self.sparsity is None and not zeros:
            raise UsageError("a sparsity is required (e.g. --sparsity 0.9); only --kind sparse --mask-from zeros "
                             "takes it from the weights")
        if self.sparsity is not None and (not isinstance(self.sparsity, (int, float)) or not 0 <= self.sparsity < 1):
            raise UsageError(f"sparsity {self.sparsity!r} is outside [0, 1); pass e.g. --sparsity 0.9")
        if self.branch_act not in BRANCH_ACTS:
            raise UsageError(f"unknown branch activation {self.branch_act!r}; choose one of: {', '.join(BRANCH_ACTS)}")
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1:
            raise UsageError(f"round-to {self.round_to!r} must be a positive integer, e.g. --round-to 8")
        if self.keep_dense is not None:
            object.__setattr__(self, "keep_dense", tuple(self.keep_dense))
        object.__setattr__(self, "leaf", tuple(self.leaf))
        pattern = Pattern.parse(self.pattern)
        object.__setattr__(self, "pattern", str(pattern))  # one spelling per pattern

    def to_json(self) -> dict:
        return {"kind": self.kind, "sparsity": self.sparsity, "keep_dense": self.keep_dense,
                "branch_act": self.branch_act, "seed": self.seed, "round_to": self.round_to,
                "strict": self.strict, "widen_heads": self.widen_heads, "leaf": list(self.leaf),
                "mask_from": self.mask_from, "distribution": self.distribution, "pattern": self.pattern}

    @classmethod
    def from_json(cls, d: dict) -> "ConvertConfig":
        d = dict(d)
        if d.get("keep_dense") is not None:
            d["keep_dense"] = tuple(d["keep_dense"])
        return cls(**d)
