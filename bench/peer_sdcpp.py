"""Time stable-diffusion.cpp (stable-diffusion-cpp-python) on the same Anima files and settings as `rdbt bench`.

Runs in its own virtual environment (see bench/README.md); prints one JSON line. sd.cpp logs its own phase timings,
which this script reads back, so the per-step figure excludes model loading, text encoding and VAE decoding exactly
as `rdbt bench`'s step_s does.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time

parser = argparse.ArgumentParser()
parser.add_argument("--models", default=".bench/models")
parser.add_argument("--size", default="512x512")
parser.add_argument("--steps", type=int, default=4)
parser.add_argument("--cfg", type=float, default=1.0)
parser.add_argument("--sampler", default="euler")
parser.add_argument("--wtype", default="default", help="sd.cpp weight type: default keeps the file's (bf16); f32")
parser.add_argument("--threads", type=int, default=os.cpu_count())
args = parser.parse_args()

w, h = map(int, args.size.lower().split("x"))
m = args.models
# sd.cpp logs from C straight to file descriptor 2; capture it there to read its phase timings.
log = tempfile.TemporaryFile(mode="w+b")
saved = os.dup(2)
os.dup2(log.fileno(), 2)
try:
    from stable_diffusion_cpp import StableDiffusion

    t0 = time.perf_counter()
    sd = StableDiffusion(
        diffusion_model_path=f"{m}/diffusion_models/anima_random.safetensors",
        llm_path=f"{m}/text_encoders/qwen_3_06b_random.safetensors",
        vae_path=f"{m}/vae/qwen_image_vae_random.safetensors",
        n_threads=args.threads, wtype=args.wtype, verbose=True,
    )
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    sd.generate_image(prompt="1girl, silver hair, night sky", width=w, height=h, cfg_scale=args.cfg,
                      sample_method=args.sampler, sample_steps=args.steps, seed=42, flow_shift=3.0)
    total_s = time.perf_counter() - t1
finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
log.seek(0)
text = log.read().decode("utf-8", "replace")
sampling = re.findall(r"sampling completed, taking ([\d.]+)s", text)
decode = re.findall(r"(?:decode_first_stage|latent \d+ decoded) completed, taking ([\d.]+)s", text)
result = {
    "peer": "stable-diffusion-cpp-python", "size": args.size, "steps": args.steps, "cfg": args.cfg,
    "sampler": args.sampler, "wtype": args.wtype, "threads": args.threads, "load_s": round(load_s, 3),
    "generate_s": round(total_s, 3),
    "sampling_s": float(sampling[-1]) if sampling else None,
    "step_s": round(float(sampling[-1]) / args.steps, 4) if sampling else None,
    "decode_s": float(decode[-1]) if decode else None,
}
if not sampling:
    result["log_tail"] = text[-2000:]
print(json.dumps(result))
