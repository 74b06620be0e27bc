"""The "native" backend: SparseLinear / SparseConv2d on siftc's C++ kernels (SparseProp's algorithm).

Forward, input gradient and weight gradient touch only the mask's non-zeros (see csrc/sparse_ops.cpp).
Per layer this backend caches the index built from the mask, keyed on `layer.mask_version`: a mask
change (SET/RigL, `set_mask`, a state-dict load) triggers one rebuild, an O(numel) scan of the mask and
an O(nnz) fill. The index stores positions, not values, so optimizer steps need no rebuild, and a weight
regrown at exactly zero is in the index and gets its gradient.

Inputs the kernels do not take (not on CPU, not float32/float64, autocast, groups != 1, non-zero
padding modes) run on the masked-dense reference instead, so a model never fails because of its backend.

Costs that stay dense because the layer's contract is a dense `weight` Parameter: the weight gradient is
a dense tensor (zeros plus the non-zeros, written row by row), and each pass gathers the non-zero values
out of the dense weight. For wide layers these are O(numel) memory passes. A fresh weight-sized gradient
buffer is also page-faulted in on every backward: THP_MEM_ALLOC_ENABLE=1 (PyTorch's huge-page allocation)
makes that several times cheaper, and letting glibc keep freed memory (MALLOC_MMAP_THRESHOLD_ and
MALLOC_TRIM_THRESHOLD_ set high, or mallopt) removes it; benchmarks/runtime.py does both, for all columns.
"""
import math
import weakref

import torch

from siftc.runtime import build
from siftc.runtime.masked import MaskedDense

L2_BYTES = 512 * 1024
"""Input bytes one column panel may touch: half of a core's L2 here (1 MiB), leaving room for the rest."""
SCRATCH_BYTES = 256 * 1024
"""Per-thread weight-gradient partial sums (one 64-byte vector per non-zero) kept per panel."""
VECTOR_FLOATS = 256
"""Batch elements one tile holds in registers (16 AVX-512 vectors): the batch slice a panel touches."""


def _pow2_floor(n: int) -> int:
    return 1 << max(0, int(n).bit_length() - 1)


def supported(layer, x) -> bool:
    """True if the kernels take this call; otherwise the backend falls back to masked dense."""
    w = layer.weight
    return (x.device.type == "cpu" and w.device.type == "cpu" and x.dtype == w.dtype
            and x.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled("cpu")
            and x.numel() > 0)


class Native:
    """Backend object: `.linear(layer, x)` and `.conv2d(layer, x)`; builds the kernels on first call."""

    name = "native"

    def __init__(self):
        self._index = weakref.WeakKeyDictionary()  # layer -> {"version": int, (panel, transpose): tensors}
        self._fallback = MaskedDense()

    def index(self, layer, panel: int, transpose: bool):
        """(ptr, code, widx) for `layer`'s current mask, built once per mask version and panel width."""
        entry = self._index.get(layer)
        if entry is None or entry["version"] != layer.mask_version:
            entry = {"version": layer.mask_version}
            self._index[layer] = entry
        key = (panel, transpose)
        if key not in entry:
            kk = math.prod(layer.weight.shape[2:]) if layer.weight.dim() == 4 else 1
            with torch.no_grad():
                entry[key] = torch.ops.siftc.build_index(layer.mask.detach(), kk, panel, transpose)
        return entry[key]

    def _indexes(self, layer, group_bytes_fwd: int, group_bytes_t: int, multi_tile: bool):
        """The forward, grad-input and grad-weight indexes, each with column panels sized for its use."""
        p = max(1, L2_BYTES // group_bytes_fwd)
        pw = p
        if multi_tile:  # the weight gradient keeps one vector per non-zero of a thread's rows in a panel
            groups = layer.weight.shape[1]
            per_group = max(1, layer.nnz // groups // max(1, torch.get_num_threads()))
            pw = min(p, max(1, SCRATCH_BYTES // (per_group * 64)))
        pt = max(1, L2_BYTES // group_bytes_t)
        p, pw, pt = _pow2_floor(p), _pow2_floor(pw), _pow2_floor(pt)
        return self.index(layer, p, False) + self.index(layer, pt, True) + self.index(layer, pw, False)

    def linear(self, layer, x):  # (*, in) -> (*, out)
        if not supported(layer, x):
            return self._fallback.linear(layer, x)
        build.load()
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        bp = -(-x2.shape[0] // 16) * 16
        chunk = min(bp, VECTOR_FLOATS) * x.element_size()
        index = self._indexes(layer, chunk, chunk, bp > VECTOR_FLOATS)
        y = torch.ops.siftc.sparse_linear(x2, layer.weight, layer.bias, *index)  # (N, out)
        return y.view(*x.shape[:-1], layer.out_features)

    def conv2d(self, layer, x):  # (B, Cin, H, W) -> (B, Cout, H', W')
        if not supported(layer, x) or layer.padding_mode != "zeros" or isinstance(layer.padding, str) \
                or layer.groups != 1 or x.dim() != 4:
            return self._fallback.conv2d(layer, x)
        build.load()
        b, _, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = layer.kernel_size, layer.stride, layer.padding, layer.dilation
        chunk = min(-(-b // 16) * 16, VECTOR_FLOATS) * x.element_size()
        ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        fwd_bytes = ((kh - 1) * dh + 1) * (w + 2 * pw) * chunk
        t_bytes = ((kh - 1) * dh + 1) * ((wo - 1) * sw + 1 + 2 * (kw - 1) * dw) * chunk
        index = self._indexes(layer, fwd_bytes, t_bytes, ho * wo > 1 or b > VECTOR_FLOATS)
        return torch.ops.siftc.sparse_conv2d(x, layer.weight, layer.bias, list(layer.stride), list(layer.padding),
                                             list(layer.dilation), *index)
