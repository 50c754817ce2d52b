"""`rdbt bench`: the measuring stick for speed and memory.

Runs the real sampling loop (sampler, scheduler, CFG batching) on the full-size Anima architecture with random weights
(no download), on a given DiT file, or on the embedded tiny model, and reports seconds per step, images per minute,
achieved TFLOP/s against the device's peak (MFU), peak device and host memory, load time and time to first step.
The text encoder is not part of the step loop, so a random 512-row context stands in for the prompt.
"""

from __future__ import annotations

import math
import resource
import statistics
import time
from pathlib import Path

import torch

from rdbt_cli import engine, sampling
from rdbt_cli.config import AdapterParams, DiTParams, VAEParams

# The released Anima 2B sizes (spec/anima.md §1.2), for building the architecture without a file.
ANIMA_2B_DIT = DiTParams(
    model_channels=2048, num_blocks=28, num_heads=16, mlp_dim=8192, in_channels=16, out_channels=16, context_dim=1024,
    adaln_lora_dim=256,
)
ANIMA_ADAPTER = AdapterParams(
    source_dim=1024, model_dim=1024, target_dim=1024, num_layers=6, num_heads=16, vocab_size=32128, mlp_dim=4096
)
WAN21_VAE = VAEParams(base_dim=96)

# Dense peak TFLOP/s by device name, for MFU (vendor data sheets; SXM parts).
NOMINAL_PEAK_TFLOPS = {
    ("H100", torch.bfloat16): 989.0, ("H100", torch.float16): 989.0, ("H100", torch.float32): 67.0,
    ("H200", torch.bfloat16): 989.0, ("H200", torch.float16): 989.0, ("H200", torch.float32): 67.0,
    ("A100", torch.bfloat16): 312.0, ("A100", torch.float16): 312.0, ("A100", torch.float32): 19.5,
    ("L40S", torch.bfloat16): 362.0, ("4090", torch.bfloat16): 165.0,
}


def dit_flops(p: DiTParams, n_tokens: int, n_context: int = 512) -> float:
    """FLOPs of one DiT forward for one image (landscape.md §4): projections, attention cores and the MLP."""
    D, C = p.model_channels, p.context_dim
    per_block = (
        8 * n_tokens * D * D  # self-attention q, k, v, out
        + 4 * n_tokens * n_tokens * D  # self-attention scores and weighted sum
        + 4 * n_tokens * D * D  # cross-attention q, out
        + 4 * n_context * C * D  # cross-attention k, v (prepared once per generation, counted as the spec does)
        + 4 * n_tokens * n_context * D  # cross-attention core
        + 4 * n_tokens * D * p.mlp_dim  # MLP
    )
    return float(p.num_blocks * per_block)


def random_module(module: torch.nn.Module, device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """Materialise a meta-built module on `device` with small random weights (norms at 1), fast enough for 2B."""
    module = module.to(dtype).to_empty(device=device)  # cast on meta first: one allocation, in the target dtype
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 or name.endswith(".gamma"):
                p.fill_(1.0)
            else:
                fan_in = math.prod(p.shape[1:])
                p.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=g)
    return module.eval().requires_grad_(False)


