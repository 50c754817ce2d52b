"""The Anima DiT + LLM adapter: key layouts, shape inference, oracle parity, fp8, prepared K/V, bad files."""

import json
import sys
import types
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from conftest import shared_path
from rdbt_cli.config import TINY_ADAPTER, TINY_DIT, AdapterParams, DiTParams
from rdbt_cli.engine import (
    FP8_DTYPES,
    AnimaDiT,
    infer_dit_params,
    load_dit,
    set_attention_backend,
)
from rdbt_cli.errors import CheckpointError, ConfigError
from rdbt_cli.tiny import tiny_dit_state_dict, write_tiny_dit


@pytest.fixture(scope="module")
def tiny_sd():
    return tiny_dit_state_dict(prefix="")


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    return write_tiny_dit(tmp_path_factory.mktemp("dit") / "anima_tiny.safetensors")


@pytest.fixture(scope="module")
def tiny32(tiny_file):
    return load_dit(tiny_file, dtype=torch.float32)


def _inputs(B=2, h=8, w=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 16, 1, h, w, generator=g)
    t = torch.rand(B, generator=g)
    ctx = torch.randn(B, 512, TINY_DIT.context_dim, generator=g)
    ctx[:, 20:] = 0  # the zero padding rows a real context carries
    return x, t, ctx


# ----------------------------------------------------------------------------------------------------------------
# Key layouts and shape inference
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["net.", "model.diffusion_model.", "diffusion_model.", ""])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_strict_round_trip_every_prefix_and_dtype(tmp_path, tiny_sd, prefix, dtype):
    sd = {prefix + k: v.to(dtype) for k, v in tiny_sd.items()}
    # Recomputed buffers some Cosmos-derived files carry must be tolerated.
    sd[prefix + "pos_embedder.seq"] = torch.arange(256, dtype=torch.float32)
    sd[prefix + "blocks.0.self_attn._extra_state"] = torch.zeros(4, dtype=torch.uint8)
    path = tmp_path / "dit.safetensors"
    save_file(sd, str(path))
    model = load_dit(path)
    loaded = model.state_dict()
    expected = {k[len(prefix) :]: v for k, v in sd.items() if "pos_embedder" not in k and "_extra_state" not in k}
    assert loaded.keys() == expected.keys()
    for k, v in expected.items():
        assert loaded[k].dtype == dtype, k
        assert torch.equal(loaded[k], v), k
    assert model.compute_dtype == dtype
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def _meta_sd(dit, adapter):
    with torch.device("meta"):
        return AnimaDiT(dit, adapter).state_dict()


@pytest.mark.parametrize(
    "dit, adapter",
    [
        (TINY_DIT, TINY_ADAPTER),
        (replace(TINY_DIT, num_blocks=3), TINY_ADAPTER),
        (replace(TINY_DIT, model_channels=48, num_heads=2, mlp_dim=96, num_blocks=40, adaln_lora_dim=16), TINY_ADAPTER),
        # odd widths and head counts; an adapter whose embedding width differs from its model width (in_proj)
        (
            DiTParams(model_channels=120, num_blocks=1, num_heads=5, mlp_dim=200, in_channels=16, out_channels=16,
                      context_dim=40, adaln_lora_dim=24),
            AdapterParams(source_dim=72, model_dim=60, target_dim=40, num_layers=3, num_heads=5, vocab_size=77,
                          mlp_dim=100),
        ),
        (
            DiTParams(model_channels=96, num_blocks=2, num_heads=3, mlp_dim=384, in_channels=4, out_channels=4,
                      context_dim=96, adaln_lora_dim=32),
            AdapterParams(source_dim=96, model_dim=96, target_dim=96, num_layers=1, num_heads=1, vocab_size=11,
                          mlp_dim=384),
        ),
    ],
)
def test_infer_params_from_shapes_alone(dit, adapter):
    sd = _meta_sd(dit, adapter)
    assert infer_dit_params(sd) == (dit, adapter)
    assert ("llm_adapter.in_proj.weight" in sd) == (adapter.target_dim != adapter.model_dim)


