"""The one table of weight-layer types: what siftc knows about each, keyed by module class.

Every pass, the FLOP count and the replacement blocks ask `layer_type(module)` (a dict look-up along the
class's MRO, so a subclass of nn.Linear is a Linear) instead of testing classes themselves:

    conv = nn.Conv2d(16, 32, 3)
    t = layer_type(conv)                   # the Conv2d entry
    t.fan_in_out(conv)                     # (144, 32): D_in = C_in*kh*kw per output position
    t.weight_shape(conv, {"in": 24, "out": 48})            # [48, 24, 3, 3]: its weight at new widths
    t.sparse_copy(conv, 500, gen, d_out=8, pointwise=True)  # SparseConv2d(16, 8, 1), 500 non-zeros

A depthwise conv (groups == C_in > 1) is a case of Conv: its outputs and groups follow its inputs, so
it has no "out" width of its own. Layers siftc finds but does not transform (Conv3d, ConvTranspose2d)
have an entry too, which says so. Layers of optional packages (HF transformers' GPT-2 `Conv1D`) are keyed
by their qualified class name, so siftc never imports the package to know them.
"""
import math

import torch
from torch import nn

from siftc.nn.attention import unsupported
from siftc.nn.sparse import SPARSE_LAYERS as SPARSE
from siftc.nn.sparse import SparseConv1d, SparseConv2d, SparseLinear


def shape(m: nn.Module) -> tuple[int, ...]:
    """`m`'s weight shape; a sparse layer's dense shape without materialising its weight."""
    return m.weight_shape if isinstance(m, SPARSE) else tuple(m.weight.shape)


def depthwise(m: nn.Module) -> bool:
    """One group per input channel: widening the inputs widens the groups and outputs with them."""
    return 1 < getattr(m, "groups", 1) == getattr(m, "in_channels", 0)


def grouped(m: nn.Module) -> bool:
    return getattr(m, "groups", 1) > 1


def channel_multiplier(m: nn.Module) -> int:
    """A depthwise conv's outputs per input channel: out = multiplier x in, at any width."""
    return m.out_channels // m.in_channels


class LayerType:
    """An entry: what holds for every weight layer unless its type says otherwise."""
    counted = True                  # its multiply-accumulates are weight FLOPs
    transforms = True               # a kind may replace it (unless `refusal` says why not)
    sides = ("out", "in")           # the width side each weight dim takes (None: no width group)
    widened_why = "widened, its extra FLOPs paid for by the sparse layers"

    def refusal(self, m) -> tuple[str, bool] | None:
        """(why a layer-wise kind leaves `m` as is, whether that is unsupported), or None."""
        return None

    def dense_shape(self, m) -> list[int]:
        """Its weight's shape, as records print it."""
        return list(shape(m))

    def weight_count(self, m) -> int:
        """Its weights (a record's search space when it is left as is)."""
        return math.prod(shape(m))

    def norm(self, width: int) -> nn.Module | None:
        """The norm of g after this layer in a branch (none after a linear layer)."""
        return None


class Linear(LayerType):
    """y = x W^T + b over the last dim. Its weight is (out, in)."""

    def fan_in_out(self, m) -> tuple[int, int]:
        return m.in_features, m.out_features

    def out_channels(self, m) -> int:
        return self.fan_in_out(m)[1]

    def weight_shape(self, m, new: dict) -> list[int]:
        return [new["out"], new["in"]]

    def dense_copy(self, m, d_in=None, d_out=None, bias=None, pointwise=False) -> nn.Module:
        """A plain layer like `m` with other widths, initialised by its own init."""
        d_in_, d_out_ = self.fan_in_out(m)
        return nn.Linear(d_in or d_in_, d_out or d_out_, bias=_bias(m, bias))

    def widened(self, m, new: dict) -> nn.Module:
        return self.dense_copy(m, new.get("in"), new.get("out"))

    def sparse_copy(self, m, nnz: int, generator, d_in=None, d_out=None, bias=None, pointwise=False):
        """A sparse layer like `m` (other widths, or a 1x1 kernel for a conv) with `nnz` non-zeros."""
        d_in_, d_out_ = self.fan_in_out(m)
        return SparseLinear(d_in or d_in_, d_out or d_out_, bias=_bias(m, bias), nnz=nnz, generator=generator)

    def torch_state(self, m) -> dict:
        """`m`'s weights in the layout of its `sparse_copy` at the same shape (to keep them under a mask)."""
        return m.state_dict()


