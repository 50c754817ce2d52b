import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import shared_path
from rdbt_cli.config import TINY_QWEN, QwenParams
from rdbt_cli.engine import load_into
from rdbt_cli.engine import QWEN_PREFIXES, Qwen3Encoder, infer_qwen_params, load_text_encoder
from rdbt_cli.errors import CheckpointError, CheckpointMismatch
from rdbt_cli.tiny import tiny_qwen_state_dict, write_tiny_text_encoder

# head_dim (32) differs from hidden/heads (16), as in Qwen3-0.6B where q_proj is twice the hidden width.
SMALL = QwenParams(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                   intermediate_size=96)


def hf_qwen3(p: QwenParams, sd: dict | None = None):
    from transformers import Qwen3Config, Qwen3Model

    cfg = Qwen3Config(
        vocab_size=p.vocab_size, hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_layers, num_attention_heads=p.num_heads, num_key_value_heads=p.num_kv_heads,
        head_dim=p.head_dim, max_position_embeddings=32768, rms_norm_eps=p.eps,
        rope_parameters={"rope_type": "default", "rope_theta": p.rope_theta}, attention_bias=False,
        tie_word_embeddings=False, attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = Qwen3Model(cfg).eval()
    if sd is not None:
        model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    else:
        with torch.no_grad():  # HF's init leaves norms at exactly 1; perturb so swapped norms would show
            for name, prm in model.named_parameters():
                if "norm" in name:
                    prm.add_(0.1 * torch.randn_like(prm))
    return model


def ours_from(sd: dict, p: QwenParams) -> Qwen3Encoder:
    with torch.device("meta"):
        model = Qwen3Encoder(p)
    return load_into(model, dict(sd), "test.safetensors", "Qwen3 text-encoder").eval()


def strip(sd):
    return {k.removeprefix("model."): v for k, v in sd.items()}


def test_fp32_parity_with_transformers():
    hf = hf_qwen3(SMALL)
    ours = ours_from({k: v.detach().clone() for k, v in hf.state_dict().items()}, SMALL)
    ids = torch.tensor([[5, 17, 299, 0, 42, 42, 7, 150, 3]])
    with torch.no_grad():
        ref = hf(input_ids=ids).last_hidden_state
        out = ours(ids)
    assert out.dtype == torch.float32 and out.shape == (1, 9, SMALL.hidden_size)
    assert (out - ref).abs().max().item() <= 1e-5


def test_bf16_storage_runs_in_fp32():
    sd = strip(tiny_qwen_state_dict(TINY_QWEN, seed=1))
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    hf = hf_qwen3(TINY_QWEN, sd)  # the bf16 values upcast exactly, computed in fp32
    ours = ours_from(sd, TINY_QWEN)
    assert ours.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    ids = torch.randint(0, TINY_QWEN.vocab_size, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        err = (ours(ids) - hf(input_ids=ids).last_hidden_state).abs().max().item()
    assert err <= 1e-5


def test_padding_mask_matches_transformers():
    hf = hf_qwen3(SMALL)
    ours = ours_from({k: v.detach().clone() for k, v in hf.state_dict().items()}, SMALL)
    ids = torch.tensor([[11, 12, 13, 14, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0]])
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        out = ours(ids, mask)
        plain = ours(ids)
        ones = ours(ids, torch.ones_like(mask))
    assert (out - ref).abs().max().item() <= 1e-5
    assert torch.equal(plain, ones)
    assert (plain[:, 4:] - out[:, 4:]).abs().max().item() > 1e-3  # the mask did something
    assert torch.allclose(plain[:, :4], out[:, :4], atol=1e-6)  # causal: earlier positions never see the padding


def test_infer_params_from_shapes():
    assert infer_qwen_params(strip(tiny_qwen_state_dict())) == TINY_QWEN
    other = QwenParams(vocab_size=50, hidden_size=48, num_layers=3, num_heads=6, num_kv_heads=3, head_dim=16,
                       intermediate_size=80)
    assert infer_qwen_params(strip(tiny_qwen_state_dict(other))) == other


@pytest.mark.parametrize("prefix", QWEN_PREFIXES)
def test_strict_load_from_every_prefix(tmp_path, prefix):
    sd = strip(tiny_qwen_state_dict())
    stored = {prefix + k: v for k, v in sd.items()}
    if prefix.startswith("cond_stage_model."):  # an all-in-one checkpoint also carries the DiT and the VAE
        stored.update({f"model.diffusion_model.blocks.{i}.mlp.layer1.weight": torch.zeros(2, 2) for i in range(8)})
        stored.update({f"first_stage_model.decoder.conv{i}.weight": torch.zeros(2) for i in range(8)})
    path = tmp_path / "te.safetensors"
    save_file(stored, str(path))
    model = load_text_encoder(path)
    assert model.params == TINY_QWEN
    ids = torch.tensor([[1, 2, 3, 4]])
    ref = ours_from(sd, TINY_QWEN)
    with torch.no_grad():
        assert torch.equal(model(ids), ref(ids))


def test_storage_dtype_choice(tmp_path):
    path = write_tiny_text_encoder(tmp_path / "te.safetensors")
    model = load_text_encoder(path, dtype=torch.float32)
    assert model.norm.weight.dtype == torch.float32
    assert load_text_encoder(path).norm.weight.dtype == torch.bfloat16


def test_not_a_text_encoder(tmp_path):
    path = tmp_path / "vae.safetensors"
    save_file({"decoder.middle.0.residual.0.gamma": torch.ones(4, 1, 1, 1)}, str(path))
    with pytest.raises(CheckpointError, match="vae.safetensors: not a Qwen3 text encoder"):
        load_text_encoder(path)


def test_missing_key_is_a_mismatch(tmp_path):
    sd = tiny_qwen_state_dict()
    del sd["model.layers.1.mlp.up_proj.weight"]
    path = tmp_path / "broken.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointMismatch, match=r"broken\.safetensors.*layers\.1\.mlp\.up_proj\.weight"):
        load_text_encoder(path)


def test_golden_text_encoder_reproduces_comfyui():
    from rdbt_cli.text import PromptTokenizer

    te = shared_path("golden", "models", "text_encoders", "qwen_3_06b_tiny.safetensors")
    tok_dir = shared_path("golden", "models", "tokenizers")
    cases = json.loads(shared_path("golden", "cases.json").read_text(encoding="utf-8"))["cases"]
    model = load_text_encoder(te)
    tok = PromptTokenizer.from_files(tok_dir / "qwen", tok_dir / "t5")
    prompts = {}
    for case in cases:
        cond = case["expected_outputs"].get("conditioning")
        if cond and "qwen_hidden" in cond:
            prompts.setdefault(case["prompt"], cond)
    assert prompts
    for prompt, cond in prompts.items():
        t = tok.tokenize(prompt)
        with torch.inference_mode():
            hidden = model(torch.tensor([t.qwen_ids]), torch.tensor([t.qwen_mask])).numpy()
        expected = np.load(shared_path("golden", cond["qwen_hidden"]))
        assert hidden.shape == expected.shape
        assert np.abs(hidden - expected).max() <= 1e-4, prompt
        assert np.array_equal(np.asarray(t.t5_ids), np.load(shared_path("golden", cond["t5_ids"])))
        assert np.array_equal(np.asarray(t.t5_weights, np.float32), np.load(shared_path("golden", cond["t5_weights"])))


def test_impossible_head_counts_are_a_checkpoint_error(tmp_path):
    from rdbt_cli.errors import CheckpointMismatch

    sd = tiny_qwen_state_dict()
    # 3 kv heads of 32 for 4 query heads: no grouping fits, so the file cannot be a Qwen3 encoder.
    for i in range(TINY_QWEN.num_layers):
        for name in ("k_proj", "v_proj"):
            sd[f"model.layers.{i}.self_attn.{name}.weight"] = torch.zeros(96, TINY_QWEN.hidden_size, dtype=torch.bfloat16)
    path = tmp_path / "bad_te.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointMismatch, match="bad_te.safetensors"):
        load_text_encoder(path)


def test_a_missing_middle_layer_is_a_checkpoint_error(tmp_path):
    from rdbt_cli.config import QwenParams

    params = QwenParams(**{**vars(TINY_QWEN), "num_layers": 3})
    sd = {k.replace("model.layers.1.", "model.layers.9."): v for k, v in tiny_qwen_state_dict(params).items()
          if not k.startswith("model.layers.2.")}
    path = tmp_path / "holes.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match="holes.safetensors.*contiguous"):
        load_text_encoder(path)
