"""The "shapes" backend (internal, not a --backend choice): a sparse layer's output as zeros of the right
shape and dtype, with no arithmetic and no dense weight built. Wide's shape check runs the widened graph
on it: with masked dense, each sparse layer would materialise its k^2-wider dense weight for a forward
on zeros whose only use is the shapes."""
import torch


class ShapesOnly:
    name = "shapes"

    def linear(self, layer, x):  # (*, in) -> (*, out)
        if x.shape[-1] != layer.in_features:
            raise RuntimeError(f"input has {x.shape[-1]} features, the layer takes {layer.in_features}")
        return x.new_zeros(*x.shape[:-1], layer.out_features)

    def conv2d(self, layer, x):  # the conv's own shape rules, on meta tensors
        weight = torch.empty(layer.weight_shape, dtype=x.dtype, device="meta")
        return x.new_zeros(layer._conv_forward(x.to("meta"), weight, None).shape)

    conv1d = conv2d
