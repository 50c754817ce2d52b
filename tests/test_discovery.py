"""Model discovery: header sniffing, models folders, name resolution, hashes and downloads (no torch needed)."""

import hashlib
import json
import os
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import shared_path
from rdbt_cli import discovery
from rdbt_cli.discovery import FileInfo, classify, file_hashes, models_dirs, resolve_component
from rdbt_cli.errors import CheckpointError, ConfigError, RdbtError

_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "U8": 1, "I64": 8}


def write_st(path, tensors: dict, meta: dict | None = None, fill: bytes = b"\0") -> Path:
    """A safetensors file with the given {name: (dtype, shape)}; data is filler (classification reads no tensors)."""
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = _BYTES[dtype] * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    if meta:
        header["__metadata__"] = meta
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + (fill * offset)[:offset])
    return path


def dit_tensors(prefix="net.", blocks=3, width=32, ctx=24, adapter=True, dtype="BF16"):
    t = {
        f"{prefix}x_embedder.proj.1.weight": (dtype, [width, 68]),
        f"{prefix}t_embedder.1.linear_1.weight": (dtype, [width, width]),
        f"{prefix}t_embedding_norm.weight": (dtype, [width]),
        f"{prefix}final_layer.linear.weight": (dtype, [64, width]),
        f"{prefix}pos_embedder.seq": ("F32", [4]),  # tolerated and ignored (formats.md §1.3)
    }
    for i in range(blocks):
        b = f"{prefix}blocks.{i}."
        t |= {
            b + "self_attn.q_proj.weight": (dtype, [width, width]),
            b + "self_attn.q_norm.weight": (dtype, [8]),
            b + "cross_attn.k_proj.weight": (dtype, [width, ctx]),
            b + "mlp.layer1.weight": (dtype, [4 * width, width]),
            b + "mlp.layer2.weight": (dtype, [width, 4 * width]),
            b + "adaln_modulation_self_attn.1.weight": (dtype, [8, width]),
        }
    if adapter:
        for i in range(2):
            a = f"{prefix}llm_adapter.blocks.{i}."
            t |= {a + "cross_attn.q_proj.weight": (dtype, [ctx, ctx]), a + "mlp.0.bias": (dtype, [ctx])}
        t[f"{prefix}llm_adapter.embed.weight"] = (dtype, [10, ctx])
    return t


def te_tensors(prefix="", layers=2, width=16):
    t = {f"{prefix}model.embed_tokens.weight": ("BF16", [100, width]), f"{prefix}model.norm.weight": ("BF16", [width])}
    for i in range(layers):
        p = f"{prefix}model.layers.{i}."
        t |= {
            p + "self_attn.q_norm.weight": ("BF16", [8]),
            p + "self_attn.q_proj.weight": ("BF16", [2 * width, width]),
            p + "post_attention_layernorm.weight": ("BF16", [width]),
            p + "mlp.up_proj.weight": ("BF16", [3 * width, width]),
        }
    return t


def vae_tensors(prefix="", wan22=False):
    t = {
        f"{prefix}encoder.conv1.weight": ("BF16", [8, 3, 3, 3, 3]),
        f"{prefix}decoder.middle.0.residual.0.gamma": ("BF16", [16, 1, 1, 1]),
        f"{prefix}decoder.head.2.weight": ("BF16", [3, 8, 3, 3, 3]),
        f"{prefix}conv1.weight": ("BF16", [32, 32, 1, 1, 1]),
        f"{prefix}conv2.weight": ("BF16", [16, 16, 1, 1, 1]),
        f"{prefix}encoder.downsamples.0.residual.0.gamma": ("BF16", [8, 1, 1, 1]),
    }
    if wan22:
        t[f"{prefix}decoder.upsamples.0.upsamples.0.residual.2.weight"] = ("BF16", [8, 8, 3, 3, 3])
    return t


