"""fp32 vs bf16 on this CPU: one DiT step and one VAE decode, each dtype in its own process.

    python bench/cpu_dtype.py [--model tiny|full] [--size 256] [--blocks 28] [--timeout 1800]

Without AVX512-BF16 or AMX, PyTorch emulates bf16 on the CPU: matrix products run a few times slower than fp32 and
convolutions (the VAE) tens of times slower. This measures by how much on the machine at hand, with the real DiT and
VAE code (random full-size weights for `full`, the embedded tiny model for `tiny`), and prints one JSON line per
measurement and the bf16/fp32 ratios. `rdbt_cli.pipeline.cpu_has_native_bf16()` is what rdbt decides by.
`--blocks N` builds the full-size DiT with only N of its 28 blocks, for a machine short of memory: a step's time
scales with the block count, and `dit_step_28_blocks_s` scales it back.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CHILD = r"""
import json, sys, time, torch
from dataclasses import replace
from rdbt_cli import bench, engine, sampling
model, size, dtype = sys.argv[1], int(sys.argv[2]), {"fp32": torch.float32, "bf16": torch.bfloat16}[sys.argv[3]]
blocks = int(sys.argv[4])
torch.manual_seed(0)
if model == "full":
    with torch.device("meta"):
        dit = engine.AnimaDiT(replace(bench.ANIMA_2B_DIT, num_blocks=blocks), bench.ANIMA_ADAPTER)
        vae = engine.WanVAE(bench.WAN21_VAE)
    dit, vae = bench.random_module(dit, "cpu", dtype), bench.random_module(vae, "cpu", dtype)
else:
    from rdbt_cli.tiny import ensure_tiny_models
    paths = ensure_tiny_models()
    dit = engine.load_dit(paths.dit, device="cpu", dtype=dtype)
    vae = engine.load_vae(paths.vae, device="cpu", dtype=dtype)
ctx = torch.randn(1, 512, dit.params.context_dim).to(dtype)
x = torch.randn(1, dit.params.in_channels, 1, size // 8, size // 8)
sigma = torch.tensor([0.9])
out = {"model": model, "size": size, "dtype": sys.argv[3]}
with torch.inference_mode():
    denoise = sampling.CFGDenoiser(dit, ctx, None, 1.0)
    denoise(x[..., :2, :2], sigma)  # warm-up: kernels and the cross-attention K/V
    t0 = time.perf_counter(); denoise(x, sigma); out["dit_step_s"] = round(time.perf_counter() - t0, 3)
    if model == "full" and blocks != 28:
        out["dit_blocks"] = blocks
        out["dit_step_28_blocks_s"] = round(out["dit_step_s"] * 28 / blocks, 3)
    vae.decode(x[..., :2, :2], tiled=False)
    t0 = time.perf_counter(); vae.decode(x, tiled=False); out["vae_decode_s"] = round(time.perf_counter() - t0, 3)
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("tiny", "full"), default="tiny")
    ap.add_argument("--size", type=int, default=256, help="image side in pixels (a multiple of 16)")
    ap.add_argument("--blocks", type=int, default=28, help="full model: build only this many DiT blocks (1-28)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds allowed per dtype")
    args = ap.parse_args()
    if not 1 <= args.blocks <= 28:
        ap.error("--blocks must be from 1 to 28")
    from rdbt_cli.pipeline import cpu_has_native_bf16

    results = {}
    for dtype in ("fp32", "bf16"):
        t0 = time.perf_counter()
        try:
            r = subprocess.run([sys.executable, "-c", CHILD, args.model, str(args.size), dtype, str(args.blocks)],
                               capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(json.dumps({"dtype": dtype, "error": f"not finished after {args.timeout:.0f} s"}))
            continue
        if r.returncode:
            sys.exit(r.stderr[-2000:])
        results[dtype] = json.loads(r.stdout.strip().splitlines()[-1])
        print(json.dumps({**results[dtype], "wall_s": round(time.perf_counter() - t0, 1),
                          "native_bf16": cpu_has_native_bf16()}))
    if len(results) == 2:
        print(json.dumps({f"bf16_over_fp32_{k}": round(results["bf16"][k] / results["fp32"][k], 2)
                          for k in ("dit_step_s", "vae_decode_s")}))



if __name__ == "__main__":
    main()
