"""The pipeline against ComfyUI's intermediate outputs (latents, float images) and its device/dtype choices."""

import json

import numpy as np
import pytest
import torch

from conftest import SHARED, shared_path
from rdbt_cli import pipeline
from rdbt_cli.config import ModelPaths
from rdbt_cli.settings import GenParams

CASES_FILE = SHARED / "golden" / "cases.json"
CASES = json.loads(CASES_FILE.read_text())["cases"] if CASES_FILE.exists() else []


@pytest.fixture(scope="module")
def golden_engine():
    models = shared_path("golden", "models")
    paths = ModelPaths(
        dit=models / "diffusion_models" / "anima_tiny.safetensors",
        text_encoder=models / "text_encoders" / "qwen_3_06b_tiny.safetensors",
        vae=models / "vae" / "qwen_image_vae_tiny.safetensors",
        qwen_tokenizer=models / "tokenizers" / "qwen" / "tokenizer.json",
        t5_tokenizer=models / "tokenizers" / "t5" / "tokenizer.json",
    )
    return pipeline.Models.load(paths, device="cpu", dtype="fp32")


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_latent_and_float_image_match_comfyui(golden_engine, case):
    eng = golden_engine
    loras = [(shared_path("golden", "models", "loras", name), w) for name, w in case["loras"]]
    eng.set_loras(loras)
    gen = GenParams(prompt=case["prompt"], negative=case["negative"], width=case["width"], height=case["height"],
                    steps=case["steps"], cfg=case["cfg"], sampler=case["sampler"], scheduler=case["scheduler"],
                    shift=3.0)
    result = pipeline.generate(eng, gen, seed=case["seed"])
    expected = np.load(shared_path("golden", case["expected_outputs"]["latent"]))
    # README tolerance for latents in VAE space (std ~4): max |Δ| <= 1e-3.
    assert np.abs(result.latent.numpy() - expected).max() <= 1e-3
    eng.set_loras([])


def test_lora_switch_restores_the_base_image(golden_engine):
    case = next((c for c in CASES if c["id"].startswith("lora_base")), None)
    if case is None:
        pytest.skip("no LoRA base case in the golden data")
    eng = golden_engine
    gen = GenParams(prompt=case["prompt"], negative=case["negative"], width=case["width"], height=case["height"],
                    steps=2, cfg=case["cfg"], sampler="euler", scheduler="simple", shift=3.0)
    before = pipeline.generate(eng, gen, seed=1).image
    eng.set_loras([(shared_path("golden", "models", "loras", "tiny_kohya_lora.safetensors"), 0.7)])
    with_lora = pipeline.generate(eng, gen, seed=1).image
    eng.set_loras([])
    after = pipeline.generate(eng, gen, seed=1).image
    assert not np.array_equal(before, with_lora)
    assert np.array_equal(before, after)


def test_auto_dtype_uses_bf16_only_on_cpus_that_have_it(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(pipeline, "cpu_has_native_bf16", lambda: True)
    assert pipeline.resolve_dtype("auto", cpu) == (torch.bfloat16, False)
    monkeypatch.setattr(pipeline, "cpu_has_native_bf16", lambda: False)
    assert pipeline.resolve_dtype("auto", cpu) == (torch.float32, False)
    assert pipeline.resolve_dtype("fp32", cpu) == (torch.float32, False)
    assert pipeline.resolve_dtype("fp8", cpu) == (torch.float32, True)


def test_unknown_device_and_dtype_are_config_errors():
    from rdbt_cli.errors import ConfigError

    with pytest.raises(ConfigError):
        pipeline.resolve_dtype("fp64", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="cuda"):
            pipeline.resolve_device("cuda")


def test_fp8_dtype_stores_the_dit_linears_in_fp8():
    from rdbt_cli.tiny import ensure_tiny_models

    dit = pipeline.load_dit_for(ensure_tiny_models().dit, torch.device("cpu"), "fp8")
    assert dit.blocks[0].mlp.layer1.weight.dtype == torch.float8_e4m3fn
    assert dit.t_embedder[1].linear_1.weight.dtype == torch.float32  # timestep embedder kept in high precision
    assert dit.compute_dtype == torch.float32
