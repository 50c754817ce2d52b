"""The ComfyUI chunks against ComfyUI's own code: the page's prompt rewriting, its seed precision, the names its
loaders list files under, and the node shapes its node definitions give.

Read for these tests (the rules below are restated from there, not imported):
- Comfy-Org/ComfyUI_frontend packages/shared-frontend-utils/src/formatUtil.ts (commit 04bacc59),
  processDynamicPrompt, applied to every widget marked dynamicPrompts by src/extensions/core/dynamicPrompts.ts;
  src/lib/litegraph/src/node/slotUtils.ts outputAsSerialisable / inputAsSerialisable (how the page saves slots).
- silveroxides/ComfyUI nodes.py, comfy_extras/nodes_model_advanced.py and nodes_custom_sampler.py (commit 4f874c5e):
  INPUT_TYPES and RETURN_TYPES / RETURN_NAMES of every node class rdbt's graphs use; folder_paths (file names are
  paths relative to the models-type folder, os.path.relpath).
"""

from __future__ import annotations

import json
import random

import pytest

from rdbt_cli import discovery, jobs, metadata

# --- the page's prompt rewriting --------------------------------------------------------------------------------------


def page_process(text: str, choose=None) -> str:
    """processDynamicPrompt of ComfyUI's page, step by step: comment stripping (/\\/\\*[\\s\\S]*?\\*\\/|\\/\\/.*/g),
    then a scan where a backslash takes the next character as a two-character escape, `{` opens a choice whose
    options split at top-level `|` and whose pick is processed again, and finally /\\\\([{}|])/g -> '$1'.
    JavaScript's `'\\\\' + undefined` (a backslash at the very end) is "\\\\undefined"."""
    import re

    choose = choose or (lambda options: random.choice(options))
    text = re.sub(r"/\*[\s\S]*?\*/|//[^\n\r\u2028\u2029]*", "", text)
    pos = 0

    def escape():
        nonlocal pos
        nxt = text[pos] if pos < len(text) else "undefined"
        pos += 1
        return "\\" + nxt

    def choice():
        nonlocal pos
        options, current, depth = [], "", 0
        while pos < len(text):
            c = text[pos]
            pos += 1
            if c == "\\":
                current += escape()
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                if not depth:
                    break
                depth -= 1
            elif c == "|" and not depth:
                options.append(current)
                current = ""
                continue
            current += c
        options.append(current)
        return page_process(choose(options), choose)

    out = ""
    while pos < len(text):
        c = text[pos]
        pos += 1
        out += escape() if c == "\\" else choice() if c == "{" else c
    return re.sub(r"\\([{}|])", r"\1", out)


def _only_choice(options):
    assert len(options) == 1, f"the page would pick at random among {options}"
    return options[0]


def test_the_oracle_is_the_pages_rule():
    assert page_process("a {b|c} d // gone", lambda options: options[0]) == "a b d "
    assert page_process("x /* gone */y") == "x y"
    assert page_process("\\{x\\|y\\}") == "{x|y}"
    assert page_process("C:\\dir") == "C:\\dir"  # an escape of an ordinary character keeps both
    assert page_process("end\\") == "end\\undefined"


PROMPTS = [
    "1girl, {red|blue} hair", "{", "}", "|", "a|b", "{{x}}", "{}", "\\{", "\\}", "\\|", "\\\\{", "\\\\\\|",
    "see http://example.org/a//b", "// all gone", "/* c */ kept", "/*/", "*/ /*", "//\n//", "a/ /b", "\\/\\/",
    "C:\\models\\{x}", "C:\\models\\x", "tab\\there", "\\\\", "back\\\\slash\\\\\\\\",
    "日本語 {猫|犬} // コメント",
    "emoji 🐱 /**/ {|}", "", "score_9, (masterpiece:1.2), {a|{b|c}}", "\\a\\{b\\}c\\", "x\\",
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_page_text_round_trips(prompt):
    written = metadata.page_text(prompt)
    trailing = len(prompt) - len(prompt.rstrip("\\"))
    if trailing % 2:  # the page keeps backslashes in pairs at the end: the one prompt shape it cannot reproduce
        assert page_process(written, _only_choice) == prompt + "\\"
    else:
        assert page_process(written, _only_choice) == prompt


def test_page_text_round_trips_every_short_string():
    rng = random.Random(20)
    alphabet = "{}|/\\*a \n"
    for _ in range(4000):
        prompt = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 10)))
        if (len(prompt) - len(prompt.rstrip("\\"))) % 2:
            continue
        assert page_process(metadata.page_text(prompt), _only_choice) == prompt, repr(prompt)


