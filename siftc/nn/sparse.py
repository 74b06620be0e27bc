"""Sparse Linear, Conv2d and Conv1d: the only layers whose weights siftc masks.

A layer holds only its non-zeros: a `values` Parameter of length nnz and a `positions` buffer (int32,
their flat row-major indices into the dense weight, ascending), plus its bias. Optimizers, checkpoints
and DDP therefore see nnz-sized tensors, whatever the widened shape. The dense `weight` (exact zeros
outside the mask) and the boolean `mask` are derived on demand, for export, inspection and the
masked-dense reference backend; `weight` is differentiable with respect to `values`. The arithmetic is
delegated to a runtime backend (`siftc.runtime.BACKENDS[layer.backend]`): `siftc.runtime.DEFAULT`
("auto": per layer the faster of the native kernels and masked dense, timed on its first call) unless
`set_backend` chose another ("torch", masked dense, is the reference).

Positions change only through `set_mask` / `set_positions`, which bump `mask_version` so a backend that
caches index structures (CSR, per-layer timings) knows to rebuild them. A state dict holding a dense
`weight` (an artifact or checkpoint of the dense-shaped format, or a dense layer's weights) loads too: it
is packed at its `mask` if it has one, else at the layer's positions.

A layer may carry a sparsity pattern, `layer.pattern` (a siftc.sparse.patterns.Pattern; None is
unstructured), which siftc.sparse.impose_pattern sets and the schedulers keep: `set_positions` refuses
positions without its structure, and the state dict holds it (`<name>.pattern`, five numbers) so
artifacts and checkpoints load it back; a state dict that brings its own positions and no pattern (an
older file) makes the layer unstructured.
"""
import math
from contextlib import contextmanager

import torch
from torch import nn

from siftc.errors import UsageError
from siftc.runtime import DEFAULT, get_backend


