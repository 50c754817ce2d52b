"""The A1111 web API's JSON, both ways: a txt2img/img2img request as rdbt settings, and rdbt's images as the response
A1111 clients (webuiapi, Open WebUI, SillyTavern, Krita plugins) read.

Labels ("Euler a", "DPM++ 2M SDE", "Karras") come from the settings table's A1111 names, `<lora:name:w>` tags and the
infotext from metadata.py, so the server writes exactly what a saved PNG says. Values are checked by the table's rules,
with the A1111 field's name in front of the problem. No torch and no web framework here.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import time
from dataclasses import dataclass, field

from rdbt_cli import metadata, settings
from rdbt_cli.config import SAMPLER_NAMES, SCHEDULER_NAMES, LoraSpec
from rdbt_cli.errors import ConfigError

# A1111 request field -> setting name, for the fields that are one setting each.
FIELDS = {"negative_prompt": "negative", "seed": "seed", "steps": "steps", "cfg_scale": "cfg", "width": "width",
          "height": "height"}
_FIELD_OF = {v: k for k, v in FIELDS.items()} | {
    "sampler": "sampler_name", "scheduler": "scheduler", "count": "batch_size x n_iter", "hires": "hr_scale",
    "hires_steps": "hr_second_pass_steps", "hires_denoise": "denoising_strength", "denoise": "denoising_strength",
    "hires_sampler": "hr_sampler_name", "hires_scheduler": "hr_scheduler", "loras": "<lora:...> tags"}
# Labels A1111 clients send that mean "the default" (webuiapi's scheduler default is "automatic").
_DEFAULT_LABELS = {"", "automatic", "default", "use same sampler", "use same scheduler", "none"}
HIRES_UPSCALERS = {"latent": "latent", "lanczos": "lanczos"}  # A1111 "Latent (nearest-exact)" etc. start with these


@dataclass
class Request:
    """An A1111 request as rdbt settings: the values by setting name, and the input images as bytes."""

    values: dict
    init_image: bytes | None = None
    mask: bytes | None = None
    invert_mask: bool = False
    model: str | None = None  # override_settings.sd_model_checkpoint
    send_images: bool = True
    loras: list[LoraSpec] = field(default_factory=list)


def sampler(label, what: str = "sampler_name") -> tuple[str | None, str | None]:
    """(sampler, scheduler) for an A1111 sampler label or an rdbt name; old labels carry the scheduler."""
    if label is None or (isinstance(label, str) and label.strip().lower() in _DEFAULT_LABELS):
        return None, None
    if not isinstance(label, str):
        raise ConfigError(f"{what} must be a string, not {label!r}")
    if label in SAMPLER_NAMES:
        return label, None
    name, scheduler_name = metadata.sampler_from_label(label)
    if name not in SAMPLER_NAMES:
        offered = ", ".join(dict.fromkeys(settings.A1111_SAMPLERS.get(n, n) for n in SAMPLER_NAMES))
        raise ConfigError(f"{what}: rdbt has no sampler {label!r}; use one of {offered}")
    return name, scheduler_name


def scheduler(label, what: str = "scheduler") -> str | None:
    if label is None or (isinstance(label, str) and label.strip().lower() in _DEFAULT_LABELS):
        return None
    if not isinstance(label, str):
        raise ConfigError(f"{what} must be a string, not {label!r}")
    if label in SCHEDULER_NAMES:
        return label
    names = {v.lower(): k for k, v in settings.A1111_SCHEDULERS.items() if k in SCHEDULER_NAMES}
    if label.strip().lower() not in names:
        offered = ", ".join(settings.A1111_SCHEDULERS.get(n, n) for n in SCHEDULER_NAMES)
        raise ConfigError(f"{what}: rdbt has no scheduler {label!r}; use one of {offered}")
    return names[label.strip().lower()]


def decode_image(data, what: str) -> bytes:
    """Base64 image bytes (with or without a data: prefix), checked to be an image Pillow opens."""
    if not isinstance(data, str) or not data:
        raise ConfigError(f"{what} must be a base64-encoded image")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=False)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{what} is not valid base64") from None
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise ConfigError(f"{what} is not an image Pillow can read (PNG, JPEG or WebP, base64-encoded)") from None
    return raw


def _number(body: dict, key: str, default):
    value = body.get(key, default)
    return default if value is None else value


def parse(body: dict, img2img: bool) -> Request:
    """The settings an A1111 txt2img/img2img body asks for; unknown fields are ignored as A1111 ignores them."""
    if not isinstance(body, dict):
        raise ConfigError("the request body must be a JSON object")
    values: dict = {}
    prompt = body.get("prompt", "")
    if not isinstance(prompt, str):
        raise ConfigError(f"prompt must be a string, not {prompt!r}")
    prompt, loras = metadata.lora_tags(prompt)
    values["prompt"] = prompt
    for key, name in FIELDS.items():
        if body.get(key) is not None:
            values[name] = body[key]
    values["sampler"], implied = sampler(body.get("sampler_name") or body.get("sampler_index"))
    values["scheduler"] = scheduler(body.get("scheduler")) or implied
    batch_size, n_iter = _number(body, "batch_size", 1), _number(body, "n_iter", 1)
    for key, n in (("batch_size", batch_size), ("n_iter", n_iter)):
        if not settings.is_int(n) or n < 1:
            raise ConfigError(f"{key} must be a whole number of at least 1, not {n!r}")
    values["count"] = batch_size * n_iter
    denoising = body.get("denoising_strength")
    request = Request(values, loras=loras, send_images=body.get("send_images", True) is not False)
    if img2img:
        images = body.get("init_images") or []
        if not isinstance(images, list) or not images:
            raise ConfigError("init_images must be a list with one base64-encoded image")
        request.init_image = decode_image(images[0], "init_images[0]")
        values["denoise"] = 0.75 if denoising is None else denoising
        if body.get("mask"):
            request.mask = decode_image(body["mask"], "mask")
            request.invert_mask = bool(body.get("inpainting_mask_invert"))
            # A1111's "original" keeps the picture under the mask (our blend); its fills start from something else,
            # which is our fill, but only where the whole of the mask is redrawn.
            fill = body.get("inpainting_fill", 1)
            values["inpaint"] = "fill" if fill != 1 and values["denoise"] == 1 else "blend"
    if body.get("enable_hr") and not img2img:
        scale = _number(body, "hr_scale", 2.0)
        rx, ry = _number(body, "hr_resize_x", 0), _number(body, "hr_resize_y", 0)
        w, h = values.get("width", 512), values.get("height", 512)
        if settings.is_number(rx) and settings.is_number(ry) and (rx or ry) and settings.is_number(w) and w and h:
            scale = max(rx / w, ry / h)
        values["hires"] = scale
        if body.get("hr_second_pass_steps"):
            values["hires_steps"] = body["hr_second_pass_steps"]
        if denoising is not None:
            values["hires_denoise"] = denoising
        values["hires_sampler"], _ = sampler(body.get("hr_sampler_name"), "hr_sampler_name")
        values["hires_scheduler"] = scheduler(body.get("hr_scheduler"), "hr_scheduler")
        upscaler = str(body.get("hr_upscaler") or "latent").lower()
        match = [v for k, v in HIRES_UPSCALERS.items() if upscaler.startswith(k)]
        if not match:
            raise ConfigError(f"hr_upscaler {body.get('hr_upscaler')!r} is not available; rdbt has Latent and Lanczos")
        values["hires_upscaler"] = match[0]
    for key in ("width", "height"):  # A1111 sizes are multiples of 8; Anima's are of 16
        values.setdefault(key, 512)
    override = body.get("override_settings") or {}
    if isinstance(override, dict) and isinstance(override.get("sd_model_checkpoint"), str):
        request.model = override["sd_model_checkpoint"]
    request.values = {k: v for k, v in values.items() if v is not None}
    return request


def check(values: dict) -> "settings.GenParams":
    """GenParams from request values, each checked by its row's rule with the A1111 field's name in front."""
    unknown = set(values) - set(settings.BY_NAME)
    if unknown:
        raise ConfigError(f"unknown settings: {', '.join(sorted(unknown))}")
    given = {k: v for k, v in values.items() if not settings.BY_NAME[k].means_unset(v)}
    params = settings.GenParams(**{k: settings.BY_NAME[k].coerce(v) for k, v in given.items()})
    settings.check_all(params, lambda s: _FIELD_OF.get(s.name, s.name))
    return params


def info(recipes: list[dict], body: dict, model_name: str, started: float) -> dict:
    """The `info` object A1111 returns (as a JSON string): the first image's settings, every seed and infotext."""
    first = recipes[0] if recipes else {}
    model = first.get("model") or {}
    return {
        "prompt": first.get("prompt", body.get("prompt", "")),
        "all_prompts": [r.get("prompt", "") for r in recipes],
        "negative_prompt": first.get("negative", ""),
        "all_negative_prompts": [r.get("negative", "") for r in recipes],
        "seed": first.get("seed"), "all_seeds": [r.get("seed") for r in recipes],
        "subseed": first.get("seed"), "all_subseeds": [r.get("seed") for r in recipes], "subseed_strength": 0,
        "width": first.get("width"), "height": first.get("height"),
        "sampler_name": settings.A1111_SAMPLERS.get(first.get("sampler"), first.get("sampler")),
        "scheduler": settings.A1111_SCHEDULERS.get(first.get("scheduler"), first.get("scheduler")),
        "cfg_scale": first.get("cfg"), "steps": first.get("steps"),
        "batch_size": body.get("batch_size", 1), "n_iter": body.get("n_iter", 1),
        "denoising_strength": first.get("denoise") if first.get("init_image") else first.get("hires_denoise"),
        "sd_model_name": model.get("name") or model_name, "sd_model_hash": model.get("hash"),
        "infotexts": [metadata.to_parameters_text(r) for r in recipes],
        "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(started)), "clip_skip": 1,
        "is_using_inpainting_conditioning": False, "index_of_first_image": 0,
        "version": f"rdbt {first.get('rdbt_version', '')}".strip(),
    }


def response(pngs: list[bytes], recipes: list[dict], body: dict, model_name: str, started: float) -> dict:
    return {"images": [base64.b64encode(p).decode("ascii") for p in pngs], "parameters": body,
            "info": json.dumps(info(recipes, body, model_name, started), ensure_ascii=False)}


def samplers() -> list[dict]:
    return [{"name": settings.A1111_SAMPLERS.get(n, n), "aliases": [n], "options": {}} for n in SAMPLER_NAMES]


def schedulers() -> list[dict]:
    return [{"name": n, "label": settings.A1111_SCHEDULERS.get(n, n), "aliases": None, "default_rho": -1,
             "need_inner_model": False} for n in SCHEDULER_NAMES]
