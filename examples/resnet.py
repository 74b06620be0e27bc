"""ResNet-18 (He et al. 2016): BasicBlocks in four stages of [2, 2, 2, 2], BatchNorm, residual adds with
1x1-conv shortcuts where a stage changes width or stride. Two stems share one implementation:

    resnet18_cifar     3x3 stride-1 stem, no maxpool, 10 classes    input (1, 3, 32, 32)
    resnet18_imagenet  7x7 stride-2 stem + maxpool, 1000 classes    input (1, 3, 224, 224)

The file has two factories, so name one after the colon:

    siftc convert examples/resnet.py:resnet18_cifar --kind parallel --sparsity 0.9 -o out/rn18-cifar-par90
    siftc convert examples/resnet.py:resnet18_imagenet --kind factorized --sparsity 0.75 -o out/rn18-imagenet-fac75
    siftc inspect out/rn18-cifar-par90
"""
import torch
from torch import nn


def cifar_stem(width: int) -> nn.Module:
    """Small images keep their resolution: one 3x3 stride-1 conv, no pooling."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
    )


def imagenet_stem(width: int) -> nn.Module:
    """Large images are cut by 4 up front: 7x7 stride-2 conv, then 3x3 stride-2 maxpool."""
    return nn.Sequential(
        nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
    )


STEMS = {"cifar": cifar_stem, "imagenet": imagenet_stem}


class BasicBlock(nn.Module):
    """Two 3x3 convs and a residual add; a 1x1 conv shortcut when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()  # one module per use, so each graph node has its own target
        self.relu2 = nn.ReLU()
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                nn.BatchNorm2d(c_out),
            )

    def forward(self, x):                          # (B, C_in, H, W)
        out = self.relu1(self.bn1(self.conv1(x)))  # (B, C_out, H/s, W/s)
        out = self.bn2(self.conv2(out))            # (B, C_out, H/s, W/s)
        return self.relu2(out + self.shortcut(x))  # (B, C_out, H/s, W/s)


class ResNet(nn.Module):
    def __init__(self, stem: str, num_classes: int, layers=(2, 2, 2, 2), widths=(64, 128, 256, 512)):
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; choose one of: {', '.join(STEMS)}")
        self.stem = STEMS[stem](widths[0])
        stages, c_in = [], widths[0]
        for i, (n_blocks, c_out) in enumerate(zip(layers, widths)):
            stride = 1 if i == 0 else 2  # every stage after the first halves the resolution
            blocks = [BasicBlock(c_in, c_out, stride)]
            blocks += [BasicBlock(c_out, c_out) for _ in range(n_blocks - 1)]
            stages.append(nn.Sequential(*blocks))
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):        # (B, 3, H, W)
        x = self.stem(x)         # (B, 64, H, W) cifar; (B, 64, H/4, W/4) imagenet
        x = self.stages(x)       # (B, 512, H/8, W/8) cifar; (B, 512, H/32, W/32) imagenet
        x = self.pool(x)         # (B, 512, 1, 1)
        x = torch.flatten(x, 1)  # (B, 512)
        return self.fc(x)        # (B, num_classes)


def resnet18_cifar() -> nn.Module:
    return ResNet("cifar", num_classes=10)


def resnet18_imagenet() -> nn.Module:
    return ResNet("imagenet", num_classes=1000)


def example_inputs():
    """Inputs for any factory without its own example_inputs_<factory>()."""
    return example_inputs_resnet18_cifar()


def example_inputs_resnet18_cifar():
    return (torch.randn(1, 3, 32, 32),)  # (B, 3, H, W)


def example_inputs_resnet18_imagenet():
    return (torch.randn(1, 3, 224, 224),)  # (B, 3, H, W)
