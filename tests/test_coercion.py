"""Option values without pydantic (coercion.py): the same values and the same errors as typer's own converters, and
a command line that parses without importing pydantic (a quarter of a second of every `rdbt gen`)."""

import subprocess
import sys
from enum import Enum
from typing import Optional

import pytest
from typer.testing import CliRunner

from rdbt_cli import coercion
from rdbt_cli.cli import app


class Colour(str, Enum):
    red = "red"


@pytest.mark.parametrize("annotation, value, expected", [
    (Optional[int], "12", 12), (int, "-3", -3), (Optional[float], "2.5", 2.5), (float, "1e-3", 1e-3),
    (float, "7", 7.0), (Optional[str], "x", "x"), (Optional[bool], True, True), (Colour, "red", Colour.red),
    (Optional[list[str]], ("a", "b:0.5"), ["a", "b:0.5"]),
])
def test_plain_values_convert_here(annotation, value, expected):
    got = coercion.convert(annotation, value)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("annotation, value", [
    (int, "1_000"), (int, "٣"), (int, "5.0"), (float, "inf"), (float, "nan"), (Colour, "RED"), (str, 3),
])
def test_anything_else_goes_to_typer(annotation, value):
    assert coercion.convert(annotation, value) is coercion._NO


def test_errors_ranges_and_choices_are_typers(tmp_path):
    runner = CliRunner()
    steps = runner.invoke(app, ["gen", "x", "--model", "tiny", "--steps", "abc", "-o", str(tmp_path)])
    assert steps.exit_code == 2 and "--steps" in steps.output and "valid integer" in steps.output
    device = runner.invoke(app, ["gen", "x", "--model", "tiny", "--device", "gpu", "-o", str(tmp_path)])
    assert device.exit_code == 2 and "'gpu' is not one of" in device.output
    queue = runner.invoke(app, ["serve", "--queue", "0"])  # a range: typer's converter checks it
    assert queue.exit_code == 2 and "greater than or equal to 1" in queue.output


def test_a_command_line_parses_without_pydantic(tmp_path):
    # Every kind of option given (int, float, str, Enum, list, flag); the --preview-file check stops it after parsing.
    code = ("import sys\nfrom rdbt_cli.cli import app\n"
            "try:\n    app(['gen', 'x', '--model', 'tiny', '--steps', '3', '--cfg', '4.5', '--device', 'cpu', '--lora',"
            " 'a:0.5', '--no-stack', '--debug', '--preview-file', 'p.txt'], prog_name='rdbt')\n"
            "except BaseException as e:\n    print(type(e).__name__, 'pydantic' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert out.stdout.split()[-1] == "False", out.stdout + out.stderr
    assert "ConfigError" in out.stdout or "preview" in out.stderr  # it got as far as the command's own checks


def test_a_typer_whose_private_converters_differ_is_left_as_it_is(monkeypatch, tmp_path):
    # coercion leans on typer internals; if their shape changes, commands must still work, through typer's own path.
    def broken(*args, **kwargs):
        raise TypeError("another typer")

    monkeypatch.setattr(coercion, "_Light", broken)
    r = CliRunner().invoke(app, ["gen", "x", "--model", "tiny", "--steps", "abc", "-o", str(tmp_path)])
    assert r.exit_code == 2 and "valid integer" in r.output
