"""The "native" backend: SparseLinear / SparseConv2d / SparseConv1d on siftc's C++ kernels (SparseProp's
algorithm; a Conv1d runs as a Conv2d with a (1, k) kernel over a height-1 input).

A layer with a structured `pattern` the block kernels take (block:4x1/8x1/16x1/1x4/4x4, any nm:N:M)
runs on them instead: a Linear on siftc.runtime.block, a Conv2d or Conv1d (as a (1, k) Conv2d) on
siftc.runtime.block_conv. Its `values` are gathered into block order each forward (`to_blocks`, O(nnz)),
so autograd scatters the blocks' gradient back into `values` order and `values.grad` is (nnz,) as on
the unstructured kernels. The block index is cached per mask version like the unstructured one. Other
patterns (block:2x1, block:8x8, ...) run on the unstructured kernels.

The kernels read the layer's `values` (nnz,) where they are and write the weight gradient only at the
non-zeros: `values.grad` comes back (nnz,) from the op, and no weight-shaped tensor is made in a forward
or a backward (see csrc/sparse_ops.cpp). Per layer this backend caches the index built from
`layer.positions`, keyed on `layer.mask_version`: a mask change (SET/RigL, `set_mask`, a state-dict load)
triggers one O(nnz) rebuild. The index stores where each entry's value is in `values`, not the value, so
optimizer steps need no rebuild, and a weight regrown at exactly zero is in the index and gets its gradient.

Inputs the kernels do not take (not on CPU, not float32/float64, autocast, groups != 1, non-zero
padding modes) run on the masked-dense reference instead, so a model never fails because of its backend.

What a step still costs beyond the multiply-adds: the activations are repacked batch-innermost (x and dY
in, y and dX out), and the forward's values are gathered into index order when a layer has more than one
column panel (a wide Linear does; the backward gathers its transposed values the same way). These are
O(nnz) and O(activations) memory passes; nothing is O(dense weight) any more.
"""
import functools
import weakref

import torch

from siftc.runtime import block, block_conv, build
from siftc.runtime._ops import batch_pad
from siftc.runtime.masked import MaskedDense

L2_BYTES = 512 * 1024
"""Input bytes one tile may touch across a column panel: half of a core's L2 here (1 MiB), leaving room
for output tiles and the index. Measured on the ResNet-18 wide layers: 256 KiB to 2 MiB are within ~10%."""
@functools.cache
def register_tile() -> tuple[int, int]:
    """(bytes per vector, accumulator vectors per tile) of the kernels' register tiles as compiled here:
    (64, 16) with AVX-512, (32, 8) on AVX2 (make_tiles in csrc/sparse_ops.cpp). Asked once per process."""
    build.load()
    return tuple(torch.ops.siftc.register_tile())


def _pow2_floor(n: int) -> int:
    return 1 << max(0, int(n).bit_length() - 1)


def supported(layer, x) -> bool:
    """True if the kernels take this call; otherwise the backend falls back to masked dense."""
    w = layer.values
    return (x.device.type == "cpu" and w.device.type == "cpu" and x.dtype == w.dtype
            and x.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled("cpu")
            and x.numel() > 0)


