"""Masked dense: the layer's dense weight (its values scattered into zeros) then the dense op. The
reference every other backend is tested against, and the fallback where no C++ compiler exists. It
computes all the zeros; the weight gradient reaches `values` through the scatter."""
import torch.nn.functional as F


class MaskedDense:
    name = "torch"

    def linear(self, layer, x):
        return F.linear(x, layer.weight, layer.bias)

    def conv2d(self, layer, x):
        return layer._conv_forward(x, layer.weight, layer.bias)

    conv1d = conv2d  # `_conv_forward` is the layer's own, 1-D or 2-D
