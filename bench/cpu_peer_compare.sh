#!/usr/bin/env bash
# rdbt vs stable-diffusion.cpp on this CPU, side by side in one run: the same random full-size Anima files,
# 512x512, 4 steps, CFG 1, euler/simple, at equal weight precision (bf16 as released, and fp32). See bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:-512x512}
STEPS=${STEPS:-4}
OUT=${OUT:-.bench/cpu_peer_compare.jsonl}
PEER_PY=${PEER_PY:-.bench/sdcpp-venv/bin/python}
python bench/make_random_weights.py .bench/models >&2
: > "$OUT"
DIT=.bench/models/diffusion_models/anima_random.safetensors
for dt in bf16 fp32; do
    rdbt bench --model "$DIT" --size "$SIZE" --steps "$STEPS" --cfg 1 --dtype "$dt" --json | tee -a "$OUT"
done
for wt in default f32; do
    "$PEER_PY" bench/peer_sdcpp.py --models .bench/models --size "$SIZE" --steps "$STEPS" --cfg 1 --wtype "$wt" \
        | tail -n 1 | tee -a "$OUT"
done
python - "$OUT" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
rdbt = {r["dtype"]: r for r in rows if "peer" not in r}
peer = {r["wtype"]: r for r in rows if "peer" in r}
for ours, theirs, label in (("bfloat16", "default", "bf16 weights"), ("float32", "f32", "fp32 weights")):
    a, b = rdbt.get(ours), peer.get(theirs)
    if a and b and b.get("step_s"):
        print(f"{label}: rdbt {a['step_s']:.2f} s/step, sd.cpp {b['step_s']:.2f} s/step -> sd.cpp/rdbt = "
              f"{b['step_s'] / a['step_s']:.2f}x")
if "float32" in rdbt:
    r = rdbt["float32"]
    print(f"rdbt fp32 DiT step at {r['width']}x{r['height']}: {r['fraction_of_gemm']:.2f} of the measured fp32 GEMM rate "
          f"({r['gemm_tflops'] * 1000:.0f} GFLOP/s), i.e. {1 / r['fraction_of_gemm']:.2f}x the GEMM floor")
PY
