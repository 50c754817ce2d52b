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


def _gib(n) -> str:
    return f"{n / 2**30:.1f} GiB" if n and n >= 2**30 else f"{n / 2**20:.0f} MiB" if n else ""


def describe(info: dict) -> str:
    """A stage event of the library (pipeline.report) as the progress line says it."""
    stage = info["stage"]
    if stage == "load":
        size = _gib(info.get("bytes"))
        return f"loading {info['part']} {info.get('file', '')}" + (f" ({size})" if size else "")
    if stage in ("lora", "hash"):
        files = ", ".join(info.get("files") or []) or "none"
        return f"merging LoRAs: {files}" if stage == "lora" else f"hashing {files} for the metadata (once per file)"
    return _STAGES.get(stage, stage)


_STAGES = {
    "text": "encoding the prompt", "sample": "sampling", "upscale": "upscaling for the hires pass",
    "hires": "hires pass", "decode": "decoding (VAE)", "save": "saving", "build": "building random weights",
    "gemm": "measuring the GEMM rate",
}
_STEPPED = ("sample", "hires")  # stages whose steps the bar counts; the others show a spinner and their time


def _rich_progress(shown: "Progress", preview):
    """rich's live display for Progress: the preview's picture above the progress line, M/N with speed and ETA."""
    from rich import progress as rp

    class WithPreview(rp.Progress):
        def get_renderables(self):
            if shown.showing and shown.preview.current is not None:
                yield shown.preview.current
            yield from super().get_renderables()

    class Counts(rp.ProgressColumn):
        """M/N, it/s (or s/it) and ETA for a stage with steps; nothing for one without."""

        def render(self, task):
            if task.total is None:
                return rp.Text("")
            done = f"{task.completed:.0f}/{task.total:.0f}"
            if not task.fields.get("steps", True):
                return rp.Text(done)
            speed = task.speed
            rate = "" if not speed else f" {speed:.2f} it/s" if speed >= 1 else f" {1 / speed:.1f} s/it"
            eta = task.time_remaining
            left = f" eta {int(eta) // 60}:{int(eta) % 60:02d}" if eta is not None and task.completed else ""
            return rp.Text(done + rate + left)

    drawn = preview is not None and preview.protocol is not None
    return WithPreview(
        rp.SpinnerColumn(), rp.TextColumn("{task.description}"), rp.BarColumn(), Counts(), rp.TimeElapsedColumn(),
        console=stderr(), transient=False, redirect_stdout=False, redirect_stderr=False,
        # a sixel or iTerm2 picture is sent again at every redraw (text over it erases it): fewer redraws
        refresh_per_second=4 if drawn and preview.protocol in ("sixel", "iterm") else 10,
    )


class _Silent:
    """rich's live display as Progress uses it, drawing nothing: with --quiet nothing is shown, and rich (50 ms to
    import) is not needed. It keeps its tasks (description, total, completed) as rich would."""

    def __init__(self):
        self.tasks: list = []
        self.added = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def add_task(self, description: str, total=None, completed: float = 0, **fields):
        from types import SimpleNamespace

        self.added += 1
        self.tasks.append(SimpleNamespace(id=self.added, description=description, total=total, completed=completed,
                                          fields=fields))
        return self.added

    def remove_task(self, task) -> None:
        self.tasks = [t for t in self.tasks if t.id != task]

    def advance(self, task, advance: float = 1) -> None:
        for t in self.tasks:
            if t.id == task:
                t.completed += advance

    def refresh(self) -> None:
        pass


class Progress:
    """Rich progress on stderr: one line for what is happening now (loading each file, encoding, each sampling step
    with it/s and ETA, decoding, saving, hashing), plus an overall bar when there are several images. Pass `event`
    as the library's callback; `quiet` shows nothing. A `preview` (preview.Preview) hears each step, and its picture
    is drawn above the progress line while an image is being made."""

    def __init__(self, total_images: int, quiet: bool, preview=None):
        self.preview, self.showing = preview, False
        self.progress = _Silent() if quiet else _rich_progress(self, preview)
        self.total_images = total_images
        self.overall = None
        self.task = None
        self.label = ""
        self.steps = None
        self.counted = 0
        self.live = not quiet

    def __enter__(self):
        self.progress.__enter__()
        if self.total_images > 1:
            self.overall = self.progress.add_task("images", total=self.total_images, steps=False)
        self.stage("starting")
        return self

    def __exit__(self, *exc):
        self.progress.remove_task(self.task)  # what stays on screen: the overall bar, if any
        self.hide_preview()
        return self.progress.__exit__(*exc)

    def hide_preview(self) -> None:
        """Take the picture off the live display (redrawn without it), then let the preview forget it."""
        if self.preview is not None:
            if self.showing:
                self.showing = False
                self.progress.refresh()
            self.preview.clear()

    def stage(self, text: str, total=None, completed: int = 0) -> None:
        """Show what happens now; the elapsed time restarts, and a stage with a total counts its steps."""
        description = f"{self.label} · {text}" if self.label else text
        if self.task is not None:  # a new task, not reset(): reset() cannot take a total back to None (a spinner)
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(description, total=total, completed=completed)

    def start_image(self, label: str, steps: int):
        self.label, self.steps, self.counted = label, steps, 0
        self.hide_preview()  # the last image's picture

    def event(self, info: dict):
        """The library's callback: a stage event starts a stage; any other dict is one sampler step (the steps of a
        hires pass go on counting after the first pass's)."""
        stage = info.get("stage")
        if stage is None:
            if self.preview is not None:
                self.preview.step(info)
                self.showing = self.preview.current is not None
            self.counted += 1
            self.progress.advance(self.task)
        elif stage in _STEPPED:
            self.counted = self.counted if stage == "hires" else 0
            self.stage(describe(info), total=self.steps, completed=self.counted)
        else:
            self.stage(describe(info))

    def warn(self, message: str) -> None:
        """A warning above the live display (or plainly on stderr when there is none)."""
        if self.live and sys.stderr.isatty():
            self.progress.console.print(f"warning: {message}", markup=False, highlight=False, soft_wrap=True)
        else:
            typer.echo(f"warning: {message}", err=True)

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
    already = f", {done} already done (reused: unchanged since an earlier run)" if done else ""
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
