"""The table of generation settings, and the one rule that layers them.

Each `Setting` row says everything rdbt knows about one setting: its type, default, allowed values (and the reason
shown when a value is refused), help text, CLI flags, preset key, whether a batch line may override it, its key in
the recorded recipe and its A1111 `parameters` label. The Typer options of every generating command, the batch-line
parser, preset validation, the recipe and `--from`, `inspect`, the A1111 text and request validation all read this
table, so a new setting is one row here plus the code that uses its value.

`GenParams` (what to make) is built from the table: one field per row, None meaning "not given". `layer` is the one
"upper value if set, else lower" rule; `resolve` applies it to defaults < preset < persistent LoRA stack < flags.
No torch here, so every value is checked before any weights are read.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields, make_dataclass
from pathlib import Path, PurePath
from typing import Callable, Optional

from rdbt_cli.config import LORA_REMAPS, SAMPLER_NAMES, SCHEDULER_NAMES, LoraSpec
from rdbt_cli.errors import ConfigError

GEN_PANEL = "Generation"

MAX_SEED = 2**64 - 1  # ComfyUI's seed widget range
RANDOM_SEED = -1  # A1111's "random": the same as giving no seed
DEFAULT_SHIFT = 3.0

# A1111/Forge labels for the ComfyUI sampler and scheduler names they share (formats.md §4.1). Names without an A1111
# label (er_sde, sa_solver_pece, res_multistep, linear_quadratic, ...) are written as the ComfyUI name.
A1111_SAMPLERS = {
    "euler": "Euler", "euler_ancestral": "Euler a", "heun": "Heun", "lms": "LMS", "dpm_2": "DPM2",
    "dpm_2_ancestral": "DPM2 a", "dpmpp_2s_ancestral": "DPM++ 2S a", "dpmpp_sde": "DPM++ SDE", "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_3m_sde": "DPM++ 3M SDE", "dpm_fast": "DPM fast",
    "dpm_adaptive": "DPM adaptive", "ddim": "DDIM", "uni_pc": "UniPC", "lcm": "LCM",
}
A1111_SCHEDULERS = {
    "simple": "Simple", "normal": "Normal", "karras": "Karras", "exponential": "Exponential",
    "sgm_uniform": "SGM Uniform", "beta": "Beta", "kl_optimal": "KL Optimal", "ddim_uniform": "DDIM",
}


# ---------------------------------------------------------------------------------------------------------------------
# Value rules. Each returns the problem as text (None when fine), so every caller can put its own "where" in front:
# a file and line, a flag, a batch line or a recorded recipe.


def is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _choice(what: str, names: tuple[str, ...]) -> Callable[[str, object], Optional[str]]:
    def check(key, value):
        if not isinstance(value, str) or value not in names:
            return f"unknown {what} {value!r}; valid {what}s: {', '.join(names)}"
        return None

    check.names = names  # for shell completion and help
    return check


def _whole(low: int, high: int, why: str = "") -> Callable[[str, object], Optional[str]]:
    def check(key, value):
        if not is_int(value):
            return f"{key} must be a whole number, not {value!r}"
        if value < low:
            return f"{key} must be at least {low}, not {value}"
        if value > high:
            return f"{key} must be at most {high}{why}, not {value}"
        return None

    return check


def _seed(key, value):
    if isinstance(value, list) and value:  # a seed list (parse_seeds)
        if len(value) > MAX_SEEDS:
            return f"a seed list holds at most {MAX_SEEDS:,} seeds, not {len(value):,}"
        bad = next((v for v in value if not is_int(v) or not 0 <= v <= MAX_SEED), None)
        if bad is None:
            return None
        value = bad
    if not is_int(value) or not 0 <= value <= MAX_SEED:
        return f"seed must be a whole number from 0 to {MAX_SEED} (or -1 for a random one), not {value!r}"
    return None


MAX_SEEDS = 100_000  # as many images as --count allows


def parse_seeds(text: str):
    """`--seed` text: one seed (`42`; `-1` random) as an int, or a list of seeds and inclusive ranges (`1,2,5-10`) as a
    list of ints in the order written. Raises ConfigError naming the part that is wrong."""
    text = str(text).strip()
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    seeds: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise ConfigError(f"--seed {text!r}: {part.strip()!r} is not a seed or a range; write seeds like 1,2,5-10")
        low, high = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
        if high < low:
            raise ConfigError(f"--seed {text!r}: the range {part.strip()} runs backwards; write {high}-{low}")
        if len(seeds) + high - low + 1 > MAX_SEEDS:
            raise ConfigError(f"--seed {text!r} makes more than {MAX_SEEDS:,} seeds; use a shorter range")
        seeds.extend(range(low, high + 1))
    return seeds


parse_seeds.metavar = "N|LIST"  # what --help shows


def seed_at(seed, count: Optional[int], index: int) -> int:
    """The seed of image `index` of a setting's images: seed + index for one seed; for a list, `count` consecutive
    seeds from each listed one in turn (1,5 with --count 2: 1, 2, 5, 6)."""
    count = count or 1
    if isinstance(seed, list):
        return seed[index // count] + index % count
    return seed + index


def images_of(seed, count: Optional[int]) -> int:
    """How many images a seed (or seed list) and --count make."""
    return (len(seed) if isinstance(seed, list) else 1) * (count or 1)


def _real(low: float, high: float, low_text: str, inclusive: bool = True) -> Callable[[str, object], Optional[str]]:
    def check(key, value):
        if not is_number(value):
            return f"{key} must be a number, not {value!r}"
        if value < low or (value == low and not inclusive):
            return f"{key} must be {low_text}, not {value}"
        if value > high:
            return f"{key} must be at most {high:g}, not {value}"
        return None

    return check


MAX_SIDE = 16384  # the VAE decodes tiles, but a side past this is a typo, not a picture (4 GB of latent activations)
MAX_HIRES = 8.0  # ComfyUI's LatentUpscaleBy / ImageScaleBy limit
HIRES_WARN_SCALE = 1.5  # Anima breaks above 1.5x in one hires pass (landscape.md §2.1, HF discussions/163, /165)
HIRES_WARN_PIXELS = 2.5e6  # and degrades past about 2.5 MP (trained at 1024-1536)


def _side(key, value):
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{key} must be a whole number of pixels, not {value!r}"
    if value <= 0 or value % 16:
        return f"{key} {value} must be a positive multiple of 16 (e.g. 832x1216, 1024x1024)"
    if value > MAX_SIDE:
        return f"{key} {value} is more than {MAX_SIDE} pixels; Anima is made for about 1 megapixel (e.g. 1024x1024)"
    return None


# Anima was trained on prompts of up to 512 tokens; the text encoder reads any length (nothing is cut), but its time
# grows with the square of the length. Past this many characters (about 5,000 tokens) a prompt is a pasted file.
MAX_PROMPT_CHARS = 20_000
_SURROGATE = re.compile("[\ud800-\udfff]")


def _text(key, value):
    if not isinstance(value, str):
        return f"{key} must be a string, not {value!r}"
    bad = _SURROGATE.search(value)
    if bad:
        c, at = ord(bad.group()), bad.start() + 1
        if 0xDC80 <= c <= 0xDCFF:  # a byte Python could not decode as UTF-8 (argv, surrogateescape)
            return f"{key} is not UTF-8: byte 0x{c - 0xDC00:02X} at character {at}; type or save it as UTF-8"
        return f"{key} holds a lone surrogate U+{c:04X} at character {at}, which is no text; remove it"
    if len(value) > MAX_PROMPT_CHARS:
        return (f"{key} is {len(value):,} characters, more than the limit of {MAX_PROMPT_CHARS:,} (Anima reads about "
                "512 tokens, some 2,000 characters, and the text encoder slows with the square of the length); "
                "shorten it")
    return None


def _file(key, value):
    if not isinstance(value, str) or not value.strip():
        return f"{key} must be a file path, not {value!r}"
    return None


def _hires_scale(key, value):
    if not is_number(value) or not (value == 0 or 1 < value <= MAX_HIRES):
        return (f"hires scale must be more than 1 and at most {MAX_HIRES:g} (e.g. 1.5; 0 turns the hires pass off), "
                f"not {value!r}")
    return None


def _loras(key, value):
    if not isinstance(value, list):
        return f"LoRAs must be a list of NAME:WEIGHT, not {value!r}"
    for spec in value:
        if not isinstance(spec, LoraSpec) or not isinstance(spec.name, str) or not spec.name:
            return f"every LoRA needs a name, got {spec!r}"
        if not is_number(spec.weight):
            return f"LoRA {spec.name} weight must be a number, not {spec.weight!r}"
    return None


_WEIGHT = re.compile(r"^(.*):([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)$")


def parse_lora_arg(text: str) -> LoraSpec:
    """"name:0.7" -> LoraSpec("name", 0.7); only a trailing `:<number>` is a weight, so `C:\\loras\\x` stays a name."""
    text = text.strip()
    m = _WEIGHT.match(text)
    name, weight = (m.group(1), float(m.group(2))) if m else (text, 1.0)
    if not name:
        raise ConfigError(f'--lora "{text}": missing the LoRA name; write NAME or NAME:WEIGHT, e.g. style:0.7')
    return LoraSpec(name, weight)


def parse_size(text: str) -> tuple[int, int]:
    """"832x1216" -> (832, 1216); both sides positive multiples of 16 (the VAE's 8× times the DiT's 2× patches)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", str(text))
    if not m:
        raise ConfigError(f'size "{text}" is not WIDTHxHEIGHT; write it like 832x1216')
    w, h = int(m.group(1)), int(m.group(2))
    problem = _side("width", w) or _side("height", h)
    if problem:
        raise ConfigError(f'size "{text}": {problem}')
    return w, h


