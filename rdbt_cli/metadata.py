"""PNG metadata: the recipe rdbt records with every image, in the forms other tools read, and reading it back.

No torch import (stdlib, Pillow and json only), so `rdbt inspect` starts instantly.

The recipe is a plain dict, the single record of how an image was made (schema "rdbt.recipe/1"):

    schema        "rdbt.recipe/1"
    rdbt_version  str
    prompt, negative                       str (negative "" when none)
    seed          int, the resolved 64-bit seed of this image (seed + index for --count)
    steps         int
    cfg, shift    float
    sampler, scheduler                     ComfyUI names (er_sde, simple, ...)
    width, height int
    model         {"name": file stem, "file": file name, "hash": AutoV2 (sha256 of the file, first 10 hex) | None,
                   "relative": its path inside its models-type folder, "/"-separated ("anima/x.safetensors"),
                   which is ComfyUI's name for it (absent in older recipes and in other tools')}
    text_encoder, vae                      same shape as model, or None when built in / not separate
    loras         [{"name", "file", "weight": float, "hash": AutoV2 | None, "a1111_hash": AutoV3 (12 hex) | None}]
    preset        str | None
    device, dtype str
    index         int, the image's index within --count
    prompt_template, negative_template     str, the prompt as written when its variants or wildcards were drawn
                                           (A1111: the Dynamic Prompts fields `Template`, `Negative Template`)
    ...           any extra keys are kept as they are

A PNG written by `save_png` carries four text chunks (spec formats.md §4):

    parameters   the A1111/Forge infotext (what Civitai, A1111 "PNG Info" and prompt readers parse)
    rdbt         json.dumps(recipe), the authoritative copy `read_png` prefers
    prompt       ComfyUI API graph of an equivalent Anima workflow
    workflow     ComfyUI UI graph of the same workflow (drag the PNG onto ComfyUI to open it)

ASCII text goes into tEXt; any other text into uncompressed iTXt (UTF-8), so Japanese and emoji survive unchanged.

For images from other tools, `read_png` normalises what it finds into the same recipe keys: `file` of a model is then
the name as recorded (A1111 records no extension), unknown A1111 fields go to recipe["extra"], and a LoRA known only
from `Lora hashes` (no `<lora:...>` tag) gets weight 1.0.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import struct
import time
import zlib
from pathlib import Path

from rdbt_cli import __version__
from rdbt_cli.config import LoraSpec
from rdbt_cli.errors import ConfigError, OutputError, io_problem
from rdbt_cli.settings import BY_NAME, DEFAULT_SHIFT, SETTINGS, GenParams, check_all, hires_size, is_number

SCHEMA = "rdbt.recipe/1"

# Table rows by their A1111 label (two rows may share one, each applying to other recipes), and each label's values
# back to ComfyUI names.
_A1111_ROWS: dict[str, list] = {}
for _s in SETTINGS:
    if _s.a1111:
        _A1111_ROWS.setdefault(_s.a1111, []).append(_s)
_FILE_ROWS = [s for s in SETTINGS if s.type is Path]  # input files (init image, mask): recorded with hash and size
_FROM_LABEL = {s.name: {v.lower(): k for k, v in s.a1111_names.items()} for s in SETTINGS if s.a1111_names}

# Anima's official ComfyUI template (anima.md §5.6): the file names ComfyUI users have, used when the recipe has none.
COMFY_DEFAULT_TE = "qwen_3_06b_base.safetensors"
COMFY_DEFAULT_VAE = "qwen_image_vae.safetensors"

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MAX_TEXT = 64 << 20  # inflated zTXt/iTXt limit: a decompression bomb is a corrupt file, not an out-of-memory


# ---------------------------------------------------------------------------------------------------------------------
# The recipe, both ways
# ---------------------------------------------------------------------------------------------------------------------


def component_record(path, hashes: dict, relative: str | None = None) -> dict:
    """A model file as the recipe records it; `hashes` is discovery.file_hashes' result ({} while unknown) and
    `relative` discovery.comfy_name's (ComfyUI names a file in a sub-folder by its path inside the models-type
    folder)."""
    path = Path(path)
    record = {"name": path.stem, "file": path.name, "path": str(path.resolve()), "hash": hashes.get("autov2")}
    return {**record, "relative": relative} if relative else record


def lora_record(path, weight: float, hashes: dict, relative: str | None = None) -> dict:
    return {**component_record(path, hashes, relative), "weight": weight, "a1111_hash": hashes.get("a1111_lora")}


TINY_COMPONENT = {"name": "tiny", "file": "tiny", "hash": None}


def input_record(path) -> dict:
    """An input image as the recipe records it: where it was, its full sha256 and its size in pixels."""
    import hashlib

    from PIL import Image

    path = Path(path)
    try:
        data = path.read_bytes()
        with Image.open(path) as im:
            width, height = im.size
    except OSError as e:  # checked before anything loaded; gone since
        raise ConfigError(f"{path}: cannot read the input image any more ({e.strerror or e})") from None
    return {"path": str(path.resolve()), "file": path.name, "sha256": hashlib.sha256(data).hexdigest(),
            "width": width, "height": height}


def make_recipe(settings, *, seed: int, index: int, model: dict, text_encoder: dict | None, vae: dict | None,
                loras: list[dict], preset: str | None, device: str, dtype: str, weights_fp8: bool, **extra) -> dict:
    """The recipe of one image: every recorded setting of the table (resolved `settings`), then what was loaded."""
    recipe = {"schema": SCHEMA, "rdbt_version": __version__}
    for s in SETTINGS:
        if s.recipe:
            value = getattr(settings, s.name)
            recipe[s.recipe] = input_record(value) if s.type is Path and value else value
    recipe["negative"] = recipe.get("negative") or ""
    recipe["seed"] = seed
    recipe.update(model=model, text_encoder=text_encoder, vae=vae, loras=loras, preset=preset, device=device,
                  dtype=dtype, weights_fp8=weights_fp8, index=index, **extra)
    return recipe


def _recorded_lora(entry) -> LoraSpec:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        raise ConfigError(f"recorded LoRA {entry!r} has no name")
    weight = BY_NAME["loras"].coerce(entry.get("weight", 1.0))
    # A LoRA recorded with its path is taken from there while that file exists (it may sit outside loras/).
    path = entry.get("path")
    return LoraSpec(path if isinstance(path, str) and Path(path).is_file() else entry["name"], weight)


def _locate(component):
    """The recorded path while that file exists, else the file name for the models folder to resolve again."""
    if isinstance(component, dict) and isinstance(component.get("path"), str) and Path(component["path"]).is_file():
        return component["path"]
    name = component.get("file") if isinstance(component, dict) else component
    if name is not None and not isinstance(name, str):
        raise ConfigError(f"recorded model file {name!r} is not a file name")
    return Path(name).stem if name and name != "tiny" else name


def _recorded_value(setting, value):
    if setting.type is Path and isinstance(value, dict):
        return value.get("path") or value.get("file")  # an input file's record
    return setting.coerce(value)


def check_recorded_inputs(params, recorded: dict) -> None:
    """Every input file a recipe names, where it is still used, must be there unchanged: else --from says so."""
    import hashlib

    for s in _FILE_ROWS:
        record = recorded["inputs"].get(s.name)
        path = getattr(params, s.name)
        if not record or path != record.get("path"):
            continue  # not recorded, or a flag gave another file
        label = s.flag.lstrip("-").replace("-", " ")
        try:
            digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        except OSError:
            raise ConfigError(f"the recorded {label} {path} is missing; put it back or give another with "
                              f"{s.flag} FILE") from None
        if record.get("sha256") and digest != record["sha256"]:
            raise ConfigError(f"the recorded {label} {path} has changed since the image was made (sha256 "
                              f"{record['sha256'][:10]}, now {digest[:10]}); give it with {s.flag} {path} to use "
                              "it as it is now")


def read_recipe(path) -> dict:
    """The recipe of a PNG for `gen --from`, every recorded value checked now (recipe_settings), so that a damaged or
    hostile recipe is refused before anything loads, naming the file."""
    recipe = read_png(path)["recipe"]
    try:
        recipe_settings(recipe)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}; this recipe cannot be re-run (see it with `rdbt inspect {path}`)") from None
    return recipe


def recipe_settings(recipe: dict):
    """(GenParams, recorded files) from a recipe read back by read_png: every value checked by the rules the flags
    obey, before anything loads. `recorded` holds the model, text_encoder and vae to look for, dtype, weights_fp8
    and the input files' records (`inputs`, for check_recorded_inputs)."""
    if not isinstance(recipe, dict):
        raise ConfigError(f"the recorded recipe is not a table but {type(recipe).__name__}")
    try:
        return _recipe_settings(recipe)
    except (TypeError, ValueError, AttributeError, KeyError, OverflowError, RecursionError) as exc:
        # a value of a type no rule expects (a dict where a number belongs, ...): refused like any bad value
        raise ConfigError(f"the recorded recipe holds a value of the wrong type ({exc.__class__.__name__}: "
                          f"{str(exc)[:200]})") from None


