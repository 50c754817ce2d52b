"""X/Y/Z grids: axes parsed by the settings table's own rules, every mistake one line with nothing written, each cell
the image `gen` makes with the same settings (a LoRA weight axis switching by exact undo), and a labelled sheet
whose recipe runs the whole grid again."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from rdbt_cli import grid
from rdbt_cli.cli import app
from rdbt_cli.config import LoadParams
from rdbt_cli.errors import ConfigError
from rdbt_cli.settings import GenParams

TINY = ["--model", "tiny", "--size", "64x64", "--steps", "2", "--quiet"]


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_axes_are_read_by_each_settings_rule():
    a = grid.parse_axis("steps=12, 20,28")
    assert a.name == "steps" and a.values == ("12", "20", "28") and [o.steps for o in a.overrides] == [12, 20, 28]
    assert [o.nag_scale for o in grid.parse_axis("nag-scale=0,5", "y").overrides] == [0.0, 5.0]
    assert [o.sampler for o in grid.parse_axis("--sampler=euler,er_sde").overrides] == ["euler", "er_sde"]
    assert [(o.width, o.height) for o in grid.parse_axis("size=64x64,128x64").overrides] == [(64, 64), (128, 64)]
    lora = grid.parse_axis("lora:turbo=0,0.5")
    assert lora.label(1) == "lora:turbo: 0.5" and [o.loras[0].weight for o in lora.overrides] == [0.0, 0.5]
    assert grid.parse_axis('prompt=red,"blue, long"').values == ("red", "blue, long")
    for text, needle in [("foo=1,2", "not a setting a grid can vary"), ("steps=0,2", "at least 1"),
                         ("cfg=1,x", "needs a number"), ("sampler=euler,nope", "unknown sampler"),
                         ("steps", "SETTING=V1,V2"), ("cfg=1,,2", "empty value"),
                         ("seed=1-9", "one seed per value|whole number"),
                         ("steps=2,2", "given twice"), ("count=1,2", "not a setting"), ("lora:x=0,a", "not a number"),
                         ("size=64x64,65x64", "multiple of 16")]:
        with pytest.raises(ConfigError, match=needle):
            grid.parse_axis(text)


def test_bad_grids_are_one_line_before_anything_loads_and_write_nothing(tmp_path, monkeypatch, shared_tiny):
    import rdbt_cli.runner

    def no_loading(*a, **k):
        raise AssertionError("models loaded for a bad grid")

    monkeypatch.setattr(rdbt_cli.runner, "Runner", no_loading)
    out = tmp_path / "out"
    for args, needle in [(["--x", "foo=1,2"], "not a setting"), (["--x", "steps=2,3", "--y", "steps=4"], "two axes"),
                         (["--x", "prompt=green,blue"], "'green' is not in the prompt"), ([], "at least one axis"),
                         (["--x", "steps=2,3", "--count", "2"], "one image per cell"),
                         (["--x", "steps=2,3", "--seed", "4,9-10"], "use an axis: --z seed=4,9,10"),
                         (["--x", "steps=2,3", "--y", "nag-scale=0,5"], "needs a negative prompt"),
                         (["--x", "seed=" + ",".join(map(str, range(11))), "--y", "steps=" + ",".join(
                             map(str, range(1, 11)))], "110 images, more than 100; add --yes")]:
        r = run("grid", "1girl, red hair", *args, "--out", out, *TINY)
        assert r.exit_code != 0 and needle in r.output, (args, r.output)
        assert len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert not out.exists()
    big = grid.plan("x", LoadParams(model="tiny"), GenParams(), x="seed=" + ",".join(map(str, range(11))),
                    y="steps=" + ",".join(map(str, range(1, 11))), yes=True)
    assert len(big.cells) == 110 and big.shape == (11, 10, 1)
    one = grid.plan("x", LoadParams(model="tiny"), GenParams(seed=[7]), x="steps=1,2")  # --seeds-from one keeper
    assert [c.job.seed for c in one.cells] == [7, 7]


def test_prompt_search_and_replace_keeps_the_template_and_each_cell_draws_its_own_variants(tmp_path, shared_tiny):
    gp = grid.plan("red hair, {smile|frown}", LoadParams(model="tiny"), GenParams(seed=3, negative="red eyes"),
                   x="prompt=red,blue,green", y="seed=3,4")
    prompts = [c.job.extra["prompt_template"] for c in gp.cells]
    assert prompts == ["red hair, {smile|frown}", "blue hair, {smile|frown}", "green hair, {smile|frown}"] * 2
    assert [c.job.settings.negative for c in gp.cells[:3]] == ["red eyes", "blue eyes", "green eyes"]
    assert [c.job.seed for c in gp.cells] == [3, 3, 3, 4, 4, 4]
    assert gp.record["prompt"] == "red hair, {smile|frown}" and gp.record["x"] == "prompt=red,blue,green"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A 2x2 grid on the golden tiny models: a LoRA weight across (0 first, so the second row undoes a merge), steps
    down; then the separate `gen` images of two cells."""
    from conftest import shared_path

    models = shared_path("golden", "models")
    root = tmp_path_factory.mktemp("grid")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RDBT_HOME", str(root / "home"))
        common = ["--models-dir", models, "--size", "64x64", "--seed", "5", "--dtype", "fp32", "--quiet"]
        r = run("grid", "1girl, night sky", "--x", "lora:tiny_peft_lora=0,0.5", "--y", "steps=2,3",
                "--out", root / "grid", *common)
        assert r.exit_code == 0, r.output
        gens = {}
        for name, extra in {"x1y2": ["--steps", "3"], "x2y2": ["--steps", "3", "--lora", "tiny_peft_lora:0.5"]}.items():
            r = run("gen", "1girl, night sky", *extra, "--out", root / f"{name}.png", *common)
            assert r.exit_code == 0, r.output
            gens[name] = root / f"{name}.png"
        sheet = next((root / "grid").glob("*-sheet.png"))
        r = run("grid", "--from", sheet, "--models-dir", models, "--out", root / "again", "--quiet")
        assert r.exit_code == 0, r.output
        yield root, sheet, gens