# ---------------------------------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class Setting:
    name: str  # the GenParams field
    type: type  # the Python type of one value (list for LoRAs)
    default: object  # Anima's default (the official template); None: resolved elsewhere (seed: random)
    help: str
    check: Callable[[str, object], Optional[str]]
    flags: tuple[str, ...] = ()  # CLI flags, long name last; () = no option (the prompt is an argument)
    preset: Optional[str] = None  # key in a preset's TOML; None = presets cannot set it
    batch: bool = True  # a batch line may override it with its flag
    recipe: Optional[str] = None  # key in the rdbt recipe; None = not recorded as such
    a1111: Optional[str] = None  # label in the A1111 `parameters` line
    a1111_names: Optional[dict] = None  # value -> A1111 label where they differ
    a1111_omit: object = None  # a value the A1111 line leaves out (as Forge leaves out default fields)
    a1111_extension: bool = False  # written after the model fields, as A1111 extensions are
    unset: object = None  # a flag value that means "not given" (--seed -1: random, as in A1111)
    # A flag whose text has its own syntax (--seed 1,2,5-10): text -> value, raising ConfigError; the option is text.
    parse: Optional[Callable[[str], object]] = None
    # Whether the setting matters for a recipe (or vars(GenParams)): the A1111 text and `inspect` leave it out
    # otherwise, and of two rows with one A1111 label the one that applies reads it back.
    applies: Optional[Callable[[dict], bool]] = None
    # A rule over the resolved settings, for values that depend on other settings (`--mask` needs `--init-image`).
    requires: Optional[Callable[[object], Optional[str]]] = None
    # A warning over the resolved settings: allowed, but the user should know (a hires pass past 1.5x).
    advice: Optional[Callable[[object], Optional[str]]] = None

    @property
    def flag(self) -> str:
        return self.flags[-1] if self.flags else f"--{self.name}"

    def coerce(self, value):
        """A value from TOML/JSON/text as this setting's type: whole numbers are valid floats; text is converted."""
        if self.type is float and is_int(value):
            return float(value)
        if self.type is Path and isinstance(value, PurePath):
            return str(value)  # paths are kept as text, so recipes and batch ids are plain JSON
        return value

    def applies_to(self, values: dict) -> bool:
        return self.applies is None or bool(self.applies(values))

    def from_text(self, text: str):
        """A flag's text value (batch lines, sweeps); raises ConfigError naming the flag."""
        if self.parse is not None:
            return self.parse(text)
        if self.type is list:
            return [parse_lora_arg(text)]
        if self.type in (int, float):
            try:
                return self.type(text)
            except ValueError:
                kind = "a whole number" if self.type is int else "a number"
                raise ConfigError(f"{self.flag} needs {kind}, not {text!r}") from None
        return text

    def problem(self, value) -> Optional[str]:
        return self.check(self.name, value)

    def means_unset(self, value) -> bool:
        return self.unset is not None and is_int(value) and value == self.unset