def kohya_lora(path, rank=4):
    t = {}
    for m in ("blocks_0_self_attn_q_proj", "blocks_1_cross_attn_k_proj", "blocks_1_mlp_layer1"):
        t[f"lora_unet_{m}.lora_down.weight"] = np.zeros((rank, 32), np.float16)
        t[f"lora_unet_{m}.lora_up.weight"] = np.zeros((32, rank), np.float16)
        t[f"lora_unet_{m}.alpha"] = np.array(2.0, np.float16)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(t, str(path), metadata={"ss_network_module": "networks.lora_anima", "ss_base_model_version": "anima"})
    return path


def peft_lora(path, rank=8):
    t = {}
    for m in ("blocks.0.self_attn.q_proj", "blocks.0.adaln_modulation_mlp.1", "llm_adapter.blocks.1.self_attn.v_proj"):
        t[f"diffusion_model.{m}.lora_A.weight"] = ("BF16", [rank, 32])
        t[f"diffusion_model.{m}.lora_B.weight"] = ("BF16", [32, rank])
    return write_st(path, t)


# ---------------------------------------------------------------------------------------------------------------------
# classification
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["net.", "model.diffusion_model.", ""])
def test_dit_in_every_prefix_layout(tmp_path, prefix):
    info = classify(write_st(tmp_path / "d.safetensors", dit_tensors(prefix, blocks=3, width=32, ctx=24)))
    assert info.kind == "dit"
    assert info.details["prefix"] == prefix
    assert (info.details["blocks"], info.details["width"], info.details["in_channels"]) == (3, 32, 16)
    assert info.details["context"] == 24 and info.details["adapter_blocks"] == 2
    assert "quant" not in info.details and info.details["dtype"].startswith("BF16")
    assert info.supported and info.size == (tmp_path / "d.safetensors").stat().st_size


def test_block_count_is_counted_not_assumed(tmp_path):
    assert classify(write_st(tmp_path / "deep.safetensors", dit_tensors(blocks=7))).details["blocks"] == 7


def test_cosmos_and_diffusers_dits(tmp_path):
    cosmos = classify(write_st(tmp_path / "c.safetensors", dit_tensors(adapter=False)))
    assert cosmos.kind == "cosmos_dit" and "adapter" in cosmos.details["note"]
    diff = {f"transformer_blocks.{i}.attn1.to_q.weight": ("BF16", [8, 8]) for i in range(4)}
    diff["patch_embed.proj.weight"] = ("BF16", [8, 68])
    info = classify(write_st(tmp_path / "t.safetensors", diff))
    assert info.kind == "diffusers_dit" and info.details["blocks"] == 4 and not info.supported


@pytest.mark.parametrize("prefix", ["", "text_encoders.qwen3_06b.transformer."])
def test_text_encoder(tmp_path, prefix):
    info = classify(write_st(tmp_path / "te.safetensors", te_tensors(prefix, layers=3, width=16)))
    assert info.kind == "te"
    assert (info.details["layers"], info.details["width"], info.details["vocab"]) == (3, 16, 100)
    assert info.details["prefix"] == prefix


def test_vae_and_wan22_vae(tmp_path):
    info = classify(write_st(tmp_path / "v.safetensors", vae_tensors()))
    assert info.kind == "vae" and info.details["z_dim"] == 16 and info.details["base_dim"] == 8
    other = classify(write_st(tmp_path / "v22.safetensors", vae_tensors(wan22=True)))
    assert other.kind == "unknown" and "2.2" in other.details["note"]


