"""Models written the way third-party code is: shape checks, defaulted arguments, training-mode
branches, and tiny HuggingFace transformers built from configs (random init, never downloaded)."""
import math

import torch
import torch.nn.functional as F
from torch import nn


class GPTConfig:
    block_size = 32
    vocab_size = 96
    n_layer = 2
    n_head = 4
    n_embd = 64
    dropout = 0.1


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        mask = torch.tril(torch.ones(cfg.block_size, cfg.block_size))
        self.register_buffer("bias", mask.view(1, 1, cfg.block_size, cfg.block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.dropout(F.softmax(att, dim=-1), self.dropout, self.training)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        h = F.gelu(self.c_fc(self.ln_2(x)))
        if self.training:
            h = F.dropout(h, 0.1)
        return x + self.c_proj(h)


class NanoGPT(nn.Module):
    """nanoGPT's style: `assert t <= block_size`, `if idx.dim() == 1`, `targets=None`, a tied head."""

    def __init__(self, cfg=GPTConfig()):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.h = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight

    def forward(self, idx, targets=None):
        if idx.dim() == 1:
            idx = idx[None]
        b, t = idx.size()
        assert t <= self.config.block_size, f"Cannot forward sequence of length {t}"
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        x = self.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return self.lm_head(x[:, [-1], :]), None


class Decides(nn.Module):
    """Python decisions on shapes and dtypes that plain fx cannot take."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x, scale: float = 1.0):
        if x.dtype != torch.float32:
            x = x.float()
        low = torch.finfo(x.dtype).min
        cols = [x[:, i] for i in range(x.size(1))]   # range(size): fixes the width
        y = torch.stack(cols, 1)
        keep = int(y.size(1) * 0.5)
        y = torch.cat([y[:, :keep], y[:, keep:]], 1)
        return self.fc(y).clamp(min=low) * scale


class OnValues(nn.Module):
    """A branch on tensor values: not traceable, whatever the tracer."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return x


class ShortPath(nn.Module):
    """A branch on a length being 1, which torch's shape analysis assumes away."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        B, T, C = x.shape
        if T == 1:
            return self.fc(x) * 0
        return self.fc(x)


def hf_models():
    """Tiny transformers models from configs, with an input each: name -> (model, inputs)."""
    import transformers as tf
    small = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    return {
        "gpt2": (tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64,
                                                  bos_token_id=0, eos_token_id=0)),
                 {"input_ids": ids}),
        "bert": (tf.BertForSequenceClassification(tf.BertConfig(vocab_size=128, max_position_embeddings=64, **small)),
                 {"input_ids": ids, "attention_mask": torch.ones(2, 16, dtype=torch.long)}),
        "llama": (tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=128, max_position_embeddings=64, num_key_value_heads=2,
                                                     bos_token_id=0, eos_token_id=0, **small)),
                  {"input_ids": ids}),
        "vit": (tf.ViTForImageClassification(tf.ViTConfig(image_size=32, patch_size=8, num_labels=10, **small)),
                {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))}),
    }