# Rules and predicates of the img2img, inpainting and hires rows: over a recipe dict or GenParams' fields.
INPAINT = ("blend", "fill")  # ComfyUI SetLatentNoiseMask / VAEEncodeForInpaint
HIRES_UPSCALERS = ("latent", "lanczos")  # LatentUpscaleBy nearest-exact / VAEDecode -> ImageScaleBy -> VAEEncode


def _has_image(v: dict) -> bool:
    return bool(v.get("init_image"))


def _masked(v: dict) -> bool:
    return bool(v.get("mask"))


def _hires_on(v: dict) -> bool:
    return bool(v.get("hires"))


def hires_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """The hires pass's size: each side times `scale`, rounded to a multiple of 16 (the DiT's 2x2 latent patches)."""
    return tuple(max(16, int(math.floor(side * scale / 16 + 0.5)) * 16) for side in (width, height))


def _mask_needs_image(p) -> Optional[str]:
    if p.mask and not p.init_image:
        return "--mask needs --init-image, the picture the mask belongs to"
    return None


def _denoise_needs_image(p) -> Optional[str]:
    if p.denoise is not None and p.denoise < 1 and not p.init_image:
        return (f"--denoise {p.denoise:g} needs --init-image, the picture to redraw (the hires pass has "
                "--hires-denoise)")
    return None


