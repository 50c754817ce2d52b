"""The rdbt command line: a thin Typer layer over the rdbt_cli library.

The options of the commands that generate come from options.py (the settings table and LoadParams). torch and the pipeline are imported inside the commands that need them,
so `rdbt --help`, `inspect`, `models`, `presets` and `lora-stack` start instantly.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from rdbt_cli import __version__, completion, console, files_cmd, grid_cmd, serve_cmd, settings
from rdbt_cli.config import SAMPLER_NAMES, SCHEDULER_NAMES, LoadParams
from rdbt_cli.console import Progress
from rdbt_cli.errors import ConfigError, RdbtError, Terminated
from rdbt_cli.options import (OUT, AllowUnmatchedOpt, Attention, DebugAnywhere, Device, DType, JsonOpt, NoStackOpt,
                               Output, PresetOpt, QuietOpt, flag, generating)


app = typer.Typer(
    cls=DebugAnywhere,
    name="rdbt",
    help="Anima text-to-image from the shell: one command per image, batches, LoRA stacks, presets, and every image "
    "carrying its own recipe.\n\nExample: rdbt gen \"1girl, silver hair, night sky\" --preset rdbt --seed 42",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode="rich",
)

_state = {"debug": False}


# What Ctrl-C leaves behind, by command.
_INTERRUPTED = {
    "gen": "interrupted; the images already written are kept",
    "batch": "interrupted; finished images are kept (run the same command again to resume where it stopped)",
    "grid": "interrupted; the cells already written are kept (a sheet is drawn once all cells of its Z value are made)",
}


def _terminate_like_ctrl_c() -> None:
    """SIGTERM and SIGHUP unwind like Ctrl-C (finally blocks remove temp files), then exit with 128 + the signal."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread (CliRunner in a thread)

    def handler(signum, frame):
        raise Terminated(signum)

    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None and signal.getsignal(sig) in (signal.SIG_DFL, None):
            signal.signal(sig, handler)


