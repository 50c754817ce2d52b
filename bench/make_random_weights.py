"""Write full-size Anima files with random weights in the released layouts, once, for benchmarks.

    python bench/make_random_weights.py .bench/models

writes diffusion_models/anima_random.safetensors (DiT + adapter, `net.` keys, bf16, ~4.2 GB),
text_encoders/qwen_3_06b_random.safetensors (`model.` keys, bf16, ~1.2 GB) and vae/qwen_image_vae_random.safetensors
(bare Wan 2.1 keys, bf16). Any tool that reads the released files (rdbt, ComfyUI, stable-diffusion.cpp) loads them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from rdbt_cli import engine
from rdbt_cli.bench import ANIMA_2B_DIT, ANIMA_ADAPTER, WAN21_VAE, random_module
from rdbt_cli.config import QwenParams

QWEN3_06B = QwenParams(
    vocab_size=151936, hidden_size=1024, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128,
    intermediate_size=3072,
)


def write(module_factory, path: Path, prefix: str) -> None:
    if path.exists():
        print(f"{path} exists, kept")
        return
    with torch.device("meta"):
        module = module_factory()
    module = random_module(module, "cpu", torch.bfloat16)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({prefix + k: v.contiguous() for k, v in module.state_dict().items()}, str(path))
    print(f"{path}: {path.stat().st_size / 2**30:.2f} GiB")
    del module


def main(root: str) -> None:
    root = Path(root)
    write(lambda: engine.AnimaDiT(ANIMA_2B_DIT, ANIMA_ADAPTER), root / "diffusion_models" / "anima_random.safetensors",
          "net.")
    write(lambda: engine.Qwen3Encoder(QWEN3_06B), root / "text_encoders" / "qwen_3_06b_random.safetensors", "model.")
    write(lambda: engine.WanVAE(WAN21_VAE), root / "vae" / "qwen_image_vae_random.safetensors", "")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".bench/models")
