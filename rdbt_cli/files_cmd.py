"""The commands that read files without generating: `rdbt inspect` (an image's recipe, or a safetensors file's
training metadata) and `rdbt models` (the model files found, or one LoRA's training metadata). cli.py registers
them; they live here to keep cli.py a thin list of commands. No torch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from rdbt_cli import console
from rdbt_cli.errors import ConfigError, RdbtError
from rdbt_cli.options import flag

_SAFETENSORS = (".safetensors", ".sft")


def inspect(
    images: Annotated[list[Path], typer.Argument(help="PNG files to read (or .safetensors files: their training "
                                                      "metadata).")],
    as_json: Annotated[bool, flag("--json", help="Print the recipe(s) as JSON.")] = False,
):
    """Show the recipe recorded in images (rdbt first, then A1111/Forge, then ComfyUI metadata), or what a
    .safetensors file says about its training (ss_* keys: base model, dim/alpha, trigger words, top tags)."""
    from rdbt_cli import lora_info, metadata

    failed = 0
    for path in images:
        try:
            if path.suffix.lower() in _SAFETENSORS:
                info = lora_info.describe(path)
            else:
                info = metadata.inspectable(metadata.read_png(path))  # what breaks its rule is listed as skipped
        except RdbtError as err:
            if len(images) == 1:
                raise
            typer.echo(f"error: {err}", err=True)
            failed += 1
            continue
        if as_json and "training" in info:
            typer.echo(json.dumps(info, ensure_ascii=False))
        elif as_json:
            record = {"path": str(path), "source": info["source"], **info["recipe"]}
            record |= {"skipped": info["skipped"]} if info["skipped"] else {}
            record |= {"notes": notes} if (notes := metadata.page_notes(info)) else {}
            try:
                text = json.dumps(record, ensure_ascii=False)
            except (ValueError, RecursionError):  # nested too deeply to write back
                text = json.dumps({"path": str(path), "source": info["source"],
                                   "skipped": ["recipe (nested too deeply to show)"]})
            typer.echo(metadata.printable(text))
        else:
            if len(images) > 1:
                typer.echo(f"== {path}")
            text = lora_info.summary(info) if "training" in info else metadata.summarise(info)
            typer.echo(metadata.printable(text))
    if failed:
        raise typer.Exit(1)


def models(
    models_dir: Annotated[Optional[str], typer.Option(help="Models folder (also $RDBT_MODELS).")] = None,
    lora: Annotated[Optional[str], typer.Option("--lora", metavar="NAME", help="Show this LoRA's training metadata "
                                                "(base model, dim/alpha, trigger words, top tags) instead.")] = None,
    hash_files: Annotated[bool, flag("--hash", help="Hash files not hashed before (slow once per file).")] = False,
    as_json: Annotated[bool, flag("--json", help="JSON output.")] = False,
):
    """List the model files rdbt finds, with component type, size and short hash (AutoV2, as Civitai shows)."""
    from rdbt_cli import discovery

    if lora is not None:
        from rdbt_cli import lora_info, lora_stack
        from rdbt_cli.config import LoadParams
        from rdbt_cli.jobs import Planner

        info = lora_info.describe(lora_stack.resolve_lora_name(lora, Planner(LoadParams(models_dir=models_dir))
                                                               .lora_dirs()))
        typer.echo(json.dumps(info, ensure_ascii=False) if as_json else lora_info.summary(info))
        return
    dirs = list(discovery.models_dirs(models_dir))
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
    rows = [console.model_row(i, dirs) for i in items]
    if as_json:
        typer.echo(json.dumps(rows, ensure_ascii=False, indent=1))
    else:
        console.print_models(rows, title=" · ".join(str(d) for d in dirs))