def test_cells_are_the_images_gen_makes_and_the_lora_axis_undoes_exactly(made):
    root, sheet, gens = made
    cells = json.loads(Image.open(sheet).info["rdbt"])["grid"]["cells"]
    assert len(cells) == 2 and len(cells[0]) == 2
    cell = {f"x{x + 1}y{y + 1}": root / "grid" / cells[y][x] for y in range(2) for x in range(2)}
    assert np.array_equal(pixels(cell["x2y2"]), pixels(gens["x2y2"]))
    assert np.array_equal(pixels(cell["x1y2"]), pixels(gens["x1y2"]))  # after the 0.5 merge of the cell before it
    assert not np.array_equal(pixels(cell["x1y2"]), pixels(cell["x2y2"]))
    rec = json.loads(Image.open(cell["x2y2"]).info["rdbt"])
    assert rec["steps"] == 3 and [(lr["file"], lr["weight"]) for lr in rec["loras"]] == [
        ("tiny_peft_lora.safetensors", 0.5)]
    assert rec["grid_cell"] == {"x": "0.5", "y": "3"}


def test_the_sheet_holds_every_cell_under_its_labels(made):
    root, sheet, _ = made
    im = pixels(sheet)
    cells = json.loads(Image.open(sheet).info["rdbt"])["grid"]["cells"]
    h, w = im.shape[:2]
    assert w > 2 * 64 and h > 2 * 64  # room for the labels left and on top
    left, top = w - 2 * 64, h - 2 * 64
    for y in range(2):
        for x in range(2):
            cell = pixels(root / "grid" / cells[y][x])
            assert np.array_equal(im[top + 64 * y: top + 64 * (y + 1), left + 64 * x: left + 64 * (x + 1)], cell)
    heads = [im[:top, left + 64 * x: left + 64 * (x + 1)] for x in range(2)]
    sides = [im[top + 64 * y: top + 64 * (y + 1), :left] for y in range(2)]
    for a, b in (heads, sides):  # a label is drawn (dark pixels) in each, and the two differ
        assert (a < 128).any() and (b < 128).any() and not np.array_equal(a, b)