def test_bad_sizes_are_config_errors():
    with pytest.raises(ConfigError, match="head_dim"):
        AnimaDiT(replace(TINY_DIT, num_heads=3), TINY_ADAPTER)


def test_attention_backend_choice():
    with pytest.raises(ConfigError, match="sdpa"):
        set_attention_backend("flash9")
    set_attention_backend("sdpa")


# ----------------------------------------------------------------------------------------------------------------
# Parity with the diffusers oracles (spec/anima.md §6.1, §6.2)
# ----------------------------------------------------------------------------------------------------------------

# anima.md §6.1: substring replacements, applied in this order.
DIFFUSERS_DIT_RENAMES = [
    ("t_embedder.1", "time_embed.t_embedder"),
    ("t_embedding_norm", "time_embed.norm"),
    ("blocks", "transformer_blocks"),
    ("adaln_modulation_self_attn.1", "norm1.linear_1"),
    ("adaln_modulation_self_attn.2", "norm1.linear_2"),
    ("adaln_modulation_cross_attn.1", "norm2.linear_1"),
    ("adaln_modulation_cross_attn.2", "norm2.linear_2"),
    ("adaln_modulation_mlp.1", "norm3.linear_1"),
    ("adaln_modulation_mlp.2", "norm3.linear_2"),
    ("self_attn", "attn1"),
    ("cross_attn", "attn2"),
    ("q_proj", "to_q"),
    ("k_proj", "to_k"),
    ("v_proj", "to_v"),
    ("output_proj", "to_out.0"),
    ("q_norm", "norm_q"),
    ("k_norm", "norm_k"),
    ("mlp.layer1", "ff.net.0.proj"),
    ("mlp.layer2", "ff.net.2"),
    ("x_embedder.proj.1", "patch_embed.proj"),
    ("final_layer.adaln_modulation.1", "norm_out.linear_1"),
    ("final_layer.adaln_modulation.2", "norm_out.linear_2"),
    ("final_layer.linear", "proj_out"),
]


def _diffusers_cosmos():
    from diffusers.models.transformers import transformer_cosmos

    if not hasattr(transformer_cosmos, "transforms"):
        # torchvision is only used to resize the all-zero padding mask; a nearest interpolate does the same.
        stub = types.ModuleType("torchvision.transforms")
        stub.InterpolationMode = types.SimpleNamespace(NEAREST="nearest")
        stub.functional = types.SimpleNamespace(
            resize=lambda img, size, interpolation=None: F.interpolate(img, size=size, mode="nearest")
        )
        sys.modules.setdefault("torchvision.transforms", stub)
        transformer_cosmos.transforms = stub
    return transformer_cosmos.CosmosTransformer3DModel


def test_dit_matches_diffusers_cosmos(tiny32):
    p = tiny32.params
    oracle = _diffusers_cosmos()(
        in_channels=p.in_channels, out_channels=p.out_channels, num_attention_heads=p.num_heads,
        attention_head_dim=p.head_dim, num_layers=p.num_blocks, mlp_ratio=p.mlp_dim / p.model_channels,
        text_embed_dim=p.context_dim, adaln_lora_dim=p.adaln_lora_dim, max_size=(128, 240, 240),
        patch_size=(1, 2, 2), rope_scale=(1.0, 4.0, 4.0), concat_padding_mask=True, extra_pos_embed_type=None,
    ).eval()
    renamed = {}
    for k, v in tiny32.state_dict().items():
        if k.startswith("llm_adapter."):
            continue
        for a, b in DIFFUSERS_DIT_RENAMES:
            k = k.replace(a, b)
        renamed[k] = v
    oracle.load_state_dict(renamed, strict=True)

    x, t, ctx = _inputs()
    with torch.no_grad():
        ref = oracle(x, t, ctx, padding_mask=torch.zeros(1, 1, 8 * x.shape[-2], 8 * x.shape[-1]), return_dict=False)[0]
        ours = tiny32(x, t, ctx)
    err = (ours - ref).abs().max().item()
    print(f"DiT vs diffusers: max abs {err:.2e}, output max {ref.abs().max():.2f}")
    assert ref.abs().max() > 0.5 and err <= 1e-4


