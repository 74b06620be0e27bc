"""Sparse Linear and Conv2d: the only layers whose weights siftc masks.

A layer holds a dense `weight` Parameter and a boolean `mask` buffer of the same shape. Weights outside
the mask are exactly zero and get no gradient, whatever the backend. The arithmetic is delegated to a
runtime backend (`siftc.runtime.BACKENDS[layer.backend]`): "torch" is masked dense, the reference.

Masks change only through `set_mask`, which bumps `mask_version` so a backend that caches index
structures (CSR, per-layer timings) knows to rebuild them.
"""
import math

import torch
from torch import nn


def random_mask(shape, nnz: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A boolean mask of `shape` with exactly `nnz` True entries at uniformly random positions."""
    numel = math.prod(shape)
    if not 0 <= nnz <= numel:
        raise ValueError(f"nnz={nnz} must be in [0, {numel}] for a weight of shape {tuple(shape)}")
    flat = torch.zeros(numel, dtype=torch.bool)
    flat[torch.randperm(numel, generator=generator)[:nnz]] = True
    return flat.view(shape)


class _SparseMixin:
    backend: str = "torch"

    def _init_mask(self, nnz: int | None, generator: torch.Generator | None):
        nnz = self.weight.numel() if nnz is None else nnz
        self.register_buffer("mask", random_mask(self.weight.shape, nnz, generator))
        self.mask_version = 0
        with torch.no_grad():
            self.weight.mul_(self.mask)

    @property
    def nnz(self) -> int:
        return int(self.mask.sum())

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


class SparseLinear(_SparseMixin, nn.Linear):
    """nn.Linear with a fixed-count random mask; `nnz` non-zeros (default: all)."""

    def __init__(self, in_features, out_features, bias=True, nnz=None, generator=None):
        super().__init__(in_features, out_features, bias=bias)
        self._init_mask(nnz, generator)

    def forward(self, x):  # (*, in) -> (*, out)
        from siftc.runtime import get_backend
        return get_backend(self.backend).linear(self, x)

    @torch.no_grad()
    def to_dense(self) -> nn.Linear:
        """A plain nn.Linear with the mask folded in (exact zeros), for export."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        out.weight.copy_(self.weight * self.mask)
        if self.bias is not None:
            out.bias.copy_(self.bias)
        return out


class SparseConv2d(_SparseMixin, nn.Conv2d):
    """nn.Conv2d (groups=1) with a fixed-count random mask; `nnz` non-zeros (default: all)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 bias=True, nnz=None, generator=None):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=1, bias=bias)
        self._init_mask(nnz, generator)

    def forward(self, x):  # (B, Cin, H, W) -> (B, Cout, H', W')
        from siftc.runtime import get_backend
        return get_backend(self.backend).conv2d(self, x)

    @torch.no_grad()
    def to_dense(self) -> nn.Conv2d:
        out = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                        padding=self.padding, dilation=self.dilation, bias=self.bias is not None,
                        padding_mode=self.padding_mode)
        out.weight.copy_(self.weight * self.mask)
        if self.bias is not None:
            out.bias.copy_(self.bias)
        return out


SPARSE_LAYERS = (SparseLinear, SparseConv2d)
