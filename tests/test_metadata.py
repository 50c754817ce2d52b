"""PNG metadata: the A1111 infotext layout, ComfyUI graphs, atomic never-overwrite saving, and reading files back."""

import json
import multiprocessing
import os
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from rdbt_cli import metadata
from rdbt_cli.errors import OutputError


def _recipe(**over):
    r = {
        "schema": "rdbt.recipe/1", "rdbt_version": "0.1.0",
        "prompt": "1girl, silver hair, night sky", "negative": "worst quality, low quality",
        "seed": 123456, "steps": 30, "cfg": 4.0, "sampler": "euler", "scheduler": "simple", "shift": 3.0,
        "width": 832, "height": 1216,
        "model": {"name": "anima-base-v1.0", "file": "anima-base-v1.0.safetensors", "hash": "bd43b7cffe"},
        "text_encoder": None, "vae": None,
        "loras": [
            {"name": "styleA", "file": "styleA.safetensors", "weight": 0.8, "hash": "0123456789",
             "a1111_hash": "0123456789ab"},
            {"name": "turboLora", "file": "turboLora.safetensors", "weight": 1.0, "hash": None,
             "a1111_hash": "89abcdef0123"},
        ],
        "preset": None, "device": "cpu", "dtype": "bf16", "index": 0,
    }
    r.update(over)
    return r


def _pixels(seed=0, h=24, w=40):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _chunk_types(path) -> dict:
    """keyword -> chunk type, read straight from the bytes (independent of the module under test)."""
    data = Path(path).read_bytes()
    pos, out = 8, {}
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind in (b"tEXt", b"iTXt", b"zTXt"):
            out[body.split(b"\0", 1)[0].decode("latin-1")] = kind.decode()
        pos += 12 + length
    return out


# --- A1111 parameters -------------------------------------------------------------------------------------------------


def test_parameters_text_is_the_spec_layout():
    # formats.md §4.1's example, for the recipe it describes (shift 3 is the default, so no Shift field).
    expected = (
        "1girl, silver hair, night sky\n"
        "Negative prompt: worst quality, low quality\n"
        "Steps: 30, Sampler: Euler, Schedule type: Simple, CFG scale: 4, Seed: 123456, Size: 832x1216, "
        "Model hash: bd43b7cffe, Model: anima-base-v1.0, "
        'Lora hashes: "styleA: 0123456789ab, turboLora: 89abcdef0123", Version: rdbt 0.1.0'
    )
    assert metadata.to_parameters_text(_recipe(), lora_tags=False) == expected
    tagged = metadata.to_parameters_text(_recipe())
    assert tagged.split("\n")[0] == "1girl, silver hair, night sky <lora:styleA:0.8> <lora:turboLora:1>"
    assert tagged.split("\n")[1:] == expected.split("\n")[1:]


def test_parameters_text_optional_fields_and_quoting():
    r = _recipe(
        prompt="line one\nline two", negative="", sampler="er_sde", scheduler="linear_quadratic", shift=5.0, cfg=4.5,
        loras=[], vae={"name": "vae, v2", "file": "vae, v2.safetensors", "hash": "aaaaaaaaaa"},
        text_encoder={"name": "qwen_3_06b_base", "file": "qwen_3_06b_base.safetensors", "hash": None},
    )
    text = metadata.to_parameters_text(r)
    lines = text.split("\n")
    assert lines[:2] == ["line one", "line two"]  # prompt lines raw; no Negative line when it is empty
    assert not any(l.startswith("Negative prompt:") for l in lines)
    assert lines[2] == (
        "Steps: 30, Sampler: er_sde, Schedule type: linear_quadratic, CFG scale: 4.5, Seed: 123456, Size: 832x1216, "
        'Model hash: bd43b7cffe, Model: anima-base-v1.0, VAE hash: aaaaaaaaaa, VAE: "vae, v2.safetensors", '
        "Shift: 5, Version: rdbt 0.1.0, Module 1: qwen_3_06b_base"
    )
    assert metadata.to_parameters_text(_recipe(sampler="dpmpp_2m_sde", scheduler="karras")).count(
        "Sampler: DPM++ 2M SDE, Schedule type: Karras") == 1