def test_odd_latent_is_padded_circularly_and_cropped(tiny32):
    x, t, ctx = _inputs(h=7, w=9)
    padded = F.pad(x, (0, 1, 0, 1, 0, 0), mode="circular")
    with torch.no_grad():
        out = tiny32(x, t, ctx)
        ref = tiny32(padded, t, ctx)[..., :7, :9]
    assert out.shape == x.shape
    assert (out - ref).abs().max() <= 1e-5


def test_adapter_matches_diffusers_anima_text_conditioner(tiny32):
    from diffusers.models.condition_embedders.condition_embedder_anima import AnimaTextConditioner

    a = tiny32.llm_adapter.params
    oracle = AnimaTextConditioner(
        source_dim=a.source_dim, target_dim=a.target_dim, model_dim=a.model_dim, num_layers=a.num_layers,
        num_attention_heads=a.num_heads, mlp_ratio=a.mlp_dim / a.model_dim, target_vocab_size=a.vocab_size,
        use_self_attention=True, use_layer_norm=False, min_sequence_length=512,
    ).eval()
    sd = {k[len("llm_adapter.") :]: v for k, v in tiny32.state_dict().items() if k.startswith("llm_adapter.")}
    oracle.load_state_dict(sd, strict=True)
    g = torch.Generator().manual_seed(1)
    qwen = torch.randn(1, 11, a.source_dim, generator=g)
    ids = torch.randint(0, a.vocab_size, (1, 9), generator=g)
    weights = 1 + 0.3 * torch.rand(1, 9, generator=g)
    with torch.no_grad():
        ref = oracle(source_hidden_states=qwen, target_input_ids=ids)
        ours = tiny32.encode_context(qwen, ids, weights)
        plain = tiny32.encode_context(qwen, ids, torch.ones(1, 9))
    assert ours.shape == (1, 512, a.target_dim)
    err = (plain - ref).abs().max().item()
    print(f"adapter vs diffusers: max abs {err:.2e}")
    assert err <= 1e-4
    assert torch.allclose(ours[:, :9], ref[:, :9] * weights[..., None], atol=1e-5)
    assert not ours[:, :9].eq(0).all() and ours[:, 9:].eq(0).all()


def test_long_prompt_is_neither_padded_nor_cut(tiny32):
    a = tiny32.llm_adapter.params
    ids = torch.randint(0, a.vocab_size, (1, 600))
    with torch.no_grad():
        out = tiny32.encode_context(torch.randn(1, 5, a.source_dim), ids, torch.ones(1, 600))
    assert out.shape == (1, 600, a.target_dim) and out.abs().amin(-1).gt(0).all()


# ----------------------------------------------------------------------------------------------------------------
# Golden files made by ComfyUI
# ----------------------------------------------------------------------------------------------------------------


def test_golden_dit_loads_and_sizes_match_cases_json():
    path = shared_path("golden", "models", "diffusion_models", "anima_tiny.safetensors")
    cfg = json.loads(shared_path("golden", "cases.json").read_text())["tiny_configs"]
    model = load_dit(path, dtype=torch.float32)
    d, a = cfg["diffusion_model"], cfg["llm_adapter"]
    p, ap = model.params, model.llm_adapter.params
    assert (p.model_channels, p.num_blocks, p.num_heads, p.head_dim) == (
        d["model_channels"], d["num_blocks"], d["num_heads"], d["head_dim"])
    assert (p.in_channels, p.out_channels, p.context_dim, p.adaln_lora_dim) == (
        d["in_channels"], d["out_channels"], d["crossattn_emb_channels"], d["adaln_lora_dim"])
    assert p.mlp_dim == d["mlp_ratio"] * d["model_channels"]
    assert (ap.source_dim, ap.model_dim, ap.target_dim, ap.num_layers, ap.num_heads, ap.vocab_size) == (
        a["source_dim"], a["model_dim"], a["target_dim"], a["num_layers"], a["num_heads"], a["vocab"])
    assert len(model.state_dict()) == d["n_keys"]


