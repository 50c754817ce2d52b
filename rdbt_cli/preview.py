"""Live previews: each sampling step's latent as a small RGB picture, drawn in place on the terminal or into a PNG.

No VAE decode: the picture is the denoised latent (model space, as the samplers report it) times the Wan 2.1 latent->RGB
matrix that ComfyUI's Latent2RGB previewer uses for this VAE (comfy/latent_formats.py, class Wan21), one pixel per
latent pixel (1/8 of the image's side). `latent_rgb` is the only function here that uses torch, and it imports it
itself: by then the pipeline has loaded it, and the rest of this module (detection and drawing) stays light.

Drawing: the kitty graphics protocol (kitty, Ghostty), iTerm2 inline images (iTerm2, WezTerm) and sixel (foot, mlterm,
Konsole, Windows Terminal, contour) where the environment names such a terminal, else coloured half blocks, which
every colour terminal shows. Detection reads the environment only: asking the terminal itself means reading its
answer from stdin, which can swallow a keystroke or a piped prompt. RDBT_PREVIEW=kitty|iterm|sixel|blocks picks one.
"""

from __future__ import annotations

import base64
import io
import os
import sys
import time
from pathlib import Path
from typing import Optional

# ComfyUI latent_formats.Wan21: latent_rgb_factors (16 latent channels x R, G, B) and latent_rgb_factors_bias.
WAN21_RGB_FACTORS = (
    (-0.1299, -0.1692, 0.2932), (0.0671, 0.0406, 0.0442), (0.3568, 0.2548, 0.1747), (0.0372, 0.2344, 0.1420),
    (0.0313, 0.0189, -0.0328), (0.0296, -0.0956, -0.0665), (-0.3477, -0.4059, -0.2925), (0.0166, 0.1902, 0.1975),
    (-0.0412, 0.0267, -0.1364), (-0.1293, 0.0740, 0.1636), (0.0680, 0.3019, 0.1128), (0.0032, 0.0581, 0.0639),
    (-0.1251, 0.0927, 0.1699), (0.0060, -0.0633, 0.0005), (0.3477, 0.2275, 0.2950), (0.1984, 0.0913, 0.1861),
)
WAN21_RGB_BIAS = (-0.1835, -0.0868, -0.3360)

PROTOCOLS = ("kitty", "iterm", "sixel", "blocks")
ROWS = 12  # terminal rows the picture takes: big enough to judge a composition, small beside the progress line


def latent_rgb(latent):
    """[1, 16, (1,) h, w] model-space latent -> uint8 numpy [h, w, 3]: (factors·x + bias + 1) / 2, clamped, times
    255 and truncated, as ComfyUI's preview_to_image."""
    import torch

    x = latent.detach()
    x = x[0, :, 0] if x.ndim == 5 else x[0]
    factors = torch.tensor(WAN21_RGB_FACTORS, dtype=torch.float32, device=x.device)
    bias = torch.tensor(WAN21_RGB_BIAS, dtype=torch.float32, device=x.device)
    rgb = torch.einsum("chw,cr->hwr", x.float(), factors) + bias
    return ((rgb + 1.0) / 2.0).clamp(0, 1).mul(255).to(torch.uint8).cpu().numpy()


def detect(environ=None, stdout_tty: Optional[bool] = None) -> str:
    """The drawing protocol this terminal understands, from its environment."""
    env = os.environ if environ is None else environ
    forced = env.get("RDBT_PREVIEW", "").strip().lower()
    if forced in PROTOCOLS:
        return forced
    term, program = env.get("TERM", ""), env.get("TERM_PROGRAM", "")
    stdout_tty = sys.stdout.isatty() if stdout_tty is None else stdout_tty
    # textual-image sends kitty pictures through stdout; with stdout in a pipe they would land in the pipe
    if (term in ("xterm-kitty", "xterm-ghostty") or env.get("KITTY_WINDOW_ID") or program == "ghostty") and stdout_tty:
        return "kitty"
    if program in ("iTerm.app", "WezTerm") or env.get("LC_TERMINAL") == "iTerm2":
        return "iterm"
    if term.startswith(("foot", "mlterm", "contour")) or env.get("KONSOLE_VERSION") or env.get("WT_SESSION"):
        return "sixel"
    return "blocks"


