"""The rdbt command line: a thin Typer layer over the rdbt_cli library.

torch and the pipeline are imported inside the commands that need them, so `rdbt --help`, `inspect`, `models`,
`presets` and `lora-stack` start instantly.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="rdbt",
    help="Anima text-to-image from the shell: one command per image, batches, LoRA stacks, presets, and every image "
    "carrying its own recipe.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _not_yet(what: str) -> None:
    typer.echo(f"rdbt {what}: not yet implemented in this build", err=True)


@app.command()
def gen(prompt: str = typer.Argument(..., help="The prompt, in ComfyUI weight syntax.")) -> None:
    """Generate images from a prompt."""
    _not_yet("gen")


@app.command()
def batch(file: str = typer.Argument(..., help="A file of prompts, one per line, or - for stdin.")) -> None:
    """Generate every line of a prompt file, resuming where an interrupted run stopped."""
    _not_yet("batch")
    raise typer.Exit(1)


@app.command("lora-stack")
def lora_stack() -> None:
    """Show or edit the persistent LoRA stack that gen and batch apply."""
    _not_yet("lora-stack")
    raise typer.Exit(1)


@app.command()
def inspect(images: list[str] = typer.Argument(..., help="PNG files to read.")) -> None:
    """Show the recipe recorded in images (rdbt, A1111/Forge and ComfyUI metadata)."""
    _not_yet("inspect")
    raise typer.Exit(1)


if __name__ == "__main__":
    app()