def _fill_needs_full_denoise(p) -> Optional[str]:
    if p.mask and p.inpaint == "fill" and p.denoise is not None and p.denoise < 1:
        return (f"--inpaint fill repaints the mask from grey and needs --denoise 1, not {p.denoise:g}; "
                "use --inpaint blend to keep part of the picture under the mask")
    return None


def _hires_fits(p) -> Optional[str]:
    if p.hires and p.width and p.height:
        w, h = hires_size(p.width, p.height, p.hires)
        if max(w, h) > MAX_SIDE:
            return (f"--hires {p.hires:g} makes {w}x{h}, more than {MAX_SIDE} pixels a side; lower --hires or the "
                    "size")
    return None


def _hires_advice(p) -> Optional[str]:
    if not p.hires or not p.width or not p.height:
        return None
    w, h = hires_size(p.width, p.height, p.hires)
    notes = []
    if p.hires > HIRES_WARN_SCALE:
        notes.append(f"--hires {p.hires:g} is more than {HIRES_WARN_SCALE:g}x in one pass, where Anima's hires "
                     "passes break up; upscale in two runs instead")
    if w * h > HIRES_WARN_PIXELS:
        notes.append(f"the hires result {w}x{h} ({w * h / 1e6:.1f} MP) is past {HIRES_WARN_PIXELS / 1e6:g} MP, "
                     "where Anima degrades")
    return "; ".join(notes) or None


# Rules of the NAG rows. Their ranges are those of ComfyUI-NAG-Extended's KSamplerWithNAG inputs, so that the
# recorded ComfyUI graph runs as it is.
NAG_SIGMA_START = 14.7  # KSamplerWithNAG's fixed start: above every flow sigma (at most 1), so from the first step


def _nag_on(v: dict) -> bool:
    return bool(v.get("nag_scale"))


def _nag_scale(key, value):
    if not is_number(value) or not (value == 0 or 1 <= value <= 100):
        return (f"NAG scale must be 0 (off) or from 1 to 100 (1 guides nothing; 5 is the node's default), "
                f"not {value!r}")
    return None


def _nag_needs_negative(p) -> Optional[str]:
    if p.nag_scale and not (p.negative or "").strip():
        return (f"--nag-scale {p.nag_scale:g} needs a negative prompt, which NAG steers away from; give one with "
                '-n "worst quality, ..."')
    return None


def _nag_window(p) -> Optional[str]:
    if p.nag_sigma_start is not None and p.nag_sigma_end is not None and p.nag_sigma_end > p.nag_sigma_start:
        return (f"--nag-sigma-end {p.nag_sigma_end:g} is above --nag-sigma-start {p.nag_sigma_start:g}: NAG acts "
                "while sigma-end <= sigma <= sigma-start, so the window is reversed; swap them")
    return None


def _yes_no(key, value):
    return None if isinstance(value, bool) else f"{key} is on or off, not {value!r}"


