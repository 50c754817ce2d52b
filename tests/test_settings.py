"""The settings table: one row per setting drives flags, presets, batch lines, the recipe and the A1111 text."""

import json
import subprocess
import sys
import textwrap

import pytest

from rdbt_cli import settings
from rdbt_cli.config import LoraSpec
from rdbt_cli.errors import ConfigError
from rdbt_cli.settings import SETTINGS, GenParams, layer


def test_every_row_is_consistent():
    flags = [flag for s in SETTINGS for flag in s.flags]
    assert len(flags) == len(set(flags)) and settings.SIZE_FLAG not in flags
    assert [f for f in GenParams.__dataclass_fields__] == [s.name for s in SETTINGS]
    for s in SETTINGS:
        if s.default is not None:
            assert s.problem(s.default) is None, s.name  # the defaults obey their own rules
        assert s.help


@pytest.mark.parametrize("name,bad,words", [
    ("steps", 0, "at least 1"), ("steps", 10**9, "at most"), ("steps", "20", "whole number"),
    ("cfg", float("nan"), "number"), ("cfg", -1.0, "0 or more"), ("shift", 0.0, "greater than 0"),
    ("width", 1000, "multiple of 16"), ("height", 10**6, "megapixel"), ("seed", -1, "seed"),
    ("sampler", "nope", "valid samplers"), ("count", True, "whole number"),
    ("loras", "style", "list"), ("loras", [LoraSpec("a", "heavy")], "weight"),
])
def test_rules_refuse_with_a_reason(name, bad, words):
    assert words in settings.value_problem(name, bad)


def test_layer_is_the_one_precedence_rule():
    low = GenParams(steps=10, cfg=2.0, loras=[LoraSpec("a", 1.0)])
    high = GenParams(steps=4, loras=[LoraSpec("b", 0.5)])
    out = layer(low, None, high)
    assert (out.steps, out.cfg, out.loras) == (4, 2.0, [LoraSpec("a", 1.0), LoraSpec("b", 0.5)])
    assert low.loras == [LoraSpec("a", 1.0)]  # inputs untouched
    assert layer(GenParams(), GenParams()).loras is None


def test_flags_are_checked_as_their_flag():
    assert settings.from_flags({"steps": 5, "loras": ["x:0.5"]}, "64x32") == GenParams(
        steps=5, loras=[LoraSpec("x", 0.5)], width=64, height=32)
    with pytest.raises(ConfigError, match="^--negative: negative must be a string"):
        settings.from_flags({"negative": 3})
    assert settings.from_flags({"cfg": 4}).cfg == 4.0 and isinstance(settings.from_flags({"cfg": 4}).cfg, float)


def test_combine_loras_by_any_key():
    specs = [LoraSpec("turbo", 0.3), LoraSpec("style", 1.0), LoraSpec("anima-turbo", 0.5), LoraSpec("STYLE", 0)]
    by_file = {"turbo": "t", "anima-turbo": "t", "style": "s", "STYLE": "s"}
    assert settings.combine_loras(specs, key=lambda s: by_file[s.name]) == [LoraSpec("anima-turbo", 0.5)]
    assert settings.combine_loras(specs) == specs[:3]


# A throw-away setting added as one row of the table, and nothing else: it must appear as a flag, a preset key, a batch
# override, a recipe field and an A1111 field, and `--from` must restore it.
_ROW = ('    Setting("sharpness", float, 0.0, "Throw-away test setting.", _real(0.0, 10.0, "0 or more"), '
        '("--sharpness",), preset="sharpness", recipe="sharpness", a1111="Sharpness", a1111_extension=True),\n')

_SCRIPT = textwrap.dedent('''
    import importlib.util, json, sys, types
    from pathlib import Path
    import rdbt_cli

    spec = importlib.util.find_spec("rdbt_cli.settings")
    source = Path(spec.origin).read_text()
    marker = "SETTINGS: tuple[Setting, ...] = (\\n"
    assert marker in source
    module = types.ModuleType("rdbt_cli.settings")
    module.__file__ = spec.origin
    sys.modules["rdbt_cli.settings"] = module
    exec(compile(source.replace(marker, marker + ROW, 1), spec.origin, "exec"), module.__dict__)

    from typer.testing import CliRunner
    from rdbt_cli.cli import app
    from PIL import Image

    out = Path(sys.argv[1])
    tiny = ["--model", "tiny", "--size", "32x32", "--steps", "1", "--quiet", "--no-stack"]
    def run(*args):
        r = CliRunner().invoke(app, [str(a) for a in args])
        assert r.exit_code == 0, r.output
        return r.output
    def recipe(path):
        return json.loads(Image.open(path).info["rdbt"])
    found = {}
    run("gen", "a cat", "--sharpness", "2.5", "--seed", "1", "--out", out / "flag.png", *tiny)
    found["flag"] = recipe(out / "flag.png")["sharpness"]
    found["a1111"] = Image.open(out / "flag.png").info["parameters"]
    run("gen", "--from", out / "flag.png", "--out", out / "again.png", "--quiet")
    found["from"] = recipe(out / "again.png")["sharpness"]
    (out / "p.toml").write_text("sharpness = 4\\n")
    run("gen", "a cat", "--preset", out / "p.toml", "--seed", "1", "--out", out / "preset.png", *tiny)
    found["preset"] = recipe(out / "preset.png")["sharpness"]
    (out / "lines.txt").write_text("a dog --sharpness 7\\n")
    run("batch", out / "lines.txt", "--out", out / "batch", *tiny)
    found["batch"] = recipe(next((out / "batch").glob("*.png")))["sharpness"]
    r = CliRunner().invoke(app, ["gen", "x", "--sharpness", "11", "--out", str(out), *tiny])
    found["refused"] = (r.exit_code, r.output)
    print(json.dumps(found))
''')


def test_a_setting_added_as_one_row_reaches_every_surface(tmp_path):
    code = f"ROW = {_ROW!r}\n" + _SCRIPT
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "RDBT_HOME": str(tmp_path / "home")})
    assert r.returncode == 0, r.stderr[-3000:]
    found = json.loads(r.stdout.strip().splitlines()[-1])
    assert found["flag"] == 2.5 and found["from"] == 2.5
    assert found["preset"] == 4.0 and found["batch"] == 7.0
    assert "Sharpness: 2.5" in found["a1111"]
    code_, message = found["refused"]
    assert code_ != 0 and "--sharpness" in message and "at most 10" in message
