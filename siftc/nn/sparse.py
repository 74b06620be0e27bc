"""Sparse Linear, Conv2d and Conv1d: the only layers whose weights siftc masks.

A layer holds a dense `weight` Parameter and a boolean `mask` buffer of the same shape. Weights outside
the mask are exactly zero and get no gradient, whatever the backend. The arithmetic is delegated to a
runtime backend (`siftc.runtime.BACKENDS[layer.backend]`, chosen with `set_backend`): "torch" is masked
dense, the reference.

Masks change only through `set_mask`, which bumps `mask_version` so a backend that caches index
structures (CSR, per-layer timings) knows to rebuild them.
"""
import math

import torch
from torch import nn

from siftc.runtime import get_backend


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


class _SparseMixin:
    backend: str = "torch"

    def _init_mask(self, nnz: int | None, generator: torch.Generator | None):
        nnz = self.weight.numel() if nnz is None else nnz
        self.register_buffer("mask", random_mask(self.weight.shape, nnz, generator))
        self.mask_version = 0
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """nn.Linear's and nn.Conv2d's own init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias
        (kaiming_uniform_ with a=sqrt(5)), drawn only where the mask is on: at 90% sparsity a tenth of
        the random numbers. The base __init__ calls this before the mask exists; `_init_mask` again."""
        if "mask" not in self._buffers:
            return
        fan_in = self.weight[0].numel()
        bound = 1 / math.sqrt(fan_in) if fan_in else 0.0
        self.weight.zero_()
        self.weight.masked_scatter_(self.mask, torch.empty(self.nnz).uniform_(-bound, bound))
        if self.bias is not None:
            self.bias.uniform_(-bound, bound)

    @property
    def nnz(self) -> int:
        return int(self.mask.count_nonzero())

    @property
    def density(self) -> float:
        return self.nnz / self.mask.numel()

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor):
        """Replace the mask; weights outside it become exactly zero."""
        if mask.shape != self.weight.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(self.weight.shape)}")
        self.mask.copy_(mask.to(torch.bool))
        self.weight.mul_(self.mask)
        self.mask_version += 1

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.mask_version += 1  # a loaded mask is a new mask for any cached index structure

    def extra_repr(self):
        return f"{super().extra_repr()}, density={self.density:.4f}, backend={self.backend}"

    @torch.no_grad()
    def to_dense(self) -> nn.Module:
        """The plain layer (nn.Linear, nn.Conv1d, nn.Conv2d) with the mask folded in (exact zeros), for
        export."""
        out = self._dense_twin()
        out.weight.copy_(self.weight * self.mask)
        if self.bias is not None:
            out.bias.copy_(self.bias)
        return out


class SparseLinear(_SparseMixin, nn.Linear):
    """nn.Linear with a fixed-count random mask; `nnz` non-zeros (default: all)."""

    def __init__(self, in_features, out_features, bias=True, nnz=None, generator=None):
        super().__init__(in_features, out_features, bias=bias)
        self._init_mask(nnz, generator)

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
                         dilation=dilation, groups=1, bias=bias)
        self._init_mask(nnz, generator)

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


def set_backend(model: nn.Module, name: str) -> nn.Module:
    """Run every sparse layer of `model` on backend `name` (a `siftc.runtime.BACKENDS` key). Returns it."""
    get_backend(name)
    for m in model.modules():
        if isinstance(m, SPARSE_LAYERS):
            m.backend = name
    return model