@pytest.mark.parametrize("over", [
    {},
    {"prompt": "猫耳の少女, 🌸 桜\nsecond: line, é ×", "negative": "低品質\nblurry",
     "sampler": "dpmpp_2m"},
    {"negative": "", "shift": 2.5, "cfg": 1.0, "seed": 2**64 - 1, "loras": []},
    {"prompt": "ends with a comma,\nnext,", "negative": "a: b, c"},
])
def test_parameters_text_parses_back(over):
    r = _recipe(**over)
    back = metadata.parse_parameters_text(metadata.to_parameters_text(r))
    for key in ("prompt", "negative", "steps", "sampler", "scheduler", "cfg", "seed", "width", "height"):
        assert back[key] == r[key], key
    assert back.get("shift", 3.0) == r["shift"]
    assert back["model"]["name"] == r["model"]["name"] and back["model"]["hash"] == r["model"]["hash"]
    assert [(l["name"], l["weight"], l["a1111_hash"]) for l in back["loras"]] == [
        (l["name"], l["weight"], l["a1111_hash"]) for l in r["loras"]]


def test_parse_foreign_a1111_text():
    text = (
        "masterpiece, <lora:detail-tweaker:0.6>, 1girl\n"
        "smile\n"
        "Negative prompt: bad hands,\nlowres\n"
        "Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 42, Size: 512x768, Model hash: 0123abcdef, "
        'Model: someModel_v2, Denoising strength: 0.4, Hires upscaler: "R-ESRGAN 4x+, anime", '
        'Lora hashes: "detail-tweaker: 111122223333, extra: 4444555566", '
        'Hashes: {"vae": "9999999999", "model": "0123abcdef"}, TI hashes: "easyneg: abc", Version: v1.10.1'
    )
    r = metadata.parse_parameters_text(text)
    assert r["prompt"] == "masterpiece, 1girl\nsmile"
    assert r["negative"] == "bad hands,\nlowres"
    assert (r["steps"], r["sampler"], r["scheduler"], r["cfg"], r["seed"]) == (28, "dpmpp_2m", "karras", 7.5, 42)
    assert (r["width"], r["height"]) == (512, 768)
    assert r["model"] == {"name": "someModel_v2", "file": "someModel_v2", "hash": "0123abcdef"}
    assert r["vae"]["hash"] == "9999999999"
    assert r["loras"] == [
        {"name": "detail-tweaker", "file": "detail-tweaker", "weight": 0.6, "hash": None, "a1111_hash": "111122223333"},
        {"name": "extra", "file": "extra", "weight": 1.0, "hash": "4444555566", "a1111_hash": None},
    ]
    # Without `Hires upscale` the denoising strength is img2img's; an upscaler rdbt lacks is kept as written.
    assert (r["denoise"], r["hires_upscaler"]) == (0.4, "R-ESRGAN 4x+, anime") and "hires_denoise" not in r
    assert r["extra"] == {"TI hashes": "easyneg: abc"}
    assert r["generator"] == "v1.10.1"


# --- ComfyUI graphs ---------------------------------------------------------------------------------------------------

# ComfyUI's node signatures (nodes.py / comfy_extras): required inputs with their types, and output types by slot.
_COMFY = {
    "UNETLoader": ({"unet_name": "COMBO", "weight_dtype": "COMBO"}, ["MODEL"]),
    "CLIPLoader": ({"clip_name": "COMBO", "type": "COMBO"}, ["CLIP"]),
    "VAELoader": ({"vae_name": "COMBO"}, ["VAE"]),
    "LoraLoaderModelOnly": ({"model": "MODEL", "lora_name": "COMBO", "strength_model": "FLOAT"}, ["MODEL"]),
    "ModelSamplingAuraFlow": ({"model": "MODEL", "shift": "FLOAT"}, ["MODEL"]),
    "CLIPTextEncode": ({"text": "STRING", "clip": "CLIP"}, ["CONDITIONING"]),
    "EmptyLatentImage": ({"width": "INT", "height": "INT", "batch_size": "INT"}, ["LATENT"]),
    "KSampler": ({"model": "MODEL", "seed": "INT", "steps": "INT", "cfg": "FLOAT", "sampler_name": "COMBO",
                  "scheduler": "COMBO", "positive": "CONDITIONING", "negative": "CONDITIONING",
                  "latent_image": "LATENT", "denoise": "FLOAT"}, ["LATENT"]),
    "VAEDecode": ({"samples": "LATENT", "vae": "VAE"}, ["IMAGE"]),
    "SaveImage": ({"images": "IMAGE", "filename_prefix": "STRING"}, []),
}
_LINK_TYPES = {"MODEL", "CLIP", "VAE", "CONDITIONING", "LATENT", "IMAGE"}


