"""A 3-hidden-layer MLP for 8x8 handwritten digits (scikit-learn's `load_digits`), flattened to 64 features.

    64 -> 256 -> 256 -> 256 -> 10, ReLU between layers. Input (B, 64), output logits (B, 10).

The smallest model worth converting: four Linear layers, of which siftc transforms the middle two by
default (the first and last stay dense, as in the paper).

    siftc convert examples/mlp.py --kind parallel --sparsity 0.9 -o out/mlp-par90
    siftc convert examples/mlp.py --kind factorized --sparsity 0.75 -o out/mlp-fac75
    siftc inspect out/mlp-par90
"""
import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, in_features: int = 64, hidden: int = 256, n_hidden: int = 3, num_classes: int = 10):
        super().__init__()
        widths = [in_features] + [hidden] * n_hidden
        layers = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(w_in, w_out), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)  # (B, 64) -> (B, num_classes)


def mlp() -> nn.Module:
    """64 -> 256 -> 256 -> 256 -> 10."""
    return MLP()


def example_inputs():
    return (torch.randn(1, 64),)  # (B, 64): one flattened 8x8 image
