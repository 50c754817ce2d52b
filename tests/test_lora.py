import hashlib
import itertools
import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import shared_path
from rdbt_cli.errors import LoraError
from rdbt_cli.lora import apply_loras, parse_lora_file

# Small DiT-, adapter- and TE-shaped parameter sets with the real names (anima.md §1.3, §1.4); (out, in) shapes.
DIT_SHAPES = {
    "x_embedder.proj.1.weight": (16, 20),
    "t_embedder.1.linear_1.weight": (16, 16),
    "t_embedding_norm.weight": (16,),
    "final_layer.linear.weight": (12, 16),
    "llm_adapter.blocks.0.cross_attn.k_proj.weight": (10, 8),
    "llm_adapter.blocks.0.mlp.0.weight": (24, 10),
    "llm_adapter.blocks.0.mlp.0.bias": (24,),
}
for _n in range(2):
    DIT_SHAPES.update({
        f"blocks.{_n}.self_attn.q_proj.weight": (16, 16),
        f"blocks.{_n}.self_attn.v_proj.weight": (16, 16),
        f"blocks.{_n}.self_attn.output_proj.weight": (16, 16),
        f"blocks.{_n}.self_attn.q_norm.weight": (8,),
        f"blocks.{_n}.cross_attn.k_proj.weight": (16, 12),
        f"blocks.{_n}.mlp.layer1.weight": (32, 16),
        f"blocks.{_n}.adaln_modulation_self_attn.1.weight": (8, 16),
    })
TE_SHAPES = {
    "embed_tokens.weight": (50, 8),
    "layers.0.self_attn.q_proj.weight": (12, 8),
    "layers.0.self_attn.k_proj.weight": (6, 8),
    "layers.1.mlp.gate_proj.weight": (20, 8),
    "layers.1.post_attention_layernorm.weight": (8,),
}


def build(shapes, dtype=torch.float32, seed=0):
    """An nn.Module tree whose named_parameters() are exactly `shapes`' keys (like the engine's modules)."""
    g = torch.Generator().manual_seed(seed)
    root = nn.Module()
    for key, shape in shapes.items() if isinstance(shapes, dict) else shapes:
        *path, leaf = key.split(".")
        m = root
        for part in path:
            if not hasattr(m, part):
                m.add_module(part, nn.Module())
            m = getattr(m, part)
        value = shape if isinstance(shape, torch.Tensor) else torch.randn(shape, generator=g)
        m.register_parameter(leaf, nn.Parameter(value.to(dtype), requires_grad=False))
    return root


