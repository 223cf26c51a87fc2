"""Cross-modal attention: image tokens (queries) read the report's tokens (keys/values).

Improves on the reference in two ways it lacked: a 2D sine positional encoding on the image
tokens, so "upper left" can be matched to a place, and the text padding mask, so padding tokens
of shorter reports in a batch carry no weight.

A text path that only helps (`FusionConfig.text_residual`, `text_dropout`): with "zero" the
attention's output projection starts at zero (with "gate", a tanh gate that starts at zero), and
the text weights come from their own random stream, so before training the model is exactly the
`no_text` network (same image-path weights); in training each sample's text residual can be
dropped with probability `text_dropout`, so the image path keeps being trained on its own.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from fasttextdiff.config import FusionConfig


def sine_positions_2d(height: int, width: int, dim: int, device=None, dtype=None) -> torch.Tensor:
    """(H*W, dim) encoding of normalised (y, x), the same for every scale of a feature pyramid."""
    if dim % 4:
        raise ValueError(f"2D sine positions need dim divisible by 4, got {dim}")
    quarter = dim // 4
    freqs = torch.exp(torch.arange(quarter, device=device, dtype=torch.float32) * (-math.log(1000.0) / quarter))
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    y_angles = ys[:, None] * freqs[None] * 2 * math.pi * 4
    x_angles = xs[:, None] * freqs[None] * 2 * math.pi * 4
    y_enc = torch.cat([y_angles.sin(), y_angles.cos()], dim=1)  # (H, dim/2)
    x_enc = torch.cat([x_angles.sin(), x_angles.cos()], dim=1)  # (W, dim/2)
    grid = torch.cat(
        [y_enc[:, None, :].expand(height, width, -1), x_enc[None, :, :].expand(height, width, -1)], dim=-1
    )
    return grid.reshape(height * width, dim).to(dtype or torch.float32)


@contextlib.contextmanager
def separate_rng_stream(index: int):
    """Draw weights from a stream of their own: the global RNG continues as if nothing was drawn,
    so a model with a text branch initialises its image path exactly like one without."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed((torch.initial_seed() * 1_000_003 + 7919 * (index + 1)) % 2**63)
        yield


