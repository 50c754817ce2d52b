"""Live previews: latent -> RGB against the Wan 2.1 factors, the escape sequences of each drawing protocol, in-place
redraws in the progress display, the preview file, and the CLI switches."""

import base64
import io
import os
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from rdbt_cli import console, preview
from rdbt_cli.cli import app

FACTORS = np.array(preview.WAN21_RGB_FACTORS, dtype=np.float32)
BIAS = np.array(preview.WAN21_RGB_BIAS, dtype=np.float32)


def expected_rgb(channel_values):
    """(factors·x + bias + 1) / 2, clamped, times 255, truncated: for one latent pixel with these channel values."""
    v = (np.asarray(channel_values, dtype=np.float32) @ FACTORS + BIAS + 1) / 2
    return np.trunc(np.clip(v, 0, 1) * 255).astype(np.uint8)


def test_latent_rgb_is_the_wan21_matrix_per_pixel():
    latent = torch.zeros(1, 16, 1, 2, 3)
    latent[0, 14, 0, 0, 0] = 1.0  # one channel on: its factor row plus the bias
    latent[0, :, 0, 1, 2] = torch.arange(16) / 8.0 - 1.0
    rgb = preview.latent_rgb(latent)
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == expected_rgb(np.eye(16)[14]).tolist()
    assert rgb[0, 1].tolist() == expected_rgb(np.zeros(16)).tolist() == [104, 116, 84]  # the bias alone
    assert rgb[1, 2].tolist() == expected_rgb(np.arange(16) / 8.0 - 1.0).tolist()
    latent[0, 6] = 40.0  # far out of range: clamped, not wrapped
    assert preview.latent_rgb(latent[:, :, 0])[0, 0].tolist() == [0, 0, 0]  # 4-D latents too


@pytest.mark.parametrize("env, stdout_tty, expected", [
    ({"TERM": "xterm-kitty"}, True, "kitty"),
    ({"TERM": "xterm-kitty"}, False, "blocks"),  # kitty pictures go through stdout: not into a pipe
    ({"TERM_PROGRAM": "iTerm.app"}, True, "iterm"), ({"TERM_PROGRAM": "WezTerm"}, False, "iterm"),
    ({"TERM": "foot"}, True, "sixel"), ({"WT_SESSION": "x", "TERM": "xterm-256color"}, True, "sixel"),
    ({"TERM": "xterm-256color"}, True, "blocks"), ({"TERM": "xterm-kitty", "RDBT_PREVIEW": "sixel"}, True, "sixel"),
])
def test_detect_reads_only_the_environment(env, stdout_tty, expected):
    assert preview.detect(env, stdout_tty=stdout_tty) == expected


def test_cells_keep_the_aspect_and_fit_a_narrow_terminal():
    assert preview.cells(128, 128) == (24, 12)  # cells are about twice as tall as wide
    assert preview.cells(152, 104) == (16, 12)  # 832x1216 portrait
    assert preview.cells(32, 128) == (60, 8)  # a 4:1 banner: capped at 60 columns, fewer rows


def picture():
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)  # 2 rows of 4 cells as half blocks: no resampling
    rgb[:2] = (255, 0, 0)  # red over blue
    rgb[2:] = (0, 0, 255)
    return rgb


def draw(renderable) -> str:
    out = io.StringIO()
    Console(file=out, force_terminal=True, color_system="truecolor", width=80).print(renderable)
    return out.getvalue()


def test_half_blocks_are_coloured_upper_half_cells():
    text = draw(preview.renderable(picture(), "blocks", rows=2))
    lines = [ln for ln in text.split("\n") if ln]
    assert len(lines) == 2 and all(ln.count("▀") == 4 for ln in lines)  # cells are 1:2
    assert "\x1b[38;2;255;0;0;48;2;255;0;0m▀" in lines[0]  # top row: red over red
    assert "\x1b[38;2;0;0;255;48;2;0;0;255m▀" in lines[1]


def test_sixel_is_drawn_over_blank_cells_and_the_cursor_restored():
    text = draw(preview.renderable(picture(), "sixel", rows=2))
    assert text.count("\n") >= 2 and "\x1b7" in text and "\x1b8" in text  # placeholder rows, save/restore
    sixel = re.search(r"\x1bP[0-9;]*q(.*?)\x1b\\", text, re.S)
    assert sixel and re.search(r"#\d+;2;100;0;0", sixel.group(1)) and re.search(r"#\d+;2;0;0;100", sixel.group(1))


def test_iterm_inline_image_carries_the_picture_as_png():
    text = draw(preview.renderable(picture(), "iterm", rows=2))
    m = re.search(r"\x1b\]1337;File=inline=1;size=(\d+);width=4;height=2;preserveAspectRatio=0:([A-Za-z0-9+/=]+)\x07",
                  text)
    assert m
    png = base64.b64decode(m.group(2))
    assert len(png) == int(m.group(1))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), picture())