def _recipe_settings(recipe: dict):
    values = {s.name: _recorded_value(s, recipe.get(s.recipe)) for s in SETTINGS if s.recipe}
    loras = recipe.get("loras") or []
    if not isinstance(loras, list):
        raise ConfigError(f"recorded loras {loras!r} is not a list")
    params = GenParams(**values, count=1, loras=[_recorded_lora(entry) for entry in loras])
    check_all(params, lambda s: f"recorded {s.recipe or s.name} {getattr(params, s.name)!r}")
    recorded = {k: _locate(recipe.get(k)) for k in ("model", "text_encoder", "vae")}
    recorded["dtype"] = recipe.get("dtype")
    recorded["weights_fp8"] = bool(recipe.get("weights_fp8"))
    recorded["inputs"] = {s.name: recipe[s.recipe] for s in _FILE_ROWS if isinstance(recipe.get(s.recipe), dict)}
    return params, recorded


# ---------------------------------------------------------------------------------------------------------------------
# A1111 / Forge `parameters`
# ---------------------------------------------------------------------------------------------------------------------


def _num(x) -> str:
    """4.0 -> "4", 4.5 -> "4.5": A1111's spelling of whole-number floats (formats.md §4.1 example `CFG scale: 4`)."""
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return str(x)


def _quote(value: str) -> str:
    """A1111 infotext quoting: a value holding `,`, `:` or a newline becomes a JSON string with non-ASCII kept."""
    if any(c in value for c in ",:\n"):
        return json.dumps(value, ensure_ascii=False)
    return value


def _tag_name(name: str) -> str:
    # A1111 removes ":" and "," from LoRA names in `Lora hashes`; "<" and ">" would end a <lora:...> tag early.
    return re.sub(r"[:,<>]", "", name).strip()


def _weight(lora: dict) -> float:
    return 1.0 if lora.get("weight") is None else float(lora["weight"])


def _lora_hash(lora: dict) -> str | None:
    # AutoV3 (A1111's own choice, Civitai's best match rate), else AutoV2, which Civitai also matches.
    return lora.get("a1111_hash") or lora.get("hash")


def to_parameters_text(recipe: dict, *, lora_tags: bool = True) -> str:
    """The A1111/Forge `parameters` infotext for a recipe (formats.md §4.1 layout, field order and quoting).

    With lora_tags, `<lora:NAME:WEIGHT>` tags are appended to the recorded prompt (unless already there) so that
    Civitai picks up each LoRA with its weight; `read_png` strips them again.
    """
    prompt = recipe.get("prompt") or ""
    loras = [l for l in recipe.get("loras") or [] if l.get("name")]
    if lora_tags:
        tags = [f"<lora:{_tag_name(l['name'])}:{_num(_weight(l))}>" for l in loras]
        tags = [t for t in tags if t not in prompt]
        if tags:
            prompt = (prompt.rstrip() + " " if prompt.strip() else "") + " ".join(tags)

    def row(setting) -> tuple[str, object]:
        value = recipe.get(setting.recipe) if setting.applies_to(recipe) else None
        if value is not None and setting.a1111_omit is not None and value == setting.a1111_omit:
            value = None
        return setting.a1111, (setting.a1111_names or {}).get(value, value)

    fields: list[tuple[str, object]] = [row(s) for s in SETTINGS if s.a1111 and not s.a1111_extension]
    if recipe.get("width") and recipe.get("height"):
        fields.append(("Size", f"{recipe['width']}x{recipe['height']}"))
    model = recipe.get("model") or {}
    fields += [("Model hash", model.get("hash")), ("Model", model.get("name"))]
    vae = recipe.get("vae") or {}
    fields += [("VAE hash", vae.get("hash")), ("VAE", vae.get("file") or vae.get("name"))]
    # Extension fields (Forge Neo's Shift for flow models, formats.md §4.1), written only when not the default, come
    # before Version.
    fields += [row(s) for s in SETTINGS if s.a1111 and s.a1111_extension]
    hashes = [(_tag_name(l["name"]), _lora_hash(l)) for l in loras]
    fields.append(("Lora hashes", ", ".join(f"{n}: {h}" for n, h in hashes if h) or None))
    # The Dynamic Prompts extension's fields: the prompts as written, when variants or wildcards made others.
    for label, (key, drawn) in _TEMPLATES.items():
        template = recipe.get(key)
        fields.append((label, template if isinstance(template, str) and template != recipe.get(drawn) else None))
    fields.append(("Version", f"rdbt {recipe.get('rdbt_version') or __version__}"))
    # Forge lists separately loaded modules after Version.
    te = recipe.get("text_encoder") or {}
    fields.append(("Module 1", te.get("name")))

    pairs = []
    for key, value in fields:
        if value is None or value == "":
            continue
        pairs.append(f"{key}: {_quote(_num(value) if isinstance(value, (int, float)) else str(value))}")

    lines = [prompt]
    if recipe.get("negative"):
        lines.append(f"Negative prompt: {recipe['negative']}")
    lines.append(", ".join(pairs))
    return "\n".join(lines).strip()


# A1111 label: (recipe key, the recipe key of what it was drawn into).
_TEMPLATES = {"Template": ("prompt_template", "prompt"), "Negative Template": ("negative_template", "negative")}
_KEY = re.compile(r"\s*(\w[\w \-/]*?)\s*:\s*")


def parse_parameter_line(line: str) -> list[tuple[str, str]]:
    """`Key: value, Key: "json string", Key: {json}` pairs of an infotext line, in order (A1111 infotext_utils)."""
    pairs = []
    pos, n = 0, len(line)
    decoder = json.JSONDecoder()
    while pos < n:
        m = _KEY.match(line, pos)
        if not m:
            nxt = line.find(",", pos)
            if nxt < 0:
                break
            pos = nxt + 1
            continue
        key, pos = m.group(1), m.end()
        value = None
        if pos < n and line[pos] in '"{[':
            try:
                obj, end = decoder.raw_decode(line, pos)
                rest = line[end:].lstrip(" ")
                if not rest or rest.startswith(","):
                    value = obj if isinstance(obj, str) else line[pos:end]
                    pos = end
            except (ValueError, RecursionError):  # RecursionError: nested past Python's limit; kept as text
                pass
        if value is None:
            nxt = line.find(",", pos)
            end = n if nxt < 0 else nxt
            value, pos = line[pos:end].strip(), end
        pairs.append((key, value))
        nxt = line.find(",", pos)
        pos = n if nxt < 0 else nxt + 1
    return pairs


_LORA_TAG = re.compile(r"<lora:([^:>]+):([^:>]*)(?::[^>]*)?>")
_TAG = r"<lora:[^:>]+:[^:>]*(?::[^>]*)?>"


def _strip_lora_tags(prompt: str) -> str:
    """The prompt without its <lora:...> tags: a run at the end (where to_parameters_text puts them) goes with the
    blanks before it; a tag that is a whole comma-separated item goes with its comma; any other only with its blanks."""
    prompt = re.sub(rf"(?:\s*{_TAG})+\s*\Z", "", prompt)
    prompt = re.sub(rf"(?:^|(?<=,))([ \t]*){_TAG}[ \t]*,[ \t]*", lambda m: " " if m.group(1) else "", prompt,
                    flags=re.M)
    return re.sub(rf"[ \t]*{_TAG}", "", prompt)


def lora_tags(prompt: str) -> tuple[str, list[LoraSpec]]:
    """A prompt's `<lora:NAME:WEIGHT>` tags as LoRAs, and the prompt without them (A1111 requests to the server)."""
    specs = []
    for name, weight in _LORA_TAG.findall(prompt):
        try:
            specs.append(LoraSpec(name.strip(), float(weight) if weight.strip() else 1.0))
        except ValueError:
            raise ConfigError(f"<lora:{name}:{weight}>: the weight must be a number, e.g. <lora:{name}:0.8>") from None
    return _strip_lora_tags(prompt), specs


def parse_parameters_text(text: str) -> dict:
    """Parse an A1111/Forge-style infotext into recipe fields (also what many other tools write)."""
    lines = text.strip().replace("\r\n", "\n").split("\n")
    params: list[tuple[str, str]] = []
    if lines and len(parse_parameter_line(lines[-1])) >= 3:
        params = parse_parameter_line(lines.pop())
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if not in_negative and line.lstrip().startswith("Negative prompt:"):
            in_negative = True
            line = line.lstrip()[len("Negative prompt:"):].lstrip()
        (negative if in_negative else prompt).append(line)

    recipe: dict = {"prompt": "\n".join(prompt).strip(), "negative": "\n".join(negative).strip()}
    loras: dict[str, dict] = {}

    for m in _LORA_TAG.finditer(recipe["prompt"]):
        name = m.group(1).strip()
        weight = _float(m.group(2))
        loras.setdefault(name, {"name": name, "file": name, "weight": 1.0 if weight is None else weight,
                                "hash": None, "a1111_hash": None})
    recipe["prompt"] = _strip_lora_tags(recipe["prompt"]).strip()

    fields = dict(params)
    extra = {}
    shared: list[tuple[str, str]] = []
    schedule = fields.get("Schedule type")
    for key, value in params:
        if key == "Sampler":  # old A1111 labels carry the schedule too ("DPM++ 2M Karras")
            sampler, implied = sampler_from_label(value)
            recipe["sampler"] = sampler
            if implied and not schedule:
                recipe["scheduler"] = implied
        elif key in _A1111_ROWS and len(_A1111_ROWS[key]) > 1:
            shared.append((key, value))  # which row it belongs to depends on the other fields
        elif key in _A1111_ROWS:
            _read_row(recipe, _A1111_ROWS[key][0], value)
        elif key == "Size":
            m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", value)
            if m:
                recipe["width"], recipe["height"] = int(m.group(1)), int(m.group(2))
        elif key == "Model":
            recipe.setdefault("model", {"name": value, "file": value, "hash": None}).update(name=value, file=value)
        elif key == "Model hash":
            recipe.setdefault("model", {"name": None, "file": None, "hash": None})["hash"] = value
        elif key == "VAE":
            recipe.setdefault("vae", {"name": None, "file": None, "hash": None}).update(
                name=value.rsplit(".", 1)[0] if value.endswith((".safetensors", ".pt", ".ckpt")) else value, file=value
            )
        elif key == "VAE hash":
            recipe.setdefault("vae", {"name": None, "file": None, "hash": None})["hash"] = value
        elif key == "Lora hashes":
            for item in value.split(","):
                name, _, h = item.rpartition(":")
                name, h = name.strip(), h.strip()
                if name and h:
                    entry = loras.setdefault(
                        name, {"name": name, "file": name, "weight": 1.0, "hash": None, "a1111_hash": None}
                    )
                    entry["hash" if len(h) == 10 else "a1111_hash"] = h
        elif key == "Hashes":
            try:
                table = json.loads(value)
            except (ValueError, RecursionError):
                extra[key] = value
                continue
            for name, h in table.items() if isinstance(table, dict) else ():
                if not isinstance(h, str):
                    continue  # a hash that is not text is no hash
                if name == "model":
                    recipe.setdefault("model", {"name": None, "file": None, "hash": None})
                    recipe["model"]["hash"] = recipe["model"]["hash"] or h
                elif name == "vae":
                    recipe.setdefault("vae", {"name": None, "file": None, "hash": None})
                    recipe["vae"]["hash"] = recipe["vae"]["hash"] or h
                elif name.startswith("lora:"):
                    entry = loras.setdefault(
                        name[5:], {"name": name[5:], "file": name[5:], "weight": 1.0, "hash": None, "a1111_hash": None}
                    )
                    key_ = "hash" if len(h) == 10 else "a1111_hash"
                    entry[key_] = entry[key_] or h
        elif key in _TEMPLATES:
            recipe[_TEMPLATES[key][0]] = value
        elif key == "Version":
            recipe["generator"] = value
        elif key == "Module 1":
            name = value.rsplit(".", 1)[0] if value.endswith(".safetensors") else value
            recipe["text_encoder"] = {"name": name, "file": value, "hash": None}
        else:
            extra[key] = value
    for key, value in shared:  # e.g. `Denoising strength`: img2img's denoise, or the hires pass's in a txt2img
        rows = _A1111_ROWS[key]
        _read_row(recipe, next((r for r in rows if r.applies_to(recipe)), rows[0]), value)
    recipe["loras"] = list(loras.values())
    if extra:
        recipe["extra"] = extra
    return recipe


def _read_row(recipe: dict, setting, value: str) -> None:
    names = _FROM_LABEL.get(setting.name)
    recipe[setting.recipe] = names.get(value.lower(), value) if names else _typed(setting.type, value)


def sampler_from_label(label: str) -> tuple[str, str | None]:
    """ComfyUI sampler name for an A1111 label; old A1111 labels carry the schedule ("DPM++ 2M Karras")."""
    low, names = label.strip().lower(), _FROM_LABEL["sampler"]
    if low in names:
        return names[low], None
    for suffix, scheduler in ((" karras", "karras"), (" exponential", "exponential"), (" sgm uniform", "sgm_uniform")):
        if low.endswith(suffix) and low[: -len(suffix)] in names:
            return names[low[: -len(suffix)]], scheduler
    return label.strip(), None


def _typed(kind: type, v):
    """An infotext value as `kind` (int, float or str), None when it does not parse: the file is a stranger's."""
    try:
        return kind(str(v).strip())
    except ValueError:
        return None


def _float(v):
    return _typed(float, v)


# ---------------------------------------------------------------------------------------------------------------------
# ComfyUI graphs
# ---------------------------------------------------------------------------------------------------------------------

# class_type -> (title, output (name, type) list); the subset of ComfyUI's nodes an Anima workflow uses.
_COMFY_NODES = {
    "UNETLoader": ("Load Diffusion Model", [("MODEL", "MODEL")]),
    "UnetLoaderGGUF": ("Unet Loader (GGUF)", [("MODEL", "MODEL")]),  # city96/ComfyUI-GGUF nodes.py
    "CLIPLoader": ("Load CLIP", [("CLIP", "CLIP")]),
    "VAELoader": ("Load VAE", [("VAE", "VAE")]),
    "LoraLoaderModelOnly": ("LoraLoaderModelOnly", [("MODEL", "MODEL")]),
    "ModelSamplingAuraFlow": ("ModelSamplingAuraFlow", [("MODEL", "MODEL")]),
    "CLIPTextEncode": ("CLIP Text Encode (Prompt)", [("CONDITIONING", "CONDITIONING")]),
    "EmptyLatentImage": ("Empty Latent Image", [("LATENT", "LATENT")]),
    "LoadImage": ("Load Image", [("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "LoadImageMask": ("Load Image (as Mask)", [("MASK", "MASK")]),
    "ImageScale": ("Upscale Image", [("IMAGE", "IMAGE")]),
    "ImageScaleBy": ("Upscale Image By", [("IMAGE", "IMAGE")]),
    "VAEEncode": ("VAE Encode", [("LATENT", "LATENT")]),
    "VAEEncodeForInpaint": ("VAE Encode (for Inpainting)", [("LATENT", "LATENT")]),
    "SetLatentNoiseMask": ("Set Latent Noise Mask", [("LATENT", "LATENT")]),
    "LatentUpscale": ("Upscale Latent", [("LATENT", "LATENT")]),
    "LatentUpscaleBy": ("Upscale Latent By", [("LATENT", "LATENT")]),
    "KSampler": ("KSampler", [("LATENT", "LATENT")]),
    # ComfyUI-NAG-Extended (BigStationW's pack; the fork that works on Anima keeps its nodes and inputs)
    "KSamplerWithNAG": ("KSamplerWithNAG", [("LATENT", "LATENT")]),
    "NAGCFGGuiderAdvanced": ("NAGCFGGuiderAdvanced", [("GUIDER", "GUIDER")]),
    "RandomNoise": ("RandomNoise", [("NOISE", "NOISE")]),
    "KSamplerSelect": ("KSamplerSelect", [("SAMPLER", "SAMPLER")]),
    "BasicScheduler": ("BasicScheduler", [("SIGMAS", "SIGMAS")]),
    "SamplerCustomAdvanced": ("SamplerCustomAdvanced", [("output", "LATENT"), ("denoised_output", "LATENT")]),
    "VAEDecode": ("VAE Decode", [("IMAGE", "IMAGE")]),
    # The reference ComfyUI's SaveImage passes its images on (RETURN_TYPES ("IMAGE",), RETURN_NAMES ("images",)).
    "SaveImage": ("Save Image", [("images", "IMAGE")]),
}
_STRING_WIDGETS = {"text", "filename_prefix"}  # the text widgets; every other text value is a list choice (COMBO)
_OPTIONAL_WIDGETS = {("CLIPLoader", "device")}  # drawn by the page as optional sockets (shape 7)
# ComfyUI separates a file's sub-folders with the separator of the machine it runs on (os.path.relpath), and a
# ComfyUI opening rdbt's graphs most likely runs where rdbt ran.
_COMFY_SEP = os.sep
# Number.MAX_SAFE_INTEGER + 1: ComfyUI's page holds widget values as JavaScript numbers, exact only below this.
PAGE_SEED_LIMIT = 2**53


def _file_name(component, default: str) -> str:
    """The name ComfyUI's loaders list a file under: the recorded path inside its models-type folder
    (`style/x.safetensors`), else the bare file name, the best guess for a recipe made before rdbt recorded it."""
    if isinstance(component, dict) and isinstance(component.get("relative"), str) and component["relative"]:
        return component["relative"].replace("/", _COMFY_SEP)
    if isinstance(component, dict) and component.get("file"):
        return Path(str(component["file"]).replace("\\", "/")).name
    return default


def page_text(text: str) -> str:
    """Widget text that ComfyUI's page turns back into `text` when it queues the workflow.

    The page rewrites every text widget marked dynamicPrompts (CLIPTextEncode's) with processDynamicPrompt
    (ComfyUI_frontend, packages/shared-frontend-utils/src/formatUtil.ts): it first deletes `//...` and `/*...*/`
    comments, then reads `\\c` as an escape kept as the two characters, `{a|b}` as a random choice (processed
    again), and at the end drops the backslash of every `\\{`, `\\}` and `\\|`. So: an empty choice `{}` is put
    between a `/` and a following `/` or `*` (no comment can start, and `{}` gives nothing); a run of backslashes
    before an ordinary character is written as escape pairs that keep it; before `{`, `}` or `|`, one backslash more,
    which the page drops, with the brace or bar itself escaped or given by a one-option choice `{\\{}`. A prompt
    that ends in an odd number of backslashes cannot be written (the page keeps backslashes in pairs); it keeps
    its last one doubled.
    """
    out, i, n = [], 0, len(text)
    while i < n:
        j = i
        while j < n and text[j] == "\\":
            j += 1
        k, c = j - i, text[j] if j < n else ""
        if c in ("{", "}", "|"):
            m = k + 1  # backslashes before the character in the page's intermediate text; it drops the last one
            out.append("\\\\" * (m // 2) + ("\\" + c if m % 2 else "{\\" + c + "}"))
        elif c:
            out.append("\\\\" * (k // 2) + ("\\" if k % 2 else "") + c)
            if c == "/" and j + 1 < n and text[j + 1] in "/*":
                out.append("{}")
        else:
            out.append("\\\\" * ((k + 1) // 2))
        i = j + 1
    return "".join(out)


def comfy_graphs(recipe: dict) -> tuple[dict, dict]:
    """(API `prompt` graph, UI `workflow` graph) of the Anima ComfyUI workflow that makes this recipe's image.

    The official template (anima.md §5.6) plus one LoraLoaderModelOnly per LoRA and, when the shift is not 3, a
    ModelSamplingAuraFlow node (multiplier 1, the semantics of rdbt's --shift; sampling.md §1.2). An init image
    starts from LoadImage (ImageScale lanczos when its size is not the size) -> VAEEncode, with a mask ->
    SetLatentNoiseMask or VAEEncodeForInpaint; a hires pass adds LatentUpscaleBy nearest-exact (or VAEDecode ->
    ImageScaleBy lanczos -> VAEEncode) and a second KSampler, or the By-less node where rdbt's multiple-of-16 size is
    not what the factor alone gives.
    """
    nodes: list[dict] = []  # {"id", "class", "title", "widgets": [(name, value)], "links": [(name, src, slot, type)]}

    def add(class_type, widgets=(), links=(), title=None, col=0):
        node = {"id": len(nodes) + 1, "class": class_type, "title": title or _COMFY_NODES[class_type][0],
                "widgets": list(widgets), "links": list(links), "col": col}
        nodes.append(node)
        return node["id"]

    unet_name = _file_name(recipe.get("model"), "anima.safetensors")
    if isinstance(recipe.get("model"), dict) and recipe["model"].get("format") == "gguf":
        unet = add("UnetLoaderGGUF", [("unet_name", unet_name)])  # UNETLoader lists no .gguf files
    else:
        unet = add("UNETLoader", [("unet_name", unet_name), ("weight_dtype", "default")])
    clip = add("CLIPLoader", [("clip_name", _file_name(recipe.get("text_encoder"), COMFY_DEFAULT_TE)),
                              ("type", "stable_diffusion"), ("device", "default")])
    vae = add("VAELoader", [("vae_name", _file_name(recipe.get("vae"), COMFY_DEFAULT_VAE))])
    model = unet
    for lora in recipe.get("loras") or []:
        model = add("LoraLoaderModelOnly", [("lora_name", _file_name(lora, f"{lora.get('name')}.safetensors")),
                                            ("strength_model", _weight(lora))],
                    [("model", model, 0, "MODEL")], col=1)
    shift = recipe.get("shift")
    if shift is not None and float(shift) != DEFAULT_SHIFT:
        model = add("ModelSamplingAuraFlow", [("shift", float(shift))], [("model", model, 0, "MODEL")], col=1)
    pos = add("CLIPTextEncode", [("text", recipe.get("prompt") or "")], [("clip", clip, 0, "CLIP")],
              title="CLIP Text Encode (Positive Prompt)", col=2)
    neg = add("CLIPTextEncode", [("text", recipe.get("negative") or "")], [("clip", clip, 0, "CLIP")],
              title="CLIP Text Encode (Negative Prompt)", col=2)
    width, height = int(recipe.get("width") or 1024), int(recipe.get("height") or 1024)
    image = recipe.get("init_image") if isinstance(recipe.get("init_image"), dict) else None
    mask = recipe.get("mask") if image and isinstance(recipe.get("mask"), dict) else None
    if image is None:
        latent = add("EmptyLatentImage", [("width", width), ("height", height), ("batch_size", 1)], col=2)
    else:
        pixels = add("LoadImage", [("image", _file_name(image, "input.png"))], col=2)
        if (image.get("width"), image.get("height")) != (width, height):
            pixels = add("ImageScale", [("upscale_method", "lanczos"), ("width", width), ("height", height),
                                        ("crop", "disabled")], [("image", pixels, 0, "IMAGE")], col=3)
        masks = [("mask", add("LoadImageMask", [("image", _file_name(mask, "mask.png")), ("channel", "red")],
                              col=2), 0, "MASK")] if mask else []
        encode = [("pixels", pixels, 0, "IMAGE"), ("vae", vae, 0, "VAE")]
        if mask and recipe.get("inpaint") == "fill":
            latent = add("VAEEncodeForInpaint", [("grow_mask_by", int(recipe.get("grow_mask") or 0))],
                         encode + masks, col=3)
        else:
            latent = add("VAEEncode", [], encode, col=3)
            if mask:
                latent = add("SetLatentNoiseMask", [], [("samples", latent, 0, "LATENT")] + masks, col=3)
    seed, steps = int(recipe.get("seed") or 0), int(recipe.get("steps") or 30)
    cfg = float(recipe.get("cfg") if recipe.get("cfg") is not None else 4.0)
    sampler_name, scheduler = recipe.get("sampler") or "er_sde", recipe.get("scheduler") or "simple"

    conds = [("model", model, 0, "MODEL"), ("positive", pos, 0, "CONDITIONING"), ("negative", neg, 0, "CONDITIONING")]
    nag = [(key, float(recipe[key])) for key in ("nag_scale", "nag_tau", "nag_alpha", "nag_sigma_end")] \
        if recipe.get("nag_scale") else []
    nag_start = float(recipe.get("nag_sigma_start") or 0) if nag else None

    def ksampler(latent, steps, sampler_name, scheduler, denoise, col):
        if not nag:
            return add("KSampler", [("seed", seed), ("steps", steps), ("cfg", cfg), ("sampler_name", sampler_name),
                                    ("scheduler", scheduler), ("denoise", float(denoise))],
                       conds + [("latent_image", latent, 0, "LATENT")], col=col)
        # NAG: the negative prompt is also the NAG negative. KSamplerWithNAG fixes sigma_start at 14.7, which no flow
        # sigma (at most 1) exceeds; a window that starts lower needs the pack's guider, the one node that takes it.
        guided = conds + [("nag_negative", neg, 0, "CONDITIONING"), ("latent_image", latent, 0, "LATENT")]
        if nag_start >= 1:
            return add("KSamplerWithNAG", [("seed", seed), ("steps", steps), ("cfg", cfg), *nag,
                                           ("sampler_name", sampler_name), ("scheduler", scheduler),
                                           ("denoise", float(denoise))], guided, col=col)
        guider = add("NAGCFGGuiderAdvanced", [("cfg", cfg), *nag[:3], ("nag_sigma_start", nag_start), nag[3],
                                              ("display_logs", False)], guided, col=col)
        return add("SamplerCustomAdvanced", [], [
            ("noise", add("RandomNoise", [("noise_seed", seed)], col=col), 0, "NOISE"),
            ("guider", guider, 0, "GUIDER"),
            ("sampler", add("KSamplerSelect", [("sampler_name", sampler_name)], col=col), 0, "SAMPLER"),
            ("sigmas", add("BasicScheduler", [("scheduler", scheduler), ("steps", steps), ("denoise", float(denoise))],
                           [("model", model, 0, "MODEL")], col=col), 0, "SIGMAS"),
            ("latent_image", latent, 0, "LATENT")], col=col)

    sampled = ksampler(latent, steps, sampler_name, scheduler, recipe.get("denoise") or 1.0 if image else 1.0, 4)
    scale = float(recipe.get("hires") or 0)
    if scale:
        w2, h2 = hires_size(width, height, scale)
        if recipe.get("hires_upscaler") == "lanczos":
            decoded = add("VAEDecode", [], [("samples", sampled, 0, "LATENT"), ("vae", vae, 0, "VAE")], col=5)
            source, by, unit = ("image", decoded, 0, "IMAGE"), ("ImageScaleBy", "ImageScale"), 1
        else:
            source, by, unit = ("samples", sampled, 0, "LATENT"), ("LatentUpscaleBy", "LatentUpscale"), 8
        method = "lanczos" if unit == 1 else "nearest-exact"
        if (round(width // unit * scale) * unit, round(height // unit * scale) * unit) == (w2, h2):
            up = add(by[0], [("upscale_method", method), ("scale_by", scale)], [source], col=5)
        else:  # ComfyUI's own rounding of the factor would not give rdbt's multiple-of-16 size
            up = add(by[1], [("upscale_method", method), ("width", w2), ("height", h2), ("crop", "disabled")],
                     [source], col=5)
        if unit == 1:
            up = add("VAEEncode", [], [("pixels", up, 0, "IMAGE"), ("vae", vae, 0, "VAE")], col=5)
        sampled = ksampler(up, int(recipe.get("hires_steps") or steps), recipe.get("hires_sampler") or sampler_name,
                           recipe.get("hires_scheduler") or scheduler, recipe.get("hires_denoise") or 0.5, 6)
    decoded = add("VAEDecode", [], [("samples", sampled, 0, "LATENT"), ("vae", vae, 0, "VAE")], col=7)
    add("SaveImage", [("filename_prefix", "rdbt")], [("images", decoded, 0, "IMAGE")], col=8)

    api = {}
    for n in nodes:
        inputs = dict(n["widgets"])
        inputs.update({name: [str(src), slot] for name, src, slot, _ in n["links"]})
        api[str(n["id"])] = {"inputs": inputs, "class_type": n["class"], "_meta": {"title": n["title"]}}

    links, outputs_links = [], {}
    for n in nodes:
        for target_slot, (_, src, slot, typ) in enumerate(n["links"]):
            link_id = len(links) + 1
            links.append([link_id, src, slot, n["id"], target_slot, typ])
            outputs_links.setdefault((src, slot), []).append(link_id)
    ui_nodes, rows = [], {}
    link_ids = iter(range(1, len(links) + 1))
    for order, n in enumerate(nodes):
        row = rows[n["col"]] = rows.get(n["col"], -1) + 1
        widgets = [page_text(v) if n["class"] == "CLIPTextEncode" and k == "text" else v for k, v in n["widgets"]]
        if n["class"] in ("KSampler", "KSamplerWithNAG", "RandomNoise"):
            widgets.insert(1, "fixed")  # the UI's control_after_generate widget sits right after the seed
        elif n["class"] in ("LoadImage", "LoadImageMask"):
            widgets.append("image")  # the UI's upload button is a widget too
        ui_nodes.append({
            "id": n["id"], "type": n["class"], "pos": [50 + 420 * n["col"], 50 + 260 * row], "size": [380, 200],
            "flags": {}, "order": order, "mode": 0, "inputs": _page_inputs(n, link_ids),
            "outputs": [_page_output(name, typ, slot, outputs_links.get((n["id"], slot)))
                        for slot, (name, typ) in enumerate(_COMFY_NODES[n["class"]][1])],
            "title": n["title"], "properties": {"Node name for S&R": n["class"]}, "widgets_values": widgets,
        })
    workflow = {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": ui_nodes, "links": links,
                "groups": [], "config": {}, "extra": {"rdbt": {"schema": recipe.get("schema", SCHEMA)}},
                "version": 0.4}
    return api, workflow


def _page_inputs(node: dict, link_ids) -> list[dict]:
    """A node's input slots as ComfyUI's page saves them: its sockets in order, then one slot per widget (the page
    lets any widget take a link; unlinked, `link` is null)."""
    slots = [{"localized_name": name, "name": name, "type": typ, "link": next(link_ids)}
             for name, _, _, typ in node["links"]]
    for name, value in node["widgets"]:
        typ = ("BOOLEAN" if isinstance(value, bool) else "INT" if isinstance(value, int) else
               "FLOAT" if isinstance(value, float) else "STRING" if name in _STRING_WIDGETS else "COMBO")
        shape = {"shape": 7} if (node["class"], name) in _OPTIONAL_WIDGETS else {}
        slots.append({"localized_name": name, "name": name, **shape, "type": typ, "widget": {"name": name},
                      "link": None})
    return slots


def _page_output(name: str, typ: str, slot: int, links: list | None) -> dict:
    # The page saves an output that was never linked with links null and no slot_index (ComfyUI_frontend,
    # src/lib/litegraph/src/node/slotUtils.ts outputAsSerialisable: `links: ids.length ? ids : null`).
    if not links:
        return {"localized_name": name, "name": name, "type": typ, "links": None}
    return {"localized_name": name, "name": name, "type": typ, "slot_index": slot, "links": links}


def _comfy_recipe(graph: dict) -> dict:
    """Recipe fields from a ComfyUI API graph: the KSampler that feeds a VAEDecode, and what its inputs lead to."""
    if not isinstance(graph, dict):
        return {}
    nodes = {str(k): v for k, v in graph.items() if isinstance(v, dict)}

    def node_of(link):
        if isinstance(link, list) and link and str(link[0]) in nodes:
            return nodes[str(link[0])]
        return None

    def inputs(node):
        return node.get("inputs") or {} if isinstance(node, dict) else {}

    def text_of(value, depth=0):
        # A prompt is a string, or a link to a primitive / text node holding one.
        if isinstance(value, str) or depth > 8:
            return value if isinstance(value, str) else None
        src = node_of(value)
        for key in ("text", "string", "value", "prompt", "text_g"):
            if key in inputs(src):
                return text_of(inputs(src)[key], depth + 1)
        return None

    samplers = [(k, v) for k, v in nodes.items()
                if v.get("class_type") in ("KSampler", "KSamplerAdvanced", "KSamplerWithNAG")]
    if not samplers:
        return {}
    decoded = {str(inputs(v).get("samples", [None])[0]) for v in nodes.values() if v.get("class_type") == "VAEDecode"}
    sampler_id, ks = next(((k, v) for k, v in samplers if k in decoded), samplers[0])
    ki = inputs(ks)
    def scalar(v):  # a linked widget (["id", slot]) is not known without running the graph
        return None if isinstance(v, (list, dict)) else v

    recipe: dict = {
        "seed": scalar(ki.get("seed", ki.get("noise_seed"))), "steps": scalar(ki.get("steps")),
        "cfg": scalar(ki.get("cfg")), "sampler": scalar(ki.get("sampler_name")),
        "scheduler": scalar(ki.get("scheduler")), "prompt": "", "negative": "", "loras": [],
    }
    for key in ("positive", "negative", "nag_negative"):
        cond = node_of(ki.get(key))
        for _ in range(16):  # walk through conditioning modifiers (ConditioningZeroOut, ...) to the text encoder
            if cond is None or "text" in inputs(cond) or "text_g" in inputs(cond):
                break
            cond = node_of(next((v for v in inputs(cond).values() if isinstance(v, list)), None))
        if cond is not None:
            text = text_of(inputs(cond).get("text", inputs(cond).get("text_g")))
            recipe["prompt" if key == "positive" else key] = text or ""
            clip = node_of(inputs(cond).get("clip"))
            for _ in range(16):
                if clip is None or "clip_name" in inputs(clip) or "clip_name1" in inputs(clip):
                    break
                clip = node_of(inputs(clip).get("clip"))
            if clip is not None and "text_encoder" not in recipe:
                name = inputs(clip).get("clip_name", inputs(clip).get("clip_name1"))
                if isinstance(name, str):
                    recipe["text_encoder"] = _component(name)
    if ks.get("class_type") == "KSamplerWithNAG":
        recipe.update({key: scalar(ki.get(key)) for key in ("nag_scale", "nag_tau", "nag_alpha", "nag_sigma_end")})
        # rdbt has one negative prompt; at CFG 1 only the NAG negative is used
        nag_negative = recipe.pop("nag_negative", None)
        if nag_negative is not None and (recipe["cfg"] == 1 or not recipe["negative"]):
            recipe["negative"] = nag_negative
    recipe.pop("nag_negative", None)
    latent = node_of(ki.get("latent_image"))
    if latent is not None and "width" in inputs(latent):
        recipe["width"], recipe["height"] = scalar(inputs(latent).get("width")), scalar(inputs(latent).get("height"))
    model, loras = node_of(ki.get("model")), []
    for _ in range(64):
        if model is None:
            break
        mi, ct = inputs(model), model.get("class_type", "")
        if "lora_name" in mi:
            name = mi["lora_name"]
            weight = mi.get("strength_model", 1.0)
            weight = float(weight) if isinstance(weight, (int, float)) else 1.0  # a linked value: unknown here
            loras.append({**_component(str(name)), "weight": weight, "a1111_hash": None})
        elif ct.startswith("ModelSampling") and isinstance(mi.get("shift"), (int, float)) and "shift" not in recipe:
            recipe["shift"] = float(mi["shift"])
        for key in ("unet_name", "ckpt_name", "model_name"):
            if isinstance(mi.get(key), str):
                recipe["model"] = _component(mi[key])
        model = node_of(mi.get("model"))
    recipe["loras"] = loras[::-1]  # walked from the sampler back, applied from the loader forward
    for node in nodes.values():
        if node.get("class_type") == "VAEDecode" and str(inputs(node).get("samples", [None])[0]) == sampler_id:
            vae = node_of(inputs(node).get("vae"))
            if vae is not None and isinstance(inputs(vae).get("vae_name"), str):
                recipe["vae"] = _component(inputs(vae)["vae_name"])
    return recipe


def _component(file: str) -> dict:
    name = Path(file.replace("\\", "/")).name
    return {"name": name.rsplit(".", 1)[0] if "." in name else name, "file": file, "hash": None}


def _comfy_workflow_recipe(workflow: dict) -> dict:
    """The little a UI graph alone tells: the first KSampler's widget values."""
    for node in workflow.get("nodes") or [] if isinstance(workflow, dict) else []:
        w = node.get("widgets_values") if isinstance(node, dict) else None
        if node.get("type") == "KSampler" and isinstance(w, list) and len(w) >= 7:
            return {"seed": w[0], "steps": w[2], "cfg": w[3], "sampler": w[4], "scheduler": w[5], "loras": []}
    return {"loras": []}


# ---------------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------------


def _to_image(pixels):
    from PIL import Image

    if isinstance(pixels, Image.Image):
        return pixels
    shape, dtype = getattr(pixels, "shape", None), str(getattr(pixels, "dtype", type(pixels).__name__))
    if shape is None or dtype != "uint8" or len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (3, 4)):
        raise OutputError(f"cannot save pixels of shape {shape} and dtype {dtype} as PNG: expected uint8 HxWx3")
    return Image.fromarray(pixels)


def text_chunks(recipe: dict) -> dict[str, str]:
    """The chunk texts save_png writes for a recipe, by keyword, in writing order."""
    prompt, workflow = comfy_graphs(recipe)
    return {
        "parameters": to_parameters_text(recipe),
        "rdbt": json.dumps(recipe, default=str),  # default=str: a stray Path must not lose the image
        "prompt": json.dumps(prompt),
        "workflow": json.dumps(workflow),
    }


def _pnginfo(recipe: dict):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, text in text_chunks(recipe).items():
        if text.isascii():
            info.add_text(key, text)
        else:
            info.add_itxt(key, text, lang="", tkey="", zip=False)
    return info


def png_bytes(pixels, recipe: dict | None = None) -> bytes:
    """The PNG that save_png writes, in memory: what the server answers (A1111 base64 images, rdbt's native API)."""
    import io

    out = io.BytesIO()
    _to_image(pixels).save(out, format="PNG", pnginfo=_pnginfo(recipe) if recipe is not None else None,
                           compress_level=4)
    return out.getvalue()


def default_stem(recipe: dict | None) -> str:
    """`rdbt-YYYYmmdd-HHMMSS-<seed>`: sorts by time, and the seed names the image; numbering settles collisions."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    seed = (recipe or {}).get("seed")
    return f"rdbt-{stamp}-{seed}" if seed is not None else f"rdbt-{stamp}"


def _split_dest(dest, recipe, stem) -> tuple[Path, str]:
    dest = Path(dest)
    raw = str(dest)
    if dest.is_dir() or raw.endswith(("/", os.sep)) or dest.suffix.lower() != ".png":
        return dest, stem or default_stem(recipe)
    return dest.parent, dest.stem


def check_destination(dest) -> Path:
    """Fail before anything loads if save_png could not write to `dest` (a .png path or a folder, created later)."""
    folder, _ = _split_dest(dest, None, "probe")
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"{folder}: output folder cannot be created or written ({probe} is in the way or read-only); "
                          "choose another with --out")
    return Path(dest)


def _ensure_folder(folder: Path):
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(
            f"{folder}: cannot create the output folder ({e.strerror or e}); choose another folder or fix its path"
        ) from None
    if not folder.is_dir():
        raise OutputError(f"{folder}: is not a folder; choose another output folder")


_TEMP_OWNER = re.compile(r"^\..+\.(?P<host>[^.]+)-(?P<pid>\d+)-[0-9a-f]{12}\.tmp$")
_swept: set[Path] = set()


def _sweep_stale_temps(folder: Path) -> None:
    """Remove the temp files that processes of this machine left when they were killed (SIGKILL, a crash), once per
    folder and process. A temp file's name carries its writer's host and pid; another host's files are left alone
    (a shared output folder), and so are those of processes that still run."""
    if folder in _swept:
        return
    _swept.add(folder)
    host = _host()
    try:
        names = [e.name for e in os.scandir(folder) if e.name.endswith(".tmp")]
    except OSError:
        return
    for name in names:
        m = _TEMP_OWNER.match(name)
        if not m or m["host"] != host:
            continue
        try:
            os.kill(int(m["pid"]), 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except OSError:  # running under another user, or unknowable: keep it
            continue
        try:
            os.unlink(folder / name)
        except OSError:
            pass


def _host() -> str:
    import socket

    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40] or "host"


def _new_temp(folder: Path, stem: str) -> tuple[int, Path]:
    # O_EXCL with a random name: no clash between writers, and the umask applies (mkstemp would force 0600).
    _sweep_stale_temps(folder)
    for _ in range(100):
        tmp = folder / f".{stem}.{_host()}-{os.getpid()}-{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue
        except OSError as e:
            raise OutputError(
                f"{folder}: output folder is not writable ({e.strerror or e}); choose another folder or fix its "
                "permissions"
            ) from None
    raise OutputError(f"{folder}: cannot create a temporary file; clean up stray .tmp files there")


def _candidates(folder: Path, stem: str):
    """stem.png, then stem-0001.png, ... starting after the highest number present, so names sort in save order."""
    pattern = re.compile(re.escape(stem) + r"-(\d{4,})\.png")
    try:
        numbers = [int(m.group(1)) for e in os.scandir(folder) if (m := pattern.fullmatch(e.name))]
    except OSError:
        numbers = []
    if not numbers:
        yield folder / f"{stem}.png"
    n = max(numbers, default=0)
    while True:
        n += 1
        yield folder / f"{stem}-{n:04d}.png"


def _claim(tmp: Path, folder: Path, stem: str) -> Path:
    """Give the finished temp file its final name with a create-if-absent operation; never replaces a file."""
    use_link = True
    for final in _candidates(folder, stem):
        if use_link:
            try:
                os.link(tmp, final)
            except FileExistsError:
                continue
            except OSError:
                use_link = False  # no hard links on this file system: reserve the name with O_EXCL, then move
            else:
                os.unlink(tmp)
                return final
        try:
            os.close(os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        try:
            os.replace(tmp, final)
        except OSError:
            os.unlink(final)  # the empty placeholder is ours; leave nothing half-made
            raise
        return final
    raise AssertionError("unreachable")


def save_png(pixels, dest, recipe: dict | None = None, *, metadata: bool = True, stem: str | None = None) -> Path:
    """Write an image atomically under a new name and return the path; an existing file is never overwritten.

    pixels: uint8 HxWx3 array or a PIL image. dest: a `.png` path, or a folder (created if missing) in which the file is
    named `<stem>.png` (default stem: see default_stem). A taken name moves on to `<stem>-0001.png`, `-0002`, ...
    With metadata and a recipe, the four text chunks of the module docstring are written.
    """
    image = _to_image(pixels)
    folder, stem = _split_dest(dest, recipe, stem)
    _ensure_folder(folder)
    pnginfo = _pnginfo(recipe) if metadata and recipe is not None else None
    fd, tmp = _new_temp(folder, stem)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=pnginfo, compress_level=4)
            f.flush()
            os.fsync(f.fileno())
        return _claim(tmp, folder, stem)
    except OSError as e:
        raise OutputError(f"{folder}: could not write the image: {io_problem(e)}") from None
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------


def _inflate(data: bytes, path) -> bytes:
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, _MAX_TEXT)
    except zlib.error:
        raise OutputError(f"{path}: corrupt PNG (a compressed text chunk does not inflate)") from None
    if d.unconsumed_tail:
        raise OutputError(f"{path}: corrupt PNG (a compressed text chunk is larger than {_MAX_TEXT >> 20} MiB)")
    return out


def read_text_chunks(path) -> dict[str, str]:
    """All tEXt / zTXt / iTXt chunks of a PNG by keyword (tEXt and zTXt decoded as Latin-1, iTXt as UTF-8).

    Checks the signature, every chunk's length and CRC, and that IEND is reached; pixel data is not decoded.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise OutputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise OutputError(f"{path}: is a folder, not a PNG file") from None
    except OSError as e:
        raise OutputError(f"{path}: cannot read ({e.strerror or e})") from None
    if not data.startswith(_PNG_SIGNATURE):
        raise OutputError(f"{path}: not a PNG file")
    texts: dict[str, str] = {}
    pos = len(_PNG_SIGNATURE)
    while True:
        if pos + 8 > len(data):
            raise OutputError(f"{path}: corrupt PNG (truncated before the IEND chunk)")
        length, kind = struct.unpack(">I4s", data[pos: pos + 8])
        body_end = pos + 8 + length
        if body_end + 4 > len(data):
            raise OutputError(f"{path}: corrupt PNG (truncated inside a {kind.decode('latin-1')!r} chunk)")
        body = data[pos + 8: body_end]
        (crc,) = struct.unpack(">I", data[body_end: body_end + 4])
        if zlib.crc32(kind + body) != crc:
            raise OutputError(f"{path}: corrupt PNG (bad checksum in a {kind.decode('latin-1')!r} chunk)")
        pos = body_end + 4
        if kind == b"IEND":
            return texts
        try:
            if kind == b"tEXt":
                key, _, text = body.partition(b"\0")
                texts[key.decode("latin-1")] = text.decode("latin-1")
            elif kind == b"zTXt":
                key, _, rest = body.partition(b"\0")
                texts[key.decode("latin-1")] = _inflate(rest[1:], path).decode("latin-1")
            elif kind == b"iTXt":
                key, _, rest = body.partition(b"\0")
                compressed, rest = rest[0], rest[2:]
                _lang, _, rest = rest.partition(b"\0")
                _tkey, _, text = rest.partition(b"\0")
                texts[key.decode("latin-1")] = (_inflate(text, path) if compressed else text).decode("utf-8")
        except (IndexError, UnicodeDecodeError):
            raise OutputError(f"{path}: corrupt PNG (malformed {kind.decode('latin-1')!r} text chunk)") from None


def read_png(path) -> dict:
    """{"source": "rdbt" | "a1111" | "comfyui", "recipe": normalised recipe fields, "raw": {chunk keyword: text}}.

    Prefers rdbt's own chunk, then A1111 `parameters`, then ComfyUI's `prompt` (and, without it, `workflow`) graph.
    """
    raw = read_text_chunks(path)
    if "rdbt" in raw:
        try:
            recipe = json.loads(raw["rdbt"])
        except (ValueError, RecursionError):  # RecursionError: JSON nested past Python's limit
            recipe = None
        if isinstance(recipe, dict) and str(recipe.get("schema", "")).startswith("rdbt.recipe/"):
            return {"source": "rdbt", "recipe": recipe, "raw": raw}
    if "Steps:" in raw.get("parameters", ""):
        return {"source": "a1111", "recipe": parse_parameters_text(raw["parameters"]), "raw": raw}
    for key, parse in (("prompt", _comfy_recipe), ("workflow", _comfy_workflow_recipe)):
        if key in raw:
            try:
                recipe = parse(json.loads(raw[key]))
            except (ValueError, TypeError, AttributeError, KeyError, IndexError, RecursionError):
                continue  # not a graph this reader understands; try the next source
            if recipe.get("seed") is not None or recipe.get("prompt"):
                return {"source": "comfyui", "recipe": recipe, "raw": raw}
    if raw.get("parameters", "").strip():
        return {"source": "a1111", "recipe": parse_parameters_text(raw["parameters"]), "raw": raw}
    if "prompt" in raw or "workflow" in raw:  # a graph without a sampler rdbt recognises: raw text only
        return {"source": "comfyui", "recipe": {"loras": []}, "raw": raw}
    raise OutputError(f"{path}: no generation metadata found (saved with --no-metadata, or stripped by another tool)")


def _record_problem(key: str, value) -> str | None:
    """What is wrong with one recorded field, for `inspect` to skip it; None when it can be shown."""
    setting = next((s for s in SETTINGS if s.recipe == key), None)
    if value is None:
        return None  # not recorded (a setting that does not apply)
    if setting is not None:
        if setting.type is Path and isinstance(value, dict):
            value = value.get("path") or value.get("file")
        return setting.problem(setting.coerce(value))
    if key in ("model", "text_encoder", "vae"):
        ok = value is None or isinstance(value, str) or (
            isinstance(value, dict) and all(isinstance(v, (str, int, float, type(None))) for v in value.values()))
        return None if ok else f"{key} is neither a file name nor a file record"
    if key == "loras":
        if not isinstance(value, list):
            return "loras is not a list"
        for entry in value:
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                return f"LoRA entry {str(entry)[:60]} has no name"
            if entry.get("weight") is not None and not is_number(entry["weight"]):
                return f"LoRA {entry['name'][:60]} weight {str(entry['weight'])[:40]} is not a number"
        return None
    if key == "extra" and not isinstance(value, dict):
        return "extra is not a table"
    return None


def inspectable(info: dict) -> dict:
    """read_png's result for `rdbt inspect`: every recorded field whose value breaks its rule (a wrong type, an absurd
    number, NaN, a lone surrogate) is left out of the recipe and listed under "skipped" with the reason."""
    recipe, skipped = {}, []
    for key, value in (info.get("recipe") or {}).items():
        try:
            problem = _record_problem(key, value)
        except (TypeError, ValueError, AttributeError, OverflowError, RecursionError) as exc:
            problem = f"{key}: unreadable ({exc.__class__.__name__})"
        if problem:
            skipped.append(f"{key} ({problem[:200]})")
        else:
            recipe[key] = value
    return {**info, "recipe": recipe, "skipped": skipped}


def printable(text: str) -> str:
    """Text safe to print on any terminal: lone surrogates (from hostile metadata) shown as \\udcxx escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def page_notes(info: dict) -> list[str]:
    """What ComfyUI's page would change when it opens read_png's image: a seed above 2^53 it cannot hold."""
    seed = (info.get("recipe") or {}).get("seed")
    if isinstance(seed, int) and seed >= PAGE_SEED_LIMIT and "workflow" in (info.get("raw") or {}):
        return [f"seed {seed} is above 2^53, which ComfyUI's page cannot hold: it rounds the seed to "
                f"{_page_number(seed)} when the workflow is opened there, so that makes another image (the prompt "
                "chunk, queued through ComfyUI's API, keeps it exact)"]
    return []


def _page_number(n: int) -> int:
    """The integer a JavaScript number holding `n` stands for (the nearest double): what the page shows and runs."""
    try:
        return int(float(n))
    except OverflowError:
        return n


def _fmt_component(c) -> str | None:
    if not isinstance(c, dict) or not (c.get("name") or c.get("file")):
        return None
    label = c.get("file") or c.get("name")
    if c.get("format") == "gguf":  # the quantisation changes the image as much as the file does
        label = f"{label} (GGUF {c.get('quant') or '?'})"
    return f"{label} [{c['hash']}]" if c.get("hash") else str(label)


def _fmt_input(record: dict) -> str:
    size = f"{record['width']}x{record['height']}, " if record.get("width") and record.get("height") else ""
    digest = f"sha256 {str(record['sha256'])[:10]}" if record.get("sha256") else "no hash"
    return f"{record.get('path') or record.get('file')} ({size}{digest})"


_SUMMARISED = {s.recipe for s in SETTINGS if s.recipe} | {
    "schema", "rdbt_version", "generator", "model", "text_encoder", "vae", "loras", "preset", "device", "dtype", "index",
    "extra",
}


def summarise(info: dict) -> str:
    """A readable multi-line summary of read_png's result, for `rdbt inspect`."""
    r = info.get("recipe") or {}
    src = info.get("source", "?")
    if src == "rdbt" and r.get("rdbt_version"):
        src = f"rdbt {r['rdbt_version']}"
    elif r.get("generator"):
        src = f"{src} ({r['generator']})"
    rows: list[tuple[str, str]] = [("source", src)]

    def add(label, value):
        if value is not None and value != "":
            rows.append((label, str(value)))

    for setting in SETTINGS:  # every recorded setting that applies, in the table's order; width and height as one
        key = setting.recipe
        if setting.name == "width":
            if r.get("width") and r.get("height"):
                add("size", f"{r['width']}x{r['height']}")
        elif key and setting.name != "height" and setting.applies_to(r):
            value = r.get(key)
            add(key, _fmt_input(value) if isinstance(value, dict) else _num(value) if isinstance(value, float) else value)
    for note in page_notes(info):
        add("note", note)
    add("model", _fmt_component(r.get("model")))
    add("text encoder", _fmt_component(r.get("text_encoder")))
    add("vae", _fmt_component(r.get("vae")))
    for lora in r.get("loras") or []:
        h = _lora_hash(lora)
        weight = lora.get("weight")
        label = f"{lora.get('file') or lora.get('name')} x {_num(float(weight)) if weight is not None else '?'}"
        add("lora", f"{label} [{h}]" if h else label)
    add("preset", r.get("preset"))
    if r.get("device") or r.get("dtype"):
        add("device", " ".join(str(r[k]) for k in ("device", "dtype") if r.get(k)))
    add("index", r.get("index"))
    for key, value in (r.get("extra") or {}).items():
        add(key, value)
    for key, value in r.items():  # extra recipe keys (e.g. a batch record), shown as JSON
        if key not in _SUMMARISED and value not in (None, "", [], {}):
            try:
                add(key, value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
            except (ValueError, RecursionError):
                info.setdefault("skipped", []).append(f"{key} (nested too deeply to show)")
    for item in info.get("skipped") or []:
        add("skipped", item)
    raw = info.get("raw") or {}
    if raw:
        add("chunks", ", ".join(f"{k} ({len(v.encode('utf-8'))} B)" for k, v in raw.items()))
    width = max(len(label) for label, _ in rows)
    out = []
    for label, value in rows:
        first, *rest = value.split("\n")
        out.append(f"{label + ':':<{width + 1}} {first}")
        out += [f"{'':<{width + 1}} {line}" for line in rest]
    return "\n".join(out)
