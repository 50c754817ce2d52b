"""Typer options of the commands that generate, declared once: one per row of the settings table (with its default
and completion) and one per LoadParams field; `generating` gives them to a command as `flags` and `load`."""

from __future__ import annotations

import functools
import inspect as pyinspect
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from rdbt_cli import coercion, completion, naming, settings
from rdbt_cli.config import ATTENTION_BACKENDS, DEVICES, DTYPES, LoadParams

# Choice types for Typer, built from config's lists so the names live in one place.
Device = Enum("Device", {name: name for name in DEVICES}, type=str)
DType = Enum("DType", {name: name for name in DTYPES}, type=str)
Attention = Enum("Attention", {name: name for name in ATTENTION_BACKENDS}, type=str)


def flag(*decls: str, **kw):
    """A boolean option; its help shows no value."""
    return typer.Option(*decls, metavar="", **kw)



LOAD = "Models and hardware"
OUT = "Output"

# Options that gen, batch and grid share.
PresetOpt = Annotated[Optional[str], typer.Option(help="Preset name or TOML path (see `rdbt presets`).", rich_help_panel=settings.GEN_PANEL, metavar="NAME|PATH", autocompletion=completion.presets)]
NoStackOpt = Annotated[bool, flag("--no-stack", help="Ignore the persistent LoRA stack.", rich_help_panel=settings.GEN_PANEL)]
AllowUnmatchedOpt = Annotated[bool, flag("--allow-unmatched", help="Apply LoRAs even if some keys do not fit (with a warning).", rich_help_panel=settings.GEN_PANEL)]
JsonOpt = Annotated[bool, flag("--json", help="One JSON record per image on stdout.", rich_help_panel=OUT)]
QuietOpt = Annotated[bool, flag("--quiet", "-q", help="No progress bar.", rich_help_panel=OUT)]

# LoadParams fields as options: (name, type, default, help).
_LOAD_OPTIONS = (
    ("model", Optional[str], None, "DiT: a path, a name in the models folder, or 'tiny'."),
    ("text_encoder", Optional[str], None, "Qwen3 text encoder file."),
    ("vae", Optional[str], None, "VAE file."),
    ("qwen_tokenizer", Optional[str], None, "Qwen tokenizer.json (or its folder)."),
    ("t5_tokenizer", Optional[str], None, "T5 tokenizer.json (or its folder)."),
    ("models_dir", Optional[str], None, "Models folder in ComfyUI layout (also $RDBT_MODELS)."),
    ("compile", bool, False, "torch.compile the DiT blocks: faster steps on a GPU after a slow first one."),
    ("device", Device, Device.auto, "auto, cpu or cuda (under torchrun: each rank's local GPU)."),
    ("dtype", DType, DType.auto, "auto, fp32, bf16, fp16 or fp8 (weights)."),
    ("low_vram", bool, False, "For small GPUs: text encoder on the CPU, DiT blocks streamed from host memory, tiled "
                              "VAE decode."),
    ("attention", Attention, Attention.sdpa, "Attention kernel: PyTorch SDPA, or xformers if installed."),
)


# What --help shows as an option's value, instead of Python types.
_METAVARS = {int: "N", float: "NUMBER", str: "TEXT", Path: "FILE", list: "NAME[:WEIGHT]", bool: ""}
_LOAD_METAVARS = {"model": "NAME|PATH", "models_dir": "DIR", "size": "WxH", "name": "TEMPLATE",
                  "seeds_from": "PNG|DIR", "preview_file": "FILE.png"}
_COMPLETE = {"model": completion.models}


def _with_default(s: settings.Setting) -> str:
    """The row's help with the table's default (which a preset, or the tiny model's size and steps, replaces)."""
    if s.default in (None, "", [], 0.0) or isinstance(s.default, bool):
        return s.help
    shown = f"{s.default:g}" if isinstance(s.default, float) else str(s.default)
    return f"{s.help} [dim]\\[default: {shown}][/dim]"