def gemm_tflops(device: torch.device, dtype: torch.dtype, n: int | None = None, repeat: int = 5) -> float:
    """Measured dense GEMM rate (TFLOP/s) of this device in `dtype`: the practical ceiling the DiT can reach."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm-up
    _sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times) / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_tflops(device: torch.device, dtype: torch.dtype) -> tuple[float | None, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for (key, dt), tf in NOMINAL_PEAK_TFLOPS.items():
            if key in name and dt == dtype:
                return tf, f"{name} data sheet"
        return None, name
    return None, "cpu"


def host_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run(
    *,
    model: str | None = None,
    width: int = 1024,
    height: int = 1024,
    steps: int = 4,
    sampler: str = "euler",
    scheduler: str = "simple",
    cfg: float = 1.0,
    nag_scale: float = 0.0,
    device: str = "auto",
    dtype: str = "auto",
    decode: bool = True,
    compile: bool = False,
    low_vram: bool = False,
    attention: str = "sdpa",
    seed: int = 0,
    callback=None,
) -> dict:
    """Build or load the DiT (and VAE), sample `steps` steps, decode; return the measured figures. `callback` hears
    each stage and step (pipeline.report)."""
    from rdbt_cli.pipeline import compile_blocks, load_dit_for, report, resolve_device, resolve_dtype, vae_dtype

    dev = resolve_device(device)
    dt, _ = resolve_dtype(dtype, dev)
    engine.set_attention_backend(attention)
    host0 = host_peak_bytes()
    t0 = time.perf_counter()
    vae_path = None
    if model in (None, "full"):
        report(callback, "build")
        with torch.device("meta"):
            dit = engine.AnimaDiT(ANIMA_2B_DIT, ANIMA_ADAPTER)
        stream = low_vram and dev.type == "cuda"
        dit = random_module(dit, "cpu" if stream else dev, dt)
        if dtype == "fp8":  # as load_dit stores a file's weights under --dtype fp8
            for name, layer in dit.named_modules():
                if isinstance(layer, engine.Linear) and not engine._HIGH_PRECISION.search(name + "."):
                    layer.weight.data = layer.weight.data.to(torch.float8_e4m3fn)
            dit.compute_dtype = dt
        if stream:
            dit.stream_blocks(dev)
        source = "random full-size Anima 2B"
    else:
        if model == "tiny":
            from rdbt_cli.tiny import ensure_tiny_models

            paths = ensure_tiny_models()
            dit_path, vae_path = paths.dit, paths.vae
        else:
            dit_path = model
        report(callback, "load", part="DiT", file=Path(dit_path).name, bytes=Path(dit_path).stat().st_size)
        dit = load_dit_for(dit_path, dev, dtype, low_vram)
        source = str(model)
    vae = None
    if decode and vae_path is not None:
        vae = engine.load_vae(vae_path, device=dev, dtype=vae_dtype(dt, dev))
    elif decode:
        with torch.device("meta"):
            vae = engine.WanVAE(WAN21_VAE)
        vae = random_module(vae, dev, vae_dtype(dt, dev))
    _sync(dev)
    load_s = time.perf_counter() - t0
    host_after_load = host_peak_bytes()
    params = dit.params
    if compile:
        compile_blocks(dit)

    g = torch.Generator().manual_seed(seed)
    ctx_dim = params.context_dim
    cond = torch.randn(1, 512, ctx_dim, generator=g).to(dev, dit.compute_dtype)
    uncond = None if math.isclose(cfg, 1.0) else torch.randn(1, 512, ctx_dim, generator=g).to(dev, dit.compute_dtype)
    nag = None
    if nag_scale > 1:  # NAG with the node's other defaults, the negative's K/V prepared with the denoiser
        negative = torch.randn(1, 512, ctx_dim, generator=g).to(dev, dit.compute_dtype)
        nag = sampling.NAGGuidance(negative, engine.NAG(nag_scale, 2.5, 0.25), 14.7, 0.0)
    sigmas = sampling.get_sigmas(scheduler, steps).to(dev)
    x = sampling.prepare_latent(seed, torch.zeros(1, params.in_channels, 1, height // 8, width // 8), sigmas).to(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    stamps = []

    def on_step(info):
        _sync(dev)
        stamps.append(time.perf_counter())
        if callback is not None:
            callback(info)

    with torch.inference_mode():
        _sync(dev)
        report(callback, "sample")
        t_start = time.perf_counter()
        # inside the first step's time: the denoiser prepares the cross-attention K/V, once per generation
        denoiser = sampling.CFGDenoiser(dit, cond, uncond, cfg, nag=nag)
        out = sampling.sample(sampler, denoiser, x, sigmas, seed=seed, callback=on_step)
        decode_s = 0.0
        if vae is not None:
            report(callback, "decode")
            t_dec = time.perf_counter()
            vae.decode(engine.latent_to_vae(out), tiled=True if low_vram else None)
            _sync(dev)
            decode_s = time.perf_counter() - t_dec
    step_times = [b - a for a, b in zip([t_start] + stamps[:-1], stamps)]
    first_step_s = step_times[0]
    steady = step_times[1:] or step_times
    step_s = statistics.median(steady)
    forwards = 1 if uncond is None else 2
    n_tokens = (height // 16) * (width // 16)
    flops_step = forwards * dit_flops(params, n_tokens)
    if nag is not None:  # one more cross-attention core per block, for the cond rows
        flops_step += params.num_blocks * 4 * n_tokens * 512 * params.model_channels
    achieved = flops_step / step_s / 1e12
    # Peaks are read before the GEMM probe, whose buffers are not part of the run.
    peak_device = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
    peak_host = host_peak_bytes()
    peak, peak_source = _peak_tflops(dev, dit.compute_dtype)
    report(callback, "gemm")
    measured_gemm = gemm_tflops(dev, dit.compute_dtype)
    image_s = step_s * steps + decode_s  # steady state: warm-up and compilation excluded
    return {
        "model": source,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "dtype": str(dit.compute_dtype).replace("torch.", ""),
        "vae_dtype": str(vae_dtype(dt, dev)).replace("torch.", "") if vae is not None else None,
        "width": width, "height": height, "steps": steps, "sampler": sampler, "scheduler": scheduler, "cfg": cfg,
        "nag_scale": nag_scale,
        "dit_blocks": params.num_blocks, "dit_width": params.model_channels,
        "load_s": round(load_s, 3),
        "first_step_s": round(first_step_s, 4),
        "step_s": round(step_s, 4),
        "decode_s": round(decode_s, 4),
        "images_per_min": round(60.0 / image_s, 3) if image_s > 0 else None,
        "tflop_per_step": round(flops_step / 1e12, 4),
        "achieved_tflops": round(achieved, 4),
        "gemm_tflops": round(measured_gemm, 4),
        "peak_tflops": peak,
        "peak_source": peak_source,
        "mfu": round(achieved / peak, 4) if peak else None,
        "fraction_of_gemm": round(achieved / measured_gemm, 4) if measured_gemm else None,
        "peak_device_mem_gb": round(peak_device / 2**30, 3) if peak_device is not None else None,
        "peak_host_mem_gb": round(peak_host / 2**30, 3),
        "host_mem_for_load_gb": round((host_after_load - host0) / 2**30, 3),
        "compile": compile,
        "low_vram": low_vram,
        "attention": attention,
    }
