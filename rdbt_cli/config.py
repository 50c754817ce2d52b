"""Plain data: network sizes (filled from checkpoint shapes), what to load, and the names rdbt accepts.

Generation settings (what to make) are a table of their own, in settings.py.

No torch import here, so the CLI can resolve and validate everything before any weights are read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def user_dir() -> Path:
    """Where rdbt keeps user state (presets, the LoRA stack, caches, the tiny model). `RDBT_HOME` relocates all of it.

    Never created here: whoever writes a file creates its folder.
    """
    if os.environ.get("RDBT_HOME"):
        return Path(os.environ["RDBT_HOME"])
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "rdbt"


def data_dir() -> Path:
    """Where rdbt keeps large files it fetches (downloaded models): $XDG_DATA_HOME/rdbt, by default ~/.local/share/rdbt,
    not the config folder. `RDBT_HOME` relocates this too."""
    if os.environ.get("RDBT_HOME"):
        return Path(os.environ["RDBT_HOME"])
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "rdbt"


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


# The embedded tiny model (`--model tiny`, and tests): small enough to run in well under a second on a CPU, with every
# structural feature of the released model (adapter with self-attention, AdaLN-LoRA, 3-D RoPE, a full Wan VAE).
# The tiny tokenizers are built by rdbt itself, so their vocabularies are small and the embeddings sized to match.
TINY_QWEN = QwenParams(
    vocab_size=2048, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=192
)
TINY_ADAPTER = AdapterParams(
    source_dim=64, model_dim=96, target_dim=96, num_layers=2, num_heads=3, vocab_size=1024, mlp_dim=384
)
TINY_DIT = DiTParams(
    model_channels=128, num_blocks=2, num_heads=2, mlp_dim=512, in_channels=16, out_channels=16, context_dim=96,
    adaln_lora_dim=256,
)
TINY_VAE = VAEParams(base_dim=16)


# Names the CLI accepts; sampling.SAMPLERS / SCHEDULERS implement exactly these (a test checks they agree), so presets
# and flags can be validated without importing torch.
SAMPLER_NAMES = (
    "er_sde", "sa_solver_pece", "sa_solver", "euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "res_multistep",
)
SCHEDULER_NAMES = ("simple", "normal", "karras", "exponential", "sgm_uniform", "beta", "linear_quadratic")
# How a LoRA made for the 28-block Anima meets a depth-expanded model (40 or 52 blocks): refused unless one is chosen;
# lora.remap_blocks implements the others.
LORA_REMAPS = ("refuse", "expand", "spread", "first")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "fp32", "bf16", "fp16", "fp8")
ATTENTION_BACKENDS = ("sdpa", "xformers")


@dataclass(frozen=True)
class LoraSpec:
    name: str  # a file stem in loras/, a unique prefix of one, or a path
    weight: float = 1.0


@dataclass
class LoadParams:
    """What to load and how. Machine facts (device, dtype) never come from presets."""

    model: str | None = None  # path, name in the models folder, or "tiny"
    text_encoder: str | None = None
    vae: str | None = None
    qwen_tokenizer: str | None = None
    t5_tokenizer: str | None = None
    models_dir: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    low_vram: bool = False
    attention: str = "sdpa"
    compile: bool = False  # torch.compile the DiT blocks


@dataclass(frozen=True)
class ModelPaths:
    """The files a generation loads, all resolved and checked before any weights are read."""

    dit: Path
    text_encoder: Path
    vae: Path
    qwen_tokenizer: Path
    t5_tokenizer: Path