def _setting_param(s: settings.Setting) -> pyinspect.Parameter:
    kind = str if s.parse else list[str] if s.type is list else s.type  # a row with its own syntax takes text
    names = getattr(s.check, "names", None)
    complete = completion.choices(names) if names else completion.loras if s.type is list else None
    metavar = getattr(s.parse, "metavar", None) or ("NAME" if names else _METAVARS.get(s.type))
    option = typer.Option(*s.flags, help=_with_default(s), rich_help_panel=settings.GEN_PANEL, metavar=metavar,
                          autocompletion=complete)
    return pyinspect.Parameter(s.name, pyinspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                               annotation=Annotated[Optional[kind], option])


def _option_param(name: str, kind, default, help: str, panel: str) -> pyinspect.Parameter:
    if kind is bool:
        option = flag(f"--{name.replace('_', '-')}", help=help, rich_help_panel=panel)
    else:
        option = typer.Option(help=help, rich_help_panel=panel, autocompletion=_COMPLETE.get(name),
                              metavar=_LOAD_METAVARS.get(name, "FILE" if kind == Optional[str] else None))
    return pyinspect.Parameter(name, pyinspect.Parameter.POSITIONAL_OR_KEYWORD, default=default,
                               annotation=Annotated[kind, option])


# Options of a command that declares an `output` parameter (Output): (name, type, default, help, panel).
_OUTPUT_OPTIONS = (
    ("seeds_from", Optional[list[str]], None, "Use the seeds recorded in these PNGs (files, or every PNG of a "
     "folder), each once, as a seed list; repeatable.", settings.GEN_PANEL),
    ("name", Optional[str], None, 'File name template, e.g. "{seed}-{sampler}-{steps}-{prompt:40}": any setting, and '
     "index, line, model, preset, size, date, time; {field:N} keeps N characters. A taken name is numbered.", OUT),
    ("preview_file", Optional[str], None, "Rewrite this PNG with a preview of every step (for an image viewer).", OUT),
    ("no_preview", bool, False, "No picture of each step on the terminal (also off with --quiet, --json or when "
     "stderr is no terminal; RDBT_PREVIEW=kitty|iterm|sixel|blocks picks how it is drawn).", OUT),
)


@dataclass
class Output:
    """How a command names its images and shows their steps."""

    name: Optional[naming.NameTemplate] = None
    preview_file: Optional[str] = None
    no_preview: bool = False

    def preview(self, quiet: bool, as_json: bool):
        """The step preview for a progress display, or None: drawn on a terminal stderr unless switched off, written
        to --preview-file whenever one is given."""
        import os
        import sys

        from rdbt_cli import preview

        off = self.no_preview or quiet or as_json or not sys.stderr.isatty() or os.environ.get("TERM") == "dumb"
        off = off or os.environ.get("WORLD_SIZE", "1") not in ("", "1")  # torchrun: ranks would draw over each other
        protocol = None if off else preview.detect()
        return preview.Preview(protocol, self.preview_file) if protocol or self.preview_file else None

    def stem(self, job, default: str, *, dit=None, line: Optional[int] = None) -> str:
        """The file stem of `job` (jobs.Job): from the --name template, else `default`."""
        if self.name is None:
            return default
        return self.name.stem(job.settings, seed=job.seed, index=job.index, line=line, model=job.model or dit,
                              preset=job.preset)


def _output(values: dict, flags) -> Output:
    """Output from its options' values; --seeds-from becomes the seed list of `flags`. Checked before any loading."""
    from rdbt_cli import jobs, preview

    if values["seeds_from"]:
        if flags.seed is not None:
            from rdbt_cli.errors import ConfigError

            raise ConfigError("give --seed or --seeds-from, not both")
        flags.seed = jobs.seeds_from(values["seeds_from"])
    path = values["preview_file"]
    if path is not None:
        preview.check_file(path)
    return Output(naming.parse(values["name"]), path, values["no_preview"])