def _check_api_graph(api):
    for node_id, node in api.items():
        assert isinstance(node_id, str) and node["class_type"] in _COMFY, node
        required, _ = _COMFY[node["class_type"]]
        assert set(required) <= set(node["inputs"]), (node["class_type"], set(required) - set(node["inputs"]))
        for name, value in node["inputs"].items():
            want = required.get(name)
            if want in _LINK_TYPES:
                assert isinstance(value, list) and len(value) == 2, (node_id, name, value)
                src, slot = value
                assert isinstance(src, str) and src in api, (node_id, name, src)
                outputs = _COMFY[api[src]["class_type"]][1]
                assert isinstance(slot, int) and 0 <= slot < len(outputs) and outputs[slot] == want, (name, value)
            else:
                assert not isinstance(value, list), (node_id, name)
                if want == "INT":
                    assert isinstance(value, int)
                if want == "FLOAT":
                    assert isinstance(value, (int, float))


def _by_class(api, cls):
    return [n for n in api.values() if n["class_type"] == cls]


@pytest.mark.parametrize("over", [{}, {"loras": [], "shift": 3.0}, {"shift": 6.0}])
def test_comfy_prompt_is_a_valid_anima_api_graph(over):
    r = _recipe(**over)
    api, workflow = metadata.comfy_graphs(r)
    json.dumps(api), json.dumps(workflow)
    _check_api_graph(api)
    ks = _by_class(api, "KSampler")
    assert len(ks) == 1
    ki = ks[0]["inputs"]
    assert (ki["seed"], ki["steps"], ki["cfg"], ki["sampler_name"], ki["scheduler"]) == (
        r["seed"], r["steps"], r["cfg"], r["sampler"], r["scheduler"])
    assert _by_class(api, "CLIPLoader")[0]["inputs"]["type"] == "stable_diffusion"
    assert _by_class(api, "UNETLoader")[0]["inputs"]["unet_name"] == r["model"]["file"]
    assert _by_class(api, "VAELoader")[0]["inputs"]["vae_name"] == "qwen_image_vae.safetensors"
    latent = _by_class(api, "EmptyLatentImage")[0]["inputs"]
    assert (latent["width"], latent["height"]) == (r["width"], r["height"])
    texts = {api[ki[k][0]]["inputs"]["text"] for k in ("positive", "negative")}
    assert texts == {r["prompt"], r["negative"]}
    # The model chain from the sampler back to the loader: shift node (if any), then LoRAs in reverse order.
    chain, node = [], api[ki["model"][0]]
    while node["class_type"] != "UNETLoader":
        chain.append(node)
        node = api[node["inputs"]["model"][0]]
    shifts = [n["inputs"]["shift"] for n in chain if n["class_type"] == "ModelSamplingAuraFlow"]
    assert shifts == ([] if r["shift"] == 3.0 else [r["shift"]])
    loras = [(n["inputs"]["lora_name"], n["inputs"]["strength_model"]) for n in chain[::-1]
             if n["class_type"] == "LoraLoaderModelOnly"]
    assert loras == [(l["file"], l["weight"]) for l in r["loras"]]


def test_comfy_workflow_is_a_consistent_ui_graph():
    api, wf = metadata.comfy_graphs(_recipe(shift=5.0))
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert wf["last_node_id"] == max(nodes) and wf["last_link_id"] == max(l[0] for l in wf["links"])
    assert {str(i) for i in nodes} == set(api)
    for link_id, src, src_slot, dst, dst_slot, typ in wf["links"]:
        assert nodes[src]["outputs"][src_slot]["type"] == typ and link_id in nodes[src]["outputs"][src_slot]["links"]
        assert nodes[dst]["inputs"][dst_slot]["link"] == link_id and nodes[dst]["inputs"][dst_slot]["type"] == typ
        assert api[str(dst)]["inputs"][nodes[dst]["inputs"][dst_slot]["name"]] == [str(src), src_slot]
    ks = next(n for n in wf["nodes"] if n["type"] == "KSampler")
    assert ks["widgets_values"] == [123456, "fixed", 30, 4.0, "euler", "simple", 1.0]
    for n in wf["nodes"]:
        assert n["type"] == api[str(n["id"])]["class_type"]


# --- save and read ----------------------------------------------------------------------------------------------------