@pytest.mark.parametrize("prompt", ["tags", "natural", "weighted"])
def test_golden_encode_context(prompt):
    model = load_dit(shared_path("golden", "models", "diffusion_models", "anima_tiny.safetensors"), dtype=torch.float32)

    def npy(kind):
        return torch.from_numpy(np.load(shared_path("golden", "conditioning", f"{prompt}_{kind}.npy")))

    with torch.no_grad():
        ctx = model.encode_context(npy("qwen_hidden"), npy("t5_ids")[None], npy("t5_weights")[None])
    ref = npy("crossattn")
    assert ctx.shape == ref.shape
    assert (ctx - ref).abs().max() <= 1e-4


# ----------------------------------------------------------------------------------------------------------------
# fp8 storage
# ----------------------------------------------------------------------------------------------------------------


def _fp8_file(tmp_path, sd, scaled: bool, quantise_t_embedder: bool = False):
    sd = {"net." + k: v for k, v in sd.items()}
    out = {"net.scaled_fp8": torch.zeros(1, dtype=torch.float8_e4m3fn)} if scaled else {}
    for k, v in sd.items():
        core = k[len("net.") :]
        is_linear = v.ndim == 2 and "embed.weight" not in core
        if is_linear and (quantise_t_embedder or not core.startswith("t_embedder")):
            if scaled:
                scale = v.float().abs().max() / 448
                out[k] = (v.float() / scale).to(torch.float8_e4m3fn)
                out[k[: -len("weight")] + "scale_weight"] = scale.reshape(())
            else:
                out[k] = v.to(torch.float8_e4m3fn)
        else:
            out[k] = v
    path = tmp_path / f"fp8_{scaled}.safetensors"
    save_file(out, str(path))
    return path


@pytest.mark.parametrize("scaled", [False, True])
def test_fp8_weights_stay_fp8_and_match_bf16(tmp_path, tiny_sd, tiny32, scaled):
    model = load_dit(_fp8_file(tmp_path, tiny_sd, scaled, quantise_t_embedder=True))
    q = model.blocks[0].self_attn.q_proj
    assert q.weight.dtype == torch.float8_e4m3fn
    assert model.compute_dtype == torch.float32  # CPU default for fp8 files
    # timestep embedding and AdaLN are dequantised at load
    assert model.t_embedder[1].linear_1.weight.dtype == torch.float32
    assert model.blocks[0].adaln_modulation_mlp[1].weight.dtype == torch.float32
    if scaled:
        assert dict(model.named_buffers())["blocks.0.self_attn.q_proj.weight_scale"] is q.weight_scale
        assert "blocks.0.self_attn.q_proj.weight_scale" not in model.state_dict()
    x, t, ctx = _inputs()
    with torch.no_grad():
        ref, out = tiny32(x, t, ctx), model(x, t, ctx)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 0.1, rel
    unquantised = load_dit(_fp8_file(tmp_path, tiny_sd, scaled), keep_fp8=False)
    assert not any(p.dtype in FP8_DTYPES for p in unquantised.parameters())


def test_bf16_file_can_be_stored_fp8(tiny_file, tiny32):
    model = load_dit(tiny_file, dtype=torch.float8_e4m3fn)
    assert model.blocks[1].mlp.layer1.weight.dtype == torch.float8_e4m3fn
    assert model.t_embedding_norm.weight.dtype == torch.float32
    x, t, ctx = _inputs()
    with torch.no_grad():
        ref, out = tiny32(x, t, ctx), model(x, t, ctx)
    assert ((out - ref).norm() / ref.norm()) < 0.1