def test_loras(tmp_path):
    k = classify(kohya_lora(tmp_path / "k.safetensors", rank=4))
    assert k.kind == "lora"
    assert (k.details["format"], k.details["algo"], k.details["rank"], k.details["alpha"]) == ("kohya", "lora", 4, True)
    assert k.details["targets"] == "dit" and k.details["base"] == "anima"
    p = classify(peft_lora(tmp_path / "p.safetensors", rank=8))
    assert (p.kind, p.details["format"], p.details["rank"], p.details["alpha"]) == ("lora", "peft", 8, False)
    assert p.details["targets"] == "dit+adapter" and p.details["prefix"] == "diffusion_model."
    lokr = {}
    for m in ("blocks_0_self_attn_q_proj", "blocks_1_mlp_layer2"):
        lokr |= {f"lora_unet_{m}.lokr_w1": ("F32", [4, 4]), f"lora_unet_{m}.lokr_w2": ("F32", [8, 8]),
                 f"lora_unet_{m}.alpha": ("F32", [])}
    lk = classify(write_st(tmp_path / "lokr.safetensors", lokr))
    assert lk.kind == "lora" and lk.details["algo"] == "lokr"
    te = {f"lora_te_layers_{i}_self_attn_q_proj.lora_down.weight": ("F16", [2, 16]) for i in range(2)}
    te |= {f"lora_te_layers_{i}_self_attn_q_proj.lora_up.weight": ("F16", [16, 2]) for i in range(2)}
    assert classify(write_st(tmp_path / "te_lora.safetensors", te)).details["targets"] == "te"
    diffs = {f"diffusion_model.blocks.{i}.self_attn.q_norm.diff": ("F16", [8]) for i in range(3)}
    d = classify(write_st(tmp_path / "diff.safetensors", diffs))
    assert (d.kind, d.details["algo"], d.details["format"]) == ("lora", "diff", "comfy")


def test_aio_checkpoint(tmp_path):
    t = dit_tensors("model.diffusion_model.", blocks=2)
    t |= vae_tensors("first_stage_model.")
    t |= te_tensors("cond_stage_model.qwen3_06b.transformer.")
    info = classify(write_st(tmp_path / "aio.safetensors", t))
    assert info.kind == "aio" and info.details["components"] == "dit+te+vae" and info.details["blocks"] == 2


def test_quantisation_markers(tmp_path):
    scaled = dit_tensors(dtype="F8_E4M3")
    scaled |= {"net.scaled_fp8": ("F8_E4M3", [0]), "net.blocks.0.mlp.layer1.scale_weight": ("F32", [])}
    info = classify(write_st(tmp_path / "s.safetensors", scaled))
    assert info.kind == "dit" and info.details["quant"] == "scaled_fp8" and info.details["dtype"].startswith("F8_E4M3")
    plain = classify(write_st(tmp_path / "p.safetensors", dit_tensors(dtype="F8_E5M2")))
    assert plain.kind == "dit" and plain.details["quant"] == "fp8"
    qmeta = {"_quantization_metadata": json.dumps(
        {"format_version": "1.0", "layers": {"blocks.0.mlp.layer1": {"format": "float8_e4m3fn"}}})}
    v1 = dit_tensors(dtype="BF16") | {"net.blocks.0.mlp.layer1.weight_scale": ("F32", [])}
    cq = classify(write_st(tmp_path / "q.safetensors", v1, qmeta))
    assert cq.details["quant"] == "comfy_quant:float8_e4m3fn"


def test_truncated_pickle_and_missing(tmp_path):
    good = write_st(tmp_path / "full.safetensors", dit_tensors())
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    info = classify(cut)
    assert info.kind == "broken" and "truncated" in info.error and not info.supported
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x80\x04\x95not a header at all")
    assert classify(junk).kind == "broken"
    pk = tmp_path / "old.ckpt"
    pk.write_bytes(b"\x80\x02}q\x00.")
    p = classify(pk)
    assert p.kind == "pickle" and "never loaded" in p.details["unsupported"]
    with pytest.raises(CheckpointError, match="not found"):
        classify(tmp_path / "nope.safetensors")