def cross_attention(attn: nn.MultiheadAttention, query: torch.Tensor, kv: torch.Tensor,
                    text_mask: torch.Tensor | None, training: bool) -> torch.Tensor:
    """`attn(query, kv, kv, key_padding_mask=~text_mask)` computed by `scaled_dot_product_attention`.

    Why not the module's own forward: it expands the padding mask to a (B*heads, N, L) float tensor, which
    at 128x128 image tokens costs more than the attention itself (1.7x slower forward + backward, measured
    on CPU at batch 8). Same parameters, so saved models load and compute the same values.
    """
    d, heads = attn.embed_dim, attn.num_heads
    w, b = attn.in_proj_weight, attn.in_proj_bias
    bias = (lambda i: None) if b is None else (lambda i: b[i * d:(i + 1) * d])

    def split(x: torch.Tensor, i: int) -> torch.Tensor:  # (B, T, d) -> (B, heads, T, d / heads)
        return F.linear(x, w[i * d:(i + 1) * d], bias(i)).unflatten(-1, (heads, d // heads)).transpose(1, 2)

    mask = None if text_mask is None else text_mask.bool()[:, None, None, :]  # True = attend
    out = F.scaled_dot_product_attention(split(query, 0), split(kv, 1), split(kv, 2), attn_mask=mask,
                                         dropout_p=attn.dropout if training else 0.0)
    return attn.out_proj(out.transpose(1, 2).flatten(2))


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention then feed-forward, each residual (one transformer block)."""

    def __init__(self, config: FusionConfig, use_text: bool = True, index: int = 0):
        super().__init__()
        self.use_text = use_text
        self.gate = None
        hidden = int(config.dim * config.mlp_ratio)
        closed = config.text_residual != "plain"
        if use_text and not closed:
            self._build_text(config)
        self.norm_ff = nn.LayerNorm(config.dim)
        self.ff = nn.Sequential(
            nn.Linear(config.dim, hidden), nn.GELU(), nn.Dropout(config.dropout), nn.Linear(hidden, config.dim)
        )
        if use_text and closed:  # the block starts as the no_text block
            with separate_rng_stream(index):
                self._build_text(config)
            if config.text_residual == "gate":
                self.gate = nn.Parameter(torch.zeros(1))  # tanh(0) = 0
            else:
                nn.init.zeros_(self.attn.out_proj.weight)
                nn.init.zeros_(self.attn.out_proj.bias)

    def _build_text(self, config: FusionConfig) -> None:
        self.norm_q = nn.LayerNorm(config.dim)
        self.norm_kv = nn.LayerNorm(config.dim)
        self.attn = nn.MultiheadAttention(config.dim, config.heads, dropout=config.dropout, batch_first=True)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None, text: torch.Tensor | None,
                text_mask: torch.Tensor | None, keep_text: torch.Tensor | None = None) -> torch.Tensor:
        """`keep_text` (B,) in {0, 1}: per-sample switch of the text residual (text dropout)."""
        if self.use_text:
            query = self.norm_q(tokens if positions is None else tokens + positions)
            kv = self.norm_kv(text)
            attended = cross_attention(self.attn, query, kv, text_mask, self.training)
            if self.gate is not None:
                attended = torch.tanh(self.gate) * attended
            if keep_text is not None:
                attended = attended * keep_text.to(attended.dtype)[:, None, None]
            tokens = tokens + attended
        return tokens + self.ff(self.norm_ff(tokens))


class CrossModalFusion(nn.Module):
    """Brings every feature scale to `dim` channels and lets its pixels attend to the report."""

    def __init__(self, in_channels: list[int], text_dim: int, config: FusionConfig, use_text: bool = True):
        super().__init__()
        if not in_channels:
            raise ValueError("CrossModalFusion needs at least one feature scale")
        if use_text and text_dim <= 0:
            raise ValueError(f"text_dim must be positive when the text branch is used, got {text_dim}")
        self.config = config
        self.use_text = use_text
        self.project = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, config.dim, kernel_size=1), nn.GroupNorm(_groups(config.dim), config.dim))
            for c in in_channels
        )
        self.text_project = None
        closed = config.text_residual != "plain"
        if use_text and not closed:
            self.text_project = nn.Linear(text_dim, config.dim)
        n_blocks = 1 if config.shared else len(in_channels)
        self.blocks = nn.ModuleList(CrossAttentionBlock(config, use_text, i) for i in range(n_blocks))
        # False: every sample's text residual is off (the image-first phase of TrainConfig.text_fallback)
        self.text_enabled = True
        if use_text and closed:
            with separate_rng_stream(n_blocks):
                self.text_project = nn.Linear(text_dim, config.dim)

    def forward(self, features: list[torch.Tensor], text_states: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        if len(features) != len(self.project):
            raise ValueError(f"expected {len(self.project)} feature scales, got {len(features)}")
        text = None
        keep_text = None
        if self.use_text:
            if text_states is None:
                raise ValueError("this model was built with text; pass the report's token states")
            if text_states.shape[0] != features[0].shape[0]:
                raise ValueError(
                    f"batch of {features[0].shape[0]} images but {text_states.shape[0]} report encodings"
                )
            text = self.text_project(text_states.to(features[0].dtype))
            if not self.text_enabled:
                keep_text = torch.zeros(text.shape[0], dtype=torch.bool, device=text.device)
            elif self.training and self.config.text_dropout > 0:  # one draw per sample, for every scale
                keep_text = torch.rand(text.shape[0], device=text.device) >= self.config.text_dropout
        fused = []
        for i, (feat, project) in enumerate(zip(features, self.project)):
            x = project(feat)
            b, c, h, w = x.shape
            tokens = x.flatten(2).transpose(1, 2)  # (B, H*W, dim)
            positions = None
            if self.config.positional_encoding:
                positions = sine_positions_2d(h, w, c, device=x.device, dtype=x.dtype)[None]
            block = self.blocks[0 if self.config.shared else i]
            tokens = block(tokens, positions, text, text_mask, keep_text)
            fused.append(tokens.transpose(1, 2).reshape(b, c, h, w))
        return fused


def _groups(channels: int) -> int:
    for g in (8, 4, 2):
        if channels % g == 0:
            return g
    return 1