def test_save_read_round_trip_rdbt(tmp_path):
    r = _recipe()
    px = _pixels()
    path = metadata.save_png(px, tmp_path / "out", r, stem="cat")
    assert path == tmp_path / "out" / "cat.png"
    with Image.open(path) as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), px)
        assert im.info["parameters"] == metadata.to_parameters_text(r)  # what A1111's PNG Info shows
        assert json.loads(im.info["prompt"]) == metadata.comfy_graphs(r)[0]
    assert _chunk_types(path) == {"parameters": "tEXt", "rdbt": "tEXt", "prompt": "tEXt", "workflow": "tEXt"}
    info = metadata.read_png(path)
    assert info["source"] == "rdbt" and info["recipe"] == r
    assert set(info["raw"]) == {"parameters", "rdbt", "prompt", "workflow"}
    summary = metadata.summarise(info)
    assert r["prompt"] in summary and "123456" in summary and "styleA.safetensors x 0.8" in summary
    assert "batch" not in summary
    assert '"line": 3' in metadata.summarise({**info, "recipe": {**r, "batch": {"line": 3}}})
    assert len(summary.splitlines()) >= 8


@pytest.mark.parametrize("prompt", ["猫耳の少女、夜空 🌙✨", "café × naïve", "emoji only 🐱🐶"])
def test_non_ascii_survives(tmp_path, prompt):
    r = _recipe(prompt=prompt, negative="低品質, 😡")
    path = metadata.save_png(_pixels(), tmp_path, r, stem="x")
    assert _chunk_types(path)["parameters"] == "iTXt"  # UTF-8, even where Latin-1 would fit
    info = metadata.read_png(path)
    assert info["recipe"]["prompt"] == prompt and info["recipe"]["negative"] == "低品質, 😡"
    assert info["raw"]["parameters"].startswith(prompt)
    with Image.open(path) as im:
        assert im.info["parameters"].startswith(prompt)
    # The parameters chunk alone (as another tool would read it) also keeps the text.
    back = metadata.parse_parameters_text(info["raw"]["parameters"])
    assert back["prompt"] == prompt and back["negative"] == "低品質, 😡"


def test_a1111_only_file(tmp_path):
    text = ("a cat on a sofa\nNegative prompt: blurry\n"
            "Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 6, Seed: 7, Size: 640x480, "
            "Model hash: abcdef0123, Model: foo, Version: f2.0.1")
    info = PngInfo()
    info.add_text("parameters", text)
    path = tmp_path / "a1111.png"
    Image.fromarray(_pixels()).save(path, pnginfo=info)
    got = metadata.read_png(path)
    assert got["source"] == "a1111" and got["raw"] == {"parameters": text}
    r = got["recipe"]
    assert (r["prompt"], r["negative"], r["steps"], r["sampler"], r["scheduler"], r["cfg"], r["seed"]) == (
        "a cat on a sofa", "blurry", 20, "euler_ancestral", "karras", 6.0, 7)
    assert (r["width"], r["height"], r["model"]["hash"]) == (640, 480, "abcdef0123")
    assert "a1111" in metadata.summarise(got)