def _renderables():
    """textual-image's renderable classes. Its package asks the terminal what it supports when it is imported with
    stdout on a terminal (reading stdin, see the module docstring); with sys.__stdout__ hidden it asks nothing. Its
    cell size (pixels per character cell, for scaling) is given from stderr's window size, for the same reason."""
    saved = sys.__stdout__
    try:
        sys.__stdout__ = None
        from textual_image import _terminal, renderable
    finally:
        sys.__stdout__ = saved
    if not hasattr(_terminal.get_cell_size, "_result"):
        _terminal.get_cell_size._result = _terminal.CellSize(*cell_pixels())
    return renderable


def cell_pixels(fd: Optional[int] = None) -> tuple[int, int]:
    """(width, height) of a character cell in pixels from the terminal's window size; (10, 20), a VT340's, when the
    terminal does not say (many report 0 pixels)."""
    try:
        import fcntl
        import struct
        import termios

        rows, columns, width, height = struct.unpack(
            "HHHH", fcntl.ioctl(sys.stderr.fileno() if fd is None else fd, termios.TIOCGWINSZ, b"\0" * 8))
    except (ImportError, OSError, ValueError, AttributeError):
        return 10, 20
    if not (rows and columns and width >= columns and height >= rows):
        return 10, 20
    return width // columns, height // rows


class ITermImage:
    """A Rich renderable for iTerm2's inline image escape (OSC 1337 File), which textual-image lacks: blank cells
    that give Rich the picture's size, then the picture drawn over them from their top left corner."""

    def __init__(self, png: bytes, columns: int, rows: int):
        self.png, self.columns, self.rows = png, columns, rows

    def __rich_console__(self, console, options):
        from rich.control import Control
        from rich.segment import ControlType, Segment

        null = [(ControlType.CURSOR_FORWARD, 0)]  # a no-op control, so Rich passes the escape through untouched
        for _ in range(self.rows):
            yield Segment(" " * self.columns + "\n")
        yield Segment("\x1b7", control=null)
        yield Control.move(0, -self.rows)
        data = base64.b64encode(self.png).decode("ascii")
        yield Segment(f"\x1b]1337;File=inline=1;size={len(self.png)};width={self.columns};height={self.rows};"
                      f"preserveAspectRatio=0:{data}\x07", control=null)
        yield Segment("\x1b8", control=null)

    def __rich_measure__(self, console, options):
        from rich.measure import Measurement

        return Measurement(self.columns, self.columns)


class _Once:
    """A renderable rendered once and replayed: Rich redraws its live display several times a second, and the sixel
    encoding of a picture should happen once per step, not once per redraw. `on_cost` hears the seconds it took."""

    def __init__(self, inner, on_cost=None):
        self.inner, self.segments, self.width, self.on_cost = inner, None, None, on_cost

    def __rich_console__(self, console, options):
        if self.segments is None or options.max_width != self.width:
            t0 = time.perf_counter()
            try:
                self.segments = list(console.render(self.inner, options))
            except Exception:  # a picture that cannot be drawn must not stop an image that takes minutes to make
                self.segments = []
            self.width = options.max_width
            if self.on_cost is not None:
                self.on_cost(time.perf_counter() - t0)
        yield from self.segments

    def __rich_measure__(self, console, options):
        return self.inner.__rich_measure__(console, options)


def _image(rgb):
    """A PIL image of a picture: uint8 [h, w, 3] from latent_rgb, or a PIL image already (a server's preview, which
    a client decodes without numpy)."""
    from PIL import Image

    return rgb if isinstance(rgb, Image.Image) else Image.fromarray(rgb)


def _hw(rgb) -> tuple[int, int]:
    return (rgb.height, rgb.width) if hasattr(rgb, "height") else rgb.shape[:2]


def _png(rgb, compress_level: int = 1) -> bytes:
    out = io.BytesIO()
    _image(rgb).save(out, format="PNG", compress_level=compress_level)
    return out.getvalue()


MAX_COLUMNS = 60  # a wide picture (a 4:1 banner) gets fewer rows instead of running past an 80-column terminal


def cells(height: int, width: int, rows: int = ROWS) -> tuple[int, int]:
    """(columns, rows) for a picture of height x width pixels at `rows` rows (a cell is about twice as tall as wide)."""
    columns = max(1, round(rows * 2 * width / height))
    if columns > MAX_COLUMNS:
        return MAX_COLUMNS, max(1, round(MAX_COLUMNS * height / (2 * width)))
    return columns, rows