SETTINGS: tuple[Setting, ...] = (
    Setting("prompt", str, None, "The prompt, in ComfyUI weight syntax: (word:1.2).", _text, batch=False,
            recipe="prompt"),
    Setting("negative", str, "", "Negative prompt.", _text, ("-n", "--negative"), preset="negative",
            recipe="negative"),
    Setting("steps", int, 30, "Sampling steps.", _whole(1, 10_000, " (a flow model settles long before)"),
            ("--steps",), preset="steps", recipe="steps", a1111="Steps"),
    Setting("sampler", str, "er_sde", f"One of: {', '.join(SAMPLER_NAMES)}.", _choice("sampler", SAMPLER_NAMES),
            ("--sampler",), preset="sampler", recipe="sampler", a1111="Sampler", a1111_names=A1111_SAMPLERS),
    Setting("scheduler", str, "simple", f"One of: {', '.join(SCHEDULER_NAMES)}.",
            _choice("scheduler", SCHEDULER_NAMES), ("--scheduler",), preset="scheduler", recipe="scheduler",
            a1111="Schedule type", a1111_names=A1111_SCHEDULERS),
    Setting("cfg", float, 4.0, "CFG scale; 1 skips the negative prompt (twice as fast).",
            _real(0.0, 100.0, "0 or more (1 turns guidance off)"), ("--cfg",), preset="cfg", recipe="cfg",
            a1111="CFG scale"),
    Setting("seed", int, None, "Seed, or a list of seeds and ranges (1,2,5-10: one image each, times --count); -1 "
            "or none: random (a fixed one per batch line); each image records its own.", _seed, ("--seed",),
            recipe="seed", a1111="Seed", unset=RANDOM_SEED, parse=parse_seeds),
    Setting("width", int, 1024, "Width (multiple of 16).", _side, ("--width",), preset="width", recipe="width"),
    Setting("height", int, 1024, "Height (multiple of 16).", _side, ("--height",), preset="height",
            recipe="height"),
    Setting("shift", float, DEFAULT_SHIFT, "Flow shift (ModelSamplingAuraFlow).",
            _real(0.0, 100.0, "greater than 0 (Anima uses 3)", inclusive=False), ("--shift",), preset="shift",
            recipe="shift", a1111="Shift", a1111_omit=DEFAULT_SHIFT, a1111_extension=True),
    Setting("count", int, 1, "Images to make (per batch line), with seeds seed, seed+1, …",
            _whole(1, 100_000), ("--count",)),
    Setting("init_image", Path, None, "Image to start from (img2img), scaled to the size with Lanczos; the size "
            "defaults to the image's own, rounded to a multiple of 16.", _file, ("--init-image",),
            recipe="init_image"),
    Setting("mask", Path, None, "Inpainting mask for --init-image: white is repainted, black kept, grey blends.",
            _file, ("--mask",), recipe="mask", requires=_mask_needs_image),
    Setting("denoise", float, 1.0, "How much of --init-image is redrawn: 1 all of it, 0.3 a light touch.",
            _real(0.0, 1.0, "more than 0 (1 redraws everything)", inclusive=False), ("--denoise",),
            recipe="denoise", a1111="Denoising strength", a1111_extension=True, applies=_has_image,
            requires=_denoise_needs_image),
    Setting("inpaint", str, "blend", "How --mask repaints: blend (the kept part is restored after every step; any "
            "--denoise) or fill (the masked part starts from grey; --denoise 1).", _choice("inpaint method", INPAINT),
            ("--inpaint",), preset="inpaint", recipe="inpaint", a1111="Inpaint method", a1111_extension=True,
            applies=_masked, requires=_fill_needs_full_denoise),
    Setting("grow_mask", int, 6, "Pixels --inpaint fill grows the mask by, for a seamless edge.", _whole(0, 64),
            ("--grow-mask",), preset="grow_mask", recipe="grow_mask", a1111="Mask grow", a1111_extension=True,
            applies=lambda v: _masked(v) and v.get("inpaint") == "fill"),
    Setting("hires", float, 0.0, "Hires fix: upscale by this factor (1.5 at most is advised) and sample again; 0 is "
            "off.", _hires_scale, ("--hires",), preset="hires", recipe="hires", a1111="Hires upscale",
            a1111_extension=True, applies=_hires_on, requires=_hires_fits, advice=_hires_advice),
    Setting("hires_denoise", float, 0.5, "Denoise of the hires pass.",
            _real(0.0, 1.0, "more than 0 (1 redraws everything)", inclusive=False), ("--hires-denoise",),
            preset="hires_denoise", recipe="hires_denoise", a1111="Denoising strength", a1111_extension=True,
            applies=lambda v: _hires_on(v) and not _has_image(v)),  # A1111's label for it when there is no img2img
    Setting("hires_steps", int, None, "Steps of the hires pass (default: --steps).",
            _whole(1, 10_000, " (a flow model settles long before)"), ("--hires-steps",), preset="hires_steps",
            recipe="hires_steps", a1111="Hires steps", a1111_extension=True, applies=_hires_on),
    Setting("hires_sampler", str, None, "Sampler of the hires pass (default: --sampler).",
            _choice("sampler", SAMPLER_NAMES), ("--hires-sampler",), preset="hires_sampler", recipe="hires_sampler",
            a1111="Hires sampler", a1111_names=A1111_SAMPLERS, a1111_extension=True, applies=_hires_on),
    Setting("hires_scheduler", str, None, "Scheduler of the hires pass (default: --scheduler).",
            _choice("scheduler", SCHEDULER_NAMES), ("--hires-scheduler",), preset="hires_scheduler",
            recipe="hires_scheduler", a1111="Hires schedule type", a1111_names=A1111_SCHEDULERS,
            a1111_extension=True, applies=_hires_on),
    Setting("hires_upscaler", str, "latent", "latent (ComfyUI LatentUpscaleBy, nearest-exact) or lanczos (decode, "
            "Lanczos, encode again).", _choice("hires upscaler", HIRES_UPSCALERS), ("--hires-upscaler",),
            preset="hires_upscaler", recipe="hires_upscaler", a1111="Hires upscaler",
            a1111_names={"latent": "Latent (nearest-exact)", "lanczos": "Lanczos"}, a1111_extension=True,
            applies=_hires_on),
    Setting("loras", list, [], "NAME[:WEIGHT], repeatable; on top of the persistent stack.", _loras, ("--lora",),
            preset="lora"),
    Setting("lora_remap", str, "refuse", "LoRAs made for the 28-block Anima on a 40/52-block model (Anima-2.9B): "
            "refuse, expand (onto the blocks 2.9B kept), spread (same relative depth) or first (as named).",
            _choice("LoRA remap", LORA_REMAPS), ("--lora-remap",), preset="lora_remap", recipe="lora_remap",
            applies=lambda v: bool(v.get("loras"))),
    Setting("nag_scale", float, 0.0, "NAG (normalized attention guidance): the negative prompt works at CFG 1 too, "
            "for about the cost of one more cross-attention; 0 is off, 5 the usual.", _nag_scale, ("--nag-scale",),
            preset="nag_scale", recipe="nag_scale", a1111="NAG scale", a1111_extension=True, applies=_nag_on,
            requires=_nag_needs_negative),
    Setting("nag_tau", float, 2.5, "NAG: how far the guided attention may grow, in times the prompt's own (default 2.5).",
            _real(1.0, 10.0, "at least 1 (below, it would shrink even unguided attention)"), ("--nag-tau",),
            preset="nag_tau", recipe="nag_tau", a1111="NAG tau", a1111_extension=True, applies=_nag_on),
    Setting("nag_alpha", float, 0.25, "NAG: how much of the guided attention is blended in, 0 to 1 (default 0.25).",
            _real(0.0, 1.0, "from 0 to 1"), ("--nag-alpha",), preset="nag_alpha", recipe="nag_alpha",
            a1111="NAG alpha", a1111_extension=True, applies=_nag_on),
    Setting("nag_sigma_start", float, NAG_SIGMA_START, "NAG acts while sigma is at most this (sigmas run from 1 down "
            "to 0, so the default acts from the first step).", _real(0.0, 20.0, "0 or more"),
            ("--nag-sigma-start",), preset="nag_sigma_start", recipe="nag_sigma_start", a1111="NAG sigma start",
            a1111_omit=NAG_SIGMA_START, a1111_extension=True, applies=_nag_on, requires=_nag_window),
    Setting("nag_sigma_end", float, 0.0, "NAG acts while sigma is at least this (0: to the last step).",
            _real(0.0, 20.0, "0 or more"), ("--nag-sigma-end",), preset="nag_sigma_end", recipe="nag_sigma_end",
            a1111="NAG sigma end", a1111_extension=True, applies=_nag_on),
    Setting("combinatorial", bool, False, "Make every prompt the prompt's {a|b} variants and __wildcards__ can give "
            "(each with --count images), instead of one drawn from each image's seed.", _yes_no, ("--combinatorial",),
            batch=False),
)
BY_NAME = {s.name: s for s in SETTINGS}