def test_the_sheet_recipe_runs_the_same_grid_again(made):
    root, sheet, _ = made
    record = json.loads(Image.open(sheet).info["rdbt"])["grid"]
    assert record["x"] == "lora:tiny_peft_lora=0,0.5" and record["y"] == "steps=2,3"
    assert record["prompt"] == "1girl, night sky" and record["seed"] == 5
    again = sorted((root / "again").glob("*.png"))
    first = sorted((root / "grid").glob("*.png"))
    assert len(again) == len(first) == 5
    for a, b in zip(first, again):
        assert np.array_equal(pixels(a), pixels(b)), (a, b)

    from conftest import shared_path

    gp = grid.plan(None, LoadParams(models_dir=str(shared_path("golden", "models"))), GenParams(steps=4), y="cfg=1,2",
                   recipe=json.loads(Image.open(sheet).info["rdbt"]))  # another Y axis, the recorded X, a new flag
    assert gp.record["x"] == record["x"] and gp.record["y"] == "cfg=1,2"
    assert {c.job.settings.steps for c in gp.cells} == {4} and [c.job.settings.cfg for c in gp.cells] == [1, 1, 2, 2]


def test_the_negative_template_is_replaced_and_drawn_per_cell(shared_tiny):
    from rdbt_cli import wildcards

    gp = grid.plan("red hair", LoadParams(model="tiny"), GenParams(negative="{blurry|noisy|dark} red eyes", cfg=2),
                   x="prompt=red,blue", y="seed=3,4")
    w = wildcards.Wildcards([])
    for cell in gp.cells:
        template = "{blurry|noisy|dark} " + ("red" if cell.at[0] == 0 else "blue") + " eyes"
        assert cell.job.extra["negative_template"] == template
        assert cell.job.settings.negative == w.pick(template, wildcards.negative_seed(cell.job.seed))
    assert gp.record["negative"] == "{blurry|noisy|dark} red eyes"  # what `grid --from SHEET` draws from again
    again = grid.plan(None, LoadParams(model="tiny"), GenParams(), recipe={
        **gp.cells[0].job.settings.__dict__, "loras": [], "model": None, "grid": gp.record})
    assert [c.job.settings.negative for c in again.cells] == [c.job.settings.negative for c in gp.cells]


SMALL = ["--model", "tiny", "--size", "32x32", "--steps", "1", "--seed", "5", "--json"]


def test_grid_names_cells_writes_the_preview_file_and_uses_a_server(tmp_path, shared_tiny, monkeypatch):
    from rdbt_cli import client
    from rdbt_cli.runner import Runner

    r = run("grid", "a fox", "--x", "steps=1,2", "--server", "http://127.0.0.1:9", "--out", tmp_path / "bad", *SMALL)
    assert r.exit_code == 2 and "no rdbt server answers" in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()

    asked = []

    class Served(Runner):  # a server that answers, with the models the grid asks for
        made = 0

        def run(self, job, callback=None):
            Served.made += 1
            return super().run(job, callback)

    def connect(server, load, paths, **kw):
        asked.append(server)
        return None if server is False else Served(load, paths)

    monkeypatch.setattr(client, "connect", connect)
    preview = tmp_path / "live.png"
    args = ["grid", "a fox", "--x", "steps=1,2", "--name", "{steps}-{seed}-{prompt}", "--preview-file", preview,
            "--out", tmp_path / "out", *SMALL]
    remote = run(*args, "--server", "http://127.0.0.1:7860")
    assert remote.exit_code == 0 and asked == ["http://127.0.0.1:7860"] and Served.made == 2, remote.output
    local = run(*args, "--no-server")
    assert local.exit_code == 0 and set(asked[1:]) == {False} and Served.made == 2, local.output
    names = sorted(p.name for p in (tmp_path / "out").glob("*.png") if "sheet" not in p.name)
    assert names == ["1-5-a fox-0001.png", "1-5-a fox.png", "2-5-a fox-0001.png", "2-5-a fox.png"]  # never overwritten
    assert np.array_equal(pixels(tmp_path / "out" / "2-5-a fox.png"), pixels(tmp_path / "out" / "2-5-a fox-0001.png"))
    sheets = [json.loads(line)["sheet"] for line in local.stdout.splitlines() if '"sheet"' in line]
    cells = json.loads(Image.open(sheets[0]).info["rdbt"])["grid"]["cells"]
    assert cells == [["1-5-a fox-0001.png", "2-5-a fox-0001.png"]]  # the sheet names the cells as written
    assert Image.open(preview).size == (4, 4)  # the last step's latent, 1/8 of the image
