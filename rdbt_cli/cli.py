"""The rdbt command line: a thin Typer layer over the rdbt_cli library.

torch and the pipeline are imported inside the commands that need them, so `rdbt --help`, `inspect`, `models`,
`presets` and `lora-stack` start instantly.
"""

from __future__ import annotations

import functools
import json
import os
import random
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from rdbt_cli import __version__
from rdbt_cli.config import (
    ATTENTION_BACKENDS, DEFAULTS, DEVICES, DTYPES, SAMPLER_NAMES, SCHEDULER_NAMES, GenParams, LoadParams, LoraSpec,
)
from rdbt_cli.errors import ConfigError, OutputError, RdbtError

app = typer.Typer(
    name="rdbt",
    help="Anima text-to-image from the shell: one command per image, batches, LoRA stacks, presets, and every image "
    "carrying its own recipe.\n\nExample: rdbt gen \"1girl, silver hair, night sky\" --preset rdbt --seed 42",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode="rich",
)

_state = {"debug": False}


# Choice types for Typer, built from config's lists so the names live in one place.
Device = Enum("Device", {name: name for name in DEVICES}, type=str)
DType = Enum("DType", {name: name for name in DTYPES}, type=str)
Attention = Enum("Attention", {name: name for name in ATTENTION_BACKENDS}, type=str)


def _stderr():
    from rich.console import Console

    return Console(stderr=True)


