"""BEiT-3's attention (`evfsam.modeling.beit3.MultiheadAttention`) on `F.scaled_dot_product_attention`.

The original masks padded keys by filling a float score tensor with -inf and runs a float32 softmax
over [B, heads, L, L] scores.  Here the key padding is a boolean mask [B, 1, 1, L] handed to SDPA, or
no mask at all when no prompt of the batch is padded, so that SDPA may choose a fused kernel (flash
takes no mask; the memory-efficient and cuDNN kernels take a boolean one).  Whether a batch is padded
is decided on the host, from the token ids the benchmark built (`set_key_padding`), never by reading a
device tensor: that would be a host sync inside CUDA-graph capture and a graph break under
torch.compile.  Same parameters, same function up to rounding; `gpu_check` checks it against the eager
model and reports which kernel ran.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from evfsam.modeling.beit3 import MultiheadAttention


class SdpaMultiheadAttention(nn.Module):
    """Drop-in for BEiT-3's `MultiheadAttention`, sharing its parameters."""

    def __init__(self, original: MultiheadAttention):
        super().__init__()
        self.num_heads, self.head_dim, self.scaling = original.num_heads, original.head_dim, original.scaling
        self.q_proj, self.k_proj, self.v_proj = original.q_proj, original.k_proj, original.v_proj
        self.out_proj, self.inner_attn_ln = original.out_proj, original.inner_attn_ln
        self.mask_keys = True  # False only when the host knows no key of the batch is padding

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor, split: int) -> torch.Tensor:
        bsz, length, dim = x.shape
        q, k, v = (proj(x, split).view(bsz, length, self.num_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        keep = ~key_padding_mask[:, None, None, :] if self.mask_keys else None
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=self.scaling)
        attn = attn.transpose(1, 2).reshape(bsz, length, dim)
        return self.out_proj(self.inner_attn_ln(attn, split), split)


def use_sdpa_beit3(model: nn.Module) -> int:
    """Swap every BEiT-3 attention under `model` in place; returns how many."""
    swapped = 0
    for module in list(model.modules()):
        if hasattr(module, "self_attn") and isinstance(module.self_attn, MultiheadAttention):
            module.self_attn = SdpaMultiheadAttention(module.self_attn)
            swapped += 1
    return swapped


def set_key_padding(model: nn.Module, padded: bool) -> None:
    """Tell every swapped attention whether the coming batch has padded prompts (host-side knowledge)."""
    for module in model.modules():
        if isinstance(module, SdpaMultiheadAttention):
            module.mask_keys = padded