def _recipe(**over):
    r = {"schema": "rdbt.recipe/1", "rdbt_version": "0.1.0", "prompt": "a {cat|dog} // at night",
         "negative": "C:\\bad\\{x}", "seed": 7, "steps": 4, "cfg": 4.0, "sampler": "er_sde", "scheduler": "simple",
         "shift": 3.0, "width": 64, "height": 64,
         "model": {"name": "anima", "file": "anima.safetensors", "hash": None, "relative": "anima/anima.safetensors"},
         "text_encoder": None, "vae": None,
         "loras": [{"name": "ink", "file": "ink.safetensors", "weight": 0.7, "hash": None, "a1111_hash": None,
                    "relative": "style/ink.safetensors"}]}
    r.update(over)
    return r


def test_workflow_widgets_give_the_prompt_and_the_api_graph_keeps_it_plain():
    r = _recipe()
    api, wf = metadata.comfy_graphs(r)
    texts = [n for n in wf["nodes"] if n["type"] == "CLIPTextEncode"]
    assert [page_process(n["widgets_values"][0], _only_choice) for n in texts] == [r["prompt"], r["negative"]]
    assert [n["inputs"]["text"] for n in api.values() if n["class_type"] == "CLIPTextEncode"] == [
        r["prompt"], r["negative"]]


# --- seeds -----------------------------------------------------------------------------------------------------------


def test_random_seeds_fit_the_page():
    assert all(0 <= jobs.random_seed() < 2**53 for _ in range(2000))


def test_large_user_seed_stays_exact_and_inspect_says_the_page_rounds_it(tmp_path):
    import numpy as np

    seed = 2**63 + 12345
    path = metadata.save_png(np.zeros((8, 8, 3), np.uint8), tmp_path / "x.png", _recipe(seed=seed))
    info = metadata.read_png(path)
    assert info["recipe"]["seed"] == seed
    api = json.loads(info["raw"]["prompt"])
    assert [n["inputs"]["seed"] for n in api.values() if n["class_type"] == "KSampler"] == [seed]
    summary = metadata.summarise(metadata.inspectable(info))
    assert f"seed {seed} is above 2^53" in summary and str(int(float(seed))) in summary
    from typer.testing import CliRunner

    from rdbt_cli.cli import app

    shown = json.loads(CliRunner().invoke(app, ["inspect", str(path), "--json"]).output)
    assert shown["seed"] == seed and "2^53" in shown["notes"][0]
    small = metadata.save_png(np.zeros((8, 8, 3), np.uint8), tmp_path / "y.png", _recipe(seed=2**53 - 1))
    assert "2^53" not in metadata.summarise(metadata.inspectable(metadata.read_png(small)))


# --- file names in sub-folders ----------------------------------------------------------------------------------------


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_comfy_name_is_the_path_inside_the_kind_folder(tmp_path):
    models = tmp_path / "ComfyUI" / "models"
    lora = _touch(models / "loras" / "style" / "ink.safetensors")
    dit = _touch(models / "diffusion_models" / "anima" / "base.safetensors")
    flat = _touch(tmp_path / "shared" / "sub" / "y.safetensors")  # a flat folder named in extra_model_paths.yaml
    assert discovery.comfy_name(lora, "lora", [models]) == "style/ink.safetensors"
    assert discovery.comfy_name(lora, "lora") == "style/ink.safetensors"  # from the folder's own name
    assert discovery.comfy_name(dit, "dit", [models]) == "anima/base.safetensors"
    assert discovery.comfy_name(flat, "lora", [tmp_path / "shared"]) == "sub/y.safetensors"
    assert discovery.comfy_name(flat, "lora") == "y.safetensors"  # no folder tells: the file name