def _gguf_string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def write_gguf(path, arch="cosmos", names=("blocks.0.mlp.layer1.weight", "blocks.1.mlp.layer1.weight",
                                           "llm_adapter.blocks.0.cross_attn.q_proj.weight")):
    kv = _gguf_string("general.architecture") + struct.pack("<I", 8) + _gguf_string(arch)
    # an array of strings and a scalar the reader must step over
    kv += _gguf_string("tokenizer.tokens") + struct.pack("<IIQ", 9, 8, 2) + _gguf_string("a") + _gguf_string("bc")
    kv += _gguf_string("general.file_type") + struct.pack("<I", 4) + struct.pack("<I", 7)
    tensors = b"".join(_gguf_string(n) + struct.pack("<I", 2) + struct.pack("<QQ", 4, 4) + struct.pack("<I", 8)
                       + struct.pack("<Q", 0) for n in names)
    Path(path).write_bytes(b"GGUF" + struct.pack("<IQQ", 3, len(names), 3) + kv + tensors)
    return Path(path)


def test_gguf_dit_is_a_model_and_other_gguf_is_listed_as_unsupported(tmp_path):
    info = classify(write_gguf(tmp_path / "anima-Q8_0.gguf"))
    assert info.kind == "dit" and info.supported and info.details["format"] == "gguf"
    assert (info.details["arch"], info.details["component"], info.details["blocks"]) == ("cosmos", "dit", 2)
    assert info.details["quant"] == "Q8_0" and "unsupported" not in info.details
    te = classify(write_gguf(tmp_path / "qwen3.gguf", arch="qwen3", names=("token_embd.weight", "blk.0.attn_q.weight")))
    assert te.kind == "gguf" and not te.supported and "text encoder" in te.details["unsupported"]


def test_golden_models_classify():
    root = shared_path("golden", "models")
    dit = classify(root / "diffusion_models" / "anima_tiny.safetensors")
    assert (dit.kind, dit.details["prefix"]) == ("dit", "net.")
    cfg = json.loads(shared_path("golden", "cases.json").read_text())["tiny_configs"]["diffusion_model"]
    assert (dit.details["width"], dit.details["blocks"]) == (cfg["model_channels"], cfg["num_blocks"])
    assert dit.details["in_channels"] == cfg["in_channels"] and dit.details["context"] == cfg["crossattn_emb_channels"]
    te = classify(root / "text_encoders" / "qwen_3_06b_tiny.safetensors")
    assert (te.kind, te.details["layers"], te.details["width"], te.details["vocab"]) == ("te", 2, 64, 151936)
    assert classify(root / "vae" / "qwen_image_vae_tiny.safetensors").kind == "vae"
    formats = {p.stem: classify(p) for p in (root / "loras").glob("*.safetensors")}
    assert {i.kind for i in formats.values()} == {"lora"}
    assert formats["tiny_kohya_lora"].details["format"] == "kohya"
    assert formats["tiny_peft_lora"].details["format"] == "peft"
    assert "adapter" in formats["tiny_peft_lora"].details["targets"]
    assert formats["tiny_lokr"].details["algo"] == "lokr"


# ---------------------------------------------------------------------------------------------------------------------
# models folders
# ---------------------------------------------------------------------------------------------------------------------

YAML = """\
# a comment
comfyui:
    base_path: {base}
    is_default: true
    checkpoints: models/checkpoints/
    clip: models/clip/   # trailing comment
    loras: |
         models/loras
         models/other_loras
    embeddings: models/embeddings
relative:
    base_path: shared
    vae: vae_store
"""


