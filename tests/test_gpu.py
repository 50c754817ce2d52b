"""Checks that need a CUDA device; skipped without one (CI has none). Run them on a GPU machine with
`python -m pytest -q tests/test_gpu.py`."""

import numpy as np
import pytest
import torch

from rdbt_cli import engine, pipeline
from rdbt_cli.settings import GenParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GEN = GenParams(prompt="1girl, silver hair", negative="blurry", width=128, height=96, steps=4, cfg=4.0,
                sampler="er_sde", scheduler="simple", shift=3.0)


@pytest.fixture(scope="module")
def tiny_paths():
    from rdbt_cli.tiny import ensure_tiny_models

    return ensure_tiny_models()


def _image(paths, gen=GEN, **load):
    eng = pipeline.Models.load(paths, **load)
    return pipeline.generate(eng, gen, seed=7)


def test_gpu_fp32_matches_cpu_fp32_closely(tiny_paths):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    # SDE samplers draw per-step noise from a CUDA generator on the GPU (as ComfyUI does), so compare with euler.
    euler = GenParams(**{**vars(GEN), "sampler": "euler"})
    a = _image(tiny_paths, euler, device="cuda", dtype="fp32").latent
    b = _image(tiny_paths, euler, device="cpu", dtype="fp32").latent
    assert (a - b).abs().max() < 1e-3


def test_bf16_and_fp8_and_low_vram_run_and_stay_close(tiny_paths):
    ref = _image(tiny_paths, device="cuda", dtype="fp32").image.astype(int)
    for load in ({"dtype": "bf16"}, {"dtype": "fp8"}, {"dtype": "bf16", "low_vram": True}):
        got = _image(tiny_paths, device="cuda", **load).image.astype(int)
        assert np.abs(got - ref).mean() < 20, load  # same picture; half precision moves levels, not content


def test_streamed_blocks_equal_resident_blocks_on_the_gpu(tiny_paths):
    resident = engine.load_dit(tiny_paths.dit, device="cuda", dtype=torch.bfloat16)
    streamed = engine.load_dit(tiny_paths.dit, device="cpu", dtype=torch.bfloat16)
    streamed.stream_blocks("cuda")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 1, 12, 16, generator=g)
    ctx = torch.randn(1, 512, resident.params.context_dim, generator=g).to("cuda", torch.bfloat16)
    t = torch.tensor([0.7])
    with torch.inference_mode():
        assert torch.equal(resident(x, t, ctx), streamed(x, t, ctx))
    assert all(p.device.type == "cpu" for n, p in streamed.named_parameters()
               if n.startswith("blocks.") and ".cross_attn.k_proj" not in n and ".cross_attn.v_proj" not in n
               and ".cross_attn.k_norm" not in n)


def test_bench_reports_mfu_on_the_gpu():
    from rdbt_cli import bench

    out = bench.run(model="tiny", width=256, height=256, steps=3, device="cuda", dtype="bf16")
    assert out["peak_device_mem_gb"] > 0 and out["achieved_tflops"] > 0