def random_mask(shape, nnz: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A boolean mask of `shape` with exactly `nnz` True entries at uniformly random positions."""
    numel = math.prod(shape)
    if not 0 <= nnz <= numel:
        raise ValueError(f"nnz={nnz} must be in [0, {numel}] for a weight of shape {tuple(shape)}")
    return _random_subset(numel, nnz, generator).view(shape)


def _random_subset(n: int, k: int, generator) -> torch.Tensor:
    """(n,) bool, exactly k True, every k-subset equally likely.

    A permutation of n costs ~30 ns an element, and a parallel or wide model at 90% sparsity masks 10x
    the dense weights. Instead, one bulk round of draws with replacement marks a set a few standard
    deviations short of k (uniform given its size: every step treats all positions alike), then
    `_flip` marks the rest exactly (or, rarely, unmarks a surplus)."""
    if 2 * k > n:
        return ~_random_subset(n, n - k, generator)
    flat = torch.zeros(n, dtype=torch.bool)
    marked = 0
    if k > 1024:
        want = k - 4 * math.isqrt(k)
        draws = math.ceil(-n * math.log1p(-want / n))  # expected distinct positions: want
        flat[torch.randint(n, (draws,), generator=generator)] = True
        marked = int(flat.count_nonzero())
    _flip(flat, abs(k - marked), marked < k, marked, generator)
    return flat


def _flip(flat: torch.Tensor, count: int, value: bool, marked: int, generator):
    """Set `count` uniformly random positions of `flat` that are not `value` to `value`: the first
    distinct ones in a stream of uniform draws, skipping those that already are."""
    n = flat.numel()
    pool = n - marked if value else marked  # positions that can flip
    while count > 0:
        draws = torch.randint(n, ((count + 16) * n // pool + 1,), generator=generator)
        draws = _first_distinct(draws[flat[draws] != value])[:count]
        flat[draws] = value
        count -= draws.numel()
        pool -= draws.numel()


def _first_distinct(x: torch.Tensor) -> torch.Tensor:
    """The distinct values of `x` in the order they first occur."""
    values, inverse = torch.unique(x, return_inverse=True)
    first = torch.full_like(values, x.numel()).scatter_reduce_(0, inverse, torch.arange(x.numel()), "amin")
    return values[first.argsort()]


def random_positions(shape, nnz: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(nnz,) int32: `nnz` distinct flat positions of a weight of `shape`, ascending, uniformly random."""
    numel = math.prod(shape)
    if numel >= 1 << 31:
        raise UsageError(f"a sparse layer of shape {'x'.join(map(str, shape))} has {numel:,} dense entries, more "
                         f"than its int32 positions can address (2^31); lower the sparsity (narrower or fewer "
                         f"parts) or keep that layer dense (--keep-dense)")
    if not 0 <= nnz <= numel:
        raise ValueError(f"nnz={nnz} must be in [0, {numel}] for a weight of shape {tuple(shape)}")
    if _without_mask(numel, nnz):  # draw the positions themselves, not a numel-byte mask
        return _draw_distinct(numel, nnz, generator).to(torch.int32)
    return _random_subset(numel, nnz, generator).nonzero().squeeze(1).to(torch.int32)


BIG_MASK = 1 << 28
"""Entries above which a sparse layer's positions are drawn without a dense boolean mask: the mask is
faster (1.8 s against 2.5 s for 9M of 900M positions) but takes a byte per dense entry."""
INDEX_BYTES = 8  # int64 indices of a mask's non-zeros, before they are packed to int32
DRAW_BYTES = 48  # peak per non-zero of positions drawn without a mask (int64 draws, cat, unique; measured)


def _without_mask(numel: int, nnz: int) -> bool:
    return numel > BIG_MASK and 8 * nnz < numel


def drawing_bytes(numel: int, nnz: int) -> int:
    """Peak bytes `random_positions` takes to draw `nnz` of `numel` positions (for memory estimates)."""
    return DRAW_BYTES * nnz if _without_mask(numel, nnz) else numel + INDEX_BYTES * nnz


def _draw_distinct(n: int, k: int, generator) -> torch.Tensor:
    """(k,) int64, ascending: a uniformly random k-subset of [0, n). Draws with replacement until k are
    distinct, then drops a uniformly random surplus; every step treats all positions alike, so the set
    is uniform. O(k log k) work and memory."""
    chosen = torch.empty(0, dtype=torch.long)
    while chosen.numel() < k:
        need = k - chosen.numel()
        chosen = torch.unique(torch.cat([chosen, torch.randint(n, (need + need // 64 + 16,), generator=generator)]))
    return chosen[torch.randperm(chosen.numel(), generator=generator)[:k].sort().values]


class _SparseMixin:
    backend: str = DEFAULT
    pattern = None  # a siftc.sparse.patterns.Pattern when structured (module docstring)

    def _init_sparse(self, nnz: int | None, generator: torch.Generator | None):
        """After the base __init__ ran on the meta device: drop its dense weight, hold values + positions."""
        self.weight_shape = tuple(self._parameters.pop("weight").shape)
        numel = math.prod(self.weight_shape)
        nnz = numel if nnz is None else nnz
        self.register_buffer("positions", random_positions(self.weight_shape, nnz, generator))
        self.values = nn.Parameter(torch.empty(nnz))
        if self.bias is not None:
            self.bias = nn.Parameter(torch.empty(self.bias.shape))
        self.mask_version = 0
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """nn.Linear's and nn.Conv2d's own init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias
        (kaiming_uniform_ with a=sqrt(5)), drawn only for the non-zeros: at 90% sparsity a tenth of the
        random numbers. The base __init__ calls this before the values exist; `_init_sparse` again."""
        if "values" not in self._parameters:
            return
        fan_in = math.prod(self.weight_shape[1:])
        bound = 1 / math.sqrt(fan_in) if fan_in else 0.0
        self.values.uniform_(-bound, bound)
        if self.bias is not None:
            self.bias.uniform_(-bound, bound)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight, zero outside the mask, materialised now (differentiable in `values`)."""
        flat = self.values.new_zeros(math.prod(self.weight_shape))
        return flat.index_put((self.positions.long(),), self.values).view(self.weight_shape)

    @property
    def mask(self) -> torch.Tensor:
        """The dense boolean mask, materialised now."""
        flat = torch.zeros(math.prod(self.weight_shape), dtype=torch.bool, device=self.positions.device)
        flat[self.positions.long()] = True
        return flat.view(self.weight_shape)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def density(self) -> float:
        numel = math.prod(self.weight_shape)
        return self.nnz / numel if numel else 0.0

    @torch.no_grad()
    def set_weight(self, dense: torch.Tensor):
        """Take `dense`'s entries at the current positions as the values (the rest of it is ignored).
        `layer.weight` is a fresh tensor each time: writing into it changes nothing, this does."""
        if tuple(dense.shape) != self.weight_shape:
            raise ValueError(f"weight shape {tuple(dense.shape)} != {self.weight_shape}")
        self.values.copy_(dense.reshape(-1)[self.positions.long()])

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Move the non-zeros to `mask`'s True entries; see `set_positions` for what it returns."""
        if tuple(mask.shape) != self.weight_shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {self.weight_shape}")
        return self.set_positions(mask.reshape(-1).nonzero().squeeze(1))

    @torch.no_grad()
    def set_positions(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Make `positions` (flat, ascending, distinct) the non-zeros. A position that was a non-zero
        keeps its value, a new one starts at exactly zero. Returns (src, kept): new entry i was old entry
        src[i] if kept[i], which is how per-parameter state (optimizer moments) follows the values.
        With an unchanged count, `values` and `positions` are updated in place (an optimizer holding
        `values` stays valid). A structured layer takes only positions with its `pattern`'s structure
        (ValueError otherwise; set `layer.pattern = None` first to make it unstructured)."""
        new = positions.to(device=self.positions.device, dtype=torch.long)
        wrong = self._structure_error(new)
        if wrong:
            raise ValueError(f"{type(self).__name__} {self.weight_shape} with pattern {self.pattern}: the new "
                             f"positions do not have it: {wrong}")
        src, kept = match_positions(self.positions.long(), new)
        values = torch.where(kept, self.values[src], 0) if self.nnz else self.values.new_zeros(new.numel())
        if new.numel() == self.nnz:
            self.positions.copy_(new)
            self.values.copy_(values)
        else:
            self.positions = new.to(torch.int32)
            self._parameters["values"] = nn.Parameter(values, requires_grad=self.values.requires_grad)
        self.mask_version += 1
        return src, kept

    def _structure_error(self, positions: torch.Tensor) -> str | None:
        """What keeps `positions` from having this layer's pattern, in a line; None if they have it."""
        if self.pattern is None or not self.pattern.structured:
            return None
        from siftc.sparse.patterns import check_structure  # siftc.sparse imports this module
        return check_structure(positions, self.weight_shape, self.pattern)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight_shape"] = torch.tensor(self.weight_shape, dtype=torch.int64)
        destination[prefix + PATTERN_KEY] = _pattern_data(self.pattern)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        shape = state_dict.pop(prefix + "weight_shape", None)
        if shape is not None and tuple(shape.tolist()) != self.weight_shape:
            error_msgs.append(f"size mismatch for {prefix}weight: the checkpoint's dense shape is "
                              f"{tuple(shape.tolist())}, this layer's {self.weight_shape}")
            return
        try:
            pattern = _pattern_of(state_dict.pop(prefix + PATTERN_KEY, None), self.pattern,
                                  prefix + "positions" in state_dict or prefix + "mask" in state_dict)
        except UsageError as e:
            error_msgs.append(f"{prefix}{PATTERN_KEY}: {e}")
            return
        dense = state_dict.pop(prefix + "weight", None)
        mask = state_dict.pop(prefix + "mask", None)
        if dense is not None and prefix + "values" not in state_dict:  # dense-shaped: pack it
            pos = mask.reshape(-1).nonzero().squeeze(1) if mask is not None else self.positions.long()
            state_dict[prefix + "values"] = dense.reshape(-1)[pos]
            state_dict[prefix + "positions"] = pos.to(torch.int32)
        values = state_dict.get(prefix + "values")
        if values is not None and values.shape != self.values.shape:  # another count: take it
            self._parameters["values"] = nn.Parameter(self.values.new_empty(values.shape),
                                                      requires_grad=self.values.requires_grad)
            self.positions = self.positions.new_empty(values.shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self.pattern = pattern
        wrong = self._structure_error(self.positions)
        if wrong:
            error_msgs.append(f"{prefix}positions do not have the layer's pattern {pattern}: {wrong}")
        self.mask_version += 1  # loaded positions are a new mask for any cached index structure

    def extra_repr(self):
        pattern = f", pattern={self.pattern}" if self.pattern is not None and self.pattern.structured else ""
        return f"{super().extra_repr()}, density={self.density:.4f}{pattern}, backend={self.backend}"

    @torch.no_grad()
    def to_dense(self) -> nn.Module:
        """The plain layer (nn.Linear, nn.Conv1d, nn.Conv2d) with the mask folded in (exact zeros), for
        export; a structured layer's twin keeps its `pattern` as an attribute, for the export's structure
        check."""
        out = self._dense_twin().to(self.values.dtype)
        if self.pattern is not None and self.pattern.structured:
            out.pattern = self.pattern
        out.weight.copy_(self.weight)
        if self.bias is not None:
            out.bias.copy_(self.bias)
        return out


PATTERN_KEY = "pattern"  # a layer's pattern in its state dict: (rows, cols, n, m, transposable) int64


def _pattern_data(pattern) -> torch.Tensor:
    """(5,) int64: a pattern as plain numbers, the same shape for every pattern (the artifact's graph
    data rebuilds a layer and compares its state's keys and shapes); unstructured is (1, 1, 0, 0, 0)."""
    p = (pattern.rows, pattern.cols, pattern.n, pattern.m, pattern.transposable) if pattern else (1, 1, 0, 0, 0)
    return torch.tensor(p, dtype=torch.int64)


def _pattern_of(stored: torch.Tensor | None, current, own_positions: bool):
    """The pattern a layer has after loading a state dict: the stored one (None when unstructured),
    else none if the state dict brings its own positions (a format without patterns), else `current`."""
    if stored is None:
        return None if own_positions else current
    from siftc.sparse.patterns import Pattern  # siftc.sparse imports this module
    if stored.dtype != torch.int64 or tuple(stored.shape) != (5,):
        raise UsageError(f"a stored sparsity pattern is 5 int64 numbers, not {stored.dtype} of shape "
                         f"{tuple(stored.shape)}; the file is corrupt")
    rows, cols, n, m, t = stored.tolist()
    pattern = Pattern.nm(n, m, bool(t)) if n else Pattern.block(rows, cols)
    return pattern if pattern.structured else None


def match_positions(old: torch.Tensor, new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For ascending flat positions `old` and `new`: (src, kept) with new[i] == old[src[i]] where
    kept[i]; src is in range everywhere (0 where not kept)."""
    if old.numel() == 0:
        return torch.zeros_like(new), torch.zeros(new.shape, dtype=torch.bool, device=new.device)
    src = torch.searchsorted(old, new).clamp_(max=old.numel() - 1)
    kept = old[src] == new
    return src.masked_fill_(~kept, 0), kept


class SparseLinear(_SparseMixin, nn.Linear):
    """nn.Linear with a fixed-count random mask; `nnz` non-zeros (default: all)."""

    def __init__(self, in_features, out_features, bias=True, nnz=None, generator=None):
        super().__init__(in_features, out_features, bias=bias, device="meta")
        self._init_sparse(nnz, generator)

    def forward(self, x):  # (*, in) -> (*, out)
        return get_backend(self.backend).linear(self, x)

    def _dense_twin(self):
        return nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)


class _SparseConv(_SparseMixin):
    """A conv (groups=1) with a fixed-count random mask; `nnz` non-zeros (default: all)."""
    dense_cls: type  # the nn.ConvNd it masks

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 bias=True, nnz=None, generator=None):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=1, bias=bias, device="meta")
        self._init_sparse(nnz, generator)

    def _dense_twin(self):
        return self.dense_cls(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                              padding=self.padding, dilation=self.dilation, bias=self.bias is not None,
                              padding_mode=self.padding_mode)


class SparseConv2d(_SparseConv, nn.Conv2d):
    """nn.Conv2d (groups=1) with a fixed-count random mask; `nnz` non-zeros (default: all)."""
    dense_cls = nn.Conv2d

    def forward(self, x):  # (B, Cin, H, W) -> (B, Cout, H', W')
        return get_backend(self.backend).conv2d(self, x)


class SparseConv1d(_SparseConv, nn.Conv1d):
    """nn.Conv1d (groups=1) with a fixed-count random mask. Its weight is (Cout, Cin, k), as nn.Conv1d's;
    the native backend runs it on the 2-D kernels as a (1, k) kernel over (B, Cin, 1, L)."""
    dense_cls = nn.Conv1d

    def forward(self, x):  # (B, Cin, L) -> (B, Cout, L')
        return get_backend(self.backend).conv1d(self, x)


SPARSE_LAYERS = (SparseLinear, SparseConv2d, SparseConv1d)


@contextmanager
def shapes_only(model: nn.Module):
    """Inside, every sparse layer of `model` returns zeros of its output's shape and computes nothing
    (siftc.runtime.shapes): to check a rewritten graph's shapes without building dense-shaped weights."""
    layers = [m for m in model.modules() if isinstance(m, SPARSE_LAYERS)]
    saved = [m.backend for m in layers]
    for m in layers:
        m.backend = "shapes"
    try:
        yield model
    finally:
        for m, name in zip(layers, saved):
            m.backend = name


def set_backend(model: nn.Module, name: str) -> nn.Module:
    """Run every sparse layer of `model` on backend `name` (a `siftc.runtime.BACKENDS` key). Returns it."""
    get_backend(name)
    for m in model.modules():
        if isinstance(m, SPARSE_LAYERS):
            m.backend = name
    return model