def friendly_errors(fn):
    """Every user mistake is one readable line and a non-zero exit code; --debug shows the traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RdbtError as err:
            if _state["debug"]:
                raise
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            if _state["debug"]:
                raise
            typer.echo("interrupted; finished images are kept (rdbt batch resumes where it stopped)", err=True)
            raise typer.Exit(130) from None
        except (OSError, MemoryError) as err:
            if _state["debug"]:
                raise
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(1) from None

    return wrapper


def _version(value: bool):
    if value:
        typer.echo(f"rdbt {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks.")] = False,
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = None,
):
    _state["debug"] = debug


# ---------------------------------------------------------------------------------------------------------------------
# Shared option sets of gen and batch
# ---------------------------------------------------------------------------------------------------------------------

GEN = "Generation"
LOAD = "Models and hardware"
OUT = "Output"

# Options shared by gen and batch, declared once.
NegativeOpt = Annotated[Optional[str], typer.Option("-n", "--negative", help="Negative prompt.", rich_help_panel=GEN)]
PresetOpt = Annotated[Optional[str], typer.Option(help="Preset name or TOML path (see `rdbt presets`).", rich_help_panel=GEN)]
SamplerOpt = Annotated[Optional[str], typer.Option(help=f"One of: {', '.join(SAMPLER_NAMES)}.", rich_help_panel=GEN)]
SchedulerOpt = Annotated[Optional[str], typer.Option(help=f"One of: {', '.join(SCHEDULER_NAMES)}.", rich_help_panel=GEN)]
StepsOpt = Annotated[Optional[int], typer.Option(help="Sampling steps.", rich_help_panel=GEN)]
CfgOpt = Annotated[Optional[float], typer.Option(help="CFG scale; 1 skips the negative prompt (twice as fast).", rich_help_panel=GEN)]
ShiftOpt = Annotated[Optional[float], typer.Option(help="Flow shift (ModelSamplingAuraFlow), default 3.", rich_help_panel=GEN)]
SizeOpt = Annotated[Optional[str], typer.Option(help="WxH, multiples of 16, e.g. 832x1216.", rich_help_panel=GEN)]
WidthOpt = Annotated[Optional[int], typer.Option(help="Width (multiple of 16).", rich_help_panel=GEN)]
HeightOpt = Annotated[Optional[int], typer.Option(help="Height (multiple of 16).", rich_help_panel=GEN)]
LoraOpt = Annotated[Optional[list[str]], typer.Option("--lora", help="NAME[:WEIGHT], repeatable; on top of the persistent stack.", rich_help_panel=GEN)]
NoStackOpt = Annotated[bool, typer.Option("--no-stack", help="Ignore the persistent LoRA stack.", rich_help_panel=GEN)]
AllowUnmatchedOpt = Annotated[bool, typer.Option("--allow-unmatched", help="Apply LoRAs even if some keys do not fit (with a warning).", rich_help_panel=GEN)]
ModelOpt = Annotated[Optional[str], typer.Option(help="DiT: a path, a name in the models folder, or 'tiny'.", rich_help_panel=LOAD)]
TextEncoderOpt = Annotated[Optional[str], typer.Option(help="Qwen3 text encoder file.", rich_help_panel=LOAD)]
VaeOpt = Annotated[Optional[str], typer.Option(help="VAE file.", rich_help_panel=LOAD)]
QwenTokOpt = Annotated[Optional[str], typer.Option(help="Qwen tokenizer.json (or its folder).", rich_help_panel=LOAD)]
T5TokOpt = Annotated[Optional[str], typer.Option(help="T5 tokenizer.json (or its folder).", rich_help_panel=LOAD)]
ModelsDirOpt = Annotated[Optional[str], typer.Option(help="Models folder in ComfyUI layout (also $RDBT_MODELS).", rich_help_panel=LOAD)]
DeviceOpt = Annotated[Device, typer.Option(help="auto, cpu or cuda (under torchrun: each rank's local GPU).", rich_help_panel=LOAD)]
DTypeOpt = Annotated[DType, typer.Option(help="auto, fp32, bf16, fp16 or fp8 (weights).", rich_help_panel=LOAD)]
AttentionOpt = Annotated[Attention, typer.Option(help="Attention kernel: PyTorch SDPA, or xformers if installed.", rich_help_panel=LOAD)]
LowVramOpt = Annotated[bool, typer.Option("--low-vram", help="For small GPUs: text encoder on the CPU, DiT blocks streamed from host memory, tiled VAE decode.", rich_help_panel=LOAD)]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON record per image on stdout.", rich_help_panel=OUT)]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.", rich_help_panel=OUT)]


def _flags_to_gen(prompt, negative, sampler, scheduler, steps, cfg, shift, seed, size, width, height, count, loras):
    """Flags to GenParams, each given value checked by presets.value_problem (the rules presets obey too), so a bad
    flag stops the command before anything loads."""
    from dataclasses import fields

    from rdbt_cli.batch import parse_lora_arg
    from rdbt_cli.presets import parse_size, value_problem

    w, h = parse_size(size) if size is not None else (None, None)
    gen = GenParams(
        prompt=prompt, negative=negative, width=width if width is not None else w,
        height=height if height is not None else h, steps=steps, cfg=cfg, seed=seed, sampler=sampler,
        scheduler=scheduler, shift=shift, count=count, loras=[parse_lora_arg(s) for s in loras] if loras else None,
    )
    for f in fields(GenParams):
        value = getattr(gen, f.name)
        problem = value_problem(f.name, value) if value is not None else None
        if problem:
            raise ConfigError(f"--{'lora' if f.name == 'loras' else f.name}: {problem}")
    return gen


# The embedded tiny model is for trying the pipeline, so its defaults keep a CPU run to a few seconds.
TINY_DEFAULTS = GenParams(width=256, height=256, steps=12)


def _resolve_gen(flags: GenParams, preset_name: Optional[str], no_stack: bool, base: Optional[GenParams] = None,
                 model_flag: Optional[str] = None, cache: Optional[dict] = None):
    """defaults < (recipe of --from) < preset < persistent LoRA stack < explicit flags.

    Returns (GenParams, preset, model name): the model is the flag's, else the preset's; the tiny model brings its
    own defaults.
    """
    from dataclasses import fields

    from rdbt_cli import lora_stack, presets

    # `cache` lets a batch read the stack file and each preset once, not once per line.
    cache = {} if cache is None else cache
    if preset_name and ("preset", preset_name) not in cache:
        cache["preset", preset_name] = presets.load_preset(preset_name)
    preset = cache["preset", preset_name] if preset_name else None
    model_name = presets.resolve_model(preset, model_flag)
    if "stack" not in cache:
        cache["stack"] = [] if no_stack else lora_stack.load_stack()
    stack = cache["stack"]
    defaults = _overlay(DEFAULTS, TINY_DEFAULTS) if model_name == "tiny" else DEFAULTS
    if base is not None:
        for f in fields(GenParams):  # a recipe read from a PNG is user input too
            value = getattr(base, f.name)
            problem = presets.value_problem(f.name, value) if value is not None and f.name != "loras" else None
            if problem:
                raise ConfigError(f"recorded {f.name} {value!r}: {problem}")
        defaults = _overlay(defaults, base)
    gen = presets.resolve(preset, stack, flags, defaults=defaults)
    # `--lora NAME:0` switches a LoRA off even when the stack or preset spells its name another way: the zero goes
    # on to _resolve_loras, which merges entries by file.
    gen.loras = [*(gen.loras or []), *(s for s in flags.loras or [] if s.weight == 0)]
    return gen, preset, model_name


def _overlay(lower: GenParams, upper: GenParams) -> GenParams:
    vals = {k: (getattr(upper, k) if getattr(upper, k) is not None else getattr(lower, k)) for k in vars(lower)}
    return GenParams(**vals)


def _models_dirs(flag: Optional[str]) -> tuple[Path, ...]:
    from rdbt_cli import discovery

    return tuple(discovery.models_dirs(flag))


def _resolve_paths(load: LoadParams):
    """Model, text encoder, VAE and tokenizer files — all checked before any weights are read."""
    from rdbt_cli import discovery, text
    from rdbt_cli.pipeline import ModelPaths

    model_name = load.model
    if model_name == "tiny":
        from rdbt_cli.tiny import ensure_tiny_models

        return ensure_tiny_models()
    dirs = list(_models_dirs(load.models_dir))
    dit = discovery.resolve_component("dit", model_name, dirs)
    te = discovery.resolve_component("te", load.text_encoder, dirs)
    vae = discovery.resolve_component("vae", load.vae, dirs)
    for path in (dit, te, vae):
        discovery.read_safetensors_header(path)  # a truncated or pickled file fails here, before anything loads
    qwen, t5 = text.find_tokenizers(load.qwen_tokenizer, load.t5_tokenizer, text_encoder=te, models_dirs=dirs)
    return ModelPaths(dit=dit, text_encoder=te, vae=vae, qwen_tokenizer=qwen, t5_tokenizer=t5)


def _lora_dirs(models_dir: Optional[str], extra: tuple[Path, ...] = ()) -> list[Path]:
    from rdbt_cli import discovery

    candidates = [*extra, *(d / sub for d in _models_dirs(models_dir) for sub in discovery.KIND_FOLDERS["lora"])]
    return discovery._dedupe(d for d in candidates if d.is_dir())


def _resolve_loras(specs: list[LoraSpec], load: LoadParams, paths) -> list[tuple[Path, float, LoraSpec]]:
    """Names to files. One entry per file: a LoRA named two ways (stack `turbo`, flag `anima-turbo-lora`) is merged
    once, at its last weight, in the place it first appeared; weight 0 leaves it out."""
    from rdbt_cli import discovery, lora_stack

    # The loras/ folder beside the model's own folder first (ComfyUI layout), then the models folders'.
    dit = Path(paths.dit)
    beside = (dit.parent.parent / "loras",) if dit.parent.name in discovery.KIND_FOLDERS["dit"] else ()
    dirs = _lora_dirs(load.models_dir, beside)
    merged: dict[str, tuple[Path, float, LoraSpec]] = {}
    for spec in specs:
        path = lora_stack.resolve_lora_name(spec.name, dirs)
        merged[os.path.realpath(path)] = (path, spec.weight, spec)
    return [entry for entry in merged.values() if entry[1] != 0]


class _Hashes:
    """File hashes for the metadata, computed on one background thread from the moment the files are known.

    Hashing a 4 GB model the first time takes seconds (then discovery's cache answers), so it overlaps model loading
    and sampling instead of delaying the first image. One worker, so the hash cache has one writer; a daemon, so an
    error or Ctrl-C exits at once instead of waiting for queued hashes (the cache is written atomically).
    """

    def __init__(self):
        self._queue = None
        self._futures: dict = {}

    def _worker(self):
        from rdbt_cli import discovery

        while True:
            path, future = self._queue.get()
            try:
                future.set_result(discovery.file_hashes(path))
            except BaseException as exc:  # handed to whoever waits for this hash
                future.set_exception(exc)

    def start(self, *paths) -> None:
        import queue
        import threading
        from concurrent.futures import Future

        if self._queue is None:
            self._queue = queue.Queue()
            threading.Thread(target=self._worker, name="rdbt-hash", daemon=True).start()
        for path in paths:
            key = self._key(path)
            if key not in self._futures:
                self._futures[key] = Future()
                self._queue.put((path, self._futures[key]))

    @staticmethod
    def _key(path):
        try:
            st = os.stat(path)
        except OSError:
            return (str(path), None, None)
        return (os.path.abspath(path), st.st_size, st.st_mtime_ns)  # a file replaced in between is hashed again

    def get(self, path) -> dict:
        self.start(path)
        try:
            return self._futures[self._key(path)].result()
        except (OSError, RdbtError):
            return {}


_hashes = _Hashes()


def _component_record(path: Path) -> dict:
    return {"name": Path(path).stem, "file": Path(path).name, "path": str(Path(path).resolve()),
            "hash": _hashes.get(path).get("autov2")}


def _make_recipe(gen: GenParams, seed: int, index: int, paths, loras, preset, load: LoadParams, engine) -> dict:
    lora_recs = []
    for path, weight, _ in loras:
        hs = _hashes.get(path)
        lora_recs.append({"name": Path(path).stem, "file": Path(path).name, "path": str(Path(path).resolve()),
                          "weight": weight, "hash": hs.get("autov2"), "a1111_hash": hs.get("a1111_lora")})
    return {
        "schema": "rdbt.recipe/1",
        "rdbt_version": __version__,
        "prompt": gen.prompt,
        "negative": gen.negative or "",
        "seed": seed,
        "steps": gen.steps,
        "cfg": gen.cfg,
        "sampler": gen.sampler,
        "scheduler": gen.scheduler,
        "shift": gen.shift,
        "width": gen.width,
        "height": gen.height,
        "model": _component_record(paths.dit) if load.model != "tiny" else {"name": "tiny", "file": "tiny", "hash": None},
        "text_encoder": _component_record(paths.text_encoder) if load.model != "tiny" else None,
        "vae": _component_record(paths.vae) if load.model != "tiny" else None,
        "loras": lora_recs,
        "preset": getattr(preset, "name", None),
        "device": engine.device.type,
        "dtype": str(engine.dtype).replace("torch.", ""),
        "weights_fp8": engine.weights_fp8,
        "index": index,
    }


def _check_output(out: Optional[str]) -> Path:
    """Fail before loading anything if the output folder cannot be written."""
    dest = Path(out) if out else Path("outputs")
    # Same rule as metadata.save_png: a .png path is a file, anything else a folder.
    folder = dest.parent if dest.suffix.lower() == ".png" else dest
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"{folder}: output folder cannot be created or written ({probe} is in the way or read-only); "
                          "choose another with --out")
    return dest


class _Progress:
    """Rich progress on stderr: one bar per image with ETA, plus an overall bar when there are several."""

    def __init__(self, total_images: int, steps: int, quiet: bool):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("eta"), TimeRemainingColumn(), console=_stderr(), disable=quiet, transient=False,
            redirect_stdout=False, redirect_stderr=False,
        )
        self.total_images = total_images
        self.steps = steps
        self.overall = None
        self.task = None
        self.live = not quiet

    def __enter__(self):
        self.progress.__enter__()
        if self.total_images > 1:
            self.overall = self.progress.add_task("images", total=self.total_images)
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def start_image(self, label: str, steps: int):
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(label, total=steps)

    def step(self, info):
        self.progress.advance(self.task)

    def image_done(self):
        if self.overall is not None:
            self.progress.advance(self.overall)


_T_START = time.perf_counter()  # taken at import, i.e. right after the interpreter started rdbt


def _timings(result, eng, first: bool) -> dict:
    t = {k: round(v, 4) for k, v in result.timings.items()}
    if first:
        t["load_s"] = round(eng.timings["load_s"], 4)
        t["start_to_first_step_s"] = round(result.timings["first_step_at"] - _T_START, 4)
    t.pop("first_step_at", None)
    return t


def _emit(path: Path, recipe: dict, as_json: bool, bar: "_Progress | None" = None, timings: dict | None = None):
    record = {"path": str(path), **recipe, **({"timings": timings} if timings else {})}
    line = json.dumps(record, ensure_ascii=False) if as_json else str(path)
    if bar is not None and bar.live and sys.stdout.isatty() and sys.stderr.isatty():
        bar.progress.console.print(line, markup=False, highlight=False, soft_wrap=True)  # above the live bar
    else:
        typer.echo(line)


# ---------------------------------------------------------------------------------------------------------------------
# gen
# ---------------------------------------------------------------------------------------------------------------------


@app.command()
@friendly_errors
def gen(
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt, in ComfyUI weight syntax: (word:1.2); - reads stdin.")] = None,
    negative: NegativeOpt = None,
    preset: PresetOpt = None,
    sampler: SamplerOpt = None,
    scheduler: SchedulerOpt = None,
    steps: StepsOpt = None,
    cfg: CfgOpt = None,
    shift: ShiftOpt = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed (random if absent; always recorded).", rich_help_panel=GEN)] = None,
    size: SizeOpt = None,
    width: WidthOpt = None,
    height: HeightOpt = None,
    count: Annotated[Optional[int], typer.Option(help="Images to make, with seeds seed, seed+1, …", rich_help_panel=GEN)] = None,
    lora: LoraOpt = None,
    no_stack: NoStackOpt = False,
    allow_unmatched: AllowUnmatchedOpt = False,
    from_image: Annotated[Optional[Path], typer.Option("--from", help="Re-generate from the recipe recorded in a PNG (flags override).", rich_help_panel=GEN)] = None,
    model: ModelOpt = None,
    text_encoder: TextEncoderOpt = None,
    vae: VaeOpt = None,
    qwen_tokenizer: QwenTokOpt = None,
    t5_tokenizer: T5TokOpt = None,
    models_dir: ModelsDirOpt = None,
    device: DeviceOpt = Device.auto,
    dtype: DTypeOpt = DType.auto,
    low_vram: LowVramOpt = False,
    attention: AttentionOpt = Attention.sdpa,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Output file or folder (default ./outputs/).", rich_help_panel=OUT)] = None,
    as_json: JsonOpt = False,
    no_metadata: Annotated[bool, typer.Option("--no-metadata", help="Write no metadata chunks.", rich_help_panel=OUT)] = False,
    quiet: QuietOpt = False,
):
    """Generate images from a prompt."""
    base = None
    if from_image is not None:
        from rdbt_cli import metadata

        base, recorded = _recipe_to_gen(metadata.read_png(from_image)["recipe"])
        model = model or recorded["model"]
        if dtype == DType.auto and recorded.get("weights_fp8"):
            dtype = DType.fp8  # fp8 storage changes LoRA merges (requantised) and so the image
        elif dtype == DType.auto and recorded.get("dtype") in _RECORDED_DTYPES:
            dtype = DType(_RECORDED_DTYPES[recorded["dtype"]])  # same precision, same image
        if model != "tiny":
            text_encoder = text_encoder or recorded["text_encoder"]
            vae = vae or recorded["vae"]
        if prompt is None:
            prompt = base.prompt
    if prompt == "-":
        prompt = sys.stdin.read().strip() or None
    if prompt is None:
        raise ConfigError("no prompt given: rdbt gen \"your prompt\" (or --from IMAGE)")
    flags = _flags_to_gen(prompt, negative, sampler, scheduler, steps, cfg, shift, seed, size, width, height, count, lora)
    # A recorded recipe holds its complete LoRA stack, so the persistent stack is not added to it again.
    gen_p, preset_obj, model = _resolve_gen(flags, preset, no_stack or from_image is not None, base, model)
    load = LoadParams(model=model, text_encoder=text_encoder, vae=vae, models_dir=models_dir, device=device.value,
                      dtype=dtype.value, qwen_tokenizer=qwen_tokenizer, t5_tokenizer=t5_tokenizer, low_vram=low_vram,
                      attention=attention.value)
    dest = _check_output(out)
    paths = _resolve_paths(load)
    loras = _resolve_loras(gen_p.loras or [], load, paths)
    if load.model != "tiny":
        _hashes.start(paths.dit, paths.text_encoder, paths.vae, *(p for p, _, _ in loras))
    first_seed = gen_p.seed if gen_p.seed is not None else random.getrandbits(63)

    from rdbt_cli import metadata
    from rdbt_cli.pipeline import Engine, generate

    eng = Engine.load(paths, device=load.device, dtype=load.dtype, low_vram=load.low_vram, attention=load.attention)
    patch = eng.set_loras([(p, w) for p, w, _ in loras], allow_unmatched=allow_unmatched)
    for warning in getattr(patch, "warnings", []) or []:
        typer.echo(f"warning: {warning}", err=True)
    n = gen_p.count or 1
    with _Progress(n, gen_p.steps, quiet) as bar:
        for i in range(n):
            s = (first_seed + i) % 2**64
            bar.start_image(f"seed {s}", gen_p.steps)
            result = generate(eng, gen_p, seed=s, index=i, callback=bar.step)
            recipe = _make_recipe(gen_p, s, i, paths, loras, preset_obj, load, eng)
            path = metadata.save_png(result.image, dest,
                                     None if no_metadata else recipe, metadata=not no_metadata, stem=f"rdbt-{s}")
            bar.image_done()
            _emit(path, recipe, as_json, bar, _timings(result, eng, i == 0))


_RECORDED_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def _recipe_to_gen(recipe: dict) -> tuple[GenParams, dict]:
    fields = {k: recipe.get(k) for k in ("prompt", "negative", "width", "height", "steps", "cfg", "seed", "sampler",
                                         "scheduler", "shift")}
    # A LoRA recorded with its path is taken from there while that file exists (it may sit outside loras/).
    loras = [
        LoraSpec(l["path"] if l.get("path") and Path(l["path"]).is_file() else l["name"], float(l.get("weight", 1.0)))
        for l in recipe.get("loras") or []
    ]
    def locate(component):
        # The recorded path while that file exists, else the file name for the models folder to resolve again.
        if isinstance(component, dict) and component.get("path") and Path(component["path"]).is_file():
            return component["path"]
        name = component.get("file") if isinstance(component, dict) else component
        return Path(name).stem if name and name != "tiny" else name

    recorded = {k: locate(recipe.get(k)) for k in ("model", "text_encoder", "vae")}
    recorded["dtype"] = recipe.get("dtype")
    recorded["weights_fp8"] = bool(recipe.get("weights_fp8"))
    return GenParams(**fields, count=1, loras=loras), recorded


# ---------------------------------------------------------------------------------------------------------------------
# batch
# ---------------------------------------------------------------------------------------------------------------------


@app.command()
@friendly_errors
def batch(
    file: Annotated[str, typer.Argument(help="Prompt file: one prompt per line, optional ` --flag value` overrides; - for stdin.")],
    negative: NegativeOpt = None,
    preset: PresetOpt = None,
    sampler: SamplerOpt = None,
    scheduler: SchedulerOpt = None,
    steps: StepsOpt = None,
    cfg: CfgOpt = None,
    shift: ShiftOpt = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for every line (default: a fixed seed per line).", rich_help_panel=GEN)] = None,
    size: SizeOpt = None,
    width: WidthOpt = None,
    height: HeightOpt = None,
    count: Annotated[Optional[int], typer.Option(help="Images per line.", rich_help_panel=GEN)] = None,
    lora: LoraOpt = None,
    no_stack: NoStackOpt = False,
    allow_unmatched: AllowUnmatchedOpt = False,
    model: ModelOpt = None,
    text_encoder: TextEncoderOpt = None,
    vae: VaeOpt = None,
    qwen_tokenizer: QwenTokOpt = None,
    t5_tokenizer: T5TokOpt = None,
    models_dir: ModelsDirOpt = None,
    device: DeviceOpt = Device.auto,
    dtype: DTypeOpt = DType.auto,
    low_vram: LowVramOpt = False,
    attention: AttentionOpt = Attention.sdpa,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Output folder (default ./outputs/).", rich_help_panel=OUT)] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Generate every line of a prompt file; run it again to resume where an interrupted run stopped.

    Under torchrun each rank takes its share of the images: torchrun --nproc-per-node 4 -m rdbt_cli batch prompts.txt
    """
    import time

    from rdbt_cli import batch as batch_mod

    t_start = time.perf_counter()
    rank, world, local_rank = batch_mod.torchrun_env()
    text = batch_mod.read_batch_source(file)
    lines = batch_mod.parse_batch(text)
    out_dir = Path(out) if out else Path("outputs")
    _check_output(str(out_dir) + os.sep)
    base = _flags_to_gen(None, negative, sampler, scheduler, steps, cfg, shift, seed, size, width, height, count, lora)
    # The same file with other batch-wide settings is another batch: it must not count the first one's images as done.
    settings = [vars(base), preset, model, text_encoder, vae, dtype.value, no_stack]
    bid = batch_mod.batch_id(text + "\0" + json.dumps(settings, default=str, sort_keys=True))
    failures: dict[int, str] = {line.lineno: line.error for line in lines if line.error}
    resolved: dict[int, tuple] = {}
    cache: dict = {}
    for line in lines:
        if line.error:
            continue
        try:
            g, p, m = _resolve_gen(batch_mod.merge_flags(base, line.overrides), line.preset or preset, no_stack,
                                   model_flag=model, cache=cache)
            if g.seed is None:
                g.seed = batch_mod.line_seed(bid, line.lineno)
            resolved[line.lineno] = (g, p, m)
        except RdbtError as err:
            failures[line.lineno] = f"line {line.lineno}: {err}"
    good = [line for line in lines if line.lineno in resolved]
    done = batch_mod.load_done(out_dir, bid)
    jobs = batch_mod.plan_jobs(good, {ln: r[0].count or 1 for ln, r in resolved.items()}, rank, world, done)

    dev = device.value
    if world > 1 and dev in ("auto", "cuda"):
        from rdbt_cli.pipeline import resolve_device

        if resolve_device(dev).type == "cuda":
            dev = f"cuda:{local_rank}"
    load = LoadParams(model=model, text_encoder=text_encoder, vae=vae, models_dir=models_dir, device=dev,
                      dtype=dtype.value, qwen_tokenizer=qwen_tokenizer, t5_tokenizer=t5_tokenizer, low_vram=low_vram,
                      attention=attention.value)
    made = 0
    if jobs:
        made = _run_batch_jobs(jobs, resolved, failures, load, out_dir, bid, rank, allow_unmatched, as_json, quiet)
    elapsed = time.perf_counter() - t_start
    _batch_summary(rank, world, made, len(done), failures, elapsed)


def _run_batch_jobs(jobs, resolved, failures, load, out_dir, bid, rank, allow_unmatched, as_json, quiet):
    from dataclasses import replace

    from rdbt_cli import batch as batch_mod, metadata
    from rdbt_cli.pipeline import Engine, generate

    # One model per batch process: the first job's. Lines that resolve to another file fail with that reason.
    load = replace(load, model=resolved[jobs[0].lineno][2])
    paths = _resolve_paths(load)
    loaded = _model_identity(load.model, paths.dit)
    if load.model != "tiny":
        _hashes.start(paths.dit, paths.text_encoder, paths.vae)
    eng = Engine.load(paths, device=load.device, dtype=load.dtype, low_vram=load.low_vram, attention=load.attention)
    made, current_stack, identities, lora_files = 0, None, {load.model: loaded}, {}
    with batch_mod.Manifest(out_dir, bid, rank) as manifest, _Progress(len(jobs), 0, quiet) as bar:
        for job in jobs:
            if job.lineno in failures:
                continue
            g, p, wanted = resolved[job.lineno]
            try:
                if wanted not in identities:
                    identities[wanted] = _model_identity(wanted, None, load)
            except RdbtError as err:
                failures[job.lineno] = f"line {job.lineno}: {err}"
                continue
            if identities[wanted] != loaded:
                failures[job.lineno] = (f"line {job.lineno}: it asks for model {wanted or 'the default model'!r} but "
                                        f"this batch runs {Path(paths.dit).name!r}; put those lines in their own batch")
                continue
            s = (g.seed + job.index) % 2**64
            stem = f"L{job.lineno:04d}-{job.index:03d}-{s}"
            if _already_saved(out_dir / f"{stem}.png", bid, job.key):
                # Killed after the PNG was written but before its manifest line: record it, do not make it twice.
                manifest.add(job, f"{stem}.png", s)
                continue
            try:
                key = tuple(g.loras or ())
                if key not in lora_files:  # resolve each line's stack once, not once per image
                    lora_files[key] = _resolve_loras(list(key), load, paths)
                loras = lora_files[key]
                stack = [(path, w) for path, w, _ in loras]
                if stack != current_stack:
                    patch = eng.set_loras(stack, allow_unmatched=allow_unmatched)
                    current_stack = stack
                    for warning in getattr(patch, "warnings", []) or []:
                        typer.echo(f"warning: line {job.lineno}: {warning}", err=True)
                bar.start_image(f"line {job.lineno} #{job.index + 1} seed {s}", g.steps)
                result = generate(eng, g, seed=s, index=job.index, callback=bar.step)
                recipe = _make_recipe(g, s, job.index, paths, loras, p, load, eng)
                recipe["batch"] = {"id": bid, "line": job.lineno, "job": job.key}
                path = metadata.save_png(result.image, out_dir, recipe, stem=stem)
            except RdbtError as err:
                failures[job.lineno] = f"line {job.lineno}: {err}"
                current_stack = None
                continue
            manifest.add(job, Path(path).name, s)
            made += 1
            bar.image_done()
            _emit(path, recipe, as_json, bar, _timings(result, eng, made == 1))
    return made


def _model_identity(name: Optional[str], resolved_path, load: Optional[LoadParams] = None) -> str:
    """What a model name means on disk ('tiny' or a real path), so two spellings of one file compare equal."""
    from rdbt_cli import discovery

    if name == "tiny":
        return "tiny"
    if resolved_path is None:
        resolved_path = discovery.resolve_component("dit", name, list(_models_dirs(load.models_dir)))
    return os.path.realpath(resolved_path)


def _already_saved(path: Path, bid: str, job_key: str) -> bool:
    from rdbt_cli import metadata

    if not path.exists():
        return False
    try:
        batch_rec = metadata.read_png(path)["recipe"].get("batch") or {}
    except RdbtError:
        return False
    return batch_rec.get("id") == bid and batch_rec.get("job") == job_key


def _batch_summary(rank, world, made, skipped, failures, elapsed):
    """Rank 0 prints one summary for all ranks; every rank exits non-zero if any line failed anywhere."""
    results = [(made, failures, elapsed)]
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        results = [None] * world
        dist.all_gather_object(results, (made, failures, elapsed))
        dist.destroy_process_group()
    total = sum(r[0] for r in results)
    all_failures = {}
    for r in results:
        all_failures.update(r[1])
    wall = max(r[2] for r in results)
    if rank == 0:
        rate = total / wall * 60 if wall > 0 else 0.0
        msg = f"{total} images made"
        if skipped:
            msg += f", {skipped} already done"
        msg += f", {len(all_failures)} failed lines, {rate:.1f} images/min over {world} process(es)"
        typer.echo(msg, err=True)
        for ln in sorted(all_failures):
            typer.echo(f"  {all_failures[ln]}", err=True)
    if all_failures:
        raise typer.Exit(1)


# ---------------------------------------------------------------------------------------------------------------------
# inspect, models, presets, samplers
# ---------------------------------------------------------------------------------------------------------------------


@app.command()
@friendly_errors
def inspect(
    images: Annotated[list[Path], typer.Argument(help="PNG files to read.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the recipe(s) as JSON.")] = False,
):
    """Show the recipe recorded in images (rdbt first, then A1111/Forge, then ComfyUI metadata)."""
    from rdbt_cli import metadata

    failed = 0
    for path in images:
        try:
            info = metadata.read_png(path)
        except RdbtError as err:
            if len(images) == 1:
                raise
            typer.echo(f"error: {err}", err=True)
            failed += 1
            continue
        if as_json:
            typer.echo(json.dumps({"path": str(path), "source": info["source"], **info["recipe"]}, ensure_ascii=False))
        else:
            if len(images) > 1:
                typer.echo(f"== {path}")
            typer.echo(metadata.summarise(info))
    if failed:
        raise typer.Exit(1)


@app.command()
@friendly_errors
def models(
    models_dir: Annotated[Optional[str], typer.Option(help="Models folder (also $RDBT_MODELS).")] = None,
    hash_files: Annotated[bool, typer.Option("--hash", help="Hash files not hashed before (slow once per file).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON output.")] = False,
):
    """List the model files rdbt finds, with component type, size and short hash (AutoV2, as Civitai shows)."""
    from rdbt_cli import discovery

    dirs = list(_models_dirs(models_dir))
    if not dirs:
        raise ConfigError(
            "no models folder found; pass --models-dir DIR or set RDBT_MODELS (ComfyUI's models/ works as is), "
            "or fetch the official files with `rdbt download`"
        )
    items = discovery.inventory(dirs)
    if hash_files:
        from dataclasses import replace

        items = [replace(i, hash=discovery.file_hashes(i.path)["autov2"]) if i.supported and not i.hash else i
                 for i in items]
    if as_json:
        typer.echo(json.dumps([_info_dict(i, dirs) for i in items], ensure_ascii=False, indent=1))
        return
    from rich.table import Table
    from rich.console import Console

    table = Table("kind", "file", "size", "hash", "details", title=" · ".join(str(d) for d in dirs))
    for i in items:
        d = _info_dict(i, dirs)
        table.add_row(d["kind"], d["file"], f"{d['size'] / 2**20:,.1f} MiB", d["hash"] or "", d["details"])
    Console().print(table)


_DETAIL_KEYS = ("blocks", "width", "layers", "base_dim", "format", "algo", "rank", "targets", "quant", "dtype", "error")


def _info_dict(info, dirs=()) -> dict:
    d = info if isinstance(info, dict) else dict(vars(info))
    path = Path(d["path"])
    rel = next((path.relative_to(root) for root in dirs if root in path.parents), path)
    details = d.get("details") or {}
    shown = {k: details[k] for k in _DETAIL_KEYS if details.get(k) not in (None, "")}
    return {
        "kind": d.get("kind"),
        "path": str(path),
        "file": str(rel),
        "size": d.get("size") if d.get("size") is not None else (path.stat().st_size if path.exists() else 0),
        "hash": d.get("hash") or d.get("short_hash"),
        "details": ", ".join(f"{k} {v}" for k, v in shown.items()),
    }


@app.command()
@friendly_errors
def presets(
    name: Annotated[Optional[str], typer.Argument(help="Show this preset in full.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON output.")] = False,
):
    """List the presets (built in and in your config folder), or show one."""
    from rdbt_cli import presets as presets_mod

    if name is None:
        items = presets_mod.list_presets()
        if as_json:
            typer.echo(json.dumps([p._asdict() for p in items], indent=1, default=str))
            return
        for p in items:
            typer.echo(f"{p.name:16} {p.source:8} {p.description or ''}")
        return
    preset = presets_mod.load_preset(name)
    path = getattr(preset, "path", None)
    if as_json:
        from dataclasses import asdict

        typer.echo(json.dumps(asdict(preset), indent=1, default=str))
    elif path and Path(path).exists():
        typer.echo(f"# {path}")
        typer.echo(Path(path).read_text(encoding="utf-8"))
    else:
        typer.echo(str(preset))


@app.command()
def samplers():
    """List the sampler and scheduler names rdbt accepts."""
    typer.echo("samplers:   " + ", ".join(SAMPLER_NAMES))
    typer.echo("schedulers: " + ", ".join(SCHEDULER_NAMES))


# ---------------------------------------------------------------------------------------------------------------------
# lora-stack
# ---------------------------------------------------------------------------------------------------------------------


@app.command("lora-stack")
@friendly_errors
def lora_stack_cmd(
    add: Annotated[Optional[list[str]], typer.Option("--add", help="NAME[:WEIGHT] to add (e.g. turbo:0.3).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="NAME:WEIGHT to change a weight.")] = None,
    remove: Annotated[Optional[list[str]], typer.Option("--remove", help="NAME to remove.")] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Remove every LoRA from the stack.")] = False,
    list_: Annotated[bool, typer.Option("--list", help="Show the stack (the default).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON output.")] = False,
    models_dir: Annotated[Optional[str], typer.Option(help="Models folder whose loras/ names resolve.")] = None,
):
    """Show or edit the persistent LoRA stack that gen and batch apply."""
    from rdbt_cli import lora_stack
    from rdbt_cli.batch import parse_lora_arg

    if clear:
        lora_stack.clear()
    for item in add or []:
        spec = parse_lora_arg(item)
        if Path(spec.name).expanduser().is_file():
            # A path is stored absolute, so the stack works from any folder.
            spec = LoraSpec(str(Path(spec.name).expanduser().resolve()), spec.weight)
        else:
            lora_stack.resolve_lora_name(spec.name, _lora_dirs(models_dir))  # fail now, not at the next gen
        lora_stack.add(spec)
    for item in set_ or []:
        spec = parse_lora_arg(item)
        if ":" not in item:
            raise ConfigError(f"--set {item}: give NAME:WEIGHT, e.g. --set turbo:0.4")
        lora_stack.set_weight(spec.name, spec.weight)
    for item in remove or []:
        lora_stack.remove(item)
    stack = lora_stack.load_stack()
    if as_json:
        typer.echo(json.dumps([{"name": s.name, "weight": s.weight} for s in stack]))
    elif not stack:
        typer.echo("the LoRA stack is empty (add one with: rdbt lora-stack --add NAME:WEIGHT)")
    else:
        for s in stack:
            typer.echo(f"{s.name}:{s.weight:g}")


# ---------------------------------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------------------------------


@app.command()
@friendly_errors
def bench(
    model: Annotated[Optional[str], typer.Option(help="'full' (random Anima 2B, no download), 'tiny', or a DiT file.")] = "full",
    size: Annotated[str, typer.Option(help="WxH.")] = "1024x1024",
    steps: Annotated[int, typer.Option(help="Sampling steps.")] = 4,
    sampler: Annotated[str, typer.Option(help="Sampler.")] = "euler",
    scheduler: Annotated[str, typer.Option(help="Scheduler.")] = "simple",
    cfg: Annotated[float, typer.Option(help="CFG scale (1: one forward per step).")] = 1.0,
    device: Annotated[Device, typer.Option(help="auto, cpu or cuda.")] = Device.auto,
    dtype: Annotated[DType, typer.Option(help="auto, fp32, bf16, fp16 or fp8.")] = DType.auto,
    decode: Annotated[bool, typer.Option(help="Include the VAE decode.")] = True,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the DiT blocks (compile time shows in first_step_s).")] = False,
    low_vram: Annotated[bool, typer.Option("--low-vram", help="Streamed DiT blocks (GPU) and tiled VAE decode, as gen --low-vram.")] = False,
    attention: Annotated[Attention, typer.Option(help="Attention kernel: sdpa or xformers.")] = Attention.sdpa,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
):
    """Measure speed and memory: seconds per step, images/min, TFLOP/s and MFU, peak memory, load time."""
    from rdbt_cli import bench as bench_mod
    from rdbt_cli import presets

    problem = presets.value_problem("sampler", sampler) or presets.value_problem("scheduler", scheduler)
    if problem:
        raise ConfigError(problem)
    w, h = presets.parse_size(size)
    result = bench_mod.run(model=model, width=w, height=h, steps=steps, sampler=sampler, scheduler=scheduler, cfg=cfg,
                           device=device.value, dtype=dtype.value, decode=decode, compile=compile,
                           low_vram=low_vram, attention=attention.value)
    if as_json:
        typer.echo(json.dumps(result))
        return
    for key, value in result.items():
        typer.echo(f"{key:22} {value}")


# ---------------------------------------------------------------------------------------------------------------------
# download
# ---------------------------------------------------------------------------------------------------------------------


@app.command()
@friendly_errors
def download(
    models_dir: Annotated[Optional[str], typer.Option(help="Where to put the files (ComfyUI layout).")] = None,
    only: Annotated[Optional[list[str]], typer.Option("--only", help="dit, te, vae or tokenizers (repeatable).")] = None,
):
    """Fetch the official Anima files and tokenizers from Hugging Face (resumable)."""
    from rdbt_cli import discovery

    # Default: rdbt's own models folder, which model discovery searches too.
    target = models_dir or os.environ.get("RDBT_MODELS", "").split(os.pathsep)[0] or discovery.default_models_dir()
    comps = tuple(only) if only else ("dit", "te", "vae", "tokenizers")
    for path in discovery.download_official(Path(target), comps):
        typer.echo(str(path))