class TransposedLinear(Linear):
    """HF transformers' `Conv1D` (GPT-2, GPT): y = x W + b with W stored (in, out); `nx` in, `nf` out.
    Widened, it stays a Conv1D (its own init: W ~ N(0, 0.02), zero bias); its sparse copy and the plain
    copies inside a block are SparseLinear / nn.Linear (weight (out, in)) drawn the same way."""
    sides = ("in", "out")
    STD = 0.02

    def fan_in_out(self, m) -> tuple[int, int]:
        return m.nx, m.nf

    def weight_shape(self, m, new: dict) -> list[int]:
        return [new["in"], new["out"]]

    def widened(self, m, new: dict) -> nn.Module:
        return type(m)(new.get("out") or m.nf, new.get("in") or m.nx)  # Conv1D(nf, nx)

    def dense_copy(self, m, d_in=None, d_out=None, bias=None, pointwise=False) -> nn.Module:
        return self._init(super().dense_copy(m, d_in, d_out, bias))

    def sparse_copy(self, m, nnz, generator, d_in=None, d_out=None, bias=None, pointwise=False):
        return self._init(super().sparse_copy(m, nnz, generator, d_in, d_out, bias))

    @torch.no_grad()
    def _init(self, layer):
        """Conv1D's init on a torch-layout layer (a sparse one's non-zeros only)."""
        (layer.values if isinstance(layer, SPARSE) else layer.weight).normal_(0, self.STD)
        if layer.bias is not None:
            layer.bias.zero_()
        return layer

    def torch_state(self, m) -> dict:
        return {"weight": m.weight.t(), **({"bias": m.bias} if m.bias is not None else {})}


class Conv(Linear):
    """nn.Conv1d / nn.Conv2d. Weight (out, in / groups, *kernel); D_in counts in/groups x kernel."""

    def __init__(self, dense_cls, sparse_cls, norm_cls):
        self.dense_cls, self.sparse_cls, self.norm_cls = dense_cls, sparse_cls, norm_cls

    def fan_in_out(self, m) -> tuple[int, int]:
        return math.prod(shape(m)[1:]), m.out_channels

    def out_channels(self, m) -> int:
        return m.out_channels

    def refusal(self, m):
        if grouped(m):
            return f"grouped conv (groups={m.groups}): left as is (paper appendix A.1.1)", False
        if m.padding_mode != "zeros":
            return f"padding_mode={m.padding_mode!r} not supported", True
        return None

    def out_width(self, m, d_in: int, d_out: int | None) -> int:
        """A depthwise conv's outputs are its channel multiplier times its inputs."""
        return d_in * channel_multiplier(m) if depthwise(m) else d_out or m.out_channels

    def groups_at(self, m, d_in: int) -> int:
        """Its group count at `d_in` inputs: a grouped conv widens by its number of groups, each group
        keeping its width (in_channels / groups; 1 for a depthwise conv)."""
        return d_in // (m.in_channels // m.groups) if grouped(m) else 1

    def weight_shape(self, m, new: dict) -> list[int]:
        return [self.out_width(m, new["in"], new.get("out")), new["in"] // self.groups_at(m, new["in"]),
                *m.kernel_size]

    def dense_copy(self, m, d_in=None, d_out=None, bias=None, pointwise=False) -> nn.Module:
        d_in = d_in or m.in_channels
        return self.dense_cls(d_in, self.out_width(m, d_in, d_out), **_geometry(m, pointwise),
                              groups=self.groups_at(m, d_in), bias=_bias(m, bias), padding_mode=m.padding_mode)

    def sparse_copy(self, m, nnz, generator, d_in=None, d_out=None, bias=None, pointwise=False):
        return self.sparse_cls(d_in or m.in_channels, d_out or m.out_channels, **_geometry(m, pointwise),
                               bias=_bias(m, bias), nnz=nnz, generator=generator)

    def norm(self, width):
        """BatchNorm over the channels: g after a conv is BatchNorm + activation."""
        return self.norm_cls(width)


class Embedding(LayerType):
    """A look-up table (num_embeddings, dim): no FLOPs, widened with the stream it feeds."""
    counted = False
    transforms = False
    sides = (None, "out")
    widened_why = "widened with the stream it feeds"

    def refusal(self, m):
        return "embedding: a look-up, no FLOPs to trade", False

    def weight_shape(self, m, new):
        return [m.num_embeddings, new["out"]]

    def widened(self, m, new):
        return nn.Embedding(m.num_embeddings, new["out"], m.padding_idx, m.max_norm, m.norm_type,
                            m.scale_grad_by_freq, m.sparse)


