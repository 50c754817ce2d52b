"""The `rdbt grid` command: its options and the loop that shows progress. The grid itself (axes, planning, the
sheet) is grid.py; cli.py registers this command, which lives here to keep cli.py a thin list of commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from rdbt_cli import settings
from rdbt_cli.config import LoadParams
from rdbt_cli.grid import AXIS_HELP, MAX_CELLS
from rdbt_cli.options import (OUT, AllowUnmatchedOpt, JsonOpt, NoStackOpt, Output, PresetOpt, QuietOpt, flag,
                              generating)

GRID = "Grid"
_AXIS = dict(rich_help_panel=GRID, metavar="AXIS")


@generating
def grid(
    prompt: Annotated[Optional[str], typer.Argument(help="The prompt; its {a|b} variants and __wildcards__ are drawn from each cell's seed.", metavar="PROMPT")] = None,
    x: Annotated[Optional[str], typer.Option("--x", help=f"Columns: {AXIS_HELP}.", **_AXIS)] = None,
    y: Annotated[Optional[str], typer.Option("--y", help="Rows, as --x.", **_AXIS)] = None,
    z: Annotated[Optional[str], typer.Option("--z", help="One sheet per value, as --x.", **_AXIS)] = None,
    yes: Annotated[bool, flag("--yes", help=f"Make a grid of more than {MAX_CELLS} images.", rich_help_panel=GRID)] = False,
    flags: settings.GenParams = None,
    preset: PresetOpt = None,
    no_stack: NoStackOpt = False,
    allow_unmatched: AllowUnmatchedOpt = False,
    from_image: Annotated[Optional[Path], typer.Option("--from", help="Run the grid recorded in a sheet again (or use an image's recipe as the base); flags and axes given override.", rich_help_panel=GRID, metavar="PNG")] = None,
    load: LoadParams = None,
    server=None,
    output: Output = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Output folder (default ./outputs/).", rich_help_panel=OUT, metavar="DIR")] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
):
    """Make an X/Y/Z grid: every combination of up to three axes of settings, models loaded once, each cell a PNG
    with its own recipe, and a labelled contact sheet per Z value that `rdbt grid --from SHEET.png` runs again.

    Example: rdbt grid "1girl, night sky" --x steps=12,20,28 --y cfg=1,3,4.5 --z lora:turbo=0,0.5
    """
    from rdbt_cli import client, grid as grid_mod, metadata
    from rdbt_cli.console import Progress

    def note(message: str) -> None:
        typer.echo(f"note: {message}", err=True)

    shown = {"warn": lambda message: typer.echo(f"warning: {message}", err=True)}

    recipe = metadata.read_recipe(from_image) if from_image is not None else None
    dest = metadata.check_destination(str(Path(out or "outputs")) + "/")
    gp = grid_mod.plan(prompt, load, flags, x=x, y=y, z=z, preset=preset, no_stack=no_stack, recipe=recipe, yes=yes)
    sheets = []
    # The server first, so that a --server that does not answer is one line before any progress bar; its warnings
    # go above the bar once there is one.
    preview = output.preview(quiet, as_json)
    remote = client.connect(server, gp.load, gp.paths, allow_unmatched=allow_unmatched,
                            on_warning=lambda m: shown["warn"](m), on_note=note, previews=preview is not None)
    with Progress(len(gp.cells), quiet, preview) as bar:
        shown["warn"] = bar.warn
        for path, made in grid_mod.run(gp, dest, allow_unmatched=allow_unmatched, on_image=bar.start_image,
                                       callback=bar.event, on_warning=bar.warn, on_sheet=sheets.append,
                                       name=output.stem, server=False, runner=remote):
            bar.done(path, made.recipe, made.timings, as_json)
    for path in sheets:
        typer.echo(json.dumps({"sheet": str(path)}) if as_json else f"sheet: {path}")
