"""nn.MultiheadAttention as four Linear layers, so every kind can transform its projections.

MHA packs q/k/v into one parameter (`in_proj_weight`) and runs them inside
F.multi_head_attention_forward, where no kind can reach them (`siftc.layers.PackedAttention`).
SplitAttention computes the same thing from `q_proj`, `k_proj`, `v_proj` and `out_proj` (nn.Linear) and
a head split written `x.view(B, T, heads, head_dim)`, which the width rules read as heads x head_dim.
`siftc.convert` splits every supported MHA of its copy of the model before tracing, and the tracer
traces through SplitAttention (`siftc.trace.leaf_rule`):

    before   attn = nn.MultiheadAttention(32, 4, batch_first=True)           attn(x, x, x) -> (y, w)
    after    split_attention(model)   # attn is SplitAttention, attn.q_proj is nn.Linear(32, 32), ...
             attn(x, x, x) -> the same (y, w), within float rounding

Supported: MHA's forward arguments (key_padding_mask, need_weights, attn_mask, average_attn_weights,
is_causal), bool and float masks, both batch_first settings, kdim/vdim, dropout in training mode.
Not supported (`unsupported` says which): add_bias_kv, add_zero_attn, subclasses of MHA (their forward
may differ), unbatched (2-D) inputs.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


class SplitAttention(nn.Module):
    """Multi-head attention from four nn.Linear layers; forward as nn.MultiheadAttention.forward."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 kdim: int | None = None, vdim: int | None = None, batch_first: bool = False,
                 device=None, dtype=None):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        like = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.dropout, self.batch_first = dropout, batch_first
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias, **like)
        self.k_proj = nn.Linear(kdim or embed_dim, embed_dim, bias, **like)
        self.v_proj = nn.Linear(vdim or embed_dim, embed_dim, bias, **like)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias, **like)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> "SplitAttention":
        """A SplitAttention with `mha`'s weights (copies), device, dtype and train/eval mode."""
        reason = unsupported(mha)
        if reason:
            raise ValueError(f"cannot split this nn.MultiheadAttention: {reason}")
        w = mha.out_proj.weight
        new = cls(mha.embed_dim, mha.num_heads, mha.dropout, mha.in_proj_bias is not None, mha.kdim, mha.vdim,
                  mha.batch_first, device=w.device, dtype=w.dtype)
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.chunk(3)                    # 3 x (E, E)
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        biases = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None,) * 3
        with torch.no_grad():
            for proj, wt, b in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases):
                proj.weight.copy_(wt)
                if b is not None:
                    proj.bias.copy_(b)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        theirs = (weights[0], biases[0], weights[1], biases[1], weights[2], biases[2], mha.out_proj.weight,
                  mha.out_proj.bias)  # in new.parameters() order; a frozen MHA stays frozen
        for mine, t in zip(new.parameters(), [t for t in theirs if t is not None]):
            mine.requires_grad_(t.requires_grad)
        return new.train(mha.training)

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False):
        if is_causal and attn_mask is None:  # as MHA: is_causal is a hint about the mask given
            raise RuntimeError("SplitAttention: is_causal needs attn_mask (the causal mask it describes)")
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))  # (B, T, E)
        B, L, S = query.shape[0], query.shape[1], key.shape[1]
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(query).view(B, L, h, d).transpose(1, 2)     # (B, h, L, d)
        k = self.k_proj(key).view(B, S, h, d).transpose(1, 2)       # (B, h, S, d)
        v = self.v_proj(value).view(B, S, h, d).transpose(1, 2)     # (B, h, S, d)
        # MHA passes the causal hint on only when no other mask has to be merged in
        causal = is_causal and key_padding_mask is None and not need_weights
        mask = None
        if not causal and (attn_mask is not None or key_padding_mask is not None):
            # the dtype read off the parameter dict, not through the module: no graph node for it
            mask = additive_mask(attn_mask, key_padding_mask, h, self.q_proj._parameters["weight"].dtype)
        weights = None
        if need_weights:
            scores = (q * math.sqrt(1.0 / d)) @ k.transpose(-2, -1)  # (B, h, L, S)
            if mask is not None:
                scores = scores + mask
            weights = F.dropout(scores.softmax(dim=-1), self.dropout, self.training)
            y = weights @ v                                          # (B, h, L, d)
            if average_attn_weights:
                weights = weights.mean(dim=1)                        # (B, L, S)
        else:
            # a product, not `p if self.training else 0`: no branch on the training flag to trace
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout * self.training,
                                               is_causal=causal)    # (B, h, L, d)
        y = self.out_proj(y.transpose(1, 2).flatten(2))             # (B, L, E)
        return (y if self.batch_first else y.transpose(0, 1)), weights


@torch.fx.wrap
def additive_mask(attn_mask, key_padding_mask, num_heads: int, dtype):
    """MHA's attn_mask ((L, S) or (B*heads, L, S)) and key_padding_mask ((B, S)) merged into one float
    mask broadcastable to the scores (B, heads, L, S), a bool True (= ignore) becoming -inf, as
    F.multi_head_attention_forward merges them. A leaf of fx traces (`torch.fx.wrap`): its branches on
    dtype and rank run on the real masks, and no mask dim meets a width group."""
    mask = None
    if attn_mask is not None:
        m = _as_float(attn_mask, dtype)
        mask = m.view(-1, num_heads, *m.shape[-2:]) if m.dim() == 3 else m  # (B, h, L, S) or (L, S)
    if key_padding_mask is not None:
        kpm = _as_float(key_padding_mask, dtype)[:, None, None, :]          # (B, 1, 1, S)
        mask = kpm if mask is None else mask + kpm
    return mask


def _as_float(mask, dtype):
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def unsupported(mha: nn.MultiheadAttention) -> str | None:
    """Why `mha` cannot become a SplitAttention, or None when it can."""
    if type(mha) is not nn.MultiheadAttention:
        return f"{type(mha).__name__} subclasses nn.MultiheadAttention and may change its forward"
    if mha.bias_k is not None:
        return "add_bias_kv=True (learned key/value bias rows appended to the sequence)"
    if mha.add_zero_attn:
        return "add_zero_attn=True (a zero key/value row appended to the sequence)"
    return None


def split_attention(model: nn.Module, keep=None) -> list[str]:
    """Replace, in place, every supported nn.MultiheadAttention under `model` by a SplitAttention with
    its weights, device, dtype and mode; return the replaced modules' names (all names of a module
    shared by several parents). Unsupported ones (`unsupported`), those `keep(name, mha)` is true for
    (the `--leaf` patterns) and `model` itself are left as they are.

        >>> split_attention(block)        # block.attn was nn.MultiheadAttention(32, 4)
        ['attn']                          # block.attn is SplitAttention; block.attn.q_proj is nn.Linear
    """
    made, names = {}, []
    for name, parent in list(model.named_modules(remove_duplicate=False)):
        for child_name, child in list(parent._modules.items()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.MultiheadAttention) and unsupported(child) is None and \
                    not (keep and keep(full, child)):
                if id(child) not in made:  # one MHA under two parents stays one module
                    made[id(child)] = SplitAttention.from_mha(child)
                setattr(parent, child_name, made[id(child)])
            elif child not in made.values():  # a replacement met again under a second parent's name
                continue
            names.append(full)
    return names
