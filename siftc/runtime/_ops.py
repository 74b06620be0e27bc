"""Python halves of the `torch.ops.siftc.*` ops: fake (shape-only) kernels and autograd formulas.

The C++ library defines the ops and their CPU kernels; `register()` runs once, right after it is loaded
(see build.py). Autograd: sparse_linear / sparse_conv2d differentiate through their *_backward ops, which
return the input gradient and a dense weight gradient that is exactly zero outside the mask; the bias
gradient is a plain sum. The index tensors are integer inputs and get no gradient. Each op takes three
indexes (forward, grad input, grad weight; see csrc/sparse_ops.cpp); the forward saves the last two.
The forward ops return (y, xp, vals): besides the output, the packed input and the gathered non-zero
values, which autograd saves (non-differentiable) so the backward neither packs x nor reads the dense
weight again.
"""
import torch

_registered = False


def _conv_out(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def batch_pad(b):
    """The packed layout's batch: b rounded up to 16 (kBatchPad in csrc/sparse_ops.cpp), at least 16."""
    return -(-torch.sym_max(b, 1) // 16) * 16


def register():
    global _registered
    if _registered:
        return
    _registered = True
    lib = torch.library

    @lib.register_fake("siftc::build_index")
    def _(mask, kk, panel, transpose):
        o = mask.shape[0]
        c = mask.numel() // (o * kk)
        rows, groups = (c, o) if transpose else (o, c)
        nnz = lib.get_ctx().new_dynamic_size()
        npanels = -(-groups // panel)
        return (mask.new_empty(npanels * rows + 1, dtype=torch.int64), mask.new_empty(nnz, dtype=torch.int32),
                mask.new_empty(nnz, dtype=torch.int32))

    @lib.register_fake("siftc::sparse_linear")
    def _(x, weight, bias, ptr, code, *index):
        n, c = x.shape
        return (x.new_empty(n, weight.shape[0]), x.new_empty(c, 1, 1, batch_pad(n)),  # y, xp
                x.new_empty(code.shape))  # vals

    @lib.register_fake("siftc::sparse_linear_backward")
    def _(grad, x, xp, vals, weight, tptr, tcode, tsrc, wptr, wcode, wwidx, need_input, need_weight):
        return (x.new_empty(x.shape) if need_input else x.new_empty(0),
                x.new_empty(weight.shape) if need_weight else x.new_empty(0))

    @lib.register_fake("siftc::sparse_conv2d")
    def _(x, weight, bias, stride, padding, dilation, ptr, code, *index):
        b, c, h, w = x.shape
        o, _, kh, kw = weight.shape
        y = x.new_empty(b, o, _conv_out(h, kh, stride[0], padding[0], dilation[0]),
                        _conv_out(w, kw, stride[1], padding[1], dilation[1]))
        xp = x.new_empty(c, h + 2 * padding[0], w + 2 * padding[1], batch_pad(b))
        return y, xp, x.new_empty(code.shape)

    @lib.register_fake("siftc::sparse_conv2d_backward")
    def _(grad, x, xp, vals, weight, stride, padding, dilation, tptr, tcode, tsrc, wptr, wcode, wwidx, need_input,
          need_weight):
        return (x.new_empty(x.shape) if need_input else x.new_empty(0),
                x.new_empty(weight.shape) if need_weight else x.new_empty(0))

    def linear_setup(ctx, inputs, output):
        x, weight, bias, *index = inputs
        _, xp, vals = output
        ctx.mark_non_differentiable(xp, vals)
        ctx.save_for_backward(x, xp, vals, weight, *index[3:])  # the grad-input and grad-weight indexes
        ctx.has_bias = bias is not None

    def linear_backward(ctx, grad, _grad_xp, _grad_vals):
        x, xp, vals, weight, *index = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx, dw = torch.ops.siftc.sparse_linear_backward(grad, x, xp, vals, weight, *index, need_x, need_w)
        db = grad.sum(0) if need_b and ctx.has_bias else None
        return (dx if need_x else None, dw if need_w else None, db) + (None,) * 9

    lib.register_autograd("siftc::sparse_linear", linear_backward, setup_context=linear_setup)

    def conv_setup(ctx, inputs, output):
        x, weight, bias, stride, padding, dilation, *index = inputs
        _, xp, vals = output
        ctx.mark_non_differentiable(xp, vals)
        ctx.save_for_backward(x, xp, vals, weight, *index[3:])
        ctx.conv = (stride, padding, dilation)
        ctx.has_bias = bias is not None

    def conv_backward(ctx, grad, _grad_xp, _grad_vals):
        x, xp, vals, weight, *index = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx, dw = torch.ops.siftc.sparse_conv2d_backward(grad, x, xp, vals, weight, *ctx.conv, *index, need_x,
                                                        need_w)
        db = grad.sum((0, 2, 3)) if need_b and ctx.has_bias else None
        return (dx if need_x else None, dw if need_w else None, db) + (None,) * 12

    lib.register_autograd("siftc::sparse_conv2d", conv_backward, setup_context=conv_setup)
