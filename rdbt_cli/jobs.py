"""From what a user asked for to fully resolved jobs: settings, model files and LoRA files, all before any weights load.

A `Job` is one image: its complete settings (every row of settings.SETTINGS filled), its seed, the preset it came
from, the model it asks for and its LoRA files. `Planner` makes jobs for one load (device, models folder, model
flags): it layers defaults < preset < persistent LoRA stack < flags < batch line, merges LoRAs by file, and finds
every file, caching what a batch would otherwise read once per line. Input images and masks are opened and checked
here too (a relative path in a batch line is relative to the prompt file). No torch here.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from rdbt_cli import discovery, images, lora_info, lora_stack, presets, settings, text, wildcards
from rdbt_cli.config import LoadParams, LoraSpec, ModelPaths
from rdbt_cli.settings import DEFAULTS, GenParams

TINY = "tiny"
# The embedded tiny model is for trying the pipeline, so its defaults keep a CPU run to a few seconds.
TINY_DEFAULTS = GenParams(width=256, height=256, steps=12)


def for_model(preset, model: Optional[str]):
    """The preset as it applies to `model`: its size and steps are meant for the real model, so on the tiny model the
    tiny defaults keep them (unless the preset itself picks the tiny model); flags still set them."""
    if model != TINY or preset is None or preset.model == TINY:
        return preset
    return replace(preset, **{name: None for name, value in vars(TINY_DEFAULTS).items() if value is not None})


@dataclass
class Job:
    settings: GenParams  # every field resolved: this image's seed, the merged LoRA stack as files
    seed: int
    index: int = 0  # within the settings' count: seed = first seed + index
    preset: Optional[str] = None
    model: Optional[str] = None  # as asked: "tiny", a path or a name in the models folder; None = the one there
    loras: list[tuple[Path, float]] = field(default_factory=list)  # files and weights, none of weight 0
    extra: dict = field(default_factory=dict)  # recorded as they are (a batch's line and job key)
    notes: list[str] = field(default_factory=list)  # warnings for the user (a scaled mask, a large hires pass)

    @property
    def steps(self) -> int:
        """Sampler steps of the whole job: the first pass and the hires pass."""
        g = self.settings
        return g.steps + ((g.hires_steps or g.steps) if g.hires else 0)


def random_seed() -> int:
    # Below 2^53: ComfyUI's page holds the workflow's seed as a JavaScript number, which rounds larger ones, so a
    # larger seed would make another image there. A seed the user gives may be any 64-bit value (inspect says so).
    return random.getrandbits(53)


def unused_negative(gen: GenParams) -> Optional[str]:
    """A note when resolved settings carry a negative prompt that nothing reads: CFG 1 never evaluates it (NAG does)."""
    if gen.negative and gen.cfg == 1 and not gen.nag_scale:
        return ("the negative prompt is not used at --cfg 1 (which skips it, twice as fast); add --nag-scale 5 (NAG, "
                "a fraction of CFG's cost) or raise --cfg to use it")
    return None


def anchor_files(params: GenParams, base: Path) -> GenParams:
    """`params` with each relative input path (init image, mask) made absolute from `base`: the current folder for
    flags, the prompt file's folder for a batch line."""
    files = {s.name: os.path.abspath(os.path.join(base, os.path.expanduser(getattr(params, s.name))))
             for s in settings.SETTINGS if s.type is Path and getattr(params, s.name)}
    return replace(params, **files)


