"""What the CLI shows on the terminal: progress on stderr, image paths or JSON records on stdout, the models table.

Rich is imported inside, so commands that print nothing of this kind start without it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer


def stderr():
    from rich.console import Console

    return Console(stderr=True)


class Progress:
    """Rich progress on stderr: one bar per image with ETA, plus an overall bar when there are several."""

    def __init__(self, total_images: int, quiet: bool):
        from rich import progress as rp

        self.progress = rp.Progress(
            rp.TextColumn("{task.description}"), rp.BarColumn(), rp.MofNCompleteColumn(), rp.TimeElapsedColumn(),
            rp.TextColumn("eta"), rp.TimeRemainingColumn(), console=stderr(), disable=quiet, transient=False,
            redirect_stdout=False, redirect_stderr=False,
        )
        self.total_images = total_images
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

    def done(self, path: Path, recipe: dict, timings: dict, as_json: bool):
        """Count the image and print its path (or JSON record) on stdout, above the live bar on a terminal."""
        if self.overall is not None:
            self.progress.advance(self.overall)
        record = {"path": str(path), **recipe, **({"timings": timings} if timings else {})}
        line = json.dumps(record, ensure_ascii=False) if as_json else str(path)
        if self.live and sys.stdout.isatty() and sys.stderr.isatty():
            self.progress.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            typer.echo(line)


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def batch_summary(made: int, done: int, failures: dict[int, str], wall: float, world: int) -> str:
    """The batch's closing lines: what was made, what an earlier run had made, each failed line."""
    rate = made / wall * 60 if wall > 0 else 0.0
    already = f", {done} already done" if done else ""
    lines = [f"{plural(made, 'image')} made{already}, {plural(len(failures), 'failed line')}, {rate:.1f} images/min "
             f"over {world} process(es)"]
    lines += [f"  {failures[ln]}" for ln in sorted(failures)]
    return "\n".join(lines)


_DETAIL_KEYS = ("blocks", "width", "layers", "base_dim", "format", "algo", "rank", "targets", "quant", "dtype", "error")


def model_row(info, dirs=()) -> dict:
    """One file of `rdbt models` as the JSON row (and table row) shows it: its name inside the models folder."""
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


def print_models(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("kind", "file", "size", "hash", "details", title=title)
    for d in rows:
        table.add_row(d["kind"], d["file"], f"{d['size'] / 2**20:,.1f} MiB", d["hash"] or "", d["details"])
    Console().print(table)
