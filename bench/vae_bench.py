"""Benchmark the full-size (base dim 96) Wan 2.1 VAE decode with random weights, fp32.

1. Time at 512x512: the 2-D single-frame fast path vs the 3-D causal-conv path, same process, and their ratio.
2. Peak memory at 1024x1024: tiled vs untiled decode, each in a fresh child process (CPU: the peak resident set size
   above the RSS just before decoding; CUDA: torch.cuda.max_memory_allocated above the weights).

Usage: python bench/vae_bench.py [--device cpu|cuda] [--size 512] [--mem-size 1024] [--tile 64] [--overlap 16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from rdbt_cli.config import VAEParams
from rdbt_cli.engine import WanVAE

FULL = VAEParams(base_dim=96)


def _model(device: str) -> WanVAE:
    torch.manual_seed(0)
    return WanVAE(FULL).to(device).eval()


def _sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def time_paths(device: str, size: int) -> dict:
    vae = _model(device)
    z = torch.randn(1, 16, 1, size // 8, size // 8, device=device)
    vae.decode(z[..., :4, :4], path="2d"), vae.decode(z[..., :4, :4], path="3d")  # warm-up (kernels, allocator)
    result = {}
    for path in ("2d", "3d"):
        _sync(device)
        t0 = time.perf_counter()
        out = vae.decode(z, path=path, tiled=False)
        _sync(device)
        result[f"{path}_s"] = time.perf_counter() - t0
        result[f"{path}_out"] = out
    diff = (result.pop("2d_out") - result.pop("3d_out")).abs().max().item()
    return {**result, "ratio_3d_over_2d": result["3d_s"] / result["2d_s"], "max_abs_diff": diff}


def peak_memory(device: str, size: int, tiled: bool, tile: int, overlap: int) -> dict:
    vae = _model(device)
    z = torch.randn(1, 16, 1, size // 8, size // 8, device=device)
    t0 = time.perf_counter()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        vae.decode(z, tiled=tiled, tile=tile, overlap=overlap)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
        base = _status("VmRSS")
        vae.decode(z, tiled=tiled, tile=tile, overlap=overlap)
        peak = _status("VmHWM") - base
    unit = FULL.base_dim * size * size * 4  # one fp32 full-resolution tensor of base_dim channels
    return {"tiled": tiled, "peak_bytes": peak, "peak_in_full_res_tensors": peak / unit, "s": time.perf_counter() - t0,
            "estimate_bytes": vae.estimate_decode_bytes(z)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--mem-size", type=int, default=1024)
    ap.add_argument("--tile", type=int, default=64)
    ap.add_argument("--overlap", type=int, default=16)
    ap.add_argument("--child-mem", choices=["tiled", "untiled"])
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if args.child_mem:
        r = peak_memory(args.device, args.mem_size, args.child_mem == "tiled", args.tile, args.overlap)
        print(json.dumps(r))
        return
    with torch.inference_mode():
        t = time_paths(args.device, args.size)
    print(f"decode {args.size}x{args.size} on {args.device}, threads {torch.get_num_threads()}: "
          f"2-D {t['2d_s']:.2f} s, 3-D {t['3d_s']:.2f} s, 3-D/2-D = {t['ratio_3d_over_2d']:.2f}, "
          f"max |2-D − 3-D| = {t['max_abs_diff']:.2e}", flush=True)
    for mode in ("untiled", "tiled"):
        cmd = [sys.executable, __file__, "--device", args.device, "--mem-size", str(args.mem_size),
               "--tile", str(args.tile), "--overlap", str(args.overlap), "--child-mem", mode]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        print(f"decode {args.mem_size}x{args.mem_size} {mode} (tile {args.tile}, overlap {args.overlap} latent): "
              f"peak +{r['peak_bytes'] / 2**20:.0f} MiB = {r['peak_in_full_res_tensors']:.2f} full-res base-dim "
              f"tensors, {r['s']:.1f} s; untiled estimate {r['estimate_bytes'] / 2**20:.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