def seeds_from(sources: list) -> list[int]:
    """The seeds recorded in PNGs, for --seeds-from: each named file must record one; a folder gives the seeds of its
    PNGs that record one, in name order. A seed met again is left out (it would make the same image again)."""
    from rdbt_cli.errors import ConfigError, RdbtError
    from rdbt_cli.metadata import read_png

    seeds: dict[int, None] = {}  # ordered, each once
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".png" and p.is_file())
        elif path.is_file():
            files = [path]
        else:
            raise ConfigError(f"--seeds-from {source}: no such file or folder")
        found = 0
        for file in files:
            try:
                seed = read_png(file)["recipe"].get("seed")
            except RdbtError as err:
                if file == path:
                    raise ConfigError(f"--seeds-from {err}") from None
                continue
            seed = settings.BY_NAME["seed"].coerce(seed)
            if settings.value_problem("seed", seed) is not None:
                if file == path:
                    raise ConfigError(f"--seeds-from {file}: records no seed; give PNGs made by rdbt, A1111/Forge "
                                      "or ComfyUI")
                continue
            found += 1
            seeds[seed] = None
        if not found:
            raise ConfigError(f"--seeds-from {source}: no PNG there records a seed")
    return list(seeds)


class Planner:
    """Resolves settings and files for one load; reads each preset, the LoRA stack and each LoRA name once."""

    def __init__(self, load: LoadParams, *, no_stack: bool = False):
        self.load = load
        self.no_stack = no_stack
        self._presets: dict = {}
        self._stack: Optional[list[LoraSpec]] = None
        self._paths: dict = {}
        self._lora_files: dict = {}
        self._lora_notes: dict = {}
        self._inputs: dict = {}
        self._wildcards: Optional[wildcards.Wildcards] = None

    def models_dirs(self) -> list[Path]:
        return list(discovery.models_dirs(self.load.models_dir))

    def preset(self, name: Optional[str]):
        if name and name not in self._presets:
            self._presets[name] = presets.load_preset(name)
        return self._presets[name] if name else None

    def stack(self) -> list[LoraSpec]:
        if self._stack is None:
            self._stack = [] if self.no_stack else lora_stack.load_stack()
        return self._stack

    def settings(self, flags: GenParams, preset_name: Optional[str] = None, base: Optional[GenParams] = None,
                 model_flag: Optional[str] = None):
        """(settings, preset, model name): defaults < (a recipe of --from) < preset < stack < flags.

        LoRAs stay as layered, zeros included, for `lora_files` to merge by file."""
        preset = self.preset(preset_name)
        model = presets.resolve_model(preset, model_flag)
        defaults = settings.layer(DEFAULTS, TINY_DEFAULTS if model == TINY else None, base)
        gen = settings.resolve(for_model(preset, model), self.stack(), flags, defaults=defaults, lora_key=None)
        if gen.init_image:
            inputs = self.inputs(gen)
            if (flags.width is None or flags.height is None) and not (base is not None and base.width):
                # The image's own size beats defaults and presets; an explicit side beats the image.
                gen.width, gen.height = inputs.size(flags.width, flags.height)
                settings.check_all(gen, lambda s: f"init image {gen.init_image} gives {s.name}")
        settings.check_together(gen)
        return gen, preset, model

    def wildcards(self) -> wildcards.Wildcards:
        """The wildcards folders of this load's models folders (and rdbt's own), read once per batch."""
        if self._wildcards is None:
            self._wildcards = wildcards.Wildcards(wildcards.folders(self.models_dirs()))
        return self._wildcards

    def inputs(self, gen: GenParams) -> images.Inputs:
        """The job's input files, opened and checked once per batch."""
        key = (gen.init_image, gen.mask, gen.inpaint)
        if key not in self._inputs:
            self._inputs[key] = images.Inputs(*key)
        return self._inputs[key]

    def paths(self, model: Optional[str]) -> ModelPaths:
        """Model, text encoder, VAE and tokenizer files, all checked before any weights are read."""
        if model not in self._paths:
            self._paths[model] = self._find_paths(model)
        return self._paths[model]

    def _find_paths(self, model: Optional[str]) -> ModelPaths:
        if model == TINY:
            from rdbt_cli.tiny import ensure_tiny_models

            return ensure_tiny_models()
        dirs = self.models_dirs()
        dit = discovery.resolve_component("dit", model, dirs)
        te = discovery.resolve_component("te", self.load.text_encoder, dirs)
        vae = discovery.resolve_component("vae", self.load.vae, dirs)
        for kind, path in (("dit", dit), ("te", te), ("vae", vae)):
            discovery.check_model_file(path, kind)  # a truncated or pickled file fails here, before anything loads
        qwen, t5 = text.find_tokenizers(self.load.qwen_tokenizer, self.load.t5_tokenizer, text_encoder=te,
                                        models_dirs=dirs)
        return ModelPaths(dit=dit, text_encoder=te, vae=vae, qwen_tokenizer=qwen, t5_tokenizer=t5)

    def identity(self, model: Optional[str]) -> str:
        """What a model name means on disk ('tiny' or a real path), so two spellings of one file compare equal."""
        if model == TINY:
            return TINY
        return os.path.realpath(self.paths(model).dit if model in self._paths else
                                discovery.resolve_component("dit", model, self.models_dirs()))

    def lora_dirs(self, dit: Optional[Path] = None) -> list[Path]:
        """The loras/ folder beside the model's own folder first (ComfyUI layout), then the models folders'."""
        beside = []
        if dit is not None and Path(dit).parent.name in discovery.KIND_FOLDERS["dit"]:
            beside.append(Path(dit).parent.parent / "loras")
        candidates = [*beside, *(d / sub for d in self.models_dirs() for sub in discovery.KIND_FOLDERS["lora"])]
        return discovery.dedupe(candidates)

    def lora_files(self, specs: list[LoraSpec], paths: ModelPaths) -> list[tuple[Path, float]]:
        """Names to files, merged by file (settings.combine_loras): a LoRA named two ways (stack `turbo`, flag
        `anima-turbo-lora`) is merged once, at its last weight, in the place it first appeared; weight 0, however
        it is spelled, leaves it out."""
        dirs = self.lora_dirs(paths.dit)
        found: dict[str, Path] = {}
        for spec in specs:
            if spec.name not in self._lora_files:
                self._lora_files[spec.name] = lora_stack.resolve_lora_name(spec.name, dirs)
            found[spec.name] = self._lora_files[spec.name]
        merged = settings.combine_loras(specs, key=lambda s: os.path.realpath(found[s.name]))
        return [(found[s.name], s.weight) for s in merged]

    def lora_notes(self, files: list[tuple[Path, float]]) -> list[str]:
        """A warning for each LoRA whose training metadata names another model family (each file read once)."""
        from rdbt_cli.errors import RdbtError

        for path, _ in files:
            if path not in self._lora_notes:
                try:
                    self._lora_notes[path] = lora_info.describe(path)["warning"]
                except RdbtError:  # a damaged file: loading it says what is wrong
                    self._lora_notes[path] = None
        return [self._lora_notes[path] for path, _ in files if self._lora_notes[path]]

    def job(self, gen: GenParams, seed: int, index: int, paths: ModelPaths, preset=None, model=None,
            prompt: Optional[str] = None, negative: Optional[str] = None, **extra) -> Job:
        """One image. Its prompt is `prompt` as given, else the one gen.prompt's variants and wildcards make for this
        seed; the negative likewise (`negative`, else drawn from gen.negative with the same seed, on a stream of its
        own). The recipe then records each template too."""
        files = self.lora_files(gen.loras or [], paths)
        seed %= 2**64
        if prompt is None and wildcards.has_syntax(gen.prompt):
            prompt = self.wildcards().pick(gen.prompt, seed)
        if prompt is not None and prompt != gen.prompt:
            extra = {"prompt_template": gen.prompt, **extra}
        if negative is None and wildcards.has_syntax(gen.negative):
            negative = self.wildcards().pick(gen.negative, wildcards.negative_seed(seed), "negative prompt")
        if negative is not None and negative != gen.negative:
            extra = {"negative_template": gen.negative, **extra}
        resolved = replace(gen, seed=seed, prompt=gen.prompt if prompt is None else prompt,
                           negative=gen.negative if negative is None else negative,
                           loras=[LoraSpec(str(p), w) for p, w in files])
        notes = [*(self.inputs(gen).notes if gen.init_image else []), *settings.advice(gen),
                 *self.lora_notes(files)]
        return Job(resolved, seed, index, getattr(preset, "name", None), model, files, extra, notes)


