"""Sparsity patterns: what shape a layer's non-zeros may take, and whether given positions have it.

    unstructured   any positions (today's default)
    block:RxC      whole R x C blocks: R output rows x C inputs (for a conv: R output channels x C
                   input channels at one kernel position), every block all non-zero or all zero
    nm:N:M         exactly N non-zeros in every group of M consecutive inputs of a row (for a conv: M
                   consecutive input channels at one kernel position); density N/M
    nm:N:M:t       transposable N:M (Hubara et al. 2021): every M x M tile of (outputs, inputs) has N
                   non-zeros in each row and in each column, so the transposed weight the input
                   gradient multiplies by is N:M too

Geometry. A layer's weight is seen as (O, I, K): Linear (out, in) has K = 1, Conv2d (out, in, kh, kw)
K = kh*kw, Conv1d (out, in, k) K = k. Flat positions (the layers' `positions`) are row-major indices of
that weight, so position p is o = p // (I*K), i = p // K % I, k = p % K. Every pattern is a *tiling* of
(O, I) at each kernel position into tiles of `Pattern.tile` = (rows, cols): (R, C) for a block, (1, M)
for nm, (M, M) for nm:t; `Tiling` maps positions to (tile, cell) and back. Tiles are numbered
row-major over (O/rows, I/cols, K), cells row-major inside a tile.

    >>> p = Pattern.parse("block:4x1")
    >>> fit(p, (24, 10))                       # 24 rows divide by 4
    Fitted(pattern=Pattern.parse('block:4x1'), reason=None)
    >>> fit(Pattern.parse("block:16x1"), (24, 10)).pattern
    Pattern.parse('block:8x1')
    >>> check_structure(layer.positions, layer.weight_shape, p)   # None, or what is wrong, in a line
"""
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from siftc.errors import UsageError

FORMS = "unstructured, block:RxC (e.g. block:4x1, block:4x4), nm:N:M (e.g. nm:2:4) or nm:N:M:t (e.g. nm:4:8:t)"
KINDS = ("unstructured", "block", "nm")


@dataclass(frozen=True)
class Pattern:
    """A sparsity pattern. Build with `Pattern.parse(text)`, `Pattern.block(r, c)`, `Pattern.nm(n, m)`
    or `Pattern()` (unstructured); `str(p)` gives the CLI text back."""
    kind: str = "unstructured"
    rows: int = 1               # block: R output rows
    cols: int = 1               # block: C inputs
    n: int = 0                  # nm: non-zeros per group
    m: int = 0                  # nm: group size
    transposable: bool = False  # nm: N:M along columns too

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UsageError(f"unknown pattern kind {self.kind!r}; use {FORMS}")
        if self.kind == "block" and not (_positive(self.rows) and _positive(self.cols)):
            raise UsageError(f"block:{self.rows}x{self.cols} needs positive integer sizes, e.g. block:4x1")
        if self.kind == "nm" and not (_positive(self.n) and _positive(self.m) and self.n < self.m):
            raise UsageError(f"nm:{self.n}:{self.m} needs integers 0 < N < M (N:M with N = M is dense), "
                             f"e.g. nm:2:4")
        if self.kind == "block" and self.rows == self.cols == 1:  # one representation per pattern
            object.__setattr__(self, "kind", "unstructured")
        if self.kind != "block":
            object.__setattr__(self, "rows", 1)
            object.__setattr__(self, "cols", 1)
        if self.kind != "nm":
            object.__setattr__(self, "n", 0)
            object.__setattr__(self, "m", 0)
            object.__setattr__(self, "transposable", False)

    @classmethod
    def block(cls, rows: int, cols: int) -> "Pattern":
        return cls("block", rows=rows, cols=cols)

    @classmethod
    def nm(cls, n: int, m: int, transposable: bool = False) -> "Pattern":
        return cls("nm", n=n, m=m, transposable=transposable)

    @classmethod
    def parse(cls, text: str) -> "Pattern":
        """`unstructured`, `block:RxC`, `nm:N:M` or `nm:N:M:t`; anything else is a one-line UsageError."""
        parts = str(text).strip().lower().split(":")
        try:
            if parts == ["unstructured"]:
                return cls()
            if parts[0] == "block" and len(parts) == 2:
                r, c = parts[1].split("x")
                return cls.block(int(r), int(c))
            if parts[0] == "nm" and len(parts) in (3, 4) and parts[3:] in ([], ["t"]):
                return cls.nm(int(parts[1]), int(parts[2]), transposable=len(parts) == 4)
        except ValueError:
            pass
        except UsageError as e:
            raise UsageError(f"sparsity pattern {text!r}: {e}; the forms are {FORMS}") from None
        raise UsageError(f"unknown sparsity pattern {text!r}; use {FORMS}")

    def __str__(self) -> str:
        if self.kind == "block":
            return f"block:{self.rows}x{self.cols}"
        if self.kind == "nm":
            return f"nm:{self.n}:{self.m}" + (":t" if self.transposable else "")
        return "unstructured"

    def __repr__(self) -> str:
        return f"Pattern.parse({str(self)!r})"

    @property
    def structured(self) -> bool:
        return self.kind != "unstructured"

    @property
    def tile(self) -> tuple[int, int]:
        """(rows, cols) of the tiles the pattern constrains (see the module docstring)."""
        if self.kind == "nm":
            return (self.m if self.transposable else 1), self.m
        return self.rows, self.cols

    @property
    def unit(self) -> int:
        """Non-zeros that come and go together: a whole block (1 when unstructured or N:M, whose
        count is fixed by `density` instead)."""
        return self.rows * self.cols

    @property
    def density(self) -> float | None:
        """The density the pattern fixes (N/M), or None when the solver chooses it."""
        return self.n / self.m if self.kind == "nm" else None

    def fixed_nnz(self, shape) -> int | None:
        """The non-zero count the pattern fixes for a weight of `shape` (N:M: numel * N / M), or None."""
        return math.prod(shape) * self.n // self.m if self.kind == "nm" else None


