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


# Bump when any tiny generator changes, so cached copies from an older rdbt are rebuilt rather than reused.
TINY_VERSION = 1


def ensure_tiny_models(root: str | os.PathLike | None = None):
    """The embedded tiny model (DiT, text encoder, VAE, tokenizers) under user_dir()/tiny-vN, built once.

    Built in a temporary folder and renamed into place, so concurrent first runs (torchrun ranks) never see a half
    written model. Returns pipeline.ModelPaths.
    """
    import shutil
    import tempfile
    from pathlib import Path

    from rdbt_cli.config import user_dir
    from rdbt_cli.pipeline import ModelPaths
    from rdbt_cli.tiny_text import build_tiny_tokenizers, write_tiny_text_encoder
    from rdbt_cli.tiny_vae import write_tiny_vae

    root = Path(root) if root is not None else user_dir() / f"tiny-v{TINY_VERSION}"
    paths = ModelPaths(
        dit=root / "diffusion_models" / "anima_tiny.safetensors",
        text_encoder=root / "text_encoders" / "qwen3_tiny.safetensors",
        vae=root / "vae" / "wan21_vae_tiny.safetensors",
        qwen_tokenizer=root / "tokenizers" / "qwen" / "tokenizer.json",
        t5_tokenizer=root / "tokenizers" / "t5" / "tokenizer.json",
    )
    if all(Path(p).exists() for p in vars(paths).values()):
        return paths
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=root.parent))
    try:
        write_tiny_dit(tmp / "diffusion_models" / paths.dit.name)
        write_tiny_text_encoder(tmp / "text_encoders" / paths.text_encoder.name)
        write_tiny_vae(tmp / "vae" / paths.vae.name)
        build_tiny_tokenizers(tmp / "tokenizers")
        try:
            os.rename(tmp, root)
        except OSError:
            if not all(Path(p).exists() for p in vars(paths).values()):  # not another process winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths
