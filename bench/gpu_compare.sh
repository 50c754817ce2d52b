#!/usr/bin/env bash
# On a GPU machine: rdbt's figures for the issue's targets and the peers' anchors, side by side in one run.
# Prepare .peers/ first as ../shared/peers/README.md says (scripts, ComfyUI's Python files, wheels); without it the
# peer lines are skipped. Prints JSON lines; nothing here downloads.
set -uo pipefail
cd "$(dirname "$0")/.."
if ls .peers/whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .peers/whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps -e . 2>/dev/null || true
B="python3 -m rdbt_cli bench --device cuda --json"
$B --size 1024x1024 --steps 20 --cfg 1 --sampler er_sde --dtype bf16                 # RDBT settings, end to end
$B --size 1024x1024 --steps 20 --cfg 1 --sampler er_sde --dtype bf16 --compile       # + torch.compile
$B --size 1024x1024 --steps 20 --cfg 1 --sampler er_sde --dtype fp8                  # fp8 weights
$B --size 1024x1024 --steps 6 --cfg 4 --dtype bf16                                   # CFG batched, per-step MFU
$B --size 1024x1024 --steps 6 --cfg 1 --dtype bf16 --low-vram                        # streamed blocks, tiled VAE
if [ -f .peers/gpu_anchor.py ]; then python3 .peers/gpu_anchor.py eager; fi
if [ -d .peers/comfyui ]; then
    python3 .peers/gpu_anchor_comfy.py .peers/comfyui eager
    python3 .peers/gpu_anchor_vae.py .peers/comfyui
fi
