"""GGUF diffusion models laid out as ComfyUI-GGUF writes them (arch `cosmos`, bare keys, ggml's reversed shapes, 1-D
and small tensors F32), written here with the gguf package's GGUFWriter from the tiny model and compared with the
package's own dequantisation."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from rdbt_cli import discovery
from rdbt_cli.cli import app
from rdbt_cli.engine import load_dit
from rdbt_cli.errors import CheckpointError
from rdbt_cli.tiny import tiny_dit_state_dict

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
# general.file_type values (gguf.LlamaFileType) of the files users download
FILE_TYPES = {"F16": 1, "Q8_0": 7, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18, "BF16": 32}
# the tensor type most weights get, and the one llama.cpp's _M mixes give some of them (every other one here)
MAIN_TYPE = {"F16": (Q.F16, Q.F16), "BF16": (Q.BF16, Q.BF16), "Q8_0": (Q.Q8_0, Q.Q8_0),
             "Q6_K": (Q.Q6_K, Q.Q6_K), "Q5_K_M": (Q.Q5_K, Q.Q6_K), "Q4_K_M": (Q.Q4_K, Q.Q6_K)}
# where the fp16 scales sit in a K-quant block (gguf.quants): (offset, count)
_K_SCALES = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208, 1)}


@pytest.fixture(scope="module")
def tiny_sd():
    return {k: v.float() for k, v in tiny_dit_state_dict(prefix="").items()}


def _k_blocks(qtype, n_rows: int, row: int, rng) -> np.ndarray:
    """Random but valid K-quant bytes (the gguf package can dequantise these types, not quantise them): random codes,
    finite small fp16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n_rows * row // block, size), dtype=np.uint8)
    at, n = _K_SCALES[qtype]
    raw[:, at:at + 2 * n] = rng.uniform(0.001, 0.01, (raw.shape[0], n)).astype(np.float16).view(np.uint8)
    return raw.reshape(n_rows, -1)


