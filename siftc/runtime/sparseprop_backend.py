"""The "sparseprop" backend: SparseProp's own kernels (the PyPI package), a peer to compare against.

Optional. Each forward hands the layer's `values` to SparseProp's autograd Functions (a Linear's values
are already in its CSR order; a conv's go through a differentiable gather into SparseProp's order), so
gradients land in `layer.values`. Its index is built from the mask, not from non-zero values, so weights
at zero inside the mask are kept, and is rebuilt when `layer.mask_version` changes.

Known limits of the package: its convolutions give wrong results when the batch is not a multiple of 8
(measured: max error ~1.1 at batch 12, 5 and 1, against 2e-7 at 16) and NaNs on grouped convolutions; it
supports square kernels, stride 1 or 2, no dilation, float32 only. This backend refuses those cases with
an error instead of returning wrong numbers.

Its Functions return a view of their own output buffer (a transpose, a reshape), which autograd refuses
to let the next op modify in place (`nn.ReLU(inplace=True)`); `_own` copies such an output once, the cost
of a peer that does it, and gradients are unchanged.

Its sdist does not build in pip's isolated build environment; INSTALL is the command that works.
"""
import weakref

import torch

from siftc.errors import UsageError

INSTALL = "pip install wheel pybind11 && pip install --no-build-isolation sparseprop==0.1.14"


def _import():
    try:
        from sparseprop.modules import functions
        from sparseprop.modules import utils
    except ImportError as e:
        raise UsageError(f"backend 'sparseprop' needs the SparseProp package: `{INSTALL}` "
                         f"(it compiles C++ on install), or choose --backend native") from e
    return functions, utils


def _own(y: torch.Tensor) -> torch.Tensor:
    """`y`, or a copy of it if it is a view made inside a Function (so in-place ops after it work)."""
    return y.clone() if y._is_view() else y


class SparseProp:
    name = "sparseprop"

    def __init__(self):
        self._index = weakref.WeakKeyDictionary()  # layer -> (mask_version, flat positions, sparseprop index)

    def _entry(self, layer, build):
        entry = self._index.get(layer)
        if entry is None or entry[0] != layer.mask_version:
            entry = (layer.mask_version, *build())
            self._index[layer] = entry
        return entry[1], entry[2]

    def linear(self, layer, x):  # (*, in) -> (*, out)
        functions, utils = _import()

        def build():
            mask = layer.mask.detach().float()
            _, idx = utils.to_csr_2d(mask)  # CSR of the mask: row-major order, the order of nonzero()
            return None, idx

        _, idx = self._entry(layer, build)
        vals = layer.values  # row-major: the CSR's order
        return _own(functions.SparseLinearFunction.apply(x, vals, idx, layer.bias, layer.out_features))

    def conv2d(self, layer, x):  # (B, Cin, H, W) -> (B, Cout, H', W')
        functions, utils = _import()
        kh, kw = layer.kernel_size
        if (kh != kw or layer.stride[0] != layer.stride[1] or layer.stride[0] not in (1, 2)
                or layer.padding[0] != layer.padding[1] or layer.dilation != (1, 1) or layer.groups != 1
                or x.dtype != torch.float32):
            raise UsageError(f"backend 'sparseprop' supports square float32 convs with stride 1 or 2 and no "
                             f"dilation, not {layer}; use --backend native")
        if x.shape[0] % 8:
            raise UsageError(f"backend 'sparseprop' computes wrong convolutions when the batch is not a multiple "
                             f"of 8 (got batch {x.shape[0]}); use --backend native or a batch size like 64")
        numel = layer.mask.numel()
        if numel >= 1 << 24:
            raise UsageError(f"backend 'sparseprop': weight of {layer} too large to index exactly")

        def build():
            # encode each masked position as its flat index + 1, so SparseProp's value order tells positions
            mask = layer.mask
            code = torch.arange(1, numel + 1, dtype=torch.float32).view(mask.shape)
            vals, idx = utils.to_sparse_format_conv2d(code * mask)
            rank = torch.zeros(numel, dtype=torch.long)  # flat position -> its index in `values`
            rank[layer.positions.long()] = torch.arange(layer.nnz)
            return rank[vals.long() - 1], idx

        order, idx = self._entry(layer, build)
        vals = layer.values[order]
        return _own(functions.SparseConvFunction.apply(x, vals, idx, layer.bias, layer.out_channels, kh,
                                                       layer.padding[0], layer.stride[0], False, False))

    def conv1d(self, layer, x):
        raise UsageError(f"backend 'sparseprop' has no 1-D convolution ({layer}); use --backend native")