def test_comfyui_only_file(tmp_path):
    # A ComfyUI-style graph with its own node ids, a LoRA chain, a shift node and a primitive feeding the prompt.
    api = {
        "12": {"class_type": "UNETLoader", "inputs": {"unet_name": "anima-preview3-base.safetensors",
                                                      "weight_dtype": "default"}},
        "13": {"class_type": "CLIPLoader", "inputs": {"clip_name": "qwen_3_06b_base.safetensors",
                                                      "type": "stable_diffusion", "device": "default"}},
        "14": {"class_type": "VAELoader", "inputs": {"vae_name": "qwen_image_vae.safetensors"}},
        "20": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["12", 0], "lora_name": "a.safetensors",
                                                               "strength_model": 0.7}},
        "21": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["20", 0], "lora_name": "sub/b.safetensors",
                                                               "strength_model": -0.5}},
        "22": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["21", 0], "shift": 4.0}},
        "30": {"class_type": "PrimitiveStringMultiline", "inputs": {"value": "1girl, 桜"}},
        "31": {"class_type": "CLIPTextEncode", "inputs": {"text": ["30", 0], "clip": ["13", 0]}},
        "32": {"class_type": "CLIPTextEncode", "inputs": {"text": "worst quality", "clip": ["13", 0]}},
        "40": {"class_type": "EmptyLatentImage", "inputs": {"width": 896, "height": 1152, "batch_size": 1}},
        "50": {"class_type": "KSampler", "inputs": {"seed": 875817230929465, "steps": 30, "cfg": 4, "denoise": 1,
                                                    "sampler_name": "er_sde", "scheduler": "simple",
                                                    "model": ["22", 0], "positive": ["31", 0],
                                                    "negative": ["32", 0], "latent_image": ["40", 0]}},
        "60": {"class_type": "VAEDecode", "inputs": {"samples": ["50", 0], "vae": ["14", 0]}},
        "70": {"class_type": "SaveImage", "inputs": {"images": ["60", 0], "filename_prefix": "ComfyUI"}},
    }
    info = PngInfo()
    info.add_text("prompt", json.dumps(api))
    info.add_text("workflow", json.dumps({"nodes": [], "links": []}))
    path = tmp_path / "comfy.png"
    Image.fromarray(_pixels()).save(path, pnginfo=info)
    got = metadata.read_png(path)
    assert got["source"] == "comfyui"
    r = got["recipe"]
    assert (r["prompt"], r["negative"], r["seed"], r["steps"], r["cfg"], r["sampler"], r["scheduler"]) == (
        "1girl, 桜", "worst quality", 875817230929465, 30, 4, "er_sde", "simple")
    assert (r["width"], r["height"], r["shift"]) == (896, 1152, 4.0)
    assert r["model"]["file"] == "anima-preview3-base.safetensors"
    assert r["text_encoder"]["file"] == "qwen_3_06b_base.safetensors"
    assert r["vae"]["file"] == "qwen_image_vae.safetensors"
    assert [(l["file"], l["weight"]) for l in r["loras"]] == [("a.safetensors", 0.7), ("sub/b.safetensors", -0.5)]


def test_own_comfy_graph_reads_back(tmp_path):
    r = _recipe(shift=4.5)
    api, workflow = metadata.comfy_graphs(r)
    info = PngInfo()
    info.add_text("prompt", json.dumps(api))
    info.add_text("workflow", json.dumps(workflow))
    path = tmp_path / "c.png"
    Image.fromarray(_pixels()).save(path, pnginfo=info)
    got = metadata.read_png(path)["recipe"]
    for key in ("prompt", "negative", "seed", "steps", "cfg", "sampler", "scheduler", "width", "height", "shift"):
        assert got[key] == r[key], key
    assert [(l["file"], l["weight"]) for l in got["loras"]] == [(l["file"], l["weight"]) for l in r["loras"]]


def test_never_overwrites(tmp_path):
    existing = tmp_path / "img.png"
    existing.write_bytes(b"precious")
    p1 = metadata.save_png(_pixels(1), existing, _recipe(index=1))
    p2 = metadata.save_png(_pixels(2), existing, _recipe(index=2))
    assert existing.read_bytes() == b"precious"
    assert (p1.name, p2.name) == ("img-0001.png", "img-0002.png")
    assert metadata.read_png(p2)["recipe"]["index"] == 2
    # Folder destinations with a stem number the same way, continuing after the highest number present.
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "s-0007.png").write_bytes(b"old")
    names = [metadata.save_png(_pixels(), tmp_path / "d", None, stem="s").name for _ in range(2)]
    assert names == ["s-0008.png", "s-0009.png"]
    assert (tmp_path / "d" / "s-0007.png").read_bytes() == b"old"


def test_default_name_in_folder(tmp_path):
    p1 = metadata.save_png(_pixels(), tmp_path / "new" / "deeper", _recipe(seed=99))
    p2 = metadata.save_png(_pixels(), tmp_path / "new" / "deeper", _recipe(seed=99))
    assert p1.parent == tmp_path / "new" / "deeper" and p1.name.startswith("rdbt-") and "99" in p1.stem
    assert p1 != p2 and p1.exists() and p2.exists()
    assert not [f for f in os.listdir(p1.parent) if f.endswith(".tmp")]


def _worker(args):
    folder, worker, n = args
    return [str(metadata.save_png(_pixels(worker), folder, _recipe(index=worker * 100 + i), stem="race"))
            for i in range(n)]


def test_concurrent_processes_get_distinct_files(tmp_path):
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(4) as pool:
        paths = [p for batch in pool.map(_worker, [(tmp_path, w, 5) for w in range(4)]) for p in batch]
    assert len(set(paths)) == 20
    assert sorted(os.listdir(tmp_path)) == sorted(Path(p).name for p in paths)  # nothing lost, no temp left
    indices = {metadata.read_png(p)["recipe"]["index"] for p in paths}
    assert indices == {w * 100 + i for w in range(4) for i in range(5)}


