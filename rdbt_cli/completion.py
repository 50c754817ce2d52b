"""Shell completion of names: samplers and other choices, presets, models and LoRAs. No torch here.

Each function takes what the user has typed so far (and Typer's context, for --models-dir) and returns the names that
start with it. Completion runs on every Tab, so a folder that cannot be read completes nothing instead of failing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

from rdbt_cli.errors import RdbtError


def _matching(names: Iterable[str], incomplete: str) -> list[str]:
    return sorted({n for n in names if n.startswith(incomplete)})


def choices(names: Iterable[str]) -> Callable[[str], list[str]]:
    names = tuple(names)
    return lambda incomplete: _matching(names, incomplete)


def _models_dirs(ctx) -> list[Path]:
    from rdbt_cli import discovery

    return list(discovery.models_dirs(ctx.params.get("models_dir") if ctx is not None else None))


def presets(incomplete: str) -> list[str]:
    from rdbt_cli.presets import list_presets

    try:
        return _matching((p.name for p in list_presets()), incomplete)
    except (OSError, RdbtError):
        return []


def models(ctx, incomplete: str) -> list[str]:
    """'tiny' and the file stems of the DiTs in the models folders."""
    from rdbt_cli import discovery

    try:
        found = [Path(f).stem for f, _ in discovery.kind_files("dit", _models_dirs(ctx))]
    except (OSError, RdbtError):
        found = []
    return _matching(["tiny", *found], incomplete)


def loras(ctx, incomplete: str) -> list[str]:
    """LoRA names (paths inside the loras folders, without .safetensors), as `--lora NAME` resolves them."""
    from rdbt_cli import discovery

    try:
        found = [name for _, name in discovery.kind_files("lora", _models_dirs(ctx))]
    except (OSError, RdbtError):
        found = []
    return _matching(found, incomplete)