# `--size WxH` (and a preset's `size`) sets width and height together.
SIZE_FLAG = "--size"
SIZE_HELP = "WxH, multiples of 16, e.g. 832x1216."


# What to make: one field per row, None meaning "not given"; `resolve` fills them.
GenParams = make_dataclass(
    "GenParams", [(s.name, Optional[s.type], field(default=None)) for s in SETTINGS],
    namespace={"__module__": __name__},
)

DEFAULTS = GenParams(**{s.name: s.default for s in SETTINGS})


def did_you_mean(name: str) -> str:
    """"; did you mean 'steps'?" for a name that is no setting (the list of settings when none is close)."""
    import difflib

    known = [*BY_NAME, "size"]
    close = difflib.get_close_matches(name.lstrip("-").replace("-", "_").lower(), known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else f" (the settings: {', '.join(known)})"


def value_problem(name: str, value: object) -> Optional[str]:
    """What is wrong with `value` (already of its Python type) for the setting `name`."""
    return BY_NAME[name].problem(value)


def check_all(params, where: Callable[[Setting], str]) -> None:
    """Every given value of `params` through its row's rule; the first problem raises with `where(row)` in front."""
    for s in SETTINGS:
        value = getattr(params, s.name)
        if value is not None:
            problem = s.problem(value)
            if problem:
                raise ConfigError(f"{where(s)}: {problem}")


def check_together(params) -> None:
    """The rules that involve several settings, over fully resolved `params`; the first problem raises."""
    for s in SETTINGS:
        problem = s.requires(params) if s.requires is not None else None
        if problem:
            raise ConfigError(problem)


def advice(params) -> list[str]:
    """Warnings for fully resolved `params`: allowed, but worth knowing."""
    return [note for s in SETTINGS if s.advice is not None and (note := s.advice(params))]


def from_flags(values: dict, size: Optional[str] = None):
    """GenParams from option values by setting name (None = not given), each checked as its flag."""
    values = {k: BY_NAME[k].parse(v) if isinstance(v, str) and BY_NAME[k].parse else v for k, v in values.items()}
    given = {k: v for k, v in values.items() if v is not None and not BY_NAME[k].means_unset(v)}
    if "loras" in given:
        given["loras"] = [parse_lora_arg(t) if isinstance(t, str) else t for t in given["loras"]]
    if size is not None:
        w, h = parse_size(size)
        given.setdefault("width", w)
        given.setdefault("height", h)
    params = GenParams(**{k: BY_NAME[k].coerce(v) for k, v in given.items()})
    check_all(params, lambda s: s.flag)
    return params


# ---------------------------------------------------------------------------------------------------------------------
# Layering


def layer(*layers):
    """The one precedence rule: for each setting the last layer that sets it wins; LoRA lists add up in layer order
    (None when no layer has one), for `combine_loras` to settle."""
    out = GenParams()
    for params in layers:
        if params is None:
            continue
        for f in fields(GenParams):
            value = getattr(params, f.name)
            if value is None:
                continue
            if f.name == "loras" and out.loras is not None:
                value = [*out.loras, *value]
            setattr(out, f.name, list(value) if f.name == "loras" else value)
    return out


def combine_loras(specs: list[LoraSpec], key: Callable[[LoraSpec], object] = lambda s: s.name) -> list[LoraSpec]:
    """LoRAs from lowest to highest precedence, one entry per `key` (the name as written, or the resolved file).

    An entry keeps the place where it first appeared, and the weight of its last appearance wins, so
    `--lora turbo:0.5` retunes a preset's turbo LoRA instead of stacking a second copy; a final weight of 0 removes
    it (`--lora turbo:0` switches a preset's LoRA off).
    """
    merged: dict[object, LoraSpec] = {}
    for spec in specs:
        merged[key(spec)] = spec
    return [spec for spec in merged.values() if spec.weight != 0]


def resolve(preset, stack: list[LoraSpec], flags, defaults=DEFAULTS, lora_key=lambda s: s.name):
    """Fill every setting: defaults < preset < persistent LoRA stack < explicit flags (None = not given).

    LoRAs are merged by `lora_key` (the name as written); with None they stay layered, zeros included, for a caller
    that merges them by resolved file."""
    check_all(flags, lambda s: s.flag)
    out = layer(defaults, preset, GenParams(loras=list(stack)), flags)
    out.loras = out.loras or []
    if lora_key is not None:
        out.loras = combine_loras(out.loras, lora_key)
    for s in SETTINGS:
        setattr(out, s.name, s.coerce(getattr(out, s.name)))
    return out
