"""X/Y/Z grids: one prompt over up to three axes of settings, made with one load, and a labelled contact sheet.

    rdbt grid "1girl, red hair" --x steps=12,20,28 --y cfg=1,3,4.5 --z lora:turbo=0,0.5

An axis is NAME=V1,V2,... (the values are read as CSV, so a value with a comma is quoted: prompt="red, long",blue):

- any setting of the table that has a flag, by its name or flag (steps, cfg, sampler, scheduler, shift, seed,
  negative, nag-scale, denoise, hires, hires-denoise, ...), each value parsed and checked by the row's own rules;
- size=832x1216,1024x1024;
- lora:NAME=W1,W2,... the weight of one LoRA on top of the stack and --lora (0 leaves it out);
- prompt=red,blue,green: A1111's Prompt S/R. The first value is searched for in the prompt (and the negative), and
  each cell replaces it by its own value; the first cell is the prompt as written.

Every cell is planned by jobs.plan, exactly as `rdbt gen` with that cell's flags would plan it (so a cell's image is
the image `gen` makes), before anything loads: a bad axis writes nothing. The models load once (runner.Runner), or a
running `rdbt serve` with the same models makes the cells (client.runner, as for gen); a LoRA weight changes by exact
undo of the last merge. Prompt variants and wildcards, in the prompt and the negative, are drawn from each cell's
seed. Each cell is a normal PNG with its own recipe; each sheet (one per Z value) carries the first cell's recipe plus
`grid`, the whole grid as written, which `rdbt grid --from SHEET` runs again. Planning imports no torch.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Optional

from rdbt_cli import settings
from rdbt_cli.config import LoadParams, LoraSpec, ModelPaths
from rdbt_cli.errors import ConfigError
from rdbt_cli.settings import GenParams

MAX_CELLS = 100  # more images than this need --yes: a typo in a range should not start hours of work
AXES = ("x", "y", "z")
# Rows that make no sense as an axis: a grid makes one image per cell, LoRAs have lora:NAME, and variants are drawn.
_NOT_AXES = {"prompt", "count", "loras", "combinatorial"}
_ROWS = {key: s for s in settings.SETTINGS if s.flags and s.name not in _NOT_AXES
         for key in (s.name, s.name.replace("_", "-"), *(f.lstrip("-") for f in s.flags if f.startswith("--")))}
AXIS_HELP = ("SETTING=V1,V2,... (steps=12,20,28; sampler=euler,er_sde; seed=1,2; size=WxH,...), lora:NAME=W1,W2,... "
             "or prompt=SEARCH,REPLACE,... (A1111's Prompt S/R)")


@dataclass(frozen=True)
class Axis:
    text: str  # as written: "steps=12,20,28"
    name: str  # "steps", "size", "lora:turbo", "prompt"
    values: tuple[str, ...]  # as written, for the labels
    overrides: tuple[GenParams, ...]  # the settings each value sets (prompt S/R: filled by `plan`)

    def label(self, i: int) -> str:
        return f"{self.name}: {self.values[i]}"


def _split(text: str) -> list[str]:
    try:
        values = next(csv.reader([text], skipinitialspace=True))
    except (csv.Error, StopIteration):
        values = []
    return [v.strip() for v in values]


def parse_axis(text: str, which: str = "x") -> Axis:
    """One --x/--y/--z value; raises ConfigError naming the option and the fix."""
    where = f"--{which} {text}"
    name, eq, rest = text.partition("=")
    name = name.strip()
    values = _split(rest) if eq else []
    if not name or not values:
        raise ConfigError(f"{where}: write SETTING=V1,V2,..., e.g. --{which} steps=12,20,28")
    if any(not v for v in values):
        raise ConfigError(f"{where}: an empty value (two commas, or one at the end); remove it")
    if len(set(values)) != len(values):
        raise ConfigError(f"{where}: a value is given twice; each cell needs its own")
    if name.lower().startswith("lora:"):
        lora = name[5:].strip()
        if not lora:
            raise ConfigError(f"{where}: name the LoRA, e.g. --{which} lora:turbo=0,0.5,1")
        weights = []
        for v in values:
            try:
                w = float(v)
            except ValueError:
                w = None
            if w is None or not settings.is_number(w):
                raise ConfigError(f"{where}: LoRA weight {v!r} is not a number")
            weights.append(w)
        return Axis(text, f"lora:{lora}", tuple(values), tuple(GenParams(loras=[LoraSpec(lora, w)]) for w in weights))
    if name == "prompt":
        return Axis(text, name, tuple(values), tuple(GenParams() for _ in values))
    if name == "size":
        overrides = []
        for v in values:
            try:
                w, h = settings.parse_size(v)
            except ConfigError as err:
                raise ConfigError(f"--{which}: {err}") from None
            overrides.append(GenParams(width=w, height=h))
        return Axis(text, name, tuple(values), tuple(overrides))
    row = _ROWS.get(name.lstrip("-").lower())
    if row is None:
        known = ", ".join(sorted({s.name.replace("_", "-") for s in _ROWS.values()}))
        raise ConfigError(f"{where}: {name!r} is not a setting a grid can vary; use one of {known}, size, "
                          "lora:NAME or prompt")
    overrides = []
    for v in values:
        try:
            value = row.coerce(row.from_text(v))
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        problem = "one seed per value" if isinstance(value, list) else row.problem(value)
        if problem:
            raise ConfigError(f"{where}: {problem}")
        overrides.append(GenParams(**{row.name: value}))
    return Axis(text, row.name.replace("_", "-"), tuple(values), tuple(overrides))


@dataclass
class Cell:
    at: tuple[int, int, int]  # x, y, z index
    job: object  # jobs.Job


@dataclass
class GridPlan:
    axes: dict[str, Axis]  # of "x", "y", "z", those given
    cells: list[Cell]  # z, then y, then x
    load: LoadParams
    paths: ModelPaths
    record: dict  # what the sheets record under "grid"
    shape: tuple[int, int, int] = (1, 1, 1)  # values per axis

    def label(self, which: str, i: int) -> Optional[str]:
        axis = self.axes.get(which)
        return axis.label(i) if axis else None


def _replace_prompt(axis: Axis, prompt: str, negative: Optional[str], which: str) -> tuple[GenParams, ...]:
    """Prompt S/R: every value in place of the first, in the prompt and (where it occurs) the negative."""
    search = axis.values[0]
    if search not in prompt and search not in (negative or ""):
        raise ConfigError(f"--{which} {axis.text}: {search!r} is not in the prompt; the first value is the text each "
                          "cell replaces (as A1111's Prompt S/R)")
    return tuple(GenParams(prompt=prompt.replace(search, v),
                           negative=negative.replace(search, v) if negative and search in negative else None)
                 for v in axis.values)


def plan(prompt: Optional[str], load: LoadParams, flags: GenParams, *, x: Optional[str] = None,
         y: Optional[str] = None, z: Optional[str] = None, preset: Optional[str] = None, no_stack: bool = False,
         recipe: Optional[dict] = None, yes: bool = False) -> GridPlan:
    """Every cell's job, before anything loads. `recipe` is a sheet's (or any image's) recipe for --from: its settings
    are the base, its `grid` gives the axes and the prompt template unless --x/--y/--z and a prompt are given."""
    from rdbt_cli import jobs

    recorded = (recipe or {}).get("grid") if isinstance((recipe or {}).get("grid"), dict) else {}
    # An axis given replaces the recorded axis of its letter; the others stay.
    given = {k: v or (recorded.get(k) if isinstance(recorded.get(k), str) else None)
             for k, v in {"x": x, "y": y, "z": z}.items()}
    axes = {k: parse_axis(v, k) for k, v in given.items() if v}
    if not axes:
        raise ConfigError("a grid needs at least one axis, e.g. --x steps=12,20,28 (see rdbt grid --help)")
    names = [a.name for a in axes.values()]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ConfigError(f"two axes vary {dup}; give each setting one axis")
    if prompt is None and isinstance(recorded.get("prompt"), str):
        prompt = recorded["prompt"]  # the template: each cell draws its own variants, as the first run did
    if flags.negative is None and isinstance(recorded.get("negative"), str):
        flags = replace(flags, negative=recorded["negative"])  # so is the negative's template
    if isinstance(flags.seed, list) and len(flags.seed) == 1:
        flags = replace(flags, seed=flags.seed[0])  # --seeds-from one keeper: that image's seed for every cell
    if isinstance(flags.seed, list):
        free = next((k for k in ("z", "y", "x") if k not in axes), "z")
        seeds = ",".join(map(str, flags.seed[:12])) + (",..." if len(flags.seed) > 12 else "")
        raise ConfigError(f"a grid takes one seed; for a list of seeds (--seed 1,2 or --seeds-from) use an axis: "
                          f"--{free} seed={seeds}")
    if (flags.count or 1) > 1:
        raise ConfigError("a grid makes one image per cell; for more seeds use an axis, e.g. --z seed=1,2,3")
    if flags.combinatorial:
        raise ConfigError("--combinatorial is for rdbt gen; in a grid, vary the prompt with an axis: prompt=red,blue")
    shape = tuple(len(axes[k].values) if k in axes else 1 for k in AXES)
    total = shape[0] * shape[1] * shape[2]
    if total > MAX_CELLS and not yes:
        raise ConfigError(f"this grid makes {total} images, more than {MAX_CELLS}; add --yes to make them all")
    # The base, planned once: the seed every cell shares (unless an axis sets it) and the prompt S/R works on.
    base_jobs, _, _ = jobs.plan(prompt, load, replace(flags, count=1), preset=preset, no_stack=no_stack,
                                recipe=recipe)
    base = base_jobs[0]
    template = base.extra.get("prompt_template") or base.settings.prompt
    negative = base.extra.get("negative_template") or base.settings.negative
    if prompt is None and recipe is not None:
        prompt = template
    for k, axis in axes.items():
        if axis.name == "prompt":
            axes[k] = replace(axis, overrides=_replace_prompt(axis, template, negative, k))
    base_flags = replace(flags, count=1, seed=base.seed)
    cells = []
    out_load = out_paths = None
    for zi in range(shape[2]):
        for yi in range(shape[1]):
            for xi in range(shape[0]):
                at = (xi, yi, zi)
                over = settings.layer(base_flags, *(axes[k].overrides[at[i]] for i, k in enumerate(AXES) if k in axes))
                cell_prompt, over = over.prompt or prompt, replace(over, prompt=None)
                where = ", ".join(axes[k].label(at[i]) for i, k in enumerate(AXES) if k in axes)
                try:
                    todo, cell_load, cell_paths = jobs.plan(cell_prompt, load, over, preset=preset, no_stack=no_stack,
                                                            recipe=recipe)
                except ConfigError as err:
                    raise ConfigError(f"grid cell {where}: {err}") from None
                job = todo[0]
                job.extra["grid_cell"] = {k: axes[k].values[at[i]] for i, k in enumerate(AXES) if k in axes}
                out_load, out_paths = out_load or cell_load, out_paths or cell_paths
                cells.append(Cell(at, job))
    record = {k: axes[k].text for k in axes} | {"prompt": template, "seed": base.seed}
    if "negative_template" in base.extra:
        record["negative"] = negative  # the cells' negatives are drawn from it; the sheet's recipe has the first's
    return GridPlan(axes, cells, out_load, out_paths, record, shape)


# ---------------------------------------------------------------------------------------------------------------------
# Running and the sheet


def run(gp: GridPlan, dest, *, allow_unmatched: bool = False, on_image: Optional[Callable] = None, callback=None,
        on_warning=None, on_sheet: Optional[Callable] = None, name: Optional[Callable] = None, server=None,
        runner=None, on_note: Callable[[str], None] = lambda m: None, previews: bool = False) -> Iterator:
    """Make every cell (yields (path, runner.Made) as each PNG is written), and after the last cell of each Z value
    its sheet (given to `on_sheet(path)`). `dest` is the output folder.

    `name(job, default_stem, dit=...)` gives a cell's file stem (--name; by default grid-<time>-x1-y1); the sheets
    keep grid-<time>-sheet. `server` is client.runner's: None uses a running `rdbt serve` that has these models
    loaded, False never, a URL that server (which switches LoRA weights between cells itself); `runner`, one made
    already (client.connect's), is used as it is. `previews`: a server sends each step's picture (client.runner's)."""
    from rdbt_cli import client, metadata

    stem = f"grid-{time.strftime('%Y%m%d-%H%M%S')}"
    if runner is None:
        runner = client.runner(server, gp.load, gp.paths, allow_unmatched=allow_unmatched, on_warning=on_warning,
                               callback=callback, on_note=on_note, previews=previews)
    per_sheet = gp.shape[0] * gp.shape[1]
    made_z: list = []
    for n, cell in enumerate(gp.cells):
        xi, yi, zi = cell.at
        if on_image:
            on_image(f"cell {n + 1}/{len(gp.cells)} " + " ".join(
                f"{k}={gp.axes[k].values[cell.at[i]]}" for i, k in enumerate(AXES) if k in gp.axes), cell.job.steps)
        made = runner.run(cell.job, callback)
        if callback:
            callback({"stage": "save"})
        cell_stem = f"{stem}-x{xi + 1}-y{yi + 1}" + (f"-z{zi + 1}" if "z" in gp.axes else "")
        if name is not None:
            cell_stem = name(cell.job, cell_stem, dit=gp.paths.dit)
        path = metadata.save_png(made.image, dest, made.recipe, stem=cell_stem)
        made_z.append((cell, path, made))
        yield path, made
        if len(made_z) == per_sheet:
            first = made_z[0][2].recipe
            names = [Path(p).name for _, p, _ in made_z]
            rows = [names[r * gp.shape[0]:(r + 1) * gp.shape[0]] for r in range(gp.shape[1])]
            record = {**gp.record, "z_index": zi, "cells": rows}
            sheet = draw_sheet(gp, zi, [m.image for _, _, m in made_z])
            sheet_recipe = {k: v for k, v in first.items() if k != "grid_cell"} | {"grid": record}
            path = metadata.save_png(sheet, dest, sheet_recipe,
                                     stem=f"{stem}-sheet" + (f"-z{zi + 1}" if "z" in gp.axes else ""))
            if on_sheet:
                on_sheet(path)
            made_z = []


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int, max_lines: int = 3) -> list[str]:
    """`text` in lines no wider than `width`, breaking at spaces where it can; the last line ends in … if cut."""
    lines, line = [], ""
    for char in text:
        if draw.textlength(line + char, font=font) <= width or not line:
            line += char
            continue
        cut = line.rfind(" ")
        head, line = (line[:cut], line[cut + 1:] + char) if cut > 0 else (line, char)
        lines.append(head)
    lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][:-1] + "…"
    return lines


def draw_sheet(gp: GridPlan, zi: int, images: list):
    """The cells of Z value `zi` (x fastest) under their X labels, beside their Y labels, below the Z label."""
    import numpy as np
    from PIL import Image, ImageDraw

    nx, ny = gp.shape[0], gp.shape[1]
    pics = [Image.fromarray(np.asarray(im)) for im in images]
    cw, ch = max(p.width for p in pics), max(p.height for p in pics)
    size = max(12, min(48, min(cw, ch) // 12))
    font, pad = _font(size), max(4, size // 3)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = int(size * 1.25)
    ys = [gp.label("y", i) for i in range(ny)] if "y" in gp.axes else []
    left = (min(int(max(probe.textlength(t, font=font) for t in ys)), 3 * cw) + 2 * pad) if ys else 0
    xs = [_wrap(probe, gp.label("x", i), font, cw - 2 * pad) for i in range(nx)] if "x" in gp.axes else []
    top_x = (max(len(t) for t in xs) * line_h + 2 * pad) if xs else 0
    title = gp.label("z", zi)
    top = top_x + (line_h + 2 * pad if title else 0)
    sheet = Image.new("RGB", (left + nx * cw, top + ny * ch), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((pad, pad), title, fill="black", font=font)
    for i, lines in enumerate(xs):
        for j, line in enumerate(lines):
            w = draw.textlength(line, font=font)
            draw.text((left + i * cw + (cw - w) / 2, top - top_x + pad + j * line_h), line, fill="black", font=font)
    for i, text in enumerate(ys):
        lines = _wrap(draw, text, font, left - 2 * pad, max_lines=max(1, ch // line_h))
        y0 = top + i * ch + (ch - len(lines) * line_h) / 2
        for j, line in enumerate(lines):
            draw.text((pad, y0 + j * line_h), line, fill="black", font=font)
    for n, pic in enumerate(pics):
        xi, yi = n % nx, n // nx
        sheet.paste(pic, (left + xi * cw + (cw - pic.width) // 2, top + yi * ch + (ch - pic.height) // 2))
    return sheet