def write_gguf(path, sd, name="Q8_0", prefix="", reshape=(), rng=None):
    """A GGUF file of `sd` following ComfyUI-GGUF's tools/convert.py rules; returns {key: the package's dequantised
    reference}. `reshape` names tensors stored as (n/256, 256) with comfy.gguf.orig_shape metadata."""
    rng = rng or np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch="cosmos")
    w.add_file_type(FILE_TYPES.get(name, 1))
    ref = {}
    for i, (key, t) in enumerate(sd.items()):
        data = t.numpy()
        qtype = MAIN_TYPE[name][(i // 2) % 2]
        if data.ndim == 1 or data.size <= 1024:
            qtype = Q.F32  # convert.py: 1-D and tiny tensors stay F32
        if key in reshape:
            w.add_array(f"comfy.gguf.orig_shape.{prefix}{key}", list(data.shape))
            data = data.reshape(-1, 256)
        if qtype in _K_SCALES and data.shape[-1] % 256 == 0:
            raw = _k_blocks(qtype, data.shape[0], data.shape[-1], rng)
        else:
            if qtype in _K_SCALES or data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
                qtype = Q.F16  # convert.py's fallback when a row does not split into the type's blocks
            raw = gguf.quants.quantize(data, qtype)
        w.add_tensor(prefix + key, raw, raw_dtype=qtype)
        ref[key] = torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(t.shape).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ref


@pytest.mark.parametrize("name", list(MAIN_TYPE))
def test_loaded_weights_equal_the_package_dequantisation(tmp_path, tiny_sd, name):
    path = tmp_path / f"anima-{name}.gguf"
    reshape = ("blocks.0.mlp.layer2.weight",)
    ref = write_gguf(path, tiny_sd, name, prefix="model.diffusion_model." if name == "Q8_0" else "", reshape=reshape)
    model = load_dit(path, dtype=torch.float32)
    loaded = model.state_dict()
    assert loaded.keys() == ref.keys()
    for k, v in ref.items():
        assert torch.equal(loaded[k], v), k
    if name in ("F16", "BF16", "Q8_0"):  # quantised from the real weights: close to them, in the right layout
        err = max((loaded[k] - tiny_sd[k]).abs().max().item() for k in ref)
        assert err < {"F16": 1e-3, "BF16": 1e-2, "Q8_0": 3e-2}[name]
    info = discovery.classify(path)
    assert info.kind == "dit" and info.supported and info.details["format"] == "gguf"
    assert (info.details["quant"], info.details["arch"], info.details["blocks"]) == (name, "cosmos", 2)
    assert info.details["width"] == 128
    # the K-quant mixes hold both of their types (the tiny model's rows of 256 and 512 values take K blocks)
    assert set(info.details["types"].split("+")) == {t.name for t in MAIN_TYPE[name]} | {"F32"} | (
        {"F16"} if name != "BF16" else set())


def test_gen_runs_a_gguf_model_and_records_it(tmp_path, tiny_sd):
    from rdbt_cli.tiny import ensure_tiny_models

    paths = ensure_tiny_models()
    model = tmp_path / "diffusion_models" / "anima-Q8_0.gguf"
    model.parent.mkdir()
    write_gguf(model, tiny_sd, "Q8_0")
    out = tmp_path / "g.png"
    r = CliRunner().invoke(app, [str(a) for a in (
        "gen", "1girl", "--model", model, "--text-encoder", paths.text_encoder, "--vae", paths.vae,
        "--qwen-tokenizer", paths.qwen_tokenizer, "--t5-tokenizer", paths.t5_tokenizer, "--size", "64x64",
        "--steps", 2, "--seed", 1, "--device", "cpu", "--no-stack", "--out", out, "--quiet")])
    assert r.exit_code == 0, r.output
    from PIL import Image

    recipe = json.loads(Image.open(out).text["rdbt"])
    assert recipe["model"]["file"] == "anima-Q8_0.gguf"
    assert (recipe["model"]["format"], recipe["model"]["quant"]) == ("gguf", "Q8_0")
    shown = CliRunner().invoke(app, ["inspect", str(out)])
    assert shown.exit_code == 0 and "anima-Q8_0.gguf (GGUF Q8_0)" in shown.output, shown.output
    # ComfyUI's UNETLoader lists no .gguf file: the graph loads it with ComfyUI-GGUF's loader node
    graph = json.loads(Image.open(out).text["prompt"])
    loader = next(n for n in graph.values() if "unet_name" in n["inputs"])
    assert loader["class_type"] == "UnetLoaderGGUF" and list(loader["inputs"]) == ["unet_name"]
    assert loader["inputs"]["unet_name"].endswith("anima-Q8_0.gguf")


def _header_only(path: Path, body: bytes) -> Path:
    path.write_bytes(body)
    return path


@pytest.mark.parametrize("damage", ["magic", "truncated", "shape", "count"])
def test_hostile_gguf_is_one_clear_error(tmp_path, tiny_sd, damage):
    good = tmp_path / "good.gguf"
    write_gguf(good, tiny_sd, "Q8_0")
    raw = bytearray(good.read_bytes())
    bad = tmp_path / "bad.gguf"
    if damage == "magic":
        raw[:4] = b"GGUX"
    elif damage == "truncated":
        raw = raw[: len(raw) // 2]
    elif damage == "shape":  # the first tensor's first dimension made absurd
        name = next(iter(tiny_sd)).encode()
        at = raw.index(name) + len(name) + 4
        raw[at:at + 8] = (1 << 40).to_bytes(8, "little")
    else:  # the tensor count
        raw[8:16] = (1 << 50).to_bytes(8, "little")
    bad.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError) as e:
        load_dit(bad, dtype=torch.float32)
    msg = str(e.value)
    assert "bad.gguf" in msg and "\n" not in msg and len(msg) < 300
    assert "download" in msg and ("truncated" in msg or "damaged" in msg)
    assert discovery.classify(bad).kind in ("broken", "gguf")
    with pytest.raises(CheckpointError, match="bad.gguf"):
        discovery.check_model_file(bad)


def test_gguf_text_encoder_and_foreign_gguf_are_refused_by_name(tmp_path):
    te = tmp_path / "qwen3-Q8_0.gguf"
    w = gguf.GGUFWriter(str(te), arch="qwen3")
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    w.add_tensor("blk.0.attn_q.weight", np.zeros((32, 32), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    info = discovery.classify(te)
    assert info.kind == "gguf" and not info.supported and "qwen_3_06b_base" in info.details["unsupported"]
    with pytest.raises(CheckpointError, match="text encoder"):
        discovery.check_model_file(te)
    with pytest.raises(CheckpointError, match="qwen3-Q8_0.gguf: a GGUF text encoder"):
        load_dit(te)
    flux = tmp_path / "flux.gguf"
    w = gguf.GGUFWriter(str(flux), arch="flux")
    w.add_tensor("double_blocks.0.img_attn.qkv.weight", np.zeros((96, 32), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    assert discovery.classify(flux).kind == "gguf"
    with pytest.raises(CheckpointError, match="flux.gguf: not an Anima diffusion model"):
        load_dit(flux)
