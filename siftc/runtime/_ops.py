"""Python halves of the `torch.ops.siftc.*` ops: fake (shape-only) kernels and autograd formulas.

The C++ library defines the ops and their CPU kernels; `register()` runs once, right after it is loaded
(see build.py). The ops take a layer's `values` (nnz,) and its dense weight shape, never a dense weight.
Autograd: sparse_linear / sparse_conv2d differentiate through their *_backward ops, which return the input
gradient and the values' gradient, (nnz,) like the values; the bias gradient is a plain sum. The shape and
the index tensors get no gradient. Each op takes three indexes (forward, grad input, grad weight; see
csrc/sparse_ops.cpp); the forward saves the last two. The forward ops return (y, xp): besides the output,
the packed input, which autograd saves (non-differentiable) so the backward does not pack x again. The
backward reads `values` itself, saved as an input: changing them in place between a forward and its
backward is the error autograd reports for any saved tensor.
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
    def _(positions, shape, panel, transpose):
        rows, groups = (shape[1], shape[0]) if transpose else (shape[0], shape[1])
        npanels = -(-groups // panel)
        nnz = positions.shape[0]
        return (positions.new_empty(npanels * rows + 1, dtype=torch.int64), positions.new_empty(nnz),
                positions.new_empty(nnz))

    def backward_fake(x, values, need_input, need_weight):
        return (x.new_empty(x.shape) if need_input else x.new_empty(0),
                x.new_empty(values.shape) if need_weight else x.new_empty(0))

    @lib.register_fake("siftc::sparse_linear")
    def _(x, values, shape, bias, *index):
        n, c = x.shape
        return x.new_empty(n, shape[0]), x.new_empty(c, 1, 1, batch_pad(n))  # y, xp

    @lib.register_fake("siftc::sparse_linear_backward")
    def _(grad, x, xp, values, shape, tptr, tcode, twidx, wptr, wcode, wwidx, need_input, need_weight):
        return backward_fake(x, values, need_input, need_weight)

    @lib.register_fake("siftc::sparse_conv2d")
    def _(x, values, shape, bias, stride, padding, dilation, *index):
        b, c, h, w = x.shape
        o, _, kh, kw = shape
        y = x.new_empty(b, o, _conv_out(h, kh, stride[0], padding[0], dilation[0]),
                        _conv_out(w, kw, stride[1], padding[1], dilation[1]))
        return y, x.new_empty(c, h + 2 * padding[0], w + 2 * padding[1], batch_pad(b))  # y, xp

    @lib.register_fake("siftc::sparse_conv2d_backward")
    def _(grad, x, xp, values, shape, stride, padding, dilation, tptr, tcode, twidx, wptr, wcode, wwidx, need_input,
          need_weight):
        return backward_fake(x, values, need_input, need_weight)

    def linear_setup(ctx, inputs, output):
        x, values, shape, bias, *index = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(x, output[1], values, *index[3:])  # the grad-input and grad-weight indexes
        ctx.shape, ctx.has_bias = shape, bias is not None

    def linear_backward(ctx, grad, _grad_xp):
        x, xp, values, *index = ctx.saved_tensors
        need_x, need_v, _, need_b = ctx.needs_input_grad[:4]
        dx, dv = torch.ops.siftc.sparse_linear_backward(grad, x, xp, values, ctx.shape, *index, need_x, need_v)
        db = grad.sum(0) if need_b and ctx.has_bias else None
        return (dx if need_x else None, dv if need_v else None, None, db) + (None,) * 9

    lib.register_autograd("siftc::sparse_linear", linear_backward, setup_context=linear_setup)

    def conv_setup(ctx, inputs, output):
        x, values, shape, bias, stride, padding, dilation, *index = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(x, output[1], values, *index[3:])
        ctx.conv = (shape, stride, padding, dilation)
        ctx.has_bias = bias is not None

    def conv_backward(ctx, grad, _grad_xp):
        x, xp, values, *index = ctx.saved_tensors
        need_x, need_v, _, need_b = ctx.needs_input_grad[:4]
        dx, dv = torch.ops.siftc.sparse_conv2d_backward(grad, x, xp, values, *ctx.conv, *index, need_x, need_v)
        db = grad.sum((0, 2, 3)) if need_b and ctx.has_bias else None
        return (dx if need_x else None, dv if need_v else None, None, db) + (None,) * 12

    lib.register_autograd("siftc::sparse_conv2d", conv_backward, setup_context=conv_setup)