def test_graphs_name_files_by_their_relative_path(monkeypatch):
    r = _recipe()
    for sep in ("/", "\\"):
        monkeypatch.setattr(metadata, "_COMFY_SEP", sep)
        api, wf = metadata.comfy_graphs(r)
        by_class = {n["class_type"]: n["inputs"] for n in api.values()}
        ui = {n["type"]: n["widgets_values"] for n in wf["nodes"]}
        want = f"style{sep}ink.safetensors"
        assert by_class["LoraLoaderModelOnly"]["lora_name"] == ui["LoraLoaderModelOnly"][0] == want
        assert by_class["UNETLoader"]["unet_name"] == ui["UNETLoader"][0] == f"anima{sep}anima.safetensors"
    # A1111 names a LoRA by its file's stem wherever it sits (extensions-builtin/Lora/networks.py), so its text does
    text = metadata.to_parameters_text(r)
    assert "<lora:ink:0.7>" in text and "style" not in text
    old = _recipe(loras=[{"name": "ink", "file": "ink.safetensors", "weight": 1.0}])  # recorded before `relative`
    api = metadata.comfy_graphs(old)[0]
    assert [n["inputs"]["lora_name"] for n in api.values() if "lora_name" in n["inputs"]] == ["ink.safetensors"]


# --- node shapes from ComfyUI's node definitions ----------------------------------------------------------------------