def friendly_errors(fn):
    """Every user mistake is one readable line and a non-zero exit code; --debug shows the traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _terminate_like_ctrl_c()
        try:
            return fn(*args, **kwargs)
        except (RdbtError, KeyboardInterrupt, OSError, MemoryError) as err:
            if _state["debug"]:
                raise
            if isinstance(err, KeyboardInterrupt):
                signum = err.signum if isinstance(err, Terminated) else signal.SIGINT
                message, code = _INTERRUPTED.get(fn.__name__, "interrupted"), 128 + signum
            else:
                message, code = f"error: {err}", getattr(err, "exit_code", 1)
            typer.echo(message, err=True)
            raise typer.Exit(code) from None

    return wrapper


def _print_version(value: bool):
    if value:
        typer.echo(f"rdbt {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    debug: Annotated[bool, flag("--debug", help="Show full tracebacks (also after the command).")] = False,
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version.")
    ] = None,
):
    _state["debug"] = debug


app.command("grid")(friendly_errors(grid_cmd.grid))  # its options: grid_cmd.py; the grid: grid.py
app.command("serve")(friendly_errors(serve_cmd.serve))  # its options and code: serve_cmd.py, server.py


def _warn(message: str) -> None:
    typer.echo(f"warning: {message}", err=True)


def _note(message: str) -> None:
    typer.echo(f"note: {message}", err=True)


# ---------------------------------------------------------------------------------------------------------------------
# gen and batch
# ---------------------------------------------------------------------------------------------------------------------


@app.command()
@friendly_errors
@generating
def gen(
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt, in ComfyUI weight syntax: (word:1.2); - reads stdin.", metavar="PROMPT")] = None,
    flags: settings.GenParams = None,
    preset: PresetOpt = None,
    no_stack: NoStackOpt = False,
    allow_unmatched: AllowUnmatchedOpt = False,
    from_image: Annotated[Optional[Path], typer.Option("--from", help="Re-generate from the recipe recorded in a PNG (flags override).", rich_help_panel=settings.GEN_PANEL)] = None,
    load: LoadParams = None,
    server=None,
    output: Output = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Output file or folder (default ./outputs/).", rich_help_panel=OUT, metavar="PATH")] = None,
    as_json: JsonOpt = False,
    no_metadata: Annotated[bool, flag("--no-metadata", help="Write no metadata chunks.", rich_help_panel=OUT)] = False,
    quiet: QuietOpt = False,
):
    """Generate images from a prompt."""
    from rdbt_cli import client, jobs, metadata

    recipe = metadata.read_recipe(from_image) if from_image is not None else None
    if prompt == "-":
        from rdbt_cli.batch import read_stdin_text

        prompt = read_stdin_text().strip() or None
    if prompt is None and recipe is None:
        raise ConfigError("no prompt given: rdbt gen \"your prompt\" (or --from IMAGE)")
    dest = metadata.check_destination(out or "outputs")
    if output.name and dest.suffix.lower() == ".png":
        raise ConfigError(f"--name names the files in a folder, but --out {out} is a file; give --out a folder")
    todo, load, paths = jobs.plan(prompt, load, flags, preset=preset, no_stack=no_stack, recipe=recipe)
    unused = jobs.unused_negative(todo[0].settings)
    if unused:
        _note(unused)

    with Progress(len(todo), quiet, output.preview(quiet, as_json)) as bar:
        # loading here imports torch, under "starting"
        runner = client.runner(server, load, paths, allow_unmatched=allow_unmatched, on_warning=bar.warn,
                               callback=bar.event, on_note=_note, previews=bar.preview is not None)
        for job in todo:
            bar.start_image(f"seed {job.seed}", job.steps)
            made = runner.run(job, bar.event)
            bar.stage("saving")
            path = metadata.save_png(made.image, dest, None if no_metadata else made.recipe, metadata=not no_metadata,
                                     stem=output.stem(job, f"rdbt-{job.seed}", dit=paths.dit))
            bar.done(path, made.recipe, made.timings, as_json)


@app.command()
@friendly_errors
@generating
def batch(
    file: Annotated[str, typer.Argument(help="Prompt file: one prompt per line, optional ` --flag value` overrides; - for stdin.", metavar="FILE")],
    flags: settings.GenParams = None,
    preset: PresetOpt = None,
    no_stack: NoStackOpt = False,
    allow_unmatched: AllowUnmatchedOpt = False,
    load: LoadParams = None,
    server=None,
    output: Output = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Output folder (default ./outputs/).", rich_help_panel=OUT, metavar="DIR")] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Generate every line of a prompt file; run it again to resume where an interrupted run stopped.

    Under torchrun each rank takes its share of the images: torchrun --nproc-per-node 4 -m rdbt_cli batch prompts.txt
    """
    from dataclasses import replace

    from rdbt_cli import batch as batch_mod, jobs, metadata

    t_start = time.perf_counter()
    rank, world, local_rank = batch_mod.torchrun_env()
    text = batch_mod.read_batch_source(file)
    out_dir = Path(out) if out else Path("outputs")
    metadata.check_destination(str(out_dir) + os.sep)
    if world > 1 and load.device in ("auto", "cuda"):
        from rdbt_cli.pipeline import resolve_device

        if resolve_device(load.device).type == "cuda":
            load = replace(load, device=f"cuda:{local_rank}")
    bp = batch_mod.plan(text, load, flags, preset=preset, no_stack=no_stack, out_dir=out_dir, rank=rank, world=world,
                        base_dir=Path.cwd() if file == "-" else Path(file).parent)
    if not bp.lines and not bp.failures:  # the same file on every rank: all of them stop here
        if rank == 0:
            _warn(f"{file}: no prompts (only blank lines and # comments); nothing to make")
        return
    unused = sorted(ln for ln, (g, *_) in bp.lines.items() if jobs.unused_negative(g))
    if unused and rank == 0:
        _note(f"line{'s' if len(unused) > 1 else ''} {', '.join(map(str, unused))}: "
              f"{jobs.unused_negative(bp.lines[unused[0]][0])}")
    made = 0
    server = server if world == 1 else False  # under torchrun each rank loads the models onto its own GPU
    with Progress(len(bp.jobs), quiet, output.preview(quiet, as_json)) as bar:
        for path, image in batch_mod.run(bp, out_dir, rank, allow_unmatched=allow_unmatched, name=output.stem,
                                         on_image=bar.start_image, callback=bar.event, on_warning=bar.warn, server=server,
                                         previews=bar.preview is not None):
            made += 1
            bar.done(path, image.recipe, image.timings, as_json)
    total, failures, wall = batch_mod.gather(rank, world, made, bp.failures, time.perf_counter() - t_start)
    if rank == 0:  # one summary for all ranks
        typer.echo(console.batch_summary(total, bp.done, failures, wall, world), err=True)
    if failures:  # every rank exits non-zero if any line failed anywhere
        raise typer.Exit(1)


# ---------------------------------------------------------------------------------------------------------------------
# inspect, models, presets, samplers
# ---------------------------------------------------------------------------------------------------------------------


app.command()(friendly_errors(files_cmd.inspect))  # these two read files: files_cmd.py
app.command()(friendly_errors(files_cmd.models))


