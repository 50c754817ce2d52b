"""A deterministic tiny Wan 2.1 VAE in the released key layout (bare keys, bf16), for tests and `--model tiny`."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from rdbt_cli.config import TINY_VAE, VAEParams
from rdbt_cli.engine_vae import WanVAE


def tiny_vae_state_dict(params: VAEParams = TINY_VAE, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with the golden models' statistics: weights N(0, 1/fan_in), norm gammas 1 + 0.1·N, biases 0.05·N.

    Gammas are not exactly 1 so that a swapped or missing norm weight changes the output.
    """
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in WanVAE(params).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key in sorted(shapes):
        shape = shapes[key]
        noise = torch.randn(shape, generator=gen)
        if key.endswith(".gamma"):
            t = 1.0 + 0.1 * noise
        elif key.endswith(".bias"):
            t = 0.05 * noise
        else:
            t = noise / math.sqrt(math.prod(shape[1:]))
        sd[key] = t.to(torch.bfloat16)
    return sd


def write_tiny_vae(path: str | os.PathLike, params: VAEParams = TINY_VAE, seed: int = 0) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tiny_vae_state_dict(params, seed), str(path))
    return path