def params(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def rnd(*shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def write(path, tensors, metadata=None):
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


# Each format: (file tensors, {(target, parameter): expected ΔW at strength 1}), computed here in float64,
# independently of rdbt_cli.lora.


def fmt_kohya():
    up, down = rnd(16, 4, seed=1), rnd(4, 16, seed=2)
    up2, down2 = rnd(10, 2, seed=3), rnd(2, 8, seed=4)
    up3, down3 = rnd(16, 4, seed=5), rnd(4, 16, seed=6)
    f = {
        "lora_unet_blocks_0_self_attn_q_proj.lora_up.weight": up.half(),
        "lora_unet_blocks_0_self_attn_q_proj.lora_down.weight": down.half(),
        "lora_unet_blocks_0_self_attn_q_proj.alpha": torch.tensor(2.0).half(),
        "lora_unet_llm_adapter_blocks_0_cross_attn_k_proj.lora_up.weight": up2,
        "lora_unet_llm_adapter_blocks_0_cross_attn_k_proj.lora_down.weight": down2,
        "lora_unet_llm_adapter_blocks_0_cross_attn_k_proj.alpha": torch.tensor(3.0),
        "lora_unet_t_embedder_1_linear_1.lora_up.weight": up3,
        "lora_unet_t_embedder_1_linear_1.lora_down.weight": down3,
        "lora_unet_t_embedder_1_linear_1.alpha": torch.tensor(4.0),
    }
    exp = {
        ("dit", "blocks.0.self_attn.q_proj.weight"): 0.5 * up.half().double() @ down.half().double(),
        ("dit", "llm_adapter.blocks.0.cross_attn.k_proj.weight"): 1.5 * up2.double() @ down2.double(),
        ("dit", "t_embedder.1.linear_1.weight"): up3.double() @ down3.double(),
    }
    return f, exp


def fmt_kohya_te():
    up, down = rnd(12, 2, seed=7), rnd(2, 8, seed=8)
    up2, down2 = rnd(20, 4, seed=9), rnd(4, 8, seed=10)
    f = {
        "lora_te_layers_0_self_attn_q_proj.lora_up.weight": up,
        "lora_te_layers_0_self_attn_q_proj.lora_down.weight": down,
        "lora_te_layers_0_self_attn_q_proj.alpha": torch.tensor(1.0),
        "lora_te_layers_1_mlp_gate_proj.lora_up.weight": up2,
        "lora_te_layers_1_mlp_gate_proj.lora_down.weight": down2,
        "lora_te_layers_1_mlp_gate_proj.alpha": torch.tensor(4.0),
    }
    exp = {
        ("te", "layers.0.self_attn.q_proj.weight"): 0.5 * up.double() @ down.double(),
        ("te", "layers.1.mlp.gate_proj.weight"): up2.double() @ down2.double(),
    }
    return f, exp


def fmt_peft():
    a, b = rnd(4, 12, seed=11), rnd(16, 4, seed=12)
    a2, b2 = rnd(4, 16, seed=13), rnd(8, 4, seed=14)
    f = {
        "diffusion_model.blocks.1.cross_attn.k_proj.lora_A.weight": a.bfloat16(),
        "diffusion_model.blocks.1.cross_attn.k_proj.lora_B.weight": b.bfloat16(),
        "diffusion_model.blocks.0.adaln_modulation_self_attn.1.lora_A.weight": a2,
        "diffusion_model.blocks.0.adaln_modulation_self_attn.1.lora_B.weight": b2,
    }
    exp = {  # no alpha stored: scale 1 (diffusion-pipe forces alpha = rank)
        ("dit", "blocks.1.cross_attn.k_proj.weight"): b.bfloat16().double() @ a.bfloat16().double(),
        ("dit", "blocks.0.adaln_modulation_self_attn.1.weight"): b2.double() @ a2.double(),
    }
    return f, exp


def fmt_hybrid():
    a, b = rnd(8, 16, seed=15), rnd(32, 8, seed=16)
    a2, b2 = rnd(2, 8, seed=17), rnd(6, 2, seed=18)
    f = {
        "diffusion_model.blocks.0.mlp.layer1.lora_A.weight": a,
        "diffusion_model.blocks.0.mlp.layer1.lora_B.weight": b,
        "diffusion_model.blocks.0.mlp.layer1.alpha": torch.tensor(2.0),
        "text_encoders.qwen3_06b.transformer.model.layers.0.self_attn.k_proj.lora_A.weight": a2,
        "text_encoders.qwen3_06b.transformer.model.layers.0.self_attn.k_proj.lora_B.weight": b2,
        "text_encoders.qwen3_06b.transformer.model.layers.0.self_attn.k_proj.alpha": torch.tensor(1.0),
    }
    exp = {
        ("dit", "blocks.0.mlp.layer1.weight"): 0.25 * b.double() @ a.double(),
        ("te", "layers.0.self_attn.k_proj.weight"): 0.5 * b2.double() @ a2.double(),
    }
    return f, exp


def fmt_diffsynth():
    a, b = rnd(4, 16, seed=19), rnd(16, 4, seed=20)
    f = {"blocks.1.self_attn.v_proj.lora_A.default.weight": a, "blocks.1.self_attn.v_proj.lora_B.default.weight": b}
    return f, {("dit", "blocks.1.self_attn.v_proj.weight"): b.double() @ a.double()}


def fmt_diffusers():
    a, b = rnd(4, 16, seed=21), rnd(16, 4, seed=22)
    a2, b2 = rnd(4, 16, seed=23), rnd(32, 4, seed=24)
    a3, b3 = rnd(2, 16, seed=25), rnd(12, 2, seed=26)
    a4, b4 = rnd(2, 20, seed=27), rnd(16, 2, seed=28)
    f = {
        "transformer.transformer_blocks.0.attn1.to_out.0.lora_A.weight": a,
        "transformer.transformer_blocks.0.attn1.to_out.0.lora_B.weight": b,
        "lora_transformer_transformer_blocks_1_ff_net_0_proj.lora_down.weight": a2,
        "lora_transformer_transformer_blocks_1_ff_net_0_proj.lora_up.weight": b2,
        "lora_transformer_transformer_blocks_1_ff_net_0_proj.alpha": torch.tensor(8.0),
        "transformer.proj_out.lora_A.weight": a3,
        "transformer.proj_out.lora_B.weight": b3,
        "patch_embed.proj.lora_A.weight": a4,
        "patch_embed.proj.lora_B.weight": b4,
    }
    exp = {
        ("dit", "blocks.0.self_attn.output_proj.weight"): b.double() @ a.double(),
        ("dit", "blocks.1.mlp.layer1.weight"): 2.0 * b2.double() @ a2.double(),
        ("dit", "final_layer.linear.weight"): b3.double() @ a3.double(),
        ("dit", "x_embedder.proj.1.weight"): b4.double() @ a4.double(),
    }
    return f, exp


def kron(a, b):
    # (p,q) ⊗ (r,s) -> (p·r, q·s), written out with broadcasting rather than torch.kron
    return (a[:, None, :, None] * b[None, :, None, :]).reshape(a.shape[0] * b.shape[0], a.shape[1] * b.shape[1])


def fmt_lokr():
    w1, w2 = rnd(4, 4, seed=29), rnd(4, 4, seed=30)  # both full: alpha stored but ignored (the §2.4 pitfall)
    w1a, w1b, w2_ = rnd(4, 2, seed=31), rnd(2, 4, seed=32), rnd(8, 4, seed=33)  # w1 factorised: alpha / rank(w1)
    w1c = rnd(2, 2, seed=34)
    w2a, w2b = rnd(8, 3, seed=35), rnd(3, 6, seed=36)  # w2 factorised: alpha / rank(w2)
    w3a, w3b, w4a, w4b = rnd(4, 2, seed=37), rnd(2, 3, seed=38), rnd(4, 5, seed=39), rnd(5, 4, seed=40)
    f = {
        "lora_unet_blocks_0_self_attn_q_proj.lokr_w1": w1,
        "lora_unet_blocks_0_self_attn_q_proj.lokr_w2": w2,
        "lora_unet_blocks_0_self_attn_q_proj.alpha": torch.tensor(16.0),
        "lycoris_blocks_1_mlp_layer1.lokr_w1_a": w1a,
        "lycoris_blocks_1_mlp_layer1.lokr_w1_b": w1b,
        "lycoris_blocks_1_mlp_layer1.lokr_w2": w2_,
        "lycoris_blocks_1_mlp_layer1.alpha": torch.tensor(1.0),
        "diffusion_model.blocks.1.cross_attn.k_proj.lokr_w1": w1c,
        "diffusion_model.blocks.1.cross_attn.k_proj.lokr_w2_a": w2a,
        "diffusion_model.blocks.1.cross_attn.k_proj.lokr_w2_b": w2b,
        "diffusion_model.blocks.1.cross_attn.k_proj.alpha": torch.tensor(6.0),
        # both factorised with different ranks: w2's rank (5) sets the scale
        "lora_unet_blocks_0_cross_attn_k_proj.lokr_w1_a": w3a,
        "lora_unet_blocks_0_cross_attn_k_proj.lokr_w1_b": w3b,
        "lora_unet_blocks_0_cross_attn_k_proj.lokr_w2_a": w4a,
        "lora_unet_blocks_0_cross_attn_k_proj.lokr_w2_b": w4b,
        "lora_unet_blocks_0_cross_attn_k_proj.alpha": torch.tensor(10.0),
    }
    exp = {
        ("dit", "blocks.0.self_attn.q_proj.weight"): kron(w1.double(), w2.double()),
        ("dit", "blocks.1.mlp.layer1.weight"): 0.5 * kron(w1a.double() @ w1b.double(), w2_.double()),
        ("dit", "blocks.1.cross_attn.k_proj.weight"): 2.0 * kron(w1c.double(), w2a.double() @ w2b.double()),
        ("dit", "blocks.0.cross_attn.k_proj.weight"): 2.0 * kron(w3a.double() @ w3b.double(),
                                                                w4a.double() @ w4b.double()),
    }
    return f, exp


def fmt_loha():
    t = {k: rnd(*s, seed=40 + i) for i, (k, s) in enumerate(
        {"hada_w1_a": (16, 2), "hada_w1_b": (2, 16), "hada_w2_a": (16, 2), "hada_w2_b": (2, 16)}.items())}
    f = {f"lora_unet_blocks_1_self_attn_q_proj.{k}": v for k, v in t.items()}
    f["lora_unet_blocks_1_self_attn_q_proj.alpha"] = torch.tensor(1.0)
    d = t["hada_w1_a"].double() @ t["hada_w1_b"].double() * (t["hada_w2_a"].double() @ t["hada_w2_b"].double())
    return f, {("dit", "blocks.1.self_attn.q_proj.weight"): 0.5 * d}


def fmt_diff():
    d, db, dn = rnd(24, 10, seed=50), rnd(24, seed=51), rnd(8, seed=52)
    f = {
        "diffusion_model.llm_adapter.blocks.0.mlp.0.diff": d,
        "diffusion_model.llm_adapter.blocks.0.mlp.0.diff_b": db,
        "diffusion_model.blocks.0.self_attn.q_norm.diff": dn,
    }
    exp = {
        ("dit", "llm_adapter.blocks.0.mlp.0.weight"): d.double(),
        ("dit", "llm_adapter.blocks.0.mlp.0.bias"): db.double(),
        ("dit", "blocks.0.self_attn.q_norm.weight"): dn.double(),
    }
    return f, exp


FORMATS = {f.__name__[4:]: f for f in (fmt_kohya, fmt_kohya_te, fmt_peft, fmt_hybrid, fmt_diffsynth, fmt_diffusers,
                                       fmt_lokr, fmt_loha, fmt_diff)}


@pytest.fixture
def models():
    return {"dit": build(DIT_SHAPES, seed=100), "te": build(TE_SHAPES, seed=101)}


@pytest.mark.parametrize("name", FORMATS)
def test_each_format_changes_exactly_its_targets_by_the_expected_delta(name, models, tmp_path):
    tensors, expected = FORMATS[name]()
    before = {t: params(m) for t, m in models.items()}
    lf = parse_lora_file(write(tmp_path / f"{name}.safetensors", tensors))
    assert lf.n_modules == len({(t, p.rsplit(".", 1)[0]) for t, p in expected})
    patch = apply_loras(models, [(lf, 0.8)])
    for t, m in models.items():
        for pname, value in m.named_parameters():
            want = before[t][pname].double() + 0.8 * expected.get((t, pname), 0.0)
            torch.testing.assert_close(value.double(), want, rtol=0, atol=2e-6, msg=f"{t}:{pname}")
    assert sorted((t, p) for t, ps in patch.patched.items() for p in ps) == sorted(expected)
    patch.undo()
    for t, m in models.items():
        for pname, value in m.named_parameters():
            assert torch.equal(value, before[t][pname]), pname


def test_target_names_resolve_underscore_names_against_real_parameter_names(models, tmp_path):
    lf = parse_lora_file(write(tmp_path / "k.safetensors", {**fmt_kohya()[0], **fmt_kohya_te()[0]}))
    names = lf.target_names(models)
    assert names["lora_unet_llm_adapter_blocks_0_cross_attn_k_proj"] == "dit:llm_adapter.blocks.0.cross_attn.k_proj"
    assert names["lora_te_layers_1_mlp_gate_proj"] == "te:layers.1.mlp.gate_proj"
    # Without a model: the released Anima names (28 blocks, 6 adapter blocks, 28 TE layers).
    assert lf.target_names()["lora_unet_t_embedder_1_linear_1"] == "dit:t_embedder.1.linear_1"
    assert lf.formats == {"kohya lora": 5}


def test_te_with_hf_model_prefix_and_separate_te_strength(tmp_path):
    te = build({f"model.{k}": v for k, v in TE_SHAPES.items()})
    dit = build(DIT_SHAPES)
    tensors, expected = fmt_hybrid()
    before_te, before_dit = params(te), params(dit)
    apply_loras({"dit": dit, "te": te}, [(parse_lora_file(write(tmp_path / "h.safetensors", tensors)), (1.0, 0.25))])
    w = dict(te.named_parameters())["model.layers.0.self_attn.k_proj.weight"]
    want = before_te["model.layers.0.self_attn.k_proj.weight"].double() + 0.25 * expected[
        ("te", "layers.0.self_attn.k_proj.weight")]
    torch.testing.assert_close(w.double(), want, rtol=0, atol=2e-6)
    w = dict(dit.named_parameters())["blocks.0.mlp.layer1.weight"]
    want = before_dit["blocks.0.mlp.layer1.weight"].double() + expected[("dit", "blocks.0.mlp.layer1.weight")]
    torch.testing.assert_close(w.double(), want, rtol=0, atol=2e-6)


def frob_rows(w):
    return torch.sqrt((w * w).sum(dim=1, keepdim=True))


def test_dora_variants(models, tmp_path):
    a, b = rnd(4, 16, seed=60), rnd(16, 4, seed=61)
    m_row, m_col, m_peft = rnd(16, 1, seed=62).abs() + 1, rnd(1, 16, seed=63).abs() + 1, rnd(16, seed=64).abs() + 1
    f = {}
    for i, (key, mag) in enumerate((("dora_scale", m_row), ("dora_scale", m_col), ("lora_magnitude_vector", m_peft))):
        base = f"diffusion_model.blocks.{i % 2}.self_attn.{'qvo'[i]}{'_proj' if i < 2 else 'utput_proj'}"
        f |= {f"{base}.lora_A.weight": a, f"{base}.lora_B.weight": b, f"{base}.{key}": mag,
              f"{base}.alpha": torch.tensor(2.0)}
    before = params(models["dit"])
    s = 0.6
    apply_loras(models, [(parse_lora_file(write(tmp_path / "d.safetensors", f)), s)])
    after = dict(models["dit"].named_parameters())
    d = 0.5 * b.double() @ a.double()
    eps = torch.finfo(torch.float32).eps
    # row dora_scale (ComfyUI): normalised by the ORIGINAL weight's row norms
    w = before["blocks.0.self_attn.q_proj.weight"].double()
    wc = (w + d) * m_row.double() / (frob_rows(w) + eps)
    torch.testing.assert_close(after["blocks.0.self_attn.q_proj.weight"].double(), w + s * (wc - w), rtol=0, atol=1e-5)
    # column dora_scale: normalised by the updated weight's column norms
    w = before["blocks.1.self_attn.v_proj.weight"].double()
    wc = (w + d) * m_col.double() / (frob_rows((w + d).T).T + eps)
    torch.testing.assert_close(after["blocks.1.self_attn.v_proj.weight"].double(), w + s * (wc - w), rtol=0, atol=1e-5)
    # PEFT magnitude: the updated weight's row norms
    w = before["blocks.0.self_attn.output_proj.weight"].double()
    wc = (w + d) * m_peft.double()[:, None] / frob_rows(w + d)
    torch.testing.assert_close(after["blocks.0.self_attn.output_proj.weight"].double(), w + s * (wc - w), rtol=0,
                               atol=1e-5)


def test_merge_then_undo_restores_every_tensor_bit_for_bit(models, tmp_path):
    for dtype in (torch.float32, torch.bfloat16):
        dit = build(DIT_SHAPES, dtype=dtype, seed=7)
        before = params(dit)
        ptrs = {k: v.data_ptr() for k, v in dit.named_parameters()}
        files = [parse_lora_file(write(tmp_path / f"{n}.safetensors", FORMATS[n]()[0])) for n in ("kohya", "lokr",
                                                                                                   "diff")]
        patch = apply_loras({"dit": dit}, [(f, 0.9) for f in files])
        changed = [k for k, v in dit.named_parameters() if not torch.equal(v, before[k])]
        assert len(changed) == patch.n_patched > 0
        assert all(v.dtype == dtype for v in dit.parameters())
        patch.undo()
        patch.undo()  # a second undo is harmless
        for k, v in dit.named_parameters():
            assert torch.equal(v, before[k]) and v.data_ptr() == ptrs[k], k


def test_switching_stacks_needs_no_reload(models, tmp_path):
    dit = models["dit"]
    kohya = parse_lora_file(write(tmp_path / "k.safetensors", fmt_kohya()[0]))
    peft = parse_lora_file(write(tmp_path / "p.safetensors", fmt_peft()[0]))
    fresh = build(DIT_SHAPES, seed=100)
    apply_loras({"dit": fresh}, [(peft, 0.4)])
    apply_loras({"dit": dit}, [(kohya, 1.0)]).undo()
    apply_loras({"dit": dit}, [(peft, 0.4)])
    for (k, v), (_, w) in zip(dit.named_parameters(), fresh.named_parameters()):
        assert torch.equal(v, w), k


def test_zero_strength_changes_nothing_but_still_checks_the_file(models, tmp_path):
    before = params(models["dit"])
    lf = parse_lora_file(write(tmp_path / "k.safetensors", fmt_kohya()[0]))
    assert apply_loras(models, [(lf, 0.0)]).n_patched == 0
    assert all(torch.equal(v, before[k]) for k, v in models["dit"].named_parameters())
    te_only = parse_lora_file(write(tmp_path / "te.safetensors", fmt_kohya_te()[0]))
    assert apply_loras(models, [(te_only, (1.0, 0.0))]).n_patched == 0
    with pytest.raises(LoraError, match="0 of 2 modules match"):
        apply_loras({"dit": models["dit"]}, [(te_only, 0.0)])


def test_stacking_order_does_not_matter_for_additive_kinds(tmp_path):
    files = [parse_lora_file(write(tmp_path / f"{n}.safetensors", FORMATS[n]()[0]))
             for n in ("kohya", "lokr", "loha", "diffusers")]
    weights = [0.7, -0.3, 1.1, 0.45]
    results = []
    for order in itertools.permutations(range(4)):
        dit = build(DIT_SHAPES, seed=3)
        apply_loras({"dit": dit}, [(files[i], weights[i]) for i in order])
        results.append(params(dit))
    base = build(DIT_SHAPES, seed=3)
    assert not torch.equal(results[0]["blocks.0.self_attn.q_proj.weight"],
                           dict(base.named_parameters())["blocks.0.self_attn.q_proj.weight"])
    for r in results[1:]:
        for k in r:
            assert torch.equal(r[k], results[0][k]), k


def test_fp8_weights_are_requantised_with_a_new_scale_and_undo_restores_them(tmp_path):
    class ScaledLinear(nn.Module):
        def __init__(self, w, scale):
            super().__init__()
            self.weight = nn.Parameter(w, requires_grad=False)
            self.weight_scale = scale

    w32 = rnd(64, 64, seed=70) * 0.05
    scale = w32.abs().amax() / 448
    dit = nn.Module()
    dit.add_module("blocks", nn.Module())
    dit.blocks.add_module("0", nn.Module())
    blk = getattr(dit.blocks, "0")
    blk.add_module("self_attn", nn.Module())
    blk.self_attn.add_module("q_proj", ScaledLinear((w32 / scale).to(torch.float8_e4m3fn), scale))
    blk.self_attn.add_module("k_proj", ScaledLinear((w32 * 10).to(torch.float8_e4m3fn), None))  # plain fp8 (no scale)
    # A delta about a tenth of an fp8 step: round-to-nearest would drop nearly all of it.
    up, down = rnd(64, 4, seed=71), rnd(4, 64, seed=72) * 3e-4
    f = {f"diffusion_model.blocks.0.self_attn.{p}.lora_{r}.weight": t
         for p in ("q_proj", "k_proj") for r, t in (("B", up), ("A", down))}
    q, k = blk.self_attn.q_proj, blk.self_attn.k_proj
    before_q, before_k = q.weight.detach().clone(), k.weight.detach().clone()
    deq_q = before_q.float() * scale
    patch = apply_loras({"dit": dit}, [(parse_lora_file(write(tmp_path / "f.safetensors", f)), 1.0)])
    assert q.weight.dtype == torch.float8_e4m3fn and q.weight_scale is not scale
    merged = q.weight.float() * q.weight_scale
    want = deq_q + up @ down
    # Stochastic rounding: each entry within one fp8 step, and unbiased over the tensor.
    # e4m3: 3 mantissa bits, so neighbours are at most |x|/8 apart (plus the subnormal step, scale·2^-9)
    assert ((merged - want).abs() <= want.abs() / 8 + q.weight_scale * 2**-9 + 1e-9).all()
    delta = up @ down
    slope = float(((merged - deq_q) * delta).sum() / (delta * delta).sum())
    assert abs(slope - 1) < 0.35, slope  # stochastic rounding keeps the delta in expectation
    assert k.weight_scale is not None and k.weight.dtype == torch.float8_e4m3fn
    patch.undo()
    assert q.weight_scale is scale and k.weight_scale is None
    assert torch.equal(q.weight.view(torch.uint8), before_q.view(torch.uint8))
    assert torch.equal(k.weight.view(torch.uint8), before_k.view(torch.uint8))


# --- golden: ComfyUI's merged weights --------------------------------------------------------------------------------

GOLDEN_FILES = {"kohya": "tiny_kohya_lora.safetensors", "peft": "tiny_peft_lora.safetensors",
                "lokr": "tiny_lokr.safetensors"}


def golden_cases():
    """{case: [(lora file, strength)]} for every case under lora_merged/, from cases.json or the case's name."""
    folder = shared_path("golden", "lora_merged")
    cases = {c["id"]: c for c in json.loads(shared_path("golden", "cases.json").read_text())["cases"]}
    out = {}
    for f in sorted(folder.glob("*.npy")):
        case = f.name.split("__")[0]
        if case in cases:
            out[case] = [tuple(x) for x in cases[case]["loras"]]
        else:  # cases kept aside: "lora_lokr_0.7", "lora_kohya0.5_peft0.3"
            out[case] = [(GOLDEN_FILES[k], float(s)) for k, s in re.findall(r"(kohya|peft|lokr)_?([0-9.]+?)(?=_|$)",
                                                                          case[len("lora_"):])]
    return out, cases


def test_golden_loras_reproduce_comfyui_merged_weights():
    model_file = shared_path("golden", "models", "diffusion_models", "anima_tiny.safetensors")
    sd = {k[len("net."):]: v.float() for k, v in load_file(str(model_file)).items()}  # like ComfyUI --force-fp32
    dit = build(sd)
    cases, records = golden_cases()
    assert len(cases) >= 4
    worst = 0.0
    for case, loras in cases.items():
        assert loras, case
        files = [(parse_lora_file(shared_path("golden", "models", "loras", name)), s) for name, s in loras]
        patch = apply_loras({"dit": dit}, files)
        merged = dict(dit.named_parameters())
        for f in shared_path("golden", "lora_merged").glob(f"{case}__*.npy"):
            expected = torch.from_numpy(np.load(f))
            err = (merged[f.name[len(case) + 2: -len(".npy")]] - expected).abs().max().item()
            assert err <= 1e-6, (case, f.name, err)
            worst = max(worst, err)
        record = records.get(case, {}).get("lora_application")
        if record:
            assert patch.n_patched == record["live_weights_changed"]
            assert sorted(patch.patched["dit"]) == sorted(record["patched_weight_keys"])
        else:
            union = {t for lf, _ in files for t in lf.target_names({"dit": dit}).values()}
            assert patch.n_patched == len(union)
        patch.undo()
        for k, v in dit.named_parameters():
            assert torch.equal(v, sd[k]), k


# --- loud failures ---------------------------------------------------------------------------------------------------


def test_sdxl_lora_matches_nothing(models, tmp_path):
    f = {f"lora_unet_down_blocks_0_attentions_0_proj_in.lora_{p}.weight": rnd(4, 4, seed=1) for p in ("up", "down")}
    f |= {f"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_{p}.weight": rnd(4, 4, seed=2) for p in ("up", "down")}
    before = params(models["dit"])
    with pytest.raises(LoraError, match=r"sdxl\.safetensors: 0 of 2 modules match this model"):
        apply_loras(models, [(parse_lora_file(write(tmp_path / "sdxl.safetensors", f)), 1.0)])
    assert all(torch.equal(v, before[k]) for k, v in models["dit"].named_parameters())


def test_partial_fit_fails_unless_allowed(models, tmp_path):
    f = dict(fmt_kohya()[0])
    f |= {f"lora_unet_blocks_7_mlp_layer1.lora_{p}.weight": rnd(*s, seed=3) for p, s in (("up", (32, 2)),
                                                                                        ("down", (2, 16)))}
    f |= {"lora_unet_blocks_0_self_attn_v_proj.lora_up.weight": rnd(16, 2, seed=4),  # right name, wrong width
          "lora_unet_blocks_0_self_attn_v_proj.lora_down.weight": rnd(2, 40, seed=5)}
    lf = parse_lora_file(write(tmp_path / "part.safetensors", f))
    before = params(models["dit"])
    with pytest.raises(LoraError, match=r"part\.safetensors: 2 of 5 modules do not match.*blocks_7_mlp_layer1"):
        apply_loras(models, [(lf, 1.0)])
    assert all(torch.equal(v, before[k]) for k, v in models["dit"].named_parameters())
    patch = apply_loras(models, [(lf, 1.0)], allow_unmatched=True)
    assert patch.n_patched == 3
    assert len(patch.warnings) == 2 and any("shape [16, 40]" in w for w in patch.warnings)


def test_lora_for_more_blocks_than_the_model_has(tmp_path):
    dit = build({f"blocks.{n}.self_attn.q_proj.weight": (4, 4) for n in range(28)})
    f = {f"lora_unet_blocks_{n}_self_attn_q_proj.lora_{p}.weight": torch.ones(4, 4) for n in range(40)
         for p in ("up", "down")}
    lf = parse_lora_file(write(tmp_path / "forty.safetensors", f))
    with pytest.raises(LoraError, match=r"12 of 40 modules do not match.*lora_unet_blocks_28_self_attn_q_proj"):
        apply_loras({"dit": dit}, [(lf, 1.0)])
    assert apply_loras({"dit": dit}, [(lf, 1.0)], allow_unmatched=True).n_patched == 28


def test_unreadable_files_raise_lora_error(tmp_path):
    with pytest.raises(LoraError, match="missing.safetensors: LoRA file not found"):
        parse_lora_file(tmp_path / "missing.safetensors")
    pt = tmp_path / "old.pt"
    torch.save({"a": torch.ones(2)}, pt)
    with pytest.raises(LoraError, match=r"old\.pt: pickle"):
        parse_lora_file(pt)
    disguised = tmp_path / "disguised.safetensors"
    disguised.write_bytes(pt.read_bytes())
    with pytest.raises(LoraError, match="disguised.safetensors: not a safetensors file"):
        parse_lora_file(disguised)
    oft = write(tmp_path / "oft.safetensors",
                {"diffusion_model.blocks.0.self_attn.q_proj.oft_blocks": torch.ones(2, 2, 2)})
    with pytest.raises(LoraError, match="OFT"):
        parse_lora_file(oft)
    half = write(tmp_path / "half.safetensors",
                 {"lora_unet_blocks_0_self_attn_q_proj.lora_up.weight": torch.ones(2, 2)})
    with pytest.raises(LoraError, match="incomplete"):
        parse_lora_file(half)


def test_lora_file_identity(tmp_path):
    lf = parse_lora_file(write(tmp_path / "k.safetensors", fmt_kohya()[0], {"ss_network_dim": "4"}))
    assert lf.name == "k" and lf.n_modules == 3 and lf.metadata == {"ss_network_dim": "4"}
    import rdbt_cli.discovery as discovery

    if hasattr(discovery, "file_hashes"):
        assert {"autov2", "a1111_lora"} <= lf.hashes.keys()
        assert lf.hashes["autov2"] == hashlib.sha256(lf.path.read_bytes()).hexdigest()[:10]
    else:
        assert lf.hashes == {}