class Native:
    """Backend object: `.linear(layer, x)` and `.conv2d(layer, x)`; builds the kernels on first call."""

    name = "native"

    def __init__(self):
        self._index = weakref.WeakKeyDictionary()  # layer -> {"version": int, (panel, transpose): tensors,
        self._fallback = MaskedDense()             #          "block": BlockIndex}

    def _entry(self, layer) -> dict:
        """The layer's cache for its current mask version (a new, empty one after a mask change)."""
        entry = self._index.get(layer)
        if entry is None or entry["version"] != layer.mask_version:
            entry = {"version": layer.mask_version}
            self._index[layer] = entry
        return entry

    def index(self, layer, panel: int, transpose: bool):
        """(ptr, code, widx) for `layer`'s current positions, built once per mask version and panel width."""
        entry, key = self._entry(layer), (panel, transpose)
        if key not in entry:
            entry[key] = torch.ops.siftc.build_index(layer.positions, list(layer.weight_shape), panel, transpose)
        return entry[key]

    def block_index(self, layer):
        """The block kernels' index for a layer whose pattern they take, once per mask version (a
        block.BlockIndex for a Linear, a block_conv.ConvBlockIndex for a conv, over its (O, I, kh, kw)
        weight; a Conv1d's (O, I, k) is (O, I, 1, k)); None for any other layer (it runs on the
        unstructured kernels)."""
        pattern = getattr(layer, "pattern", None)
        if pattern is None or block.kernel_block(pattern) is None:
            return None
        entry = self._entry(layer)
        if "block" not in entry:
            shape = layer.weight_shape
            entry["block"] = block.index(layer.positions, shape, pattern) if len(shape) == 2 else \
                block_conv.index(layer.positions, (*shape[:2], 1, shape[2]) if len(shape) == 3 else shape, pattern)
        return entry["block"]

    def indexes(self, layer, panel: int, tpanel: int) -> tuple:
        """The nine index tensors the ops take: forward (panel groups per column panel), grad input (the
        transposed index, tpanel groups), grad weight (= forward)."""
        fwd = self.index(layer, panel, False)
        return fwd + self.index(layer, tpanel, True) + fwd  # the weight gradient walks the forward index

    def linear(self, layer, x):  # (*, in) -> (*, out)
        if not supported(layer, x):
            return self._fallback.linear(layer, x)
        ix = self.block_index(layer)
        if ix is not None:  # (nnz,) values -> (nblocks, R, C) blocks, differentiably
            return block.linear(x, ix.to_blocks(layer.values), ix, layer.bias)
        build.load()
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        vec, acc = register_tile()  # a tile's batch slice: the bytes one Linear panel's row touches
        chunk = min(batch_pad(x2.shape[0]) * x.element_size(), vec * acc)
        index = self.indexes(layer, _panel(chunk), _panel(chunk))
        y = torch.ops.siftc.sparse_linear(x2, layer.values, list(layer.weight_shape), layer.bias, *index)[0]  # (N, out)
        return y.view(*x.shape[:-1], layer.out_features)

    def conv2d(self, layer, x):  # (B, Cin, H, W) -> (B, Cout, H', W')
        if not _conv_supported(layer, x, 4):
            return self._fallback.conv2d(layer, x)
        return self._conv(layer, x, layer.kernel_size, layer.stride, layer.padding, layer.dilation)

    def conv1d(self, layer, x):  # (B, Cin, L) -> (B, Cout, L'): a (1, k) kernel over (B, Cin, 1, L)
        if not _conv_supported(layer, x, 3):
            return self._fallback.conv1d(layer, x)
        y = self._conv(layer, x.unsqueeze(2), (1, *layer.kernel_size), (1, *layer.stride), (0, *layer.padding),
                       (1, *layer.dilation))  # (B, Cout, 1, L')
        return y.squeeze(2)

    def _conv(self, layer, x, kernel, stride, padding, dilation):
        """The 2-D kernels on x (B, Cin, H, W) and the layer's values as a (Cout, Cin, kh, kw) weight (a
        Conv1d's positions index its (Cout, Cin, k) weight, which is (Cout, Cin, 1, k) too)."""
        ix = self.block_index(layer)
        if ix is not None:
            return block_conv.conv2d(x, ix.to_blocks(layer.values), ix, layer.bias, stride, padding, dilation)
        build.load()
        b, _, h, w = x.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
        ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        # panels sized by the main register tile's input footprint (csrc make_tiles): a tile's slice of a
        # panel stays in L2 while the thread's rows reuse it
        vec, acc = register_tile()
        vectors = batch_pad(b) * x.element_size() // vec
        rows = (kh - 1) * dh + 1
        nv, nt = _tile(vectors, wo, acc)
        panel = _panel(rows * ((nt - 1) * sw + (kw - 1) * dw + 1) * nv * vec)
        nv, nt = _tile(vectors, -(-w // sw), acc)  # a stride phase of dX
        index = self.indexes(layer, panel, _panel(rows * (nt + (kw - 1) * dw) * nv * vec))
        shape = [*layer.weight_shape[:2], *kernel]  # (Cout, Cin, kh, kw)
        return torch.ops.siftc.sparse_conv2d(x, layer.values, shape, layer.bias, list(stride), list(padding),
                                             list(dilation), *index)[0]


def _conv_supported(layer, x, dims: int) -> bool:
    """True if the kernels take this conv call (zero padding given as numbers, groups=1, batched input)."""
    return supported(layer, x) and layer.padding_mode == "zeros" and not isinstance(layer.padding, str) \
        and layer.groups == 1 and x.dim() == dims


def _tile(nvec: int, pos_w: int, acc: int) -> tuple[int, int]:
    """(vectors, positions) of the kernels' main register tile of `acc` accumulators (make_tiles in
    csrc/sparse_ops.cpp)."""
    nv = min(acc, _pow2_floor(nvec))
    nt = max(1, acc // nv)
    return nv, nt if nt <= pos_w else 1


def _panel(tile_bytes: int) -> int:
    """Groups per column panel so that one tile's input slice over a panel stays in L2."""
    return _pow2_floor(max(1, L2_BYTES // tile_bytes))
