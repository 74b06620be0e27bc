"""Python halves of the `torch.ops.siftc.*` ops: fake (shape-only) kernels and autograd formulas.

The C++ library defines the ops and their CPU kernels; `register()` runs once, right after it is loaded
(see build.py). Autograd: sparse_linear / sparse_conv2d differentiate through their *_backward ops, which
return the input gradient and a dense weight gradient that is exactly zero outside the mask; the bias
gradient is a plain sum. The index tensors are integer inputs and get no gradient. Each op takes three
indexes (forward, grad input, grad weight; see csrc/sparse_ops.cpp); the forward saves the last two.
"""
import torch

_registered = False


def _conv_out(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


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
    def _(x, weight, bias, *index):
        return x.new_empty(x.shape[0], weight.shape[0])

    @lib.register_fake("siftc::sparse_linear_backward")
    def _(grad, x, weight, tptr, tcode, twidx, wptr, wcode, wwidx, need_input, need_weight):
        return (x.new_empty(x.shape) if need_input else x.new_empty(0),
                x.new_empty(weight.shape) if need_weight else x.new_empty(0))

    @lib.register_fake("siftc::sparse_conv2d")
    def _(x, weight, bias, stride, padding, dilation, *index):
        b, _, h, w = x.shape
        o, _, kh, kw = weight.shape
        return x.new_empty(b, o, _conv_out(h, kh, stride[0], padding[0], dilation[0]),
                           _conv_out(w, kw, stride[1], padding[1], dilation[1]))

    @lib.register_fake("siftc::sparse_conv2d_backward")
    def _(grad, x, weight, stride, padding, dilation, tptr, tcode, twidx, wptr, wcode, wwidx, need_input,
          need_weight):
        return (x.new_empty(x.shape) if need_input else x.new_empty(0),
                x.new_empty(weight.shape) if need_weight else x.new_empty(0))

    def linear_setup(ctx, inputs, output):
        x, weight, bias, *index = inputs
        ctx.save_for_backward(x, weight, *index[3:])  # the grad-input and grad-weight indexes
        ctx.has_bias = bias is not None

    def linear_backward(ctx, grad):
        x, weight, *index = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx, dw = torch.ops.siftc.sparse_linear_backward(grad, x, weight, *index, need_x, need_w)
        db = grad.sum(0) if need_b and ctx.has_bias else None
        return (dx if need_x else None, dw if need_w else None, db) + (None,) * 9

    lib.register_autograd("siftc::sparse_linear", linear_backward, setup_context=linear_setup)

    def conv_setup(ctx, inputs, output):
        x, weight, bias, stride, padding, dilation, *index = inputs
        ctx.save_for_backward(x, weight, *index[3:])
        ctx.conv = (stride, padding, dilation)
        ctx.has_bias = bias is not None

    def conv_backward(ctx, grad):
        x, weight, *index = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx, dw = torch.ops.siftc.sparse_conv2d_backward(grad, x, weight, *ctx.conv, *index, need_x, need_w)
        db = grad.sum((0, 2, 3)) if need_b and ctx.has_bias else None
        return (dx if need_x else None, dw if need_w else None, db) + (None,) * 12

    lib.register_autograd("siftc::sparse_conv2d", conv_backward, setup_context=conv_setup)
