"""Deterministic tiny checkpoints in the released key layouts, for tests and `--model tiny`.

Random weights as the golden README describes: linear weights N(0, 1/fan_in), norm weights 1 + 0.1·N, biases 0.05·N,
stored bf16 like the released files.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

from rdbt_cli.config import TINY_ADAPTER, TINY_DIT, AdapterParams, DiTParams
from rdbt_cli.engine import AnimaDiT


def tiny_dit_state_dict(
    dit: DiTParams = TINY_DIT, adapter: AdapterParams = TINY_ADAPTER, seed: int = 0, prefix: str = "net."
) -> dict[str, torch.Tensor]:
    """A random Anima DiT + LLM adapter state dict with the released keys under `prefix`, bf16."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AnimaDiT(dit, adapter).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=g, dtype=torch.float32)
        if key.endswith(".bias"):
            w = 0.05 * noise
        elif len(shape) == 1:  # RMSNorm weights: not exactly 1, so a swapped or missing norm shows
            # The DiT's cross-attention q/k norms near 2 make a random text signal strong enough to test.
            base = 2.0 if ".cross_attn." in key and not key.startswith("llm_adapter.") else 1.0
            w = base + 0.1 * noise
        elif key == "llm_adapter.embed.weight":
            w = noise
        else:
            w = noise / shape[1] ** 0.5
        sd[prefix + key] = w.to(torch.bfloat16)
    return sd


def write_tiny_dit(path: str | os.PathLike, **kw) -> str:
    """Save `tiny_dit_state_dict(**kw)` as a .safetensors file; returns the path."""
    path = str(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tiny_dit_state_dict(**kw), path)
    return path
