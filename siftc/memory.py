"""Will a conversion fit in memory? What its new layers will hold, estimated from the solved shapes and
checked against the memory available before any of them is built, so a conversion too large for the
machine is one line with the numbers, not an OOM kill with no output.

    >>> check_fits(gm, ConvertConfig("wide", 0.9999))  # siftc.convert calls it before the pass
    UsageError: wide at sparsity 0.9999 needs about 1.2 TiB of memory for its new layers (the largest
    layer: 2), more than the 22.5 GiB available (MemAvailable in /proc/meminfo; SIFTC_MEMORY_LIMIT
    overrides it); lower --sparsity (narrower widths), or convert a smaller model

Counted per transformed layer (bytes per element of the dense weight's dtype, 4 for fp32):
    a sparse part   nnz values + nnz int32 positions (4 B) + its bias
    a dense part    its weights: doped's U and V, a layer wide keeps dense but widens
    building a part drawing its positions: a bool mask of its dense-shaped numel (1 B an entry) and
                    the int64 indices of its non-zeros (8 B each), or for a large, very sparse part
                    (siftc.nn.sparse.BIG_MASK) the draws alone (48 B a non-zero, measured); parts are
                    built one at a time, so only the largest counts
Layers left as they are cost nothing new: the converted model shares them with the copy it converts.

Sparse Wide's widths come from its group analysis, inside the pass. Before it, a sparse layer is counted
at its dense budget of non-zeros (wide never gives it more) and a mask k^2 times its dense size (both
sides widened), a dense one at k times its weights (one side widened: the stem and the head keep the
model's input and output widths). Wide then runs the widened graph once to check its shapes, with every
sparse layer giving zeros of its output's shape (siftc.nn.sparse.shapes_only), so no dense weight is
built.

SIFTC_MEMORY_LIMIT (bytes, or a number with K, M, G or T: binary units) replaces the available memory:
to leave room for other work, or to test the refusal.
"""
import math
import os
import re
from typing import NamedTuple

from siftc import solve
from siftc.errors import UsageError
from siftc.layers import fan_in_out, layer_type
from siftc.nn.sparse import drawing_bytes
from siftc.passes.select import choose

ENV = "SIFTC_MEMORY_LIMIT"
MEMINFO = "/proc/meminfo"
POSITION_BYTES = 4  # int32 flat positions
UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
FIX = {"parallel": "lower --sparsity (fewer branches)", "wide": "lower --sparsity (narrower widths)"}


class Estimate(NamedTuple):
    held: int      # bytes the conversion's new layers hold
    building: int  # bytes more while the largest part is built (or, for wide, shape-checked)
    largest: str   # the layer that needs the most

    @property
    def total(self) -> int:
        return self.held + self.building


def check_fits(gm, cfg) -> None:
    """Refuse, in one UsageError line, a conversion of `gm` by `cfg` whose new layers would need more
    memory than is available. Without a way to know the available memory, it lets the conversion run."""
    avail = available()
    if avail is None:
        return
    limit, source = avail
    need = estimate(gm, cfg)
    if need.total > limit:
        raise UsageError(f"{cfg.kind} at sparsity {cfg.sparsity:g} needs about {_size(need.total)} of memory "
                         f"for its new layers (the largest layer: {need.largest}), more than the "
                         f"{_size(limit)} available ({source}); {FIX.get(cfg.kind, 'lower --sparsity')}, or "
                         f"convert a smaller model")


def estimate(gm, cfg) -> Estimate:
    """What converting `gm` by `cfg` will take, before the pass runs (see the module's docstring)."""
    held, building, largest = 0, 0, (-1, "")
    for c in choose(gm, cfg.keep_dense, cfg.strict):
        h, b = _layer(cfg.kind, c.module, cfg.sparsity, c.transform)
        held, building, largest = held + h, max(building, b), max(largest, (h + b, c.name))
    return Estimate(held, building, largest[1])


def _layer(kind: str, m, sparsity: float, transform: bool) -> tuple[int, int]:
    """(bytes the layer that replaces `m` holds, bytes needed while its largest sparse part is built)."""
    item = next(m.parameters()).element_size()
    k2 = solve.wide_k(sparsity or 0) ** 2
    if not transform:  # left as is (shared), or kept dense and widened by wide
        return (round(math.sqrt(k2) * layer_type(m).weight_count(m)) * item if kind == "wide" else 0), 0
    d_in, d_out = fan_in_out(m)
    bias = d_out * item if getattr(m, "bias", None) is not None else 0
    if kind == "sparse":  # its own shape, (1 - s) of its weights kept (--mask-from zeros: at most all)
        b = d_in * d_out
        nnz = b - round((sparsity or 0) * b)
        return nnz * (item + POSITION_BYTES) + bias, drawing_bytes(b, nnz)
    if kind == "wide":
        b = d_in * d_out  # its non-zeros, at most
        numel = round(k2 * b)  # its widened weight's entries, which its positions are drawn from
        held = b * (item + POSITION_BYTES) + round(math.sqrt(k2) * bias)
        return held, drawing_bytes(numel, b)
    shape = solve.SOLVERS[kind](d_in, d_out, sparsity)
    held = sum(shape.nnz) * (item + POSITION_BYTES) + shape.dense_weights * item + len(shape.nnz) * bias
    return held, max(drawing_bytes(c, n) for c, n in zip(shape.capacity, shape.nnz))


def available() -> tuple[int, str] | None:
    """(bytes of memory available, where that number comes from), or None where it cannot be known."""
    text = os.environ.get(ENV, "").strip()
    if text:
        match = re.fullmatch(r"(\d+(?:\.\d*)?)\s*([KMGT]?)(?:i?B)?", text, re.IGNORECASE)
        if not match:
            raise UsageError(f"{ENV}={text!r} is not an amount of memory; give bytes or a number with K, M, "
                             f"G or T, e.g. {ENV}=8G, or unset it")
        return int(float(match[1]) * UNITS[match[2].upper()]), f"{ENV}={text}"
    try:
        with open(MEMINFO) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, f"MemAvailable in {MEMINFO}; {ENV} overrides it"
    except (OSError, ValueError, IndexError):  # not Linux, or a kernel before 3.14: no check
        pass
    return None


def _size(n: int) -> str:
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        scale = UNITS[unit[0]]
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
