"""Plain data: network sizes (filled from checkpoint shapes), load and generation parameters, family defaults.

No torch import here, so the CLI can resolve and validate everything before any weights are read.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AdapterParams:
    """LLM adapter (anima/model.py LLMAdapter). Released: 1024/1024/1024, 6 layers, 16 heads, vocab 32128."""

    source_dim: int  # Qwen hidden width it cross-attends to
    model_dim: int
    target_dim: int  # output width = the DiT's cross-attention context width
    num_layers: int
    num_heads: int
    vocab_size: int  # T5 vocabulary
    mlp_dim: int


@dataclass(frozen=True)
class DiTParams:
    """Cosmos-Predict2 MiniTrainDIT as used by Anima. Released: 2048 wide, 28 blocks, 16 heads, MLP 8192."""

    model_channels: int
    num_blocks: int
    num_heads: int
    mlp_dim: int
    in_channels: int  # latent channels, without the padding-mask channel
    out_channels: int
    context_dim: int  # cross-attention context width (adapter output)
    adaln_lora_dim: int
    patch_spatial: int = 2
    patch_temporal: int = 1
    rope_extrapolation: tuple[float, float, float] = (1.0, 4.0, 4.0)  # (t, h, w), as released

    @property
    def head_dim(self) -> int:
        return self.model_channels // self.num_heads


@dataclass(frozen=True)
class QwenParams:
    """Qwen3 decoder used as the text encoder. Released Qwen3-0.6B: 1024 wide, 28 layers, 16/8 heads of 128."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 1_000_000.0
    eps: float = 1e-6


@dataclass(frozen=True)
class VAEParams:
    """Wan 2.1 / Qwen-Image VAE. Released: base dim 96, z 16, dim_mult (1, 2, 4, 4), 2 res blocks."""

    base_dim: int
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