# ----------------------------------------------------------------------------------------------------------------
# Cross-attention K/V, prepared once per generation by the caller
# ----------------------------------------------------------------------------------------------------------------


def test_prepared_kv_gives_the_output_of_its_context(tiny_file):
    model = load_dit(tiny_file, dtype=torch.float32)
    x, t, ctx = _inputs()

    def fresh():
        return model(x, t, kv=model.prepare_context(ctx))

    with torch.no_grad():
        first = model(x, t, ctx)
        kv = model.prepare_context(ctx)
        assert torch.equal(model(x, t, kv=kv), first)
        assert torch.equal(model(x, t * 0.5, kv=kv), model(x, t * 0.5, ctx))  # another step, the same K/V

        ctx[:, 0] += 1  # changed in place
        changed = model(x, t, ctx)
        assert not torch.equal(changed, first) and torch.equal(changed, fresh())

        model.blocks[0].cross_attn.v_proj.weight.mul_(1.5)  # e.g. a LoRA patch between generations
        patched = model(x, t, ctx)
        assert not torch.equal(patched, changed) and torch.equal(patched, fresh())


# ----------------------------------------------------------------------------------------------------------------
# Bad files: one readable line naming the file
# ----------------------------------------------------------------------------------------------------------------


def _bad_files(tmp_path, sd):
    good = {"net." + k: v for k, v in sd.items()}
    files = {}

    def st(name, sd):
        files[name] = tmp_path / f"{name}.safetensors"
        save_file({k: v.clone() for k, v in sd.items()}, str(files[name]))

    files["missing"] = tmp_path / "nope.safetensors"
    trunc = tmp_path / "truncated.safetensors"
    save_file(good, str(trunc))
    trunc.write_bytes(trunc.read_bytes()[: trunc.stat().st_size // 2])
    files["truncated"] = trunc
    files["pickle"] = tmp_path / "model.ckpt"
    torch.save({"a": torch.zeros(1)}, files["pickle"])
    files["random"] = tmp_path / "random.safetensors"
    files["random"].write_bytes(np.random.default_rng(0).bytes(5000))
    w = torch.zeros(4, 4)
    st("vae", {f"decoder.middle.0.residual.{i}.gamma": w for i in range(8)} | {"encoder.conv1.weight": w})
    st("te", {f"model.layers.{i}.self_attn.q_proj.weight": w for i in range(8)} | {"model.embed_tokens.weight": w})
    st("lora", {f"lora_unet_blocks_{i}_self_attn_q_proj.lora_down.weight": w for i in range(8)})
    st("missing_key", {k: v for k, v in good.items() if k != "net.blocks.1.mlp.layer2.weight"})
    st("unexpected_key", good | {"net.blocks.0.mlp.layer3.weight": w})
    st("misshaped_key", good | {"net.blocks.1.cross_attn.v_proj.weight": torch.zeros(128, 95)})
    return files


def test_bad_files_raise_one_line_checkpoint_errors(tmp_path, tiny_sd):
    expect = {
        "missing": "not found", "truncated": "truncated", "pickle": "pickle", "random": "not a safetensors",
        "vae": "VAE", "te": "text encoder", "lora": "LoRA", "missing_key": "blocks.1.mlp.layer2.weight",
        "unexpected_key": "blocks.0.mlp.layer3.weight", "misshaped_key": "blocks.1.cross_attn.v_proj.weight",
    }
    for name, path in _bad_files(tmp_path, tiny_sd).items():
        with pytest.raises(CheckpointError) as err:
            load_dit(path)
        msg = str(err.value)
        assert str(path) in msg and "\n" not in msg, (name, msg)
        assert expect[name] in msg, (name, msg)


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 0.05), (torch.float16, 0.01)])
def test_half_precision_compute_stays_close_to_fp32(tiny_file, tiny32, dtype, tol):
    model = load_dit(tiny_file, dtype=dtype)
    assert model.compute_dtype == dtype
    x, t, ctx = _inputs()
    with torch.no_grad():
        ref, out = tiny32(x, t, ctx), model(x, t, ctx)
    assert out.dtype == torch.float32
    assert ((out - ref).norm() / ref.norm()) < tol


