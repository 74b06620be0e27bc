"""Test-only graphs for Sparse Wide, one width-rule situation each. Every class has `inputs()`."""
import torch
import torch.nn.functional as F
from torch import nn


class DownsampleResidual(nn.Module):
    """A residual add across a stride-2 shortcut: conv1/conv2 and the 1x1 shortcut share one out group."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.shortcut = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):                                   # (B, 3, 8, 8)
        x = F.relu(self.stem(x))                            # (B, 8, 8, 8)
        h = self.conv2(F.relu(self.bn1(self.conv1(x))))     # (B, 16, 4, 4)
        h = F.relu(h + self.shortcut(x))                    # (B, 16, 4, 4)
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))  # (B, 5)

    @staticmethod
    def inputs():
        return (torch.randn(2, 3, 8, 8),)


class CatBranches(nn.Module):
    """torch.cat of two branches stacks their groups; the conv after it sees both."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 6, 1)
        self.b = nn.Conv2d(8, 10, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.mix = nn.Conv2d(16, 12, 1)
        self.fc = nn.Linear(12, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        h = self.bn(torch.cat([self.a(x), self.b(x)], dim=1))   # (B, 6 + 10, H, W)
        return self.fc(self.mix(h).mean((2, 3)))

    @staticmethod
    def inputs():
        return (torch.randn(2, 3, 6, 6),)


class Chunked(nn.Module):
    """A gated MLP: chunk(2) cuts one Linear's output into value and gate of equal width."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(12, 32)
        self.up = nn.Linear(32, 2 * 48)
        self.down = nn.Linear(48, 32)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        x = F.gelu(self.inp(x))
        value, gate = self.up(x).chunk(2, dim=-1)              # 2 x (B, 48)
        x = x + self.down(value * torch.sigmoid(gate))
        return self.head(x)

    @staticmethod
    def inputs():
        return (torch.randn(4, 12),)


class FlattenLinear(nn.Module):
    """flatten before a Linear: its in side is channels x spatial size (C*H*W)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):                        # (B, 1, 8, 8)
        x = F.relu(self.conv2(F.relu(self.conv1(x))))  # (B, 8, 4, 4)
        x = torch.flatten(x, 1)                  # (B, 128)
        return self.fc2(self.drop(F.relu(self.fc1(x))))

    @staticmethod
    def inputs():
        return (torch.randn(2, 1, 8, 8),)


class FunctionalMix(nn.Module):
    """Functional calls between modules: F.layer_norm with its own parameters, a scaled residual,
    permute and reshape."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(6, 24)
        self.scale = nn.Parameter(torch.ones(24))
        self.shift = nn.Parameter(torch.zeros(24))
        self.mlp = nn.Linear(24, 24)
        self.out = nn.Linear(24, 2)

    def forward(self, x):                                       # (B, T, 6)
        h = self.embed(x)                                       # (B, T, 24)
        n = F.layer_norm(h, (24,), self.scale, self.shift)
        h = h + 0.5 * F.silu(self.mlp(n))
        h = h.permute(0, 2, 1).mean(-1)                         # (B, 24)
        return self.out(h)

    @staticmethod
    def inputs():
        return (torch.randn(2, 5, 6),)


class NoRule(nn.Module):
    """torch.cumsum has no width rule: the group it touches keeps its width and is reported."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 16)
        self.c = nn.Linear(16, 20)
        self.d = nn.Linear(20, 3)

    def forward(self, x):
        h = torch.cumsum(self.b(torch.relu(self.a(x))), dim=-1)   # b's out group: fixed by cumsum
        return self.d(torch.relu(self.c(h)))                      # c's out group widens

    @staticmethod
    def inputs():
        return (torch.randn(3, 8),)


class TwoLayers(nn.Module):
    """Only two weight layers, both kept dense by default: nothing can pay for widening."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))

    @staticmethod
    def inputs():
        return (torch.randn(3, 8),)


GRAPHS = [DownsampleResidual, CatBranches, Chunked, FlattenLinear, FunctionalMix, NoRule]


class AttentionBlock(nn.Module):
    """A transformer block on nn.MultiheadAttention (its q/k/v one packed parameter) with an MLP."""

    def __init__(self, need_weights: bool = False):
        super().__init__()
        self.need_weights = need_weights
        self.inp = nn.Linear(10, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.ln = nn.LayerNorm(32)
        self.fc1, self.fc2 = nn.Linear(32, 64), nn.Linear(64, 32)
        self.out = nn.Linear(32, 3)

    def forward(self, x):                                                  # (B, T, 10)
        h = self.inp(x)                                                    # (B, T, 32)
        a, _ = self.attn(h, h, h, need_weights=self.need_weights)
        h = self.ln(h + a)
        h = h + self.fc2(torch.relu(self.fc1(h)))                          # (B, T, 32)
        return self.out(h)                                                 # (B, T, 3)

    @staticmethod
    def inputs():
        return (torch.randn(2, 5, 10),)


class GroupedBottleneck(nn.Module):
    """ResNeXt's bottleneck: a 3x3 conv in 16 groups of 4 channels between two dense convs."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.c1 = nn.Conv2d(32, 64, 3, padding=1)
        self.g = nn.Conv2d(64, 64, 3, padding=1, groups=16)
        self.bn = nn.BatchNorm2d(64)
        self.c2 = nn.Conv2d(64, 32, 1)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):                                                  # (B, 3, H, W)
        x = F.relu(self.stem(x))                                           # (B, 32, H, W)
        h = F.relu(self.bn(self.g(F.relu(self.c1(x)))))                    # (B, 64, H, W): 16 groups x 4
        x = x + self.c2(h)
        return self.fc(x.mean((2, 3)))                                     # (B, 5)

    @staticmethod
    def inputs():
        return (torch.randn(2, 3, 8, 8),)
