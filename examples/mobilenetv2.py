"""A MobileNetV2-style network (Sandler et al. 2018) for 32x32 images and 10 classes.

3x3 stem conv, ten inverted residual blocks (1x1 expand, 3x3 depthwise, 1x1 linear project, residual
add when the shape is kept), a 1x1 conv to the head width, average pool, Linear classifier. Strides are
CIFAR-sized (32 -> 4 pixels), and `width_mult` scales every width; the default 0.5 keeps a forward on
(1, 3, 32, 32) near 3 ms on one CPU thread (327k parameters).

The depthwise convs (groups == channels) are the interesting part for siftc: they hold few FLOPs, so
siftc leaves them as they are (the paper's appendix A.1.1) and transforms the 1x1 convs around them.

    siftc convert examples/mobilenetv2.py --kind parallel --sparsity 0.9 -o out/mbv2-par90
    siftc convert examples/mobilenetv2.py --kind doped --sparsity 0.9 -o out/mbv2-dop90
    siftc inspect out/mbv2-par90
"""
import torch
from torch import nn

# (expand ratio t, output channels c, blocks n, first block's stride s), as in the paper's Table 2,
# cut to 10 blocks with strides for 32x32 inputs.
BLOCKS = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 2, 2),
    (6, 64, 2, 2),
    (6, 96, 1, 1),
    (6, 160, 1, 2),
    (6, 320, 1, 1),
)


def _round8(c: float) -> int:
    """Round a scaled width to a multiple of 8 (never below 8, never 10% below the target)."""
    r = max(8, int(c + 4) // 8 * 8)
    return r + 8 if r < 0.9 * c else r


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1,
            act: bool = True) -> nn.Sequential:
    """Conv (no bias: BN's shift replaces it), BatchNorm, and ReLU6 unless `act` is False."""
    layers = [
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    ]
    if act:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = c_in * expand_ratio
        self.use_residual = stride == 1 and c_in == c_out  # fixed at construction: fx sees one graph
        # With t == 1 the expand conv would be a square 1x1 conv; the paper drops it.
        self.expand = conv_bn(c_in, hidden, 1) if expand_ratio != 1 else nn.Identity()
        self.depthwise = conv_bn(hidden, hidden, 3, stride=stride, groups=hidden)
        self.project = conv_bn(hidden, c_out, 1, act=False)  # linear bottleneck: no activation

    def forward(self, x):        # (B, C_in, H, W)
        h = self.expand(x)       # (B, C_in*t, H, W)
        h = self.depthwise(h)    # (B, C_in*t, H/s, W/s)
        h = self.project(h)      # (B, C_out, H/s, W/s)
        return x + h if self.use_residual else h


class MobileNetV2(nn.Module):
    def __init__(self, width_mult: float = 0.5, num_classes: int = 10, head_width: int = 1280):
        super().__init__()
        c_in = _round8(32 * width_mult)
        self.stem = conv_bn(3, c_in, 3, stride=1)  # stride 1: 32x32 inputs are already small
        blocks = []
        for t, c, n, s in BLOCKS:
            c_out = _round8(c * width_mult)
            for i in range(n):
                blocks.append(InvertedResidual(c_in, c_out, s if i == 0 else 1, t))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        c_head = _round8(head_width * min(1.0, width_mult))  # scaled down too, unlike the paper
        self.head = conv_bn(c_in, c_head, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c_head, num_classes)
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):          # (B, 3, 32, 32)
        x = self.stem(x)           # (B, 16, 32, 32) at width 0.5
        x = self.blocks(x)         # (B, 160, 4, 4)
        x = self.head(x)           # (B, 640, 4, 4)
        x = self.pool(x)           # (B, 640, 1, 1)
        x = torch.flatten(x, 1)    # (B, 640)
        return self.classifier(x)  # (B, num_classes)


def mobilenetv2(width_mult: float = 0.5) -> nn.Module:
    return MobileNetV2(width_mult=width_mult)


def example_inputs():
    return (torch.randn(1, 3, 32, 32),)  # (B, 3, H, W)