# class -> (inputs in INPUT_TYPES order as (name, type, optional), outputs as (RETURN_NAMES or RETURN_TYPES, type)).
# Read from silveroxides/ComfyUI @ 4f874c5e: nodes.py (loaders, CLIPTextEncode, EmptyLatentImage, LoadImage,
# LoadImageMask, ImageScale(By), VAEEncode(ForInpaint), SetLatentNoiseMask, LatentUpscale(By), KSampler, VAEDecode,
# SaveImage, whose RETURN_TYPES there is ("IMAGE",) named "images"), comfy_extras/nodes_model_advanced.py
# (ModelSamplingAuraFlow) and comfy_extras/nodes_custom_sampler.py (RandomNoise, KSamplerSelect, BasicScheduler,
# SamplerCustomAdvanced).
_W = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
NODE_DEFS = {
    "UNETLoader": ([("unet_name", "COMBO", 0), ("weight_dtype", "COMBO", 0)], [("MODEL", "MODEL")]),
    "CLIPLoader": ([("clip_name", "COMBO", 0), ("type", "COMBO", 0), ("device", "COMBO", 1)], [("CLIP", "CLIP")]),
    "VAELoader": ([("vae_name", "COMBO", 0)], [("VAE", "VAE")]),
    "LoraLoaderModelOnly": ([("model", "MODEL", 0), ("lora_name", "COMBO", 0), ("strength_model", "FLOAT", 0)],
                            [("MODEL", "MODEL")]),
    "ModelSamplingAuraFlow": ([("model", "MODEL", 0), ("shift", "FLOAT", 0)], [("MODEL", "MODEL")]),
    "CLIPTextEncode": ([("text", "STRING", 0), ("clip", "CLIP", 0)], [("CONDITIONING", "CONDITIONING")]),
    "EmptyLatentImage": ([("width", "INT", 0), ("height", "INT", 0), ("batch_size", "INT", 0)], [("LATENT", "LATENT")]),
    "LoadImage": ([("image", "COMBO", 0)], [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "LoadImageMask": ([("image", "COMBO", 0), ("channel", "COMBO", 0)], [("MASK", "MASK")]),
    "ImageScale": ([("image", "IMAGE", 0), ("upscale_method", "COMBO", 0), ("width", "INT", 0), ("height", "INT", 0),
                    ("crop", "COMBO", 0)], [("IMAGE", "IMAGE")]),
    "ImageScaleBy": ([("image", "IMAGE", 0), ("upscale_method", "COMBO", 0), ("scale_by", "FLOAT", 0)],
                     [("IMAGE", "IMAGE")]),
    "VAEEncode": ([("pixels", "IMAGE", 0), ("vae", "VAE", 0)], [("LATENT", "LATENT")]),
    "VAEEncodeForInpaint": ([("pixels", "IMAGE", 0), ("vae", "VAE", 0), ("mask", "MASK", 0),
                             ("grow_mask_by", "INT", 0)], [("LATENT", "LATENT")]),
    "SetLatentNoiseMask": ([("samples", "LATENT", 0), ("mask", "MASK", 0)], [("LATENT", "LATENT")]),
    "LatentUpscale": ([("samples", "LATENT", 0), ("upscale_method", "COMBO", 0), ("width", "INT", 0),
                       ("height", "INT", 0), ("crop", "COMBO", 0)], [("LATENT", "LATENT")]),
    "LatentUpscaleBy": ([("samples", "LATENT", 0), ("upscale_method", "COMBO", 0), ("scale_by", "FLOAT", 0)],
                        [("LATENT", "LATENT")]),
    "KSampler": ([("model", "MODEL", 0), ("seed", "INT", 0), ("steps", "INT", 0), ("cfg", "FLOAT", 0),
                  ("sampler_name", "COMBO", 0), ("scheduler", "COMBO", 0), ("positive", "CONDITIONING", 0),
                  ("negative", "CONDITIONING", 0), ("latent_image", "LATENT", 0), ("denoise", "FLOAT", 0)],
                 [("LATENT", "LATENT")]),
    "RandomNoise": ([("noise_seed", "INT", 0)], [("NOISE", "NOISE")]),
    "KSamplerSelect": ([("sampler_name", "COMBO", 0)], [("SAMPLER", "SAMPLER")]),
    "BasicScheduler": ([("model", "MODEL", 0), ("scheduler", "COMBO", 0), ("steps", "INT", 0), ("denoise", "FLOAT", 0)],
                       [("SIGMAS", "SIGMAS")]),
    "SamplerCustomAdvanced": ([("noise", "NOISE", 0), ("guider", "GUIDER", 0), ("sampler", "SAMPLER", 0),
                               ("sigmas", "SIGMAS", 0), ("latent_image", "LATENT", 0)],
                              [("output", "LATENT"), ("denoised_output", "LATENT")]),
    "VAEDecode": ([("samples", "LATENT", 0), ("vae", "VAE", 0)], [("IMAGE", "IMAGE")]),
    "SaveImage": ([("images", "IMAGE", 0), ("filename_prefix", "STRING", 0)], [("images", "IMAGE")]),
}
# Widget slots the page adds to widgets_values without an input: control_after_generate after seed / noise_seed
# (control_after_generate=True), and the upload button after the widgets of an image_upload combo.
EXTRA_VALUES = {"KSampler": 1, "RandomNoise": 1, "LoadImage": 1, "LoadImageMask": 1}
CUSTOM = {"KSamplerWithNAG", "NAGCFGGuiderAdvanced"}  # ComfyUI-NAG-Extended's, not in ComfyUI's code
UPSCALE = {"LatentUpscale": "nearest-exact bilinear area bicubic bislerp",
           "LatentUpscaleBy": "nearest-exact bilinear area bicubic bislerp",
           "ImageScale": "nearest-exact bilinear area bicubic lanczos",
           "ImageScaleBy": "nearest-exact bilinear area bicubic lanczos"}


def _image(name, w, h):
    return {"path": f"/in/{name}", "file": name, "sha256": "0" * 64, "width": w, "height": h}


SHAPES = {
    "txt2img": {},
    "shift": {"shift": 5.0, "loras": []},
    "img2img": {"init_image": _image("a.png", 80, 48), "denoise": 0.6},
    "inpaint": {"init_image": _image("a.png", 64, 64), "mask": _image("m.png", 64, 64), "denoise": 1.0},
    "fill": {"init_image": _image("a.png", 64, 64), "mask": _image("m.png", 64, 64), "inpaint": "fill",
             "grow_mask": 8},
    "hires": {"hires": 1.5, "hires_upscaler": "latent", "hires_denoise": 0.5},
    "hires-odd": {"hires": 1.4, "hires_upscaler": "latent"},  # 64 * 1.4 -> 96 (rdbt), 88 (ComfyUI)
    "hires-lanczos-odd": {"hires": 1.4, "hires_upscaler": "lanczos"},
    "hires-lanczos": {"hires": 2.0, "hires_upscaler": "lanczos"},
    "nag-window": {"nag_scale": 5.0, "nag_tau": 2.5, "nag_alpha": 0.25, "nag_sigma_end": 0.0,
                   "nag_sigma_start": 0.5},
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_graph_nodes_have_the_shapes_comfyui_defines(shape):
    api, wf = metadata.comfy_graphs(_recipe(**SHAPES[shape]))
    outputs_of = {str(n["id"]): n["outputs"] for n in wf["nodes"]}
    linked = {(str(src), slot) for _, src, slot, _, _, _ in wf["links"]}
    for node in wf["nodes"]:
        cls, key = node["type"], str(node["id"])
        if cls in CUSTOM:
            continue
        defined, outputs = NODE_DEFS[cls]
        sockets = [(name, typ) for name, typ, _ in defined if typ not in _W]
        widgets = [(name, typ, opt) for name, typ, opt in defined if typ in _W]
        # the API graph: every input of the definition, each link to an output of its type, each widget a value
        assert list(api[key]["inputs"]) and set(api[key]["inputs"]) == {name for name, _, _ in defined}, cls
        for name, typ in sockets:
            src, slot = api[key]["inputs"][name]
            assert outputs_of[src][slot]["type"] == typ, (cls, name)
        for name, typ, _ in widgets:
            value = api[key]["inputs"][name]
            assert {"INT": int, "FLOAT": float, "STRING": str, "COMBO": str, "BOOLEAN": bool}[typ] is type(value)
            if name == "upscale_method":
                assert value in UPSCALE[cls].split(), (cls, value)
        # the UI graph as the page saves it: sockets, then one slot per widget (optional ones drawn as shape 7)
        want = [{"localized_name": n, "name": n, "type": t} for n, t in sockets]
        want += [{"localized_name": n, "name": n, **({"shape": 7} if opt else {}), "type": t, "widget": {"name": n}}
                 for n, t, opt in widgets]
        assert [{k: v for k, v in slot.items() if k != "link"} for slot in node["inputs"]] == want, cls
        assert all(slot["link"] is None for slot in node["inputs"][len(sockets):])
        assert len(node["widgets_values"]) == len(widgets) + EXTRA_VALUES.get(cls, 0), cls
        assert [(o["name"], o["type"]) for o in node["outputs"]] == outputs, cls
        for slot, out in enumerate(node["outputs"]):
            assert out["localized_name"] == out["name"]
            if (key, slot) in linked:
                assert out["links"] and out["slot_index"] == slot
            else:  # never linked: links null, no slot_index, as the page saves a fresh node's output
                assert out["links"] is None and "slot_index" not in out, (cls, out)
    assert any(o["links"] is None for n in wf["nodes"] if n["type"] == "SaveImage" for o in n["outputs"])


def test_gen_records_sub_folder_names_in_both_chunks(tmp_path):
    import shutil

    from typer.testing import CliRunner

    from conftest import shared_path
    from rdbt_cli.cli import app

    models = tmp_path / "models"
    shutil.copytree(shared_path("golden", "models"), models)
    (models / "loras" / "style").mkdir()
    shutil.move(models / "loras" / "tiny_peft_lora.safetensors", models / "loras" / "style" / "ink.safetensors")
    (models / "diffusion_models" / "anima").mkdir()
    shutil.move(models / "diffusion_models" / "anima_tiny.safetensors", models / "diffusion_models" / "anima")
    out = tmp_path / "a.png"
    r = CliRunner().invoke(app, ["gen", "x", "--lora", "style/ink:0.5", "--models-dir", str(models), "--out", str(out),
                                 "--size", "64x64", "--steps", "1", "--seed", "5", "--quiet", "--dtype", "fp32"])
    assert r.exit_code == 0, r.output
    info = metadata.read_png(out)
    recipe = info["recipe"]
    assert recipe["loras"][0]["relative"] == "style/ink.safetensors"
    assert recipe["model"]["relative"] == "anima/anima_tiny.safetensors"
    assert recipe["vae"]["relative"] == "qwen_image_vae_tiny.safetensors"
    import os

    api = json.loads(info["raw"]["prompt"])
    names = {n["class_type"]: n["inputs"] for n in api.values()}
    assert names["LoraLoaderModelOnly"]["lora_name"] == os.path.join("style", "ink.safetensors")
    assert names["UNETLoader"]["unet_name"] == os.path.join("anima", "anima_tiny.safetensors")
    wf = json.loads(info["raw"]["workflow"])
    assert [n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "LoraLoaderModelOnly"] == [
        os.path.join("style", "ink.safetensors")]
    assert "<lora:ink:0.5>" in info["raw"]["parameters"]
