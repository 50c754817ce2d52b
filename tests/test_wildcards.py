"""Variants and wildcards in prompts: drawn per seed (the same seed, the same prompt), every combination on request,
ComfyUI syntax untouched, each bad template one line before anything loads, and the recipe keeping both texts."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from rdbt_cli import batch, wildcards
from rdbt_cli.cli import app
from rdbt_cli.config import LoadParams
from rdbt_cli.errors import ConfigError
from rdbt_cli.settings import GenParams

TINY = ["--model", "tiny", "--size", "64x64", "--steps", "2", "--quiet"]


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def folder(tmp_path, shared_tiny):
    """A wildcards folder in tmp_path, which the CLI tests use as RDBT_HOME."""
    shared_tiny(tmp_path)
    d = tmp_path / "wildcards"
    (d / "sub").mkdir(parents=True)
    (d / "color.txt").write_text("red\nblue\n# a comment line\ngreen\n")
    (d / "sub" / "pose.txt").write_text("standing\nsitting, __color__ chair\n")
    (d / "odd.txt").write_text("50% #1 $5\n")
    (d / "loop_a.txt").write_text("x __loop_b__\n")
    (d / "loop_b.txt").write_text("y __loop_a__\n")
    return d


def test_the_same_seed_draws_the_same_prompt_and_other_seeds_others(folder):
    w = wildcards.Wildcards([folder])
    template = "__color__ hair, {smile|frown|grin}, __sub/pose__"
    drawn = [w.pick(template, seed) for seed in range(12)]
    assert drawn == [wildcards.Wildcards([folder]).pick(template, seed) for seed in range(12)]  # a fresh reader too
    assert len(set(drawn)) >= 4
    for prompt in drawn:
        color, face, pose = prompt.split(", ", 2)
        assert color in ("red hair", "blue hair", "green hair") and face in ("smile", "frown", "grin")
        assert pose == "standing" or pose.startswith("sitting, ") and pose.endswith(" chair")


def test_weighted_and_multiple_choice_variants(folder):
    w = wildcards.Wildcards([folder])
    heavy = [w.pick("{9::red|blue}", s) for s in range(100)]
    assert 70 < heavy.count("red") < 100
    for s in range(20):
        two = w.pick("{2$$a|b|c}", s).split(",")
        assert len(two) == 2 and len(set(two)) == 2 and set(two) <= {"a", "b", "c"}
        assert " and " in w.pick("{2$$ and $$a|b|c}", s)


def test_comfyui_syntax_and_plain_prompts_pass_through(folder):
    w = wildcards.Wildcards([folder])
    rest = r", (silver hair:1.2), <lora:turbo:0.5>, \(artist\), 50% off #1 $5 score_9"
    assert w.pick("{red|red} eyes" + rest, 3) == "red eyes" + rest
    assert w.pick(rest, 3) == rest  # no variant syntax: never parsed
    assert w.pick("__odd__ {x|x}", 1) == "50% #1 $5 x"  # the same characters in a wildcard file


def test_combinatorial_lists_every_prompt_and_refuses_an_explosion(folder):
    w = wildcards.Wildcards([folder])
    assert w.combinations("{a|b} __color__") == ["a blue", "a green", "a red", "b blue", "b green", "b red"]
    with pytest.raises(ConfigError, match="more than 1000 prompts"):
        w.combinations("{a|b|c|d|e|f|g|h|i|j}" * 4)


@pytest.mark.parametrize("template, needles", [
    ("__nope__ hair", ["wildcard __nope__", "nope.txt", "wildcards"]),
    ("__loop_a__", ["__loop_a__ -> __loop_b__ -> __loop_a__", "loop"]),
    ("{red||blue} hair", ["{red||blue}", "empty option"]),
    ("{} hair", ["empty option"]),
    ("{red|blue hair", ["cannot read the variants", "close every {"]),
])
def test_bad_templates_are_one_error_naming_the_problem(folder, template, needles):
    with pytest.raises(ConfigError) as err:
        wildcards.Wildcards([folder]).check(template)
    assert all(n in str(err.value) for n in needles), err.value
    assert "\n" not in str(err.value)


def test_folders_are_the_models_folders_then_rdbt_home_and_the_first_wins(tmp_path, monkeypatch):
    models, home = tmp_path / "models", tmp_path / "home"
    (models / "wildcards").mkdir(parents=True)
    (home / "wildcards").mkdir(parents=True)
    (models / "wildcards" / "c.txt").write_text("from models\n")
    (home / "wildcards" / "c.txt").write_text("from home\n")
    (home / "wildcards" / "h.txt").write_text("only home\n")
    monkeypatch.setenv("RDBT_HOME", str(home))
    dirs = wildcards.folders([models])
    assert dirs == [models / "wildcards", home / "wildcards"]
    assert wildcards.Wildcards(dirs).pick("__c__, __h__", 0) == "from models, only home"


def test_gen_records_template_and_drawn_prompt_and_from_remakes_it(tmp_path, folder, monkeypatch):
    monkeypatch.setenv("RDBT_HOME", str(folder.parent))
    negative = "{blurry|noisy|dark}, __color__ tint"
    r = run("gen", "__color__ hair, {smile|frown}", "--negative", negative, "--seed", 5, "--count", 2,
            "--out", tmp_path / "a", *TINY)
    assert r.exit_code == 0, r.output
    first, second = sorted((tmp_path / "a").glob("*.png"))
    rec = json.loads(Image.open(first).info["rdbt"])
    w = wildcards.Wildcards([folder])
    assert rec["prompt"] == w.pick("__color__ hair, {smile|frown}", 5)
    assert rec["prompt_template"] == "__color__ hair, {smile|frown}"
    assert rec["negative"] == w.pick(negative, wildcards.negative_seed(5)) and rec["negative_template"] == negative
    assert json.loads(Image.open(second).info["rdbt"])["prompt"] == w.pick("__color__ hair, {smile|frown}", 6)
    info = Image.open(first).info
    assert info["parameters"].startswith(rec["prompt"] + "\n")  # A1111 and ComfyUI carry the drawn prompt
    assert rec["prompt"] in info["prompt"] and "__color__" not in info["prompt"]
    # ... and the A1111 text the templates too, in the fields A1111's Dynamic Prompts extension writes
    assert 'Template: "__color__ hair, {smile|frown}"' in info["parameters"].splitlines()[-1]
    assert f'Negative Template: "{negative}"' in info["parameters"].splitlines()[-1]
    assert info["parameters"].splitlines()[1] == "Negative prompt: " + rec["negative"]
    shown = run("inspect", first).output
    assert "__color__ hair, {smile|frown}" in shown and rec["prompt"] in shown
    # --from takes the drawn prompt as recorded, even after the wildcard file changed
    (folder / "color.txt").write_text("purple\n")
    r = run("gen", "--from", first, "--out", tmp_path / "again.png", "--quiet")
    assert r.exit_code == 0, r.output
    again = tmp_path / "again.png"
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(first)))
    again = json.loads(Image.open(again).info["rdbt"])
    assert {k: again[k] for k in ("prompt", "prompt_template", "negative", "negative_template")} == {
        k: rec[k] for k in ("prompt", "prompt_template", "negative", "negative_template")}


def test_gen_combinatorial_makes_every_prompt_and_errors_come_before_loading(tmp_path, folder, monkeypatch):
    monkeypatch.setenv("RDBT_HOME", str(folder.parent))
    r = run("gen", "{a|b} girl", "--combinatorial", "--seed", 1, "--out", tmp_path / "c", "--json", *TINY)
    assert r.exit_code == 0, r.output
    records = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [rec["prompt"] for rec in records] == ["a girl", "b girl"]
    assert {rec["seed"] for rec in records} == {1}
    import rdbt_cli.runner

    def no_loading(*a, **k):
        raise AssertionError("models loaded for a bad template")

    monkeypatch.setattr(rdbt_cli.runner, "Runner", no_loading)
    for args, needle in ((["__missing__ hair"], "__missing__"), (["{a||b}"], "empty option"),
                         (["x", "--negative", "__missing__"], "negative prompt: wildcard __missing__"),
                         (["x", "--negative", "{a||b}"], "negative prompt: the variant {a||b} has an empty option")):
        r = run("gen", *args, "--out", tmp_path / "bad", *TINY)
        assert r.exit_code != 0 and needle in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "bad").exists()


def test_a_batch_line_with_a_bad_template_fails_alone(tmp_path, folder, monkeypatch):
    monkeypatch.setenv("RDBT_HOME", str(folder.parent))
    text = "__color__ eyes\n__nope__ eyes\n{a||b}\nplain\nx --negative __nope__\n"
    bp = batch.plan(text, LoadParams(model="tiny"), GenParams(), out_dir=tmp_path)
    assert sorted(bp.lines) == [1, 4]
    assert "line 5: negative prompt: wildcard __nope__" in bp.failures[5]
    assert "line 2" in bp.failures[2] and "__nope__" in bp.failures[2]
    assert "line 3" in bp.failures[3] and "empty option" in bp.failures[3]
    job = bp.planner.job(bp.lines[1][0], 3, 0, bp.planner.paths("tiny"))
    assert job.settings.prompt.endswith(" eyes") and job.extra["prompt_template"] == "__color__ eyes"


def test_batch_combinatorial_makes_each_prompt_with_each_seed_of_its_line(tmp_path, folder, monkeypatch):
    monkeypatch.setenv("RDBT_HOME", str(folder.parent))
    (tmp_path / "p.txt").write_text("{a|b} girl --seed 3 --count 2\nplain --seed 9\n")
    r = run("batch", tmp_path / "p.txt", "--combinatorial", "--out", tmp_path / "out", "--json", *TINY)
    assert r.exit_code == 0, r.output
    made = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [(m["prompt"], m["seed"]) for m in made] == [("a girl", 3), ("a girl", 4), ("b girl", 3), ("b girl", 4),
                                                        ("plain", 9)]


def test_the_negative_is_drawn_from_the_image_seed_on_a_stream_of_its_own(folder, monkeypatch):
    from rdbt_cli import jobs

    monkeypatch.setenv("RDBT_HOME", str(folder.parent))
    template = "{a|b|c|d|e|f}"
    planned = [jobs.plan(template, LoadParams(model="tiny"), negative=f"{template}, __color__", seed=10, count=12,
                         cfg=2)[0] for _ in range(2)]
    negatives = [j.settings.negative for j in planned[0]]
    assert negatives == [j.settings.negative for j in planned[1]]  # the same seeds, the same negatives
    w = wildcards.Wildcards([folder])
    assert negatives == [w.pick(f"{template}, __color__", wildcards.negative_seed(10 + i)) for i in range(12)]
    assert len(set(negatives)) >= 5 and all(j.extra["negative_template"] == f"{template}, __color__"
                                            for j in planned[0])
    # Not the positive's draws: with one seed for both, {a|...} would pick the same letter in each
    assert [j.settings.negative.split(",")[0] for j in planned[0]] != [j.settings.prompt for j in planned[0]]
    plain = jobs.plan("x", LoadParams(model="tiny"), negative="blurry", seed=1)[0][0]
    assert plain.settings.negative == "blurry" and "negative_template" not in plain.extra


def test_the_templates_round_trip_through_the_a1111_text(tmp_path):
    from PIL.PngImagePlugin import PngInfo

    from rdbt_cli import metadata

    recipe = {"prompt": "red hair, smile", "prompt_template": "{red|blue} hair, {2::smile|frown}",
              "negative": "blurry", "negative_template": "{blurry|noisy}", "steps": 4, "seed": 7, "loras": []}
    text = metadata.to_parameters_text(recipe)
    back = metadata.parse_parameters_text(text)
    assert {k: back[k] for k in recipe if k != "loras"} == {k: v for k, v in recipe.items() if k != "loras"}
    info = PngInfo()
    info.add_text("parameters", text)  # as A1111 with Dynamic Prompts writes it: no rdbt chunk
    Image.new("RGB", (8, 8)).save(tmp_path / "a1111.png", pnginfo=info)
    read = metadata.read_png(tmp_path / "a1111.png")["recipe"]
    assert read["prompt_template"] == recipe["prompt_template"] and read["negative_template"] == "{blurry|noisy}"
    # a template that made nothing else (no variants, or a recipe from before templates) writes no field
    same = metadata.to_parameters_text({**recipe, "prompt_template": "red hair, smile", "negative_template": None})
    assert "Template" not in same and "prompt_template" not in metadata.parse_parameters_text(same)