def test_models_dirs_precedence(tmp_path):
    home = tmp_path / "home"
    flag_dir, env_a, env_b = tmp_path / "flag", tmp_path / "envA", tmp_path / "envB"
    comfy = home / "ComfyUI"
    extra = tmp_path / "elsewhere"
    a1111 = home / "stable-diffusion-webui" / "models"
    for d in (flag_dir, env_a, env_b, comfy / "models" / "loras", extra / "models" / "loras",
              extra / "models" / "other_loras", extra / "models" / "clip", comfy / "shared" / "vae_store",
              a1111 / "Lora"):
        d.mkdir(parents=True)
    (comfy / "extra_model_paths.yaml").write_text(YAML.format(base=extra))
    env = {"RDBT_MODELS": os.pathsep.join([str(env_a), str(tmp_path / "missing"), str(env_b)])}

    assert models_dirs(str(flag_dir), env, home=home) == [flag_dir]
    assert models_dirs([flag_dir, env_a], env, home=home) == [flag_dir, env_a]
    assert models_dirs(None, env, home=home) == [env_a, env_b]
    auto = models_dirs(None, {}, home=home)
    assert auto == [comfy / "models", extra / "models" / "clip", extra / "models" / "loras",
                    extra / "models" / "other_loras", comfy / "shared" / "vae_store", a1111]
    assert models_dirs(None, {}, home=tmp_path / "empty_home") == []
    # injectable roots: a ComfyUI install elsewhere
    assert models_dirs(None, {}, comfy_roots=[comfy], a1111_roots=[]) == auto[:5]
    with pytest.raises(ConfigError, match="no such folder"):
        models_dirs(str(tmp_path / "typo"), env, home=home)


def test_default_download_folder_is_searched_last(tmp_path):
    d = discovery.default_models_dir()
    d.mkdir(parents=True)
    assert models_dirs(None, {}, home=tmp_path) == [d]


def test_simple_yaml_parser_matches_pyyaml():
    yaml = pytest.importorskip("yaml")
    text = YAML.format(base="/x/y")
    parsed = discovery.parse_simple_yaml(text)
    expected = yaml.safe_load(text)
    for section in expected:
        for key, value in expected[section].items():
            if key == "is_default":
                continue
            assert str(parsed[section][key]).split() == str(value).split(), (section, key)