def test_concurrent_threads_get_distinct_files(tmp_path):
    results, errors = [], []

    def run(w):
        try:
            results.extend(_worker((tmp_path, w, 4)))
        except Exception as e:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 24 and len(os.listdir(tmp_path)) == 24


@pytest.mark.parametrize("exc, expected", [(OSError(28, "No space left on device"), OutputError),
                                           (RuntimeError("boom"), RuntimeError)])
def test_failed_write_leaves_nothing(tmp_path, monkeypatch, exc, expected):
    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise exc

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(expected):
        metadata.save_png(_pixels(), tmp_path, _recipe(), stem="p")
    assert os.listdir(tmp_path) == []


def test_unwritable_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError) as e:
        metadata.save_png(_pixels(), blocker / "sub", _recipe())
    assert str(blocker / "sub") in str(e.value) and "\n" not in str(e.value)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="not writable"):
            metadata.save_png(_pixels(), folder, _recipe())
    finally:
        folder.chmod(0o700)


def test_bad_pixels():
    with pytest.raises(OutputError, match="uint8"):
        metadata.save_png(np.zeros((4, 4, 3), np.float32), "unused", None)


def test_read_errors(tmp_path):
    good = metadata.save_png(_pixels(), tmp_path, _recipe(), stem="good")
    data = good.read_bytes()

    not_png = tmp_path / "x.png"
    not_png.write_text("hello")
    truncated = tmp_path / "t.png"
    truncated.write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0xFF
    corrupt = tmp_path / "c.png"
    corrupt.write_bytes(bytes(flipped))
    bare = metadata.save_png(_pixels(), tmp_path, _recipe(), stem="bare", metadata=False)
    assert _chunk_types(bare) == {}

    for path, message in [(not_png, "not a PNG"), (truncated, "truncated"), (corrupt, "corrupt PNG"),
                          (bare, "no generation metadata found"), (tmp_path / "missing.png", "no such file"),
                          (tmp_path, "folder")]:
        with pytest.raises(OutputError, match=message) as e:
            metadata.read_png(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_compressed_text_chunks_are_read(tmp_path):
    info = PngInfo()
    info.add_itxt("parameters", "圧縮\nSteps: 5, Sampler: Euler, CFG scale: 2, Seed: 1", zip=True)
    path = tmp_path / "z.png"
    Image.fromarray(_pixels()).save(path, pnginfo=info)
    # zTXt by hand: keyword, NUL, method 0, deflate stream.
    data = path.read_bytes()
    body = b"Comment\0\0" + zlib.compress("café".encode("latin-1"))
    chunk = struct.pack(">I", len(body)) + b"zTXt" + body + struct.pack(">I", zlib.crc32(b"zTXt" + body))
    path.write_bytes(data[:33] + chunk + data[33:])  # right after IHDR
    got = metadata.read_png(path)
    assert got["recipe"]["prompt"] == "圧縮" and got["recipe"]["steps"] == 5 and got["raw"]["Comment"] == "café"


def test_metadata_does_not_import_torch():
    code = "import sys, rdbt_cli.metadata; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_file_system_without_hard_links(tmp_path, monkeypatch):
    def no_link(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    (tmp_path / "h.png").write_bytes(b"keep")
    paths = [metadata.save_png(_pixels(), tmp_path / "h.png", _recipe(index=i)) for i in range(2)]
    assert [p.name for p in paths] == ["h-0001.png", "h-0002.png"]
    assert (tmp_path / "h.png").read_bytes() == b"keep"
    assert [metadata.read_png(p)["recipe"]["index"] for p in paths] == [0, 1]
    assert sorted(os.listdir(tmp_path)) == ["h-0001.png", "h-0002.png", "h.png"]


@pytest.mark.parametrize("graph", ['[]', '{"1": 5}', '{"1": {"class_type": "KSampler", "inputs": null}}',
                                   '{"1": {"class_type": "KSampler", "inputs": {"seed": ["2", 0], "model": "x"}}}'])
def test_odd_comfy_graphs_do_not_crash(tmp_path, graph):
    info = PngInfo()
    info.add_text("prompt", graph)
    path = tmp_path / "odd.png"
    Image.fromarray(_pixels()).save(path, pnginfo=info)
    got = metadata.read_png(path)
    assert got["source"] == "comfyui" and got["raw"] == {"prompt": graph}
    assert got["recipe"].get("seed") is None
    assert "comfyui" in metadata.summarise(got)
