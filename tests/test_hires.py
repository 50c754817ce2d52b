"""The hires fix through the real CLI on the tiny model: sizes, both upscalers, warnings, presets, batch lines,
--from, the recipe and graphs, and bad values as one readable line with nothing written."""

import json

import numpy as np
import pytest
from PIL import Image

from rdbt_cli import LoadParams, metadata, plan, settings
from test_cli import assert_one_line_error, pixels, run
from test_img2img import _mask, _picture, _recipe

TINY = ["--model", "tiny", "--steps", "3", "--seed", "11", "--quiet"]


def _api(path):
    return json.loads(metadata.read_png(path)["raw"]["prompt"])


def _classes(path):
    return sorted(n["class_type"] for n in _api(path).values())


@pytest.mark.parametrize("upscaler,node", [("latent", "LatentUpscaleBy"), ("lanczos", "ImageScaleBy")])
def test_hires_pass_makes_the_larger_image_and_records_it(tmp_path, upscaler, node):
    out, plain = tmp_path / "h.png", tmp_path / "p.png"
    r = run("gen", "a cat", "--size", "64x32", "--hires", "1.5", "--hires-upscaler", upscaler, "--hires-steps", "2",
            "--out", out, *TINY)
    assert r.exit_code == 0, r.output
    assert Image.open(out).size == (96, 48)
    rec = _recipe(out)
    assert (rec["width"], rec["height"], rec["hires"], rec["hires_steps"], rec["hires_upscaler"]) == (
        64, 32, 1.5, 2, upscaler)
    text = metadata.read_png(out)["raw"]["parameters"]
    assert "Size: 64x32" in text and "Hires upscale: 1.5" in text and "Hires steps: 2" in text
    assert "Denoising strength: 0.5" in text  # A1111's label for the hires denoise of a txt2img
    assert "Hires upscaler: " + ("Latent (nearest-exact)" if upscaler == "latent" else "Lanczos") in text
    assert _classes(out).count("KSampler") == 2 and node in _classes(out)
    assert metadata.parse_parameters_text(text)["hires_denoise"] == 0.5
    # The first pass is the plain image at the small size: same seed, same settings.
    assert run("gen", "a cat", "--size", "64x32", "--out", plain, *TINY).exit_code == 0
    assert Image.open(plain).size == (64, 32)
    again = tmp_path / "again.png"
    assert run("gen", "--from", out, "--out", again, "--quiet").exit_code == 0
    assert np.array_equal(pixels(out), pixels(again))


def test_a_factor_whose_size_is_not_a_multiple_of_16_rounds_and_says_so_in_the_graph(tmp_path):
    out = tmp_path / "h.png"
    assert run("gen", "a cat", "--size", "48x48", "--hires", "1.5", "--out", out, *TINY).exit_code == 0
    assert Image.open(out).size == (80, 80) == settings.hires_size(48, 48, 1.5)  # 72 would not fit the DiT's patches
    up = [n for n in _api(out).values() if n["class_type"] == "LatentUpscale"]
    assert up and (up[0]["inputs"]["width"], up[0]["inputs"]["height"]) == (80, 80)


def test_hires_after_img2img_and_inpainting(tmp_path):
    src, mask = _picture(tmp_path / "in.png", 64, 64), _mask(tmp_path / "m.png", 64, 64)
    out = tmp_path / "o.png"
    r = run("gen", "a cat", "--init-image", src, "--mask", mask, "--denoise", "0.7", "--hires", "1.5",
            "--hires-denoise", "0.4", "--out", out, *TINY)
    assert r.exit_code == 0, r.output
    assert Image.open(out).size == (96, 96)
    assert {"LoadImage", "SetLatentNoiseMask", "LatentUpscaleBy"} <= set(_classes(out))
    text = metadata.read_png(out)["raw"]["parameters"]
    assert "Denoising strength: 0.7" in text and "Hires upscale: 1.5" in text  # img2img's denoise takes the label


def test_presets_set_hires_and_flags_and_batch_lines_override(tmp_path):
    preset = tmp_path / "big.toml"
    preset.write_text('# test\nhires = 1.5\nhires_denoise = 0.3\nhires_upscaler = "lanczos"\n')
    jobs, _, _ = plan("x", LoadParams(model="tiny"), preset=str(preset))
    g = jobs[0].settings
    assert (g.hires, g.hires_denoise, g.hires_upscaler) == (1.5, 0.3, "lanczos")
    assert jobs[0].steps == 2 * g.steps  # what the progress bar counts: both passes
    off, _, _ = plan("x", LoadParams(model="tiny"), preset=str(preset), hires=0)
    assert off[0].settings.hires == 0 and off[0].steps == g.steps
    lines = tmp_path / "lines.txt"
    lines.write_text("a cat --hires 2 --hires-steps 1\na dog --hires 0\n", encoding="utf-8")
    r = run("batch", lines, "--preset", preset, "--out", tmp_path / "out", "--model", "tiny", "--steps", "2",
            "--size", "32x32", "--quiet")
    assert r.exit_code == 0, r.output
    sizes = {p.name[:5]: Image.open(p).size for p in (tmp_path / "out").glob("*.png")}
    assert sizes == {"L0001": (64, 64), "L0002": (32, 32)}
    assert "line 1: --hires 2 is more than 1.5x" in r.output


def test_bundled_kirazuri_presets_want_hires():
    from rdbt_cli.presets import load_preset

    for name in ("kirazuri", "kirazuri-fast"):
        p = load_preset(name)
        w, h = settings.hires_size(p.width, p.height, p.hires)
        assert 1 < p.hires <= settings.HIRES_WARN_SCALE and w * h <= settings.HIRES_WARN_PIXELS, name


def test_large_results_are_warned_about_not_refused():
    jobs, _, _ = plan("x", LoadParams(model="tiny"), width=1024, height=1024, hires=1.6)
    notes = " ".join(jobs[0].notes)
    assert "more than 1.5x" in notes and "1632x1632" in notes and "MP" in notes
    jobs, _, _ = plan("x", LoadParams(model="tiny"), width=1024, height=1024, hires=1.5)
    assert jobs[0].notes == []  # 1536x1536 is 2.4 MP


@pytest.mark.parametrize("args,needles", [
    (["--hires", "1"], ["hires", "more than 1", "0 turns"]),
    (["--hires", "0.5"], ["hires", "more than 1"]),
    (["--hires", "9"], ["at most 8"]),
    (["--size", "4096x4096", "--hires", "5"], ["--hires 5", "20480x20480", "16384"]),
    (["--hires", "1.5", "--hires-denoise", "0"], ["--hires-denoise", "more than 0"]),
    (["--hires", "1.5", "--hires-denoise", "2"], ["--hires-denoise", "at most 1"]),
    (["--hires", "1.5", "--hires-steps", "0"], ["--hires-steps", "at least 1"]),
    (["--hires", "1.5", "--hires-sampler", "nope"], ["nope", "er_sde"]),
    (["--hires", "1.5", "--hires-upscaler", "esrgan"], ["esrgan", "latent", "lanczos"]),
])
def test_bad_hires_values_are_one_line_and_write_nothing(tmp_path, args, needles):
    out = tmp_path / "out"
    assert_one_line_error(run("gen", "a cat", *args, "--out", out, *TINY), *needles)
    assert not out.exists()