class Untransformed(LayerType):
    """A weight layer siftc lists but neither counts nor transforms (Conv3d, transposed convs)."""
    counted = False
    transforms = False

    def refusal(self, m):
        names = [cls.__name__ for cls, t in DENSE_TYPES.items() if t.transforms]
        return f"{type(m).__name__} is not transformed (only {', '.join(names)} are)", True


class PackedAttention(LayerType):
    """nn.MultiheadAttention that conversion did not split into Linear layers (`siftc.nn.attention`: one
    `unsupported` names, such as add_bias_kv=True, one inside a leaf or kept by --leaf): its q/k/v
    projections are one packed parameter (`in_proj_weight`, or three when kdim/vdim differ) run inside
    F.multi_head_attention_forward, so no kind can sparsify them one by one, and its embed_dim is heads x
    head_dim, which Sparse Wide keeps. It is left as is and its widths stay fixed
    (`siftc.passes.layer_rules.packed_attention`); its projections are not weight FLOPs here (no Linear of
    it runs as a module), before or after."""
    counted = False
    transforms = False
    sides = ()
    WHY = ("nn.MultiheadAttention packs its q/k/v projections into one parameter (in_proj_weight) and its "
           "embed_dim is heads x head_dim: left as is, its widths kept")

    def refusal(self, m):
        why = unsupported(m)
        return (f"{self.WHY}; not split into Linear layers: {why}" if why else
                f"{self.WHY}; kept whole (inside a leaf module or a --leaf match)"), True

    def dense_shape(self, m):
        w = m.in_proj_weight if m.in_proj_weight is not None else m.q_proj_weight
        return list(w.shape)

    def weight_count(self, m):
        return sum(p.numel() for n, p in m.named_parameters() if n.endswith("weight"))


DENSE_TYPES = {
    nn.Linear: Linear(),
    nn.Conv2d: Conv(nn.Conv2d, SparseConv2d, nn.BatchNorm2d),
    nn.Conv1d: Conv(nn.Conv1d, SparseConv1d, nn.BatchNorm1d),
    nn.Embedding: Embedding(),
    nn.Conv3d: Untransformed(),
    nn.ConvTranspose2d: Untransformed(),
    nn.MultiheadAttention: PackedAttention(),
}
# The sparse replacements are their dense twins to everyone who asks (fan-in, positions, shapes).
LAYER_TYPES = {**DENSE_TYPES, SparseLinear: DENSE_TYPES[nn.Linear], SparseConv2d: DENSE_TYPES[nn.Conv2d],
               SparseConv1d: DENSE_TYPES[nn.Conv1d],
               # optional packages, by qualified class name (see `lookup`): known without importing them
               "transformers.pytorch_utils.Conv1D": TransposedLinear()}


def layer_type(m: nn.Module) -> LayerType | None:
    """`m`'s entry (the nearest class in its MRO that has one), or None for a layer without weights."""
    return lookup(LAYER_TYPES, m)


def lookup(table: dict, m: nn.Module):
    """The entry of the nearest class in `m`'s MRO, keyed by the class or by its qualified name."""
    for cls in type(m).__mro__:
        entry = table.get(cls) or table.get(f"{cls.__module__}.{cls.__qualname__}")
        if entry is not None:
            return entry
    return None


def counted(m: nn.Module) -> bool:
    """True for a layer whose multiply-accumulates are weight FLOPs (Linear, Conv, their sparse twins)."""
    t = layer_type(m)
    return t is not None and t.counted


def fan_in_out(m: nn.Module) -> tuple[int, int]:
    """(D_in, D_out) of a Linear or conv: a conv counts C_in/groups*kernel inputs per output position."""
    return layer_type(m).fan_in_out(m)


def new_weights(m: nn.Module, new: dict) -> int:
    """Weight count of `m` rebuilt at the widths `new` (side -> width)."""
    return math.prod(layer_type(m).weight_shape(m, new))


def _bias(m, bias) -> bool:
    return m.bias is not None if bias is None else bias


def _geometry(m, pointwise: bool) -> dict:
    """A conv's kernel, stride, padding and dilation (a 1x1 kernel and nothing else if `pointwise`)."""
    if pointwise:
        return {"kernel_size": 1}
    return {"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding, "dilation": m.dilation}