def renderable(rgb, protocol: str, rows: int = ROWS, on_cost=None):
    """A Rich renderable that draws the picture (see _image) with `protocol`; `on_cost` hears its drawing time."""
    columns, rows = cells(*_hw(rgb), rows)
    if protocol == "iterm":
        return _Once(ITermImage(_png(rgb), columns, rows), on_cost)
    lib = _renderables()
    cls = {"kitty": lib.TGPImage, "sixel": lib.SixelImage, "blocks": lib.HalfcellImage}[protocol]
    return _Once(cls(_image(rgb), width=columns, height=rows), on_cost)


def check_file(path) -> None:
    """Refuse a --preview-file that cannot be written, or is an image of its own, before anything loads."""
    from rdbt_cli.errors import ConfigError

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ConfigError(f"--preview-file {path}: the preview is a PNG; give a name ending in .png")
    if path.is_dir():
        raise ConfigError(f"--preview-file {path}: is a folder; give a file name ending in .png")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"--preview-file {path}: folder {folder} does not exist or cannot be written; create it or "
                          "choose another")
    if path.exists() and _has_recipe(path):  # rewritten every step: never over an image rdbt made
        raise ConfigError(f"--preview-file {path}: is an image with a recipe, which the preview would replace; give "
                          "another name")


def _has_recipe(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return "rdbt" in im.info or "parameters" in im.info or "prompt" in im.info
    except Exception:  # not an image Pillow reads: a file the user would still not want replaced
        return True


def write_png(rgb, path: Path) -> None:
    """Replace `path` with the picture atomically (a temp file beside it, then rename), so a viewer that reloads on
    change never reads half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(_png(rgb))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


BUDGET = 0.02  # the share of the time the preview may take from sampling


class Preview:
    """What a progress display does with each step: the picture drawn with `protocol` (None: not drawn) and written
    to `file` (None: not written). `current` is the renderable of the latest step, for the live display.

    Every step is shown while the preview's own work (latent -> RGB, drawing, the file) costs at most `budget` of
    the time since the last picture; faster steps (a GPU at small sizes, sixel's slow encoding) are shown as often as
    that allows. budget=None shows every step whatever it costs."""

    def __init__(self, protocol: Optional[str] = None, file: Optional[Path] = None, rows: int = ROWS,
                 budget: Optional[float] = BUDGET):
        self.protocol, self.file, self.rows, self.budget = protocol, Path(file) if file else None, rows, budget
        self.current = self._shown = None
        self.cost = 0.0  # seconds of the last picture: made here, plus its drawing (on Rich's refresh thread)
        self._last: Optional[float] = None  # perf_counter() when the last picture was done
        self.shown_steps = 0

    def _drawn(self, seconds: float) -> None:
        self.cost += seconds

    def due(self) -> bool:
        if self.budget is None or self._last is None:
            return True
        return self.cost <= self.budget * (time.perf_counter() - self._last)

    def step(self, info: dict) -> None:
        """A sampler step: its `denoised` latent in-process, or `preview_png` (PNG bytes of the same picture) from a
        server."""
        latent, png = info.get("denoised"), info.get("preview_png")
        if (latent is None and png is None) or not self.due():
            return
        t0 = time.perf_counter()
        rgb = latent_rgb(latent) if latent is not None else _decode(png)
        if rgb is None:
            return
        if self.file is not None:
            try:
                write_png(rgb, self.file)
            except OSError as e:
                from rdbt_cli.errors import OutputError, io_problem

                raise OutputError(f"{self.file}: cannot write the preview: {io_problem(e)}") from None
        if self.protocol is not None:
            # The picture before last is surely off the screen now (the last may still be drawn until the next
            # redraw): a kitty picture is deleted from the terminal's memory then.
            _cleanup(self._shown)
            self._shown, self.current = self.current, renderable(rgb, self.protocol, self.rows, self._drawn)
        self._last = time.perf_counter()
        self.cost = self._last - t0
        self.shown_steps += 1

    def clear(self) -> None:
        """Forget the pictures (at the end of an image, after the display has been redrawn without them)."""
        _cleanup(self._shown)
        _cleanup(self.current)
        self.current = self._shown = None


def _decode(png: bytes):
    """The server's preview as an RGB image, or None: a picture that does not decode is skipped, not a failed image."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(png)) as image:
            return image.convert("RGB")
    except Exception:
        return None


def _cleanup(shown) -> None:
    inner = getattr(shown, "inner", None)
    if inner is not None and hasattr(inner, "cleanup"):
        inner.cleanup()