def plan(prompt: Optional[str], load: LoadParams, flags: Optional[GenParams] = None, *, preset: Optional[str] = None,
         no_stack: bool = False, recipe: Optional[dict] = None, **values) -> tuple[list[Job], LoadParams, ModelPaths]:
    """What `rdbt gen` makes: `count` jobs with consecutive seeds (from each seed of a seed list), and what to load
    (settings and files).

    Settings come as `flags` or as keywords by setting name (`steps=20, loras=["turbo:0.3"], size="832x1216"`),
    checked as flags are; a keyword that is no setting is a TypeError naming the nearest one.

    `recipe` (read back from a PNG) comes under the preset and the flags; its complete LoRA stack replaces the
    persistent one, and its model files are used unless `load` names others.
    """
    size = values.pop("size", None)  # "WxH", as --size
    for key in values:
        if key not in settings.BY_NAME:
            raise TypeError(f"plan() got {key}={values[key]!r}, which is no setting{settings.did_you_mean(key)}")
    flags = replace(anchor_files(settings.layer(flags, settings.from_flags(values, size)), Path.cwd()), prompt=prompt)
    settings.check_all(flags, lambda s: s.flags[-1] if s.flags else s.name)  # text and values before any file is read
    base = None
    if recipe is not None:
        from rdbt_cli.metadata import check_recorded_inputs, recipe_settings

        base, recorded = recipe_settings(recipe)
        check_recorded_inputs(settings.layer(base, flags), recorded)  # input files come from the recipe or flags
        load = replace(load, model=load.model or recorded["model"])
        if load.dtype == "auto" and recorded.get("weights_fp8"):
            load = replace(load, dtype="fp8")  # fp8 storage changes LoRA merges (requantised) and so the image
        elif load.dtype == "auto" and recorded.get("dtype") in _RECORDED_DTYPES:
            load = replace(load, dtype=_RECORDED_DTYPES[recorded["dtype"]])  # same precision, same image
        if load.model != TINY:
            load = replace(load, text_encoder=load.text_encoder or recorded["text_encoder"],
                           vae=load.vae or recorded["vae"])
        no_stack = True
    planner = Planner(load, no_stack=no_stack)
    gen, preset_obj, model = planner.settings(flags, preset, base, load.model)
    if not gen.prompt:
        from rdbt_cli.errors import ConfigError

        raise ConfigError("no prompt given: rdbt gen \"your prompt\" (or --from IMAGE)")
    planner.load = replace(load, model=model)
    paths = planner.paths(model)
    seed = gen.seed if gen.seed is not None else random_seed()
    # A recorded prompt was drawn from its template when the image was made: --from takes it as it is.
    literal = prompt is None and recipe is not None
    prompts = ([gen.prompt] if literal else planner.wildcards().combinations(gen.prompt) if gen.combinatorial
               else [None])
    template = recipe.get("prompt_template") if literal else None
    extra = {"prompt_template": template} if isinstance(template, str) else {}
    # The same for the negative, unless a flag or preset gave another.
    negative = gen.negative if recipe is not None and base is not None and gen.negative == base.negative else None
    template = recipe.get("negative_template") if negative is not None else None
    extra |= {"negative_template": template} if isinstance(template, str) else {}
    jobs = [planner.job(gen, settings.seed_at(seed, gen.count, i), i, paths, preset_obj, model, prompt=p,
                        negative=negative, **extra)
            for p in prompts for i in range(settings.images_of(seed, gen.count))]
    return jobs, planner.load, paths


_RECORDED_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
