"""Time merging a rank-32 LoRA into a full-size Anima DiT (28 blocks, real shapes) on the CPU, and switching stacks.

Usage: python bench/lora_bench.py [--dtype bf16|fp32] [--rank 32] [--blocks 28]
bf16 needs about 4 GB for the weights plus 4 GB for the originals kept for undo; fp32 twice that.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from rdbt_cli.lora import apply_loras, parse_lora_file

C, CTX, MLP, ADA = 2048, 1024, 8192, 256  # anima.md §1.3


def linear_shapes(blocks: int) -> dict[str, tuple[int, int]]:
    shapes = {}
    for n in range(blocks):
        b = f"blocks.{n}"
        for p in ("q_proj", "k_proj", "v_proj", "output_proj"):
            shapes[f"{b}.self_attn.{p}"] = (C, C)
        shapes |= {f"{b}.cross_attn.q_proj": (C, C), f"{b}.cross_attn.k_proj": (C, CTX),
                   f"{b}.cross_attn.v_proj": (C, CTX), f"{b}.cross_attn.output_proj": (C, C),
                   f"{b}.mlp.layer1": (MLP, C), f"{b}.mlp.layer2": (C, MLP)}
        for m in ("self_attn", "cross_attn", "mlp"):
            shapes |= {f"{b}.adaln_modulation_{m}.1": (ADA, C), f"{b}.adaln_modulation_{m}.2": (3 * C, ADA)}
    return shapes


def build(shapes, dtype) -> nn.Module:
    root = nn.Module()
    for name, (o, i) in shapes.items():
        *path, leaf = name.split(".")
        m = root
        for part in path:
            if not hasattr(m, part):
                m.add_module(part, nn.Module())
            m = getattr(m, part)
        layer = nn.Linear(i, o, bias=False, device="meta")
        layer.weight = nn.Parameter(torch.full((o, i), 0.01, dtype=dtype), requires_grad=False)  # values don't matter
        m.add_module(leaf, layer)
    return root


def peft_lora(shapes, rank: int, seed: int, folder: Path) -> Path:
    """diffusion-pipe layout (like the official Turbo LoRA: every Linear of every block, bf16, no alpha)."""
    g = torch.Generator().manual_seed(seed)
    t = {}
    for name, (o, i) in shapes.items():
        t[f"diffusion_model.{name}.lora_A.weight"] = (torch.randn(rank, i, generator=g) / i**0.5).bfloat16()
        t[f"diffusion_model.{name}.lora_B.weight"] = (torch.randn(o, rank, generator=g) * 0.01).bfloat16()
    path = folder / f"lora{seed}.safetensors"
    save_file(t, str(path))
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--blocks", type=int, default=28)
    args = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    shapes = linear_shapes(args.blocks)
    t0 = time.perf_counter()
    dit = build(shapes, dtype)
    n = sum(p.numel() for p in dit.parameters())
    print(f"built {len(shapes)} linears, {n / 1e9:.2f} B params in {args.dtype} "
          f"({n * torch.finfo(dtype).bits // 8 / 2**30:.1f} GiB) in {time.perf_counter() - t0:.1f} s;"
          f" torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as d:
        files = [peft_lora(shapes, args.rank, s, Path(d)) for s in (1, 2)]
        t0 = time.perf_counter()
        a, b = (parse_lora_file(f) for f in files)
        print(f"parse 2 rank-{args.rank} LoRAs ({files[0].stat().st_size / 2**20:.0f} MiB each): "
              f"{(time.perf_counter() - t0) / 2:.2f} s each")
    t0 = time.perf_counter()
    patch = apply_loras({"dit": dit}, [(a, 0.8)])
    t_apply = time.perf_counter() - t0
    print(f"apply 1 LoRA ({patch.n_patched} weights): {t_apply:.2f} s")
    t0 = time.perf_counter()
    patch.undo()
    t_undo = time.perf_counter() - t0
    t0 = time.perf_counter()
    patch = apply_loras({"dit": dit}, [(a, 0.8), (b, 0.5)])
    t_apply2 = time.perf_counter() - t0
    print(f"switch stacks: undo {t_undo:.3f} s + apply 2 LoRAs {t_apply2:.2f} s = {t_undo + t_apply2:.2f} s")
    patch.undo()


if __name__ == "__main__":
    main()