UNSTRUCTURED = Pattern()


def _positive(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def effective_sparsity(pattern: Pattern | None, sparsity: float) -> float:
    """The sparsity a layer with `pattern` will have: 1 - N/M for N:M (whatever was asked, so the width,
    rank or branch count is solved around it), else `sparsity`."""
    density = pattern.density if pattern is not None else None
    return sparsity if density is None else 1 - density


# ---- fitting a pattern to a layer ---------------------------------------------------------------
class Fitted(NamedTuple):
    pattern: Pattern    # what the layer gets
    reason: str | None  # why it is not the asked pattern, for the report (None: as asked)


def oik(shape) -> tuple[int, int, int]:
    """(O, I, K) of a weight shape: (out, in) or (out, in, *kernel)."""
    if len(shape) < 2:
        raise ValueError(f"a weight of shape {tuple(shape)} has no (out, in) dims")
    return shape[0], shape[1], math.prod(shape[2:])


def fits(pattern: Pattern, shape) -> bool:
    o, i, _ = oik(shape)
    rows, cols = pattern.tile
    return o % rows == 0 and i % cols == 0


def fallbacks(pattern: Pattern) -> list[Pattern]:
    """The documented fallback chain, best first, ending with unstructured:

    block:RxC  every sub-block block:rxc with r | R and c | C, larger area first and, at equal area,
               more rows first (rows sharing an input are what a kernel reuses a loaded operand for);
    nm:N:M:t   nm:(N/g):(M/g):t for each g dividing gcd(N, M), smallest g first (same density, smaller
               tiles), then the same chain without :t;
    nm:N:M     nm:(N/g):(M/g), smallest g first."""
    if pattern.kind == "block":
        subs = [(r, c) for r in _divisors(pattern.rows) for c in _divisors(pattern.cols)]
        subs.sort(key=lambda rc: (-rc[0] * rc[1], -rc[0]))
        return [Pattern.block(r, c) for r, c in subs]
    if pattern.kind == "nm":
        gs = _divisors(math.gcd(pattern.n, pattern.m))[::-1]  # ascending
        kinds = (True, False) if pattern.transposable else (False,)
        return [Pattern.nm(pattern.n // g, pattern.m // g, t) for t in kinds for g in gs] + [UNSTRUCTURED]
    return [UNSTRUCTURED]


def _divisors(n: int) -> list[int]:
    """Divisors of n, largest first."""
    return [d for d in range(n, 0, -1) if n % d == 0]


def fit(pattern: Pattern | None, shape) -> Fitted:
    """The first pattern of `fallbacks(pattern)` whose tiles divide the layer's (O, I), and why."""
    pattern = pattern or UNSTRUCTURED
    o, i, _ = oik(shape)
    for candidate in fallbacks(pattern):
        if fits(candidate, shape):
            if candidate == pattern:
                return Fitted(pattern, None)
            rows, cols = pattern.tile
            why = " and ".join(f"{name}={size} is not a multiple of {step}"
                               for name, size, step in (("out", o, rows), ("in", i, cols)) if size % step)
            return Fitted(candidate, f"{pattern} does not fit a {'x'.join(map(str, shape))} weight ({why}): "
                                     f"{candidate}")
    raise AssertionError("unreachable: unstructured fits every shape")


# ---- positions <-> tiles -------------------------------------------------------------------------
class Tiling:
    """A weight of `shape` cut into `pattern.tile` tiles at each kernel position (module docstring).

    Dense (numel,) tensors view as (tiles, rows, cols) with `tiles_of`, back with `dense_of`; flat
    positions map to (tile, cell) with `locate`."""

    def __init__(self, shape, pattern: Pattern):
        if not fits(pattern, shape):
            raise ValueError(f"{pattern} does not tile a weight of shape {tuple(shape)}; use fit() first")
        self.shape, self.pattern = tuple(shape), pattern
        self.o, self.i, self.k = oik(shape)
        self.rows, self.cols = pattern.tile
        self.grid = (self.o // self.rows, self.i // self.cols, self.k)
        self.n_tiles = math.prod(self.grid)
        self.numel = self.o * self.i * self.k

    def tiles_of(self, dense: torch.Tensor) -> torch.Tensor:
        """(numel,) or `shape` -> (tiles, rows, cols)."""
        x = dense.reshape(self.grid[0], self.rows, self.grid[1], self.cols, self.k)
        return x.permute(0, 2, 4, 1, 3).reshape(self.n_tiles, self.rows, self.cols)

    def dense_of(self, tiles: torch.Tensor) -> torch.Tensor:
        """(tiles, rows, cols) -> (numel,), the inverse of `tiles_of`."""
        x = tiles.reshape(self.grid[0], self.grid[1], self.k, self.rows, self.cols)
        return x.permute(0, 3, 1, 4, 2).reshape(self.numel)

    def positions_of(self, tiles: torch.Tensor) -> torch.Tensor:
        """(tiles, rows, cols) bool -> the flat positions of its True cells, ascending int32."""
        return self.dense_of(tiles).nonzero().squeeze(1).to(torch.int32)

    def locate(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat positions -> (tile, cell) int64, cell = row_in_tile * cols + col_in_tile."""
        p = positions.long()
        o, i, k = p // (self.i * self.k), p // self.k % self.i, p % self.k
        tile = ((o // self.rows) * self.grid[1] + i // self.cols) * self.k + k
        return tile, (o % self.rows) * self.cols + i % self.cols

    def expand(self, tiles: torch.Tensor) -> torch.Tensor:
        """Tile ids -> the flat positions of all their cells, ascending int32, without a dense mask."""
        t = tiles.long()
        k, rest = t % self.k, t // self.k
        r0, c0 = rest // self.grid[1] * self.rows, rest % self.grid[1] * self.cols
        r = r0[:, None, None] + torch.arange(self.rows)[None, :, None]   # (n, rows, 1)
        c = c0[:, None, None] + torch.arange(self.cols)[None, None, :]   # (n, 1, cols)
        return ((r * self.i + c) * self.k + k[:, None, None]).reshape(-1).sort().values.to(torch.int32)

    def where(self, tile: int) -> str:
        """Tile `tile` in words, for messages."""
        ob, rest = divmod(tile, self.grid[1] * self.k)
        ib, k = divmod(rest, self.k)
        rows = _span("row", ob * self.rows, self.rows)
        cols = _span("input", ib * self.cols, self.cols)
        return f"{rows}, {cols}" + (f" at kernel position {k}" if self.k > 1 else "")


def _span(name: str, start: int, size: int) -> str:
    return f"{name} {start}" if size == 1 else f"{name}s {start}-{start + size - 1}"


# ---- the structure check ------------------------------------------------------------------------
def check_structure(positions: torch.Tensor, shape, pattern: Pattern | None) -> str | None:
    """None when `positions` (flat, of a weight of `shape`) are valid and have `pattern`'s structure;
    else the first thing wrong, in one line (for an error message: ascending, distinct, in range;
    every block full or empty; N per group; N per row and per column of every nm:t tile)."""
    pattern = pattern or UNSTRUCTURED
    p = positions.reshape(-1).long()
    numel = math.prod(shape)
    if p.numel() and (p[0] < 0 or p[-1] >= numel):
        return f"positions must lie in [0, {numel}) for a weight of shape {tuple(shape)}"
    if p.numel() > 1 and not bool((p[1:] > p[:-1]).all()):
        return "positions are not strictly ascending (sorted and distinct)"
    if not pattern.structured:
        return None
    if not fits(pattern, shape):
        return f"{pattern} does not tile a weight of shape {tuple(shape)}"
    tiling = Tiling(shape, pattern)
    tile, cell = tiling.locate(p)
    if pattern.kind == "block":
        count = torch.bincount(tile, minlength=tiling.n_tiles)
        bad = ((count != 0) & (count != pattern.unit)).nonzero()
        if bad.numel():
            t = int(bad[0])
            return (f"{pattern}: the block at {tiling.where(t)} holds {int(count[t])} of its {pattern.unit} "
                    f"non-zeros (a block is all non-zero or all zero)")
        return None
    m, n = pattern.m, pattern.n
    lines = [("row", tile * tiling.rows + cell // m)]  # row r of a tile
    if pattern.transposable:
        lines.append(("column", tile * m + cell % m))
    for name, line in lines:
        count = torch.bincount(line, minlength=tiling.n_tiles * m if pattern.transposable else tiling.n_tiles)
        bad = (count != n).nonzero()
        if bad.numel():
            t, j = divmod(int(bad[0]), m if pattern.transposable else 1)
            which = f"{name} {j} of the tile at {tiling.where(t)}" if pattern.transposable else \
                f"the group at {tiling.where(t)}"
            return f"{pattern}: {which} holds {int(count[bad[0]])} non-zeros, not {n}"
    return None