def test_kitty_picture_is_sent_once_and_placed_by_unicode_placeholders(monkeypatch):
    sent = io.StringIO()
    monkeypatch.setattr(sys, "__stdout__", sent)  # textual-image sends kitty pictures on stdout
    shown = preview.renderable(picture(), "kitty", rows=2)
    text = draw(shown) + draw(shown)  # a redraw sends nothing again
    commands = re.findall(r"\x1b_G([^;\x1b]*)(?:;[^\x1b]*)?\x1b\\", sent.getvalue())
    assert any("f=100" in c for c in commands) and sum("a=p" in c and "U=1" in c for c in commands) == 1
    assert text.count(chr(0x10EEEE)) == 4 * 2 * 2  # 4x2 cells, drawn twice
    preview._cleanup(shown)
    assert "a=d" in sent.getvalue().rsplit("\x1b_G", 1)[1]  # deleted from the terminal's memory


def test_progress_redraws_the_picture_in_place_above_the_bar(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(console, "stderr", lambda: Console(file=out, force_terminal=True, width=80,
                                                           color_system="truecolor"))
    shown = preview.Preview("blocks", rows=3, budget=None)
    latent = torch.zeros(1, 16, 1, 8, 8)
    with console.Progress(1, False, shown) as bar:
        bar.start_image("seed 1", 2)
        bar.event({"stage": "sample"})
        for i in range(2):
            latent[0, 14] = i  # a brighter picture at the second step
            bar.event({"i": i, "denoised": latent})
            bar.progress.refresh()
        during = out.getvalue()
    assert shown.shown_steps == 2
    for colour in (expected_rgb(np.zeros(16)), expected_rgb(np.eye(16)[14])):  # both steps' pictures
        assert "\x1b[38;2;{};{};{}m".format(*colour).replace("m", ";48") in during
    assert "\x1b[1A\x1b[2K" in during  # redrawn in place: cursor up, line erased
    final = out.getvalue()[len(during):]
    assert "▀" not in final  # the last frame (the bar) has no picture left in it


def test_preview_file_is_replaced_atomically_at_every_step(tmp_path, monkeypatch):
    target = tmp_path / "p.png"
    replaced = []
    real_replace = os.replace

    def spy(src, dst):
        assert os.path.dirname(src) == str(tmp_path) and os.path.basename(src).startswith(".p.png.")
        replaced.append(np.asarray(Image.open(src)).copy())
        real_replace(src, dst)

    monkeypatch.setattr(preview.os, "replace", spy)
    shown = preview.Preview(file=target, budget=None)
    latent = torch.zeros(1, 16, 1, 4, 6)
    for i in range(3):
        latent[0, 2] = i
        shown.step({"i": i, "denoised": latent})
        assert np.array_equal(np.asarray(Image.open(target)), preview.latent_rgb(latent))
    assert len(replaced) == 3 and not np.array_equal(replaced[0], replaced[2])
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]  # no temp file left


def test_budget_skips_steps_that_come_faster_than_the_preview_may_cost(monkeypatch):
    clock = iter([0.0, 1.0, 1.05, 1.1, 51.5, 51.5, 51.6])
    monkeypatch.setattr(preview.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(preview, "latent_rgb", lambda latent: picture())
    shown = preview.Preview(file=None, protocol=None, budget=0.02)
    for _ in range(4):
        shown.step({"denoised": object()})
    # the first picture cost 1 s (0.0 to 1.0), so the next is due 50 s later: steps at 1.05 and 1.1 are skipped, the
    # one at 51.5 is shown
    assert shown.shown_steps == 2


TINY = ["--model", "tiny", "--size", "32x32", "--steps", "2", "--seed", "2"]


def test_gen_writes_the_preview_file_and_refuses_a_bad_one(tmp_path):
    target = tmp_path / "live.png"
    r = CliRunner().invoke(app, ["gen", "a cat", "--preview-file", str(target), "--out", str(tmp_path / "o"),
                                 "--json", *TINY])
    assert r.exit_code == 0, r.output
    assert Image.open(target).size == (4, 4)  # the latent's size: 1/8 of the image
    assert "▀" not in r.output  # --json (and stderr not a terminal): nothing drawn
    for bad, needle in ((tmp_path / "x.jpg", "ending in .png"), (tmp_path / "nope" / "p.png", "does not exist"),
                        (next((tmp_path / "o").glob("*.png")), "image with a recipe")):
        r = CliRunner().invoke(app, ["gen", "a", "--preview-file", str(bad), *TINY])
        assert r.exit_code != 0 and needle in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_the_terminal_preview_is_off_unless_stderr_is_a_terminal_and_nothing_asks_quiet(monkeypatch, tmp_path):
    from rdbt_cli.options import Output

    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.delenv("RDBT_PREVIEW", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert Output().preview(quiet=False, as_json=False).protocol == "blocks"
    assert Output(no_preview=True).preview(quiet=False, as_json=False) is None
    assert Output().preview(quiet=True, as_json=False) is None
    assert Output().preview(quiet=False, as_json=True) is None
    kept = Output(no_preview=True, preview_file=str(tmp_path / "p.png")).preview(quiet=True, as_json=False)
    assert kept.protocol is None and kept.file == tmp_path / "p.png"  # the file is written all the same
    monkeypatch.setenv("TERM", "dumb")
    assert Output().preview(quiet=False, as_json=False) is None
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.setenv("WORLD_SIZE", "2")  # ranks of torchrun share the terminal
    assert Output().preview(quiet=False, as_json=False) is None
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert Output().preview(quiet=False, as_json=False) is None