def test_cast_while_reading_equals_cast_after_reading(tiny_file):
    from rdbt_cli.engine import DIT_PREFIXES, read_checkpoint

    mapped, _ = read_checkpoint(tiny_file, DIT_PREFIXES)
    cast, _ = read_checkpoint(tiny_file, DIT_PREFIXES, cast=torch.float32)
    assert mapped.keys() == cast.keys()
    for k in mapped:
        assert cast[k].dtype == torch.float32 and torch.equal(cast[k], mapped[k].float()), k


def test_streamed_blocks_give_the_same_output_and_rest_on_the_host(tiny_file):
    ref = load_dit(tiny_file, dtype=torch.float32)
    streamed = load_dit(tiny_file, dtype=torch.float32)
    streamed.stream_blocks("cpu")
    at_rest = {n: p.data_ptr() for n, p in streamed.named_parameters() if n.startswith("blocks.")}
    layer = streamed.blocks[1].mlp.layer1
    during = []
    layer.register_forward_hook(lambda m, a, o: during.append(m.weight.data_ptr()))
    x, t, ctx = _inputs()
    with torch.inference_mode():
        want, got = ref(x, t, ctx), streamed(x, t, ctx)
        again = streamed(x, t * 0.5, ctx)
    assert torch.equal(want, got)
    assert not torch.equal(got, again)
    # While the block runs it uses a streamed copy; afterwards every parameter points at its host tensor again.
    assert during and all(ptr != at_rest["blocks.1.mlp.layer1.weight"] for ptr in during)
    assert all(p.data_ptr() == at_rest[n] for n, p in streamed.named_parameters() if n.startswith("blocks."))


def test_streamed_blocks_see_a_weight_swapped_between_forwards(tiny_file):
    model = load_dit(tiny_file, dtype=torch.float32)
    model.stream_blocks("cpu")
    x, t, ctx = _inputs()
    layer = model.blocks[0].mlp.layer1
    with torch.inference_mode():
        before = model(x, t, ctx)
        original = layer.weight.data
        layer.weight.data = original * 1.5  # what a LoRA merge does
        patched = model(x, t, ctx)
        layer.weight.data = original  # and its undo
        after = model(x, t, ctx)
    assert not torch.equal(before, patched) and torch.equal(before, after)


def test_streaming_keeps_cross_attention_kv_resident_and_survives_a_failing_block(tiny_file):
    model = load_dit(tiny_file, dtype=torch.float32)
    model.stream_blocks("cpu")
    with pytest.raises(RuntimeError, match="already"):
        model.stream_blocks("cpu")
    block = model.blocks[0]
    k_rest, mlp_rest = block.cross_attn.k_proj.weight.data_ptr(), block.mlp.layer1.weight.data_ptr()
    seen = {}

    def spy(module, args, output):
        seen["k"], seen["mlp"] = block.cross_attn.k_proj.weight.data_ptr(), block.mlp.layer1.weight.data_ptr()
        raise MemoryError("simulated out of memory inside the block")

    handle = block.mlp.register_forward_hook(spy)
    x, t, ctx = _inputs()
    with torch.inference_mode(), pytest.raises(MemoryError):
        model(x, t, ctx)
    handle.remove()
    assert seen["k"] == k_rest and seen["mlp"] != mlp_rest  # K/V projections resident, the MLP streamed in
    assert block.mlp.layer1.weight.data_ptr() == mlp_rest  # and given back although the block raised


def test_a_missing_block_is_a_checkpoint_error(tmp_path):
    from safetensors.torch import save_file

    sd = {k.replace("net.blocks.1.", "net.blocks.5."): v for k, v in tiny_dit_state_dict().items()}
    path = tmp_path / "holes.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match="holes.safetensors.*contiguous"):
        load_dit(path)