def generating(command):
    """Gives `command` one option per settings row with flags (plus --size) and per LoadParams field; it receives
    them as `flags` (GenParams, None = not given) and `load` (LoadParams). A command with an `output` parameter also
    gets the _OUTPUT_OPTIONS, as `output` (Output); one with a `server` parameter gets `serving`'s options."""
    command = serving(command) if "server" in pyinspect.signature(command).parameters else command
    own = list(pyinspect.signature(command, eval_str=True).parameters.values())
    at = [p.name for p in own].index("flags")
    added = [_setting_param(s) for s in settings.SETTINGS if s.flags]
    size_help = f"{settings.SIZE_HELP} [dim]\\[default: {settings.DEFAULTS.width}x{settings.DEFAULTS.height}][/dim]"
    added.append(_option_param("size", Optional[str], None, size_help, settings.GEN_PANEL))
    added += [_option_param(*spec, LOAD) for spec in _LOAD_OPTIONS]
    with_output = any(p.name == "output" for p in own)
    added += [_option_param(*spec) for spec in _OUTPUT_OPTIONS] if with_output else []
    rest = [p for p in own[at + 1:] if p.name not in ("load", "output")]

    @functools.wraps(command)
    def wrapper(**kwargs):
        values = {s.name: kwargs.pop(s.name) for s in settings.SETTINGS if s.flags}
        kwargs["flags"] = settings.from_flags(values, kwargs.pop("size"))
        load = {name: kwargs.pop(name) for name, *_ in _LOAD_OPTIONS}
        kwargs["load"] = LoadParams(**{k: v.value if isinstance(v, Enum) else v for k, v in load.items()})
        if with_output:
            kwargs["output"] = _output({name: kwargs.pop(name) for name, *_ in _OUTPUT_OPTIONS}, kwargs["flags"])
        return command(**kwargs)

    wrapper.__signature__ = pyinspect.Signature([*own[:at], *added, *rest])
    return wrapper


class DebugAnywhere(TyperGroup):
    """`--debug` works after the subcommand too (`rdbt gen ... --debug`): it is moved in front of it."""

    def parse_args(self, ctx, args):
        coercion.lighten(self, ctx)  # the options' values without pydantic: see coercion.py
        end = args.index("--") if "--" in args else len(args)
        if "--debug" in args[1:end]:
            args = ["--debug", *(a for i, a in enumerate(args) if not (a == "--debug" and i < end))]
        return super().parse_args(ctx, args)

    def get_command(self, ctx, name):
        command = super().get_command(ctx, name)
        coercion.lighten(command, ctx)
        return command


SERVER = "Server"


def serving(command):
    """Gives `command` --server URL and --no-server, as `server`: None (use the one RDBT_HOME announces, if it has
    the same models), False (never) or the URL (must be usable). Put it under `generating`."""
    own = [p for p in pyinspect.signature(command, eval_str=True).parameters.values() if p.name != "server"]
    url = typer.Option(help="Use the rdbt serve at this URL (default: the one running for this RDBT_HOME, when it "
                       "has the same models loaded); its API key, if it has one: $RDBT_API_KEY.",
                       rich_help_panel=SERVER, metavar="URL")
    added = [pyinspect.Parameter("server", pyinspect.Parameter.POSITIONAL_OR_KEYWORD, default=None,
                                 annotation=Annotated[Optional[str], url]),
             _option_param("no_server", bool, False, "Load the models here even if a server runs.", SERVER)]

    @functools.wraps(command)
    def wrapper(**kwargs):
        url, off = kwargs.pop("server"), kwargs.pop("no_server")
        return command(**kwargs, server=False if off else url)

    wrapper.__signature__ = pyinspect.Signature([*own, *added])
    return wrapper


def loading(command):
    """Gives `command` one option per LoadParams field, as `load` (rdbt serve)."""
    own = [p for p in pyinspect.signature(command, eval_str=True).parameters.values() if p.name != "load"]

    @functools.wraps(command)
    def wrapper(**kwargs):
        load = {name: kwargs.pop(name) for name, *_ in _LOAD_OPTIONS}
        return command(**kwargs, load=LoadParams(**{k: v.value if isinstance(v, Enum) else v for k, v in load.items()}))

    wrapper.__signature__ = pyinspect.Signature([*own, *(_option_param(*spec, LOAD) for spec in _LOAD_OPTIONS)])
    return wrapper