def test_extra_model_paths_without_pyyaml(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml -> ImportError
    y = tmp_path / "extra_model_paths.yaml"
    y.write_text(YAML.format(base=tmp_path / "b"))
    got = discovery.extra_model_paths(y)
    assert tmp_path / "b" / "models" / "other_loras" in got and tmp_path / "shared" / "vae_store" in got
    assert not any("embeddings" in str(p) for p in got)


# ---------------------------------------------------------------------------------------------------------------------
# resolving names
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def models(tmp_path):
    root = tmp_path / "models"
    write_st(root / "diffusion_models" / "anima-base-v1.0.safetensors", dit_tensors())
    write_st(root / "unet" / "Anima-Turbo-v1.1.safetensors", dit_tensors())
    write_st(root / "text_encoders" / "qwen_3_06b_base.safetensors", te_tensors())
    write_st(root / "vae" / "qwen_image_vae.safetensors", vae_tensors())
    kohya_lora(root / "loras" / "style" / "watercolor.safetensors")
    peft_lora(root / "loras" / "anima-turbo-lora-v0.2.safetensors")
    peft_lora(root / "loras" / "anima-turbo-lora-v0.1.safetensors")
    return root


def test_resolve_exact_prefix_and_case(models):
    dirs = [models]
    assert resolve_component("dit", "anima-base-v1.0", dirs).name == "anima-base-v1.0.safetensors"
    assert resolve_component("dit", "anima-turbo-v1.1", dirs).name == "Anima-Turbo-v1.1.safetensors"  # case-insensitive
    assert resolve_component("dit", "anima-base", dirs).name == "anima-base-v1.0.safetensors"  # unique prefix
    assert resolve_component("dit", "anima-base-v1.0.safetensors", dirs).parent.name == "diffusion_models"
    assert resolve_component("lora", "watercolor", dirs).name == "watercolor.safetensors"
    assert resolve_component("lora", "style/watercolor", dirs).name == "watercolor.safetensors"
    assert resolve_component("lora", "anima-turbo-lora-v0.2", dirs).stem == "anima-turbo-lora-v0.2"


def test_resolve_ambiguous_and_missing(models):
    with pytest.raises(ConfigError, match="ambiguous") as err:
        resolve_component("lora", "anima-turbo", [models])
    assert "anima-turbo-lora-v0.1" in str(err.value) and "anima-turbo-lora-v0.2" in str(err.value)
    with pytest.raises(CheckpointError) as err:
        resolve_component("lora", "nothing-like-this", [models])
    msg = str(err.value)
    assert "\n" not in msg and "--models-dir" in msg and "RDBT_MODELS" in msg and "rdbt download" in msg
    assert str(models / "loras") in msg


def test_resolve_path_and_earlier_folder_wins(models, tmp_path):
    other = tmp_path / "other"
    shadow = write_st(other / "vae" / "qwen_image_vae.safetensors", vae_tensors())
    assert resolve_component("vae", "qwen_image_vae", [other, models]) == shadow
    assert resolve_component("vae", "qwen_image_vae", [models, other]) != shadow
    assert resolve_component("vae", str(shadow), [models]) == shadow
    with pytest.raises(CheckpointError, match="not found"):
        resolve_component("vae", str(tmp_path / "gone.safetensors"), [models])


def test_resolve_without_a_name_sniffs(models, tmp_path):
    assert resolve_component("te", None, [models]).name == "qwen_3_06b_base.safetensors"
    assert resolve_component("vae", "", [models]).name == "qwen_image_vae.safetensors"
    with pytest.raises(ConfigError, match="several"):
        resolve_component("dit", None, [models])
    flat = tmp_path / "flat"  # a folder with mixed files and no layout: kinds come from the headers
    write_st(flat / "a.safetensors", dit_tensors())
    write_st(flat / "b.safetensors", vae_tensors())
    kohya_lora(flat / "c.safetensors")
    assert resolve_component("dit", None, [flat]).name == "a.safetensors"
    assert resolve_component("vae", None, [flat]).name == "b.safetensors"
    with pytest.raises(CheckpointError, match="no text encoder file found"):
        resolve_component("te", None, [flat])
    with pytest.raises(CheckpointError, match="no models folder"):
        resolve_component("te", None, [])


def test_aio_serves_every_component(tmp_path):
    t = dit_tensors("model.diffusion_model.") | vae_tensors("first_stage_model.")
    t |= te_tensors("cond_stage_model.qwen3_06b.transformer.")
    aio = write_st(tmp_path / "m" / "checkpoints" / "animayume.safetensors", t)
    for kind in ("dit", "te", "vae"):
        assert resolve_component(kind, None, [tmp_path / "m"]) == aio


def test_inventory_lists_everything(models, tmp_path):
    write_gguf(models / "diffusion_models" / "anima-Q8_0.gguf")
    (models / "checkpoints").mkdir()
    (models / "checkpoints" / "old.ckpt").write_bytes(b"\x80\x02.")
    os.symlink(models / "vae", models / "vae_link")  # the same file twice is listed once
    file_hashes(models / "vae" / "qwen_image_vae.safetensors")
    items = discovery.inventory([models, models])
    by_name = {i.path.name: i for i in items}
    assert len(items) == len(by_name) == 9
    assert by_name["anima-Q8_0.gguf"].kind == "dit" and by_name["old.ckpt"].kind == "pickle"
    assert by_name["watercolor.safetensors"].kind == "lora"
    vae = by_name["qwen_image_vae.safetensors"]
    assert vae.hash == hashlib.sha256(vae.path.read_bytes()).hexdigest()[:10]
    assert by_name["anima-base-v1.0.safetensors"].hash is None  # never hashed while listing
    assert all(i.size == i.path.stat().st_size for i in items)


# ---------------------------------------------------------------------------------------------------------------------
# hashes
# ---------------------------------------------------------------------------------------------------------------------


def test_hash_values(tmp_path):
    # Data larger than one read chunk, so the header/data split and chunking are both exercised.
    p = write_st(tmp_path / "l.safetensors", {"a.lora_down.weight": ("F32", [700_000])}, fill=b"\x01\x02\x03")
    raw = p.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    full = hashlib.sha256(raw).hexdigest()
    body = hashlib.sha256(raw[8 + n:]).hexdigest()
    h = file_hashes(p)
    assert h["sha256"] == full and h["autov2"] == full[:10] and h["sha256_12"] == full[:12]
    assert h["autov3"] == body[:12] and h["a1111_lora"] == body[:12]
    assert discovery.short_hash(p) == full[:10]
    other = tmp_path / "x.gguf"
    other.write_bytes(b"GGUF" + b"\0" * 50)
    h2 = file_hashes(other)
    assert h2["sha256"] == hashlib.sha256(other.read_bytes()).hexdigest() and h2["autov3"] is None


def test_a1111_lora_hash_prefers_trainer_metadata(tmp_path):
    p = write_st(tmp_path / "k.safetensors", {"a.lora_up.weight": ("F16", [4, 2])}, {"sshs_model_hash": "ABCDEF0123456789"})
    h = file_hashes(p)
    assert h["a1111_lora"] == "abcdef012345" and h["autov3"] != h["a1111_lora"]


def test_hash_cache_is_used_and_invalidated(tmp_path, monkeypatch):
    p = write_st(tmp_path / "m.safetensors", {"w": ("F32", [1000])})
    calls = []
    real = discovery._hash_file
    monkeypatch.setattr(discovery, "_hash_file", lambda path: calls.append(path) or real(path))
    first = file_hashes(p)
    assert file_hashes(p) == first and len(calls) == 1
    assert (Path(os.environ["RDBT_HOME"]) / "hashes.json").is_file()
    assert discovery.cached_hashes(p) == first
    write_st(p, {"w": ("F32", [1001])}, fill=b"\x07")  # new size and content
    assert discovery.cached_hashes(p) is None
    second = file_hashes(p)
    assert len(calls) == 2 and second["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest() != first["sha256"]
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same size, touched: hashed again
    file_hashes(p)
    assert len(calls) == 3


def test_corrupt_hash_cache_is_ignored(tmp_path):
    cache = Path(os.environ["RDBT_HOME"]) / "hashes.json"
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text("{not json")
    p = write_st(tmp_path / "m.safetensors", {"w": ("F32", [10])})
    assert file_hashes(p)["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
    assert json.loads(cache.read_text())["version"] == 1


# ---------------------------------------------------------------------------------------------------------------------
# downloads (hf_hub_download is mocked: no network in tests)
# ---------------------------------------------------------------------------------------------------------------------


def test_download_official_layout(tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    calls = []

    def fake(repo_id, filename, local_dir, **kw):
        calls.append((repo_id, filename))
        out = Path(local_dir) / filename
        if filename.endswith("vae.safetensors"):
            write_st(out, vae_tensors())
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(f"{repo_id}/{filename}")
        return str(out)

    monkeypatch.setattr(hub, "hf_hub_download", fake)
    monkeypatch.setattr(discovery, "check_network", lambda: None)  # the HTTP layer is mocked: say the network is up
    got = discovery.download_official(tmp_path / "m")
    rel = sorted(p.relative_to(tmp_path / "m").as_posix() for p in got)
    assert rel == [
        "diffusion_models/anima-base-v1.0.safetensors",
        "text_encoders/qwen_3_06b_base.safetensors",
        "tokenizers/qwen/tokenizer.json",
        "tokenizers/t5/tokenizer.json",
        "vae/qwen_image_vae.safetensors",
    ]
    assert all(p.is_file() for p in got)
    assert ("circlestone-labs/Anima", "split_files/vae/qwen_image_vae.safetensors") in calls
    assert (tmp_path / "m" / "tokenizers" / "qwen" / "tokenizer.json").read_text().startswith("Qwen/")
    # found again by discovery, and a second run downloads nothing
    assert resolve_component("vae", None, [tmp_path / "m"]).name == "qwen_image_vae.safetensors"
    calls.clear()
    assert discovery.download_official(tmp_path / "m", ("dit",), variant="base") == got[:1]
    assert calls == []
    discovery.download_official(tmp_path / "m", ("dit",), variant="turbo")
    assert calls == [("circlestone-labs/Anima", "split_files/diffusion_models/anima-turbo-v1.1.safetensors")]


def test_download_failure_is_one_line(tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")

    def boom(**kw):
        raise OSError("Connection refused\nTraceback noise")

    monkeypatch.setattr(hub, "hf_hub_download", boom)
    monkeypatch.setattr(discovery, "check_network", lambda: None)
    with pytest.raises(RdbtError) as err:
        discovery.download_official(tmp_path / "m", ("vae",))
    msg = str(err.value)
    assert "\n" not in msg and "Connection refused" in msg and "qwen_image_vae.safetensors" in msg
    assert not (tmp_path / "m" / "vae" / "qwen_image_vae.safetensors").exists()
    with pytest.raises(ConfigError, match="unknown Anima variant"):
        discovery.download_official(tmp_path / "m", ("dit",), variant="nope")
    with pytest.raises(ConfigError, match="unknown component"):
        discovery.download_official(tmp_path / "m", ("unet",))


def test_offline_download_is_one_line_at_once(tmp_path, monkeypatch):
    import socket

    hub = pytest.importorskip("huggingface_hub")

    def never(**kw):
        raise AssertionError("no download may start when the network is down")

    monkeypatch.setattr(hub, "hf_hub_download", never)
    # offline: the name lookup fails (conftest blocks the network, as a machine without one does)
    with pytest.raises(RdbtError) as err:
        discovery.download_official(tmp_path / "m", ("tokenizers",))
    assert str(err.value).startswith("cannot reach https://huggingface.co (") and "\n" not in str(err.value)
    # a server that refuses: a closed port on this machine
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(RdbtError, match=f"cannot reach http://127.0.0.1:{port} \\(Connection refused\\)"):
        discovery.download_official(tmp_path / "m", ("vae",))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RdbtError, match="HF_HUB_OFFLINE"):
        discovery.download_official(tmp_path / "m", ("vae",))
    # files already in place need no network at all
    (tmp_path / "m" / "vae").mkdir(parents=True)
    (tmp_path / "m" / "vae" / "qwen_image_vae.safetensors").write_bytes(b"x")
    assert discovery.download_official(tmp_path / "m", ("vae",)) == [tmp_path / "m" / "vae" / "qwen_image_vae.safetensors"]


def test_downloads_go_to_the_data_folder_and_the_turbo_lora_is_one(tmp_path, monkeypatch, fake_hub):
    from rdbt_cli.lora_stack import resolve_lora_name

    monkeypatch.delenv("RDBT_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    assert discovery.default_models_dir() == tmp_path / "data" / "rdbt" / "models"  # not the config folder
    old = tmp_path / "config" / "rdbt" / "models"  # where earlier versions downloaded: still searched
    for d in (discovery.default_models_dir(), old):
        d.mkdir(parents=True)
    assert models_dirs(None, {}, home=tmp_path, comfy_roots=[], a1111_roots=[]) == [discovery.default_models_dir(), old]
    assert discovery.official_plan(["turbo-lora"]) == [
        ("circlestone-labs/Anima-Official-LoRAs", "anima-turbo-lora-v0.2.safetensors", "loras")]
    (got,) = discovery.download_official(discovery.default_models_dir(), ("turbo-lora",))
    # the turbo preset's LoRA name now resolves in the default folders
    assert resolve_lora_name("anima-turbo-lora-v0.2", [discovery.default_models_dir() / "loras"]) == got


def test_discovery_never_imports_torch():
    import subprocess

    code = "import sys, rdbt_cli.discovery; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_fileinfo_is_plain_data(tmp_path):
    info = classify(write_st(tmp_path / "v.safetensors", vae_tensors()))
    assert isinstance(info, FileInfo) and vars(info)["kind"] == "vae" and vars(info)["path"] == info.path


def test_rdbt_models_naming_no_existing_folder_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="RDBT_MODELS"):
        discovery.models_dirs(None, env={"RDBT_MODELS": str(tmp_path / "nope")})
