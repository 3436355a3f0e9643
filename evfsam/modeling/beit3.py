"""BEiT-3 multiway encoder, written to load torchscale 0.2.0 state dicts without renaming.

Module and parameter names follow torchscale (`text_embed`, `vision_embed.proj`,
`encoder.embed_positions.A`, `encoder.layers.N.self_attn.q_proj.A`, `...ffn.B.fc1`, ...), and the
numerics follow it operation for operation: no embedding scale, sub-LayerNorm ("subln") inside
attention and FFN, pre-norm residual blocks, key padding by -inf before a float32 softmax, and
fairseq-style positions that start at 2 separately for the vision and the text part.

The multiway split (vision tokens through the `A` experts, text tokens through `B`) is passed as an
argument instead of torchscale's module-global state, so the module traces cleanly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class BEiT3Config:
    embed_dim: int = 1024
    layers: int = 24
    attention_heads: int = 16
    ffn_embed_dim: int = 4096
    vocab_size: int = 64010
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    max_source_positions: int = 1024
    layernorm_eps: float = 1e-5

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def vision_tokens(self) -> int:
        return self.num_patches + 1  # [CLS] first


class Multiway(nn.Module):
    """Vision tokens (the first `split` along dim 1) through `A`, text tokens through `B`."""

    def __init__(self, a: nn.Module, b: nn.Module):
        super().__init__()
        self.A = a
        self.B = b

    def forward(self, x: torch.Tensor, split: int) -> torch.Tensor:
        return torch.cat([self.A(x[:, :split]), self.B(x[:, split:])], dim=1)


def _layer_norm(dim: int, eps: float) -> Multiway:
    return Multiway(nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps))


def _linear(dim_in: int, dim_out: int) -> Multiway:
    return Multiway(nn.Linear(dim_in, dim_out), nn.Linear(dim_in, dim_out))


class VisionEmbedding(nn.Module):
    def __init__(self, cfg: BEiT3Config):
        super().__init__()
        self.img_size = cfg.img_size
        self.proj = nn.Conv2d(
            cfg.in_chans, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )
        # torchscale keeps a mask token for masked-image pretraining; unused at inference.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.proj(images).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        return torch.cat((cls, x), dim=1)


class PositionalEmbedding(nn.Embedding):
    """fairseq positions: token i gets row i + 2."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        positions = torch.arange(2, x.size(1) + 2, device=x.device).unsqueeze(0)
        return F.embedding(positions, self.weight)


class MultiheadAttention(nn.Module):
    def __init__(self, cfg: BEiT3Config):
        super().__init__()
        dim = cfg.embed_dim
        self.num_heads = cfg.attention_heads
        self.head_dim = dim // cfg.attention_heads
        self.scaling = self.head_dim**-0.5
        self.k_proj = _linear(dim, dim)
        self.v_proj = _linear(dim, dim)
        self.q_proj = _linear(dim, dim)
        self.out_proj = _linear(dim, dim)
        self.inner_attn_ln = _layer_norm(dim, cfg.layernorm_eps)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor, split: int) -> torch.Tensor:
        bsz, length, dim = x.shape
        q = self.q_proj(x, split) * self.scaling
        k = self.k_proj(x, split)
        v = self.v_proj(x, split)
        q, k, v = (t.view(bsz, length, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        weights = q @ k.transpose(-1, -2)
        weights = weights.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        weights = F.softmax(weights, dim=-1, dtype=torch.float32).type_as(weights)
        attn = (weights @ v).transpose(1, 2).reshape(bsz, length, dim)
        return self.out_proj(self.inner_attn_ln(attn, split), split)


class FeedForwardNetwork(nn.Module):
    def __init__(self, cfg: BEiT3Config):
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.ffn_embed_dim)
        self.fc2 = nn.Linear(cfg.ffn_embed_dim, cfg.embed_dim)
        self.ffn_layernorm = nn.LayerNorm(cfg.ffn_embed_dim, eps=cfg.layernorm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        x = F.gelu(x.float()).type_as(x)
        return self.fc2(self.ffn_layernorm(x))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: BEiT3Config):
        super().__init__()
        self.self_attn = MultiheadAttention(cfg)
        self.self_attn_layer_norm = _layer_norm(cfg.embed_dim, cfg.layernorm_eps)
        self.ffn = Multiway(FeedForwardNetwork(cfg), FeedForwardNetwork(cfg))
        self.final_layer_norm = _layer_norm(cfg.embed_dim, cfg.layernorm_eps)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor, split: int) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x, split), key_padding_mask, split)
        return x + self.ffn(self.final_layer_norm(x, split), split)


class Encoder(nn.Module):
    def __init__(self, cfg: BEiT3Config):
        super().__init__()
        self.embed_positions = Multiway(
            PositionalEmbedding(cfg.vision_tokens + 2, cfg.embed_dim),
            PositionalEmbedding(cfg.max_source_positions, cfg.embed_dim),
        )
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers))
        self.layer_norm = _layer_norm(cfg.embed_dim, cfg.layernorm_eps)

    def forward(self, tokens: torch.Tensor, padding_mask: torch.Tensor, split: int) -> torch.Tensor:
        x = tokens + self.embed_positions(tokens, split)
        x = x * (1 - padding_mask.unsqueeze(-1).type_as(x))
        for layer in self.layers:
            x = layer(x, padding_mask, split)
        return self.layer_norm(x, split)


class BEiT3(nn.Module):
    def __init__(self, cfg: BEiT3Config):
        super().__init__()
        self.cfg = cfg
        self.text_embed = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
        self.vision_embed = VisionEmbedding(cfg)
        self.encoder = Encoder(cfg)

    def forward(
        self,
        visual_tokens: torch.Tensor,
        textual_tokens: torch.Tensor,
        text_padding_position: torch.Tensor,
    ) -> torch.Tensor:
        """Returns the encoder output [B, vision_tokens + L, D]; row 0 is the fused [CLS] token.

        `text_padding_position` is 1 (or True) at padded text positions, as in torchscale.
        """
        vision = self.vision_embed(visual_tokens)
        split = vision.shape[1]
        text = self.text_embed(textual_tokens)
        tokens = torch.cat([vision, text], dim=1)
        padding = torch.cat(
            [torch.zeros(vision.shape[:-1], dtype=torch.bool, device=vision.device),
             text_padding_position.to(torch.bool)],
            dim=1,
        )
        return self.encoder(tokens, padding, split)


class BEiT3Wrapper(nn.Module):
    """Upstream's `mm_extractor`: holds the encoder as `.beit3` (hence `mm_extractor.beit3.*`)."""

    def __init__(self, cfg: BEiT3Config):
        super().__init__()
        self.beit3 = BEiT3(cfg)
