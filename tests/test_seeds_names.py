"""Seed lists (--seed 1,2,5-10, --seeds-from) and file-name templates (--name), through the CLI on the tiny model."""

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from rdbt_cli import naming, settings
from rdbt_cli.cli import app
from rdbt_cli.errors import ConfigError

TINY = ["--model", "tiny", "--size", "32x32", "--steps", "1", "--quiet"]


def run(*args, input=None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def recorded_seed(path) -> int:
    return json.loads(Image.open(path).info["rdbt"])["seed"]


def one_line_error(result, *needles):
    assert result.exit_code != 0, result.output
    out = result.output.strip()
    assert "Traceback" not in out and len(out.splitlines()) == 1, out
    for needle in needles:
        assert needle in out, out


# ---------------------------------------------------------------------------------------------------------------------
# Seed lists


@pytest.mark.parametrize("text, value", [
    ("42", 42), ("-1", -1), ("1,2,5-7", [1, 2, 5, 6, 7]), (" 3 , 1 ", [3, 1]), ("4-4", [4]),
    ("18446744073709551615,0", [2**64 - 1, 0]),
])
def test_seed_text_parses_to_one_seed_or_a_list(text, value):
    assert settings.parse_seeds(text) == value


@pytest.mark.parametrize("text, needle", [
    ("1,,2", "'' is not a seed"), ("1,x", "'x' is not a seed"), ("9-3", "runs backwards; write 3-9"),
    ("1,-1", "'-1' is not a seed"), ("0-100000", "more than 100,000 seeds"),
])
def test_bad_seed_lists_name_the_part(text, needle):
    with pytest.raises(ConfigError, match=needle):
        settings.parse_seeds(text)


def test_seed_list_positions_repeat_each_seed_count_times():
    assert [settings.seed_at([1, 5], 2, i) for i in range(settings.images_of([1, 5], 2))] == [1, 2, 5, 6]
    assert [settings.seed_at(7, 3, i) for i in range(settings.images_of(7, 3))] == [7, 8, 9]
    assert "not 18446744073709551616" in settings.value_problem("seed", [1, 2**64])  # each obeys the seed rule
    assert "at most 100,000 seeds, not 100,001" in settings.value_problem("seed", list(range(100_001)))


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """--seed 3,4 --count 2: seeds 3, 4, then 4, 5; one run for the tests below."""
    out = tmp_path_factory.mktemp("made")
    r = run("gen", "a cat", "--seed", "3,4", "--count", 2, "--out", out, *TINY)
    assert r.exit_code == 0, r.output
    return out, [Path(p) for p in r.output.split()]


def test_gen_seed_list_makes_one_image_per_seed_times_count_each_recording_its_own(made):
    folder, paths = made
    assert [recorded_seed(p) for p in paths] == [3, 4, 4, 5]
    assert len(set(paths)) == 4  # seed 4 twice: the second is numbered, not overwritten


def test_seeds_from_a_folder_and_a_file_reuses_each_seed_once(made, tmp_path):
    from rdbt_cli.jobs import seeds_from

    folder, paths = made
    (tmp_path / "notes.txt").write_text("not an image")
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")  # a PNG without a recipe is skipped in a folder
    (tmp_path / "b.png").write_bytes(paths[3].read_bytes())
    assert seeds_from([folder]) == [3, 4, 5]  # in name order, seed 4 once
    assert seeds_from([tmp_path, paths[0]]) == [5, 3]

    r = run("gen", "a dog", "--seeds-from", tmp_path / "b.png", "--out", tmp_path / "again", *TINY)
    assert r.exit_code == 0, r.output
    assert [recorded_seed(Path(p)) for p in r.output.split()] == [5]

    one_line_error(run("gen", "a", "--seeds-from", tmp_path / "plain.png", *TINY), "plain.png",
                   "no generation metadata")
    one_line_error(run("gen", "a", "--seeds-from", tmp_path / "nope", *TINY), "no such file or folder")
    one_line_error(run("gen", "a", "--seeds-from", folder, "--seed", 3, *TINY), "--seed or --seeds-from")
    (tmp_path / "b.png").unlink()
    one_line_error(run("gen", "a", "--seeds-from", tmp_path, *TINY), "no PNG there records a seed")


def test_bad_seed_flag_is_one_line_before_loading(tmp_path):
    one_line_error(run("gen", "a", "--seed", "1,2-x", "--out", tmp_path, *TINY), "--seed", "'2-x'")
    assert not list(tmp_path.iterdir())


def test_batch_line_seed_list_and_a_bad_one_failing_alone(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat --seed 5,7\na dog --seed 3-\n", encoding="utf-8")
    out = tmp_path / "out"
    r = run("batch", prompts, "--out", out, *TINY)
    assert r.exit_code == 1, r.output
    assert "line 2" in r.output and "'3-' is not a seed" in r.output
    assert sorted(p.name for p in out.glob("*.png")) == ["L0001-000-5.png", "L0001-001-7.png"]
    # a rerun resumes: the list's images are done, nothing is made again
    r = run("batch", prompts, "--out", out, *TINY)
    assert "0 images made, 2 already done" in r.output


# ---------------------------------------------------------------------------------------------------------------------
# File-name templates


def params(**values):
    return settings.layer(settings.DEFAULTS, settings.GenParams(**values))


def test_template_fills_settings_and_facts():
    t = naming.NameTemplate("{seed}-{sampler}-{steps}-{prompt:10}-{cfg}-{index:03d}-{size}-{model}-{loras}")
    from rdbt_cli.config import LoraSpec

    g = params(prompt="1girl, silver hair", loras=[LoraSpec("/m/loras/turbo.safetensors", 0.3)])
    assert t.stem(g, seed=7, index=2, model="/m/dit/anima.safetensors") == \
        "7-er_sde-30-1girl, sil-4-002-1024x1024-anima-turbo-0.3"


@pytest.mark.parametrize("text, stem", [
    ("a/b\\c", "a_b_c"), ("../../etc/passwd", "_.._etc_passwd"), ("x\x00y\x1b[31m\n z", "x_y_[31m z"),
    ("...hidden", "hidden"), ("name. . ", "name"), ("CON", "_CON"), ("a\u202eexe.png", "a_exe.png"),
    ("", "rdbt"), ("///", "___"), ('why?<>:"|*', "why_______"),
])
def test_safe_stem_keeps_names_inside_the_folder_and_visible(text, stem):
    assert naming.safe_stem(text) == stem


def test_safe_stem_bounds_bytes_at_a_character_boundary():
    stem = naming.safe_stem("夜" * 200)
    assert len(stem.encode()) <= naming.MAX_STEM_BYTES and stem == "夜" * (naming.MAX_STEM_BYTES // 3)


@pytest.mark.parametrize("template, needle", [
    ("{sed}", "unknown field {sed}; known fields: prompt,"), ("{seed!r}", "not supported"),
    ("{seed", "expected '}'"), ("{prompt:x}", "does not fit {prompt}"), ("  ", "--name is empty"),
    ("{seed.real}", "unknown field"),
])
def test_bad_templates_are_one_line_before_anything_loads(tmp_path, template, needle):
    r = run("gen", "a cat", "--name", template, "--out", tmp_path / "o", *TINY)
    one_line_error(r, needle)
    assert not (tmp_path / "o").exists()


def test_gen_and_batch_name_files_by_template_and_never_overwrite(tmp_path):
    out = tmp_path / "o"
    for _ in range(2):
        r = run("gen", "a red/blue cat", "--seed", 4, "--name", "{prompt:10}-{seed}-{steps}", "--out", out, *TINY)
        assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["a red_blue-4-1-0001.png", "a red_blue-4-1.png"]

    prompts = tmp_path / "p.txt"
    prompts.write_text("# a comment\na cat --seed 9 --cfg 1\n", encoding="utf-8")
    r = run("batch", prompts, "--name", "L{line}-{index}-{seed}-{sampler}-{cfg}", "--out", tmp_path / "b", *TINY)
    assert r.exit_code == 0, r.output
    assert [p.name for p in (tmp_path / "b").glob("*.png")] == ["L2-0-9-er_sde-1.png"]
    one_line_error(run("gen", "a", "--name", "{seed}", "--out", tmp_path / "x.png", *TINY), "is a file")
