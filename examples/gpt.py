"""A small byte-level GPT in the style of nanoGPT: token + position embeddings, pre-LN transformer
blocks (causal self-attention, GELU MLP), final LayerNorm, lm_head to 256 byte values.

    gpt        lm_head has its own weight
    gpt_tied   lm_head.weight is the token embedding's weight (one Parameter, two uses)

Input (B, T) int64 byte ids with T <= block_size, output logits (B, T, 256). The file has two
factories, so name one after the colon:

    siftc convert examples/gpt.py:gpt --kind parallel --sparsity 0.9 -o out/gpt-par90
    siftc convert examples/gpt.py:gpt_tied --kind factorized --sparsity 0.75 -o out/gpt-tied-fac75
    siftc inspect out/gpt-par90
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256      # bytes: any text is a valid input, no tokenizer to ship
    block_size: int = 64       # longest sequence; sizes the position table
    n_layer: int = 2           # enough to have repeated blocks, small enough to trace in a blink
    n_head: int = 4            # head_dim = n_embd / n_head = 32
    n_embd: int = 128          # residual width; the MLP's hidden width is 4x this
    tie_weights: bool = False  # share lm_head.weight with the token embedding (GPT-2 does)

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                             f"pick n_embd as a multiple of n_head")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x):  # (B, T, C)
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)               # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)     # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)                # (B, T, C)
        return self.c_proj(y)                                           # (B, T, C)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):                             # (B, T, C)
        return self.c_proj(self.gelu(self.c_fc(x)))  # (B, T, 4C) -> (B, T, C)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x):                  # (B, T, C)
        x = x + self.attn(self.ln_1(x))    # (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.Sequential(*[Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                # GPT-2: scale residual projections so the residual stream's variance does not grow with depth
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx):                       # (B, T) int64 byte ids
        _, T = idx.size()                         # from the input, so the traced graph takes any T
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.wte(idx) + self.wpe(pos)         # (B, T, C)
        x = self.blocks(x)                        # (B, T, C)
        return self.lm_head(self.ln_f(x))         # (B, T, vocab_size)


def gpt() -> nn.Module:
    return GPT(GPTConfig())


def gpt_tied() -> nn.Module:
    return GPT(GPTConfig(tie_weights=True))


def example_inputs():
    return (torch.randint(0, 256, (1, 64)),)  # (B, T) byte ids, T = block_size