@app.command()
@friendly_errors
def presets(
    name: Annotated[Optional[str], typer.Argument(help="Show this preset in full.")] = None,
    as_json: Annotated[bool, flag("--json", help="JSON output.")] = False,
):
    """List the presets (built in and in your config folder), or show one."""
    from rdbt_cli import presets as presets_mod

    if name is None:
        items = presets_mod.list_presets()
        if as_json:
            typer.echo(json.dumps([p._asdict() for p in items], indent=1, default=str))
            return
        for p in items:
            typer.echo(f"{p.name:16} {p.source:8} {f'invalid: {p.error}' if p.error else p.description or ''}")
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
    clear: Annotated[bool, flag("--clear", help="Remove every LoRA from the stack.")] = False,
    list_: Annotated[bool, flag("--list", help="Show the stack (the default).")] = False,
    as_json: Annotated[bool, flag("--json", help="JSON output.")] = False,
    models_dir: Annotated[Optional[str], typer.Option(help="Models folder whose loras/ names resolve.")] = None,
):
    """Show or edit the persistent LoRA stack that gen and batch apply."""
    from rdbt_cli import lora_stack
    from rdbt_cli.jobs import Planner
    from rdbt_cli.settings import parse_lora_arg

    if clear:
        lora_stack.clear()
    for item in add or []:
        lora_stack.add(parse_lora_arg(item), Planner(LoadParams(models_dir=models_dir)).lora_dirs())
    for item in set_ or []:
        spec = parse_lora_arg(item)
        if spec.name == item.strip():  # no number after the last colon
            raise ConfigError(f"--set {item}: give NAME:WEIGHT with a number for the weight, e.g. --set turbo:0.4")
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
    size: Annotated[Optional[str], typer.Option(help="WxH (default 1024x1024; 256x256 on the tiny model).")] = None,
    steps: Annotated[int, typer.Option(help="Sampling steps.")] = 4,
    sampler: Annotated[str, typer.Option(help="Sampler.")] = "euler",
    scheduler: Annotated[str, typer.Option(help="Scheduler.")] = "simple",
    cfg: Annotated[float, typer.Option(help="CFG scale (1: one forward per step).")] = 1.0,
    nag_scale: Annotated[float, typer.Option(help="NAG scale (0: off), with the node's other defaults.")] = 0.0,
    device: Annotated[Device, typer.Option(help="auto, cpu or cuda.")] = Device.auto,
    dtype: Annotated[DType, typer.Option(help="auto, fp32, bf16, fp16 or fp8.")] = DType.auto,
    decode: Annotated[bool, flag(help="Include the VAE decode.")] = True,
    compile: Annotated[bool, flag("--compile", help="torch.compile the DiT blocks (compile time shows in first_step_s).")] = False,
    low_vram: Annotated[bool, flag("--low-vram", help="Streamed DiT blocks (GPU) and tiled VAE decode, as gen --low-vram.")] = False,
    attention: Annotated[Attention, typer.Option(help="Attention kernel: sdpa or xformers.")] = Attention.sdpa,
    as_json: Annotated[bool, flag("--json", help="One JSON object on stdout.")] = False,
    quiet: Annotated[bool, flag("--quiet", "-q", help="No progress.")] = False,
):
    """Measure speed and memory: seconds per step, images/min, TFLOP/s and MFU, peak memory, load time."""
    from rdbt_cli import bench as bench_mod

    problem = (settings.value_problem("sampler", sampler) or settings.value_problem("scheduler", scheduler)
               or settings.value_problem("nag_scale", nag_scale))
    if problem:
        raise ConfigError(problem)
    if size is None:
        from rdbt_cli.jobs import TINY, TINY_DEFAULTS

        w, h = (TINY_DEFAULTS.width, TINY_DEFAULTS.height) if model == TINY else (1024, 1024)
    else:
        w, h = settings.parse_size(size)
    from rdbt_cli.pipeline import dtype_warning, resolve_device, resolve_dtype

    dev = resolve_device(device.value)
    warning = dtype_warning(resolve_dtype(dtype.value, dev)[0], dev)
    if warning:
        _warn(warning)
    with Progress(1, quiet) as bar:  # on stderr: --json keeps stdout for the result
        bar.start_image("bench", steps)
        result = bench_mod.run(model=model, width=w, height=h, steps=steps, sampler=sampler, scheduler=scheduler,
                               cfg=cfg, nag_scale=nag_scale, device=device.value, dtype=dtype.value, decode=decode,
                               compile=compile, low_vram=low_vram, attention=attention.value, callback=bar.event)
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
    only: Annotated[Optional[list[str]], typer.Option("--only", metavar="PART", autocompletion=completion.choices(("dit", "te", "vae", "tokenizers", "turbo-lora")), help="dit, te, vae, tokenizers or turbo-lora (the official Turbo LoRA, for the turbo preset); repeatable. Default: all but turbo-lora.")] = None,
):
    """Fetch the official Anima files and tokenizers from Hugging Face (resumable) into rdbt's data folder
    (~/.local/share/rdbt/models), where model discovery finds them."""
    from rdbt_cli import discovery

    target = models_dir or os.environ.get("RDBT_MODELS", "").split(os.pathsep)[0] or discovery.default_models_dir()
    comps = tuple(only) if only else discovery.DEFAULT_DOWNLOAD
    for path in discovery.download_official(Path(target), comps):
        typer.echo(str(path))
