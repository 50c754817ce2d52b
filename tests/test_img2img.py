"""img2img and inpainting through the real CLI on the tiny model: sizes, recipes, --from, batch lines, inspect, and
every bad input as one readable line with nothing written."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from rdbt_cli import LoadParams, metadata, pipeline, plan
from rdbt_cli.errors import ConfigError
from test_cli import assert_one_line_error, pixels, run

TINY = ["--model", "tiny", "--steps", "3", "--seed", "7", "--quiet"]


def _picture(path, w=64, h=48, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 256], -1).astype(np.uint8)
    rgb[h // 4: h // 2, w // 4: w // 2] = rng.integers(0, 256, 3, dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def _mask(path, w=64, h=48, box=(32, 0, 64, 24), grey=None):
    m = np.zeros((h, w), np.uint8)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = 255
    if grey is not None:
        m[h - 8:, :8] = grey
    Image.fromarray(np.stack([m] * 3, -1)).save(path)
    return path


@pytest.fixture
def pic(tmp_path):
    return _picture(tmp_path / "in.png")


def _recipe(path):
    return json.loads(Image.open(path).info["rdbt"])


def test_img2img_size_defaults_to_the_image_rounded_to_16(tmp_path):
    src = _picture(tmp_path / "odd.png", 150, 100)
    out = tmp_path / "a.png"
    assert run("gen", "a cat", "--init-image", src, "--denoise", "0.5", "--out", out, *TINY).exit_code == 0
    assert Image.open(out).size == (144, 96)  # 150x100 -> Lanczos to the nearest multiples of 16
    r = _recipe(out)
    assert (r["width"], r["height"], r["denoise"]) == (144, 96, 0.5)
    assert r["init_image"]["path"] == str(src) and r["init_image"]["width"] == 150
    assert len(r["init_image"]["sha256"]) == 64
    one_side = tmp_path / "b.png"
    assert run("gen", "a cat", "--init-image", src, "--width", "64", "--out", one_side, *TINY).exit_code == 0
    assert Image.open(one_side).size == (64, 48)  # the other side follows the image's shape
    given = tmp_path / "c.png"  # an explicit size (or a preset's) beats the default; the image is stretched to it
    assert run("gen", "a cat", "--init-image", src, "--size", "32x32", "--out", given, *TINY).exit_code == 0
    assert Image.open(given).size == (32, 32)


def test_denoise_moves_the_picture_away_from_the_input(tmp_path, pic):
    outs = {}
    for d in ("0.2", "0.9"):
        outs[d] = tmp_path / f"d{d}.png"
        assert run("gen", "a cat", "--init-image", pic, "--denoise", d, "--out", outs[d], *TINY).exit_code == 0
    src = pixels(pic).astype(int)
    near, far = (np.abs(pixels(outs[d]).astype(int) - src).mean() for d in ("0.2", "0.9"))
    assert near < far  # the less denoise, the more of the input survives (tiny random model: a weak but sure sign)


def test_from_restores_the_input_and_says_when_it_is_missing_or_changed(tmp_path, pic):
    first = tmp_path / "first.png"
    assert run("gen", "a cat", "--init-image", pic, "--denoise", "0.6", "--out", first, *TINY).exit_code == 0
    again = tmp_path / "again.png"
    assert run("gen", "--from", first, "--out", again, "--quiet").exit_code == 0
    assert np.array_equal(pixels(first), pixels(again)) and _recipe(again)["denoise"] == 0.6
    other = _picture(tmp_path / "other.png", seed=3)
    swapped = tmp_path / "swapped.png"  # a flag replaces the recorded file
    assert run("gen", "--from", first, "--init-image", other, "--out", swapped, "--quiet").exit_code == 0
    assert _recipe(swapped)["init_image"]["path"] == str(other)
    _picture(pic, seed=5)  # the recorded file changed
    assert_one_line_error(run("gen", "--from", first, "--out", tmp_path / "x.png", "--quiet"), "in.png", "changed",
                          "--init-image")
    os.remove(pic)
    assert_one_line_error(run("gen", "--from", first, "--out", tmp_path / "x.png", "--quiet"), "in.png", "missing",
                          "--init-image")
    assert not (tmp_path / "x.png").exists()


def test_metadata_of_an_inpainting(tmp_path, pic):
    mask = _mask(tmp_path / "m.png")
    out = tmp_path / "inp.png"
    assert run("gen", "a cat", "--init-image", pic, "--mask", mask, "--denoise", "0.8", "--out", out,
               *TINY).exit_code == 0
    info = metadata.read_png(out)
    text = info["raw"]["parameters"]
    assert "Denoising strength: 0.8" in text and "Inpaint method: blend" in text and "Mask grow" not in text
    assert "Hires" not in text
    shown = metadata.summarise(info)
    assert "m.png (64x48, sha256 " in shown and "grow_mask" not in shown and "hires" not in shown
    api = json.loads(info["raw"]["prompt"])
    classes = sorted(n["class_type"] for n in api.values())
    assert "SetLatentNoiseMask" in classes and "EmptyLatentImage" not in classes and "ImageScale" not in classes
    r = run("inspect", out, "--json")
    assert json.loads(r.output)["mask"]["file"] == "m.png"


def test_blend_keeps_the_unmasked_latent_and_fill_repaints_from_grey(tmp_path, pic):
    mask = _mask(tmp_path / "m.png", grey=128)
    load = LoadParams(model="tiny", device="cpu", dtype="fp32")
    jobs, load, paths = plan("a cat", load, steps=3, seed=1, init_image=str(pic), mask=str(mask), denoise=1.0)
    models = pipeline.Models.load(paths, device="cpu", dtype="fp32")
    result = pipeline.generate(models, jobs[0].settings, seed=1)
    encoded, noise_mask = pipeline.encode_input(models, jobs[0].settings)
    from rdbt_cli import sampling

    kept = sampling.latent_mask(noise_mask, encoded.shape) == 0
    assert kept.any() and (~kept).any()
    # ComfyUI's SetLatentNoiseMask: where the mask is 0 the final latent is the input's (up to float rounding)
    assert (result.latent - encoded).abs()[kept].max() <= 1e-5
    assert (result.latent - encoded).abs()[~kept].max() > 0.1
    jobs, _, _ = plan("a cat", load, steps=3, seed=1, init_image=str(pic), mask=str(mask), inpaint="fill",
                      grow_mask=4)
    filled, grown = pipeline.encode_input(models, jobs[0].settings)
    assert set(grown.unique().tolist()) == {0.0, 1.0} and grown.sum() > (noise_mask >= 0.5).sum()  # rounded, grown
    assert not torch.equal(filled, encoded)  # the masked pixels were greyed before encoding


def test_batch_lines_name_images_relative_to_the_prompt_file(tmp_path, monkeypatch):
    folder = tmp_path / "job"
    folder.mkdir()
    _picture(folder / "in.png")
    _mask(folder / "m.png")
    (folder / "prompts.txt").write_text(
        "a cat --init-image in.png --denoise 0.5\n"
        "a dog --init-image in.png --mask m.png --inpaint fill\n"
        "a bird --init-image missing.png\n"
        "a fish --mask m.png\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # not the prompt file's folder
    r = run("batch", folder / "prompts.txt", "--out", tmp_path / "out", "--model", "tiny", "--steps", "2", "--quiet")
    assert r.exit_code == 1, r.output
    assert "line 3: init image" in r.output and "missing.png: no such file" in r.output
    assert "line 4: --mask needs --init-image" in r.output
    made = {p.name[:5]: _recipe(p) for p in (tmp_path / "out").glob("*.png")}
    assert sorted(made) == ["L0001", "L0002"]
    assert made["L0001"]["init_image"]["path"] == str(folder / "in.png") and made["L0001"]["denoise"] == 0.5
    assert made["L0002"]["mask"]["path"] == str(folder / "m.png") and made["L0002"]["inpaint"] == "fill"


def test_a_mask_of_another_size_is_scaled_with_a_note(tmp_path, pic):
    mask = _mask(tmp_path / "big.png", 128, 96, box=(64, 0, 128, 48))
    out = tmp_path / "o.png"
    r = run("gen", "a cat", "--init-image", pic, "--mask", mask, "--out", out, *TINY)
    assert r.exit_code == 0, r.output
    assert "big.png is 128x96" in r.output and "scaled" in r.output and out.exists()


# --- bad input: one line naming the file and the fix, exit != 0, nothing written ----------------------------------------


def _bad_files(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    good = _picture(tmp_path / "good.png")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size * 2 // 3])
    black = _mask(tmp_path / "black.png", box=(0, 0, 0, 0))
    grey = tmp_path / "dim.png"  # something to blend, nothing that rounds to 1
    Image.fromarray(np.full((48, 64, 3), 100, np.uint8)).save(grey)
    square = _mask(tmp_path / "square.png", 64, 64)
    return {"good": good, "text": text, "cut": truncated, "black": black, "dim": grey, "square": square,
            "none": tmp_path / "nowhere.png", "folder": tmp_path}


@pytest.mark.parametrize("args,needles", [
    (["--init-image", "{none}"], ["nowhere.png", "no such file"]),
    (["--init-image", "{text}"], ["notes.png", "not an image", "PNG"]),
    (["--init-image", "{cut}"], ["cut.png", "truncated"]),
    (["--init-image", "{folder}"], ["is a folder"]),
    (["--init-image", "{good}", "--mask", "{none}"], ["nowhere.png", "no such file"]),
    (["--init-image", "{good}", "--mask", "{text}"], ["mask", "notes.png", "not an image"]),
    (["--init-image", "{good}", "--mask", "{black}"], ["black.png", "all black", "nothing to repaint"]),
    (["--init-image", "{good}", "--mask", "{dim}", "--inpaint", "fill"], ["dim.png", "--inpaint blend"]),
    (["--init-image", "{good}", "--mask", "{square}"], ["square.png", "64x64", "64x48", "another shape"]),
    (["--init-image", "{good}", "--denoise", "0"], ["--denoise", "more than 0"]),
    (["--init-image", "{good}", "--denoise", "1.5"], ["--denoise", "at most 1"]),
    (["--init-image", "{good}", "--denoise", "-0.2"], ["--denoise"]),
    (["--mask", "{good}"], ["--mask needs --init-image"]),
    (["--denoise", "0.5"], ["--denoise 0.5 needs --init-image"]),
    (["--init-image", "{good}", "--mask", "{good}", "--inpaint", "fill", "--denoise", "0.7"],
     ["--inpaint fill", "--denoise 1", "--inpaint blend"]),
    (["--init-image", "{good}", "--inpaint", "smudge"], ["smudge", "blend", "fill"]),
    (["--init-image", "{good}", "--grow-mask", "65"], ["grow_mask", "at most 64"]),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, needles):
    files = _bad_files(tmp_path)
    out = tmp_path / "out"
    r = run("gen", "a cat", *[a.format(**files) for a in args], "--out", out, *TINY)
    assert_one_line_error(r, *needles)
    assert not out.exists()


def test_plan_refuses_bad_inputs_before_anything_loads(tmp_path):
    with pytest.raises(ConfigError, match="nowhere.png"):
        plan("x", LoadParams(model="tiny"), init_image=str(tmp_path / "nowhere.png"))
