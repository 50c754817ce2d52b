"""The benchmark scripts as a user runs them: a real argument parser, and a random models folder that `gen` can use."""

import sys
from pathlib import Path

from typer.testing import CliRunner

from rdbt_cli.cli import app

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "make_random_weights.py"


def test_help_and_option_like_folders_write_nothing(tmp_path, spawn):
    r = spawn.run([sys.executable, SCRIPT, "--help"], cwd=tmp_path, timeout=120)
    assert r.returncode == 0 and "--qwen-tokenizer" in r.stdout and "tokenizers/qwen" in r.stdout
    r = spawn.run([sys.executable, SCRIPT, "-x"], cwd=tmp_path, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    r = spawn.run([sys.executable, SCRIPT, "--", "-x"], cwd=tmp_path, timeout=120)
    assert r.returncode != 0 and "looks like an option" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_random_models_folder_works_with_gen(tmp_path, spawn):
    models = tmp_path / "models"
    r = spawn.run([sys.executable, SCRIPT, models, "--tiny"], timeout=300)  # the same layout with the tiny networks
    assert r.returncode == 0, r.stderr
    assert (models / "tokenizers" / "qwen" / "tokenizer.json").is_file()
    assert (models / "tokenizers" / "t5" / "tokenizer.json").is_file()
    assert not (models / "tokenizers" / ".tiny").exists()
    out = tmp_path / "x.png"
    r = CliRunner().invoke(app, ["gen", "1girl", "--models-dir", str(models), "--size", "64x64", "--steps", "1",
                                 "--quiet", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert out.is_file()
    # the user's own tokenizers are copied as they are
    mine = tmp_path / "mine.json"
    mine.write_text((models / "tokenizers" / "t5" / "tokenizer.json").read_text())
    other = tmp_path / "other"
    r = spawn.run([sys.executable, SCRIPT, other, "--only", "tokenizers", "--t5-tokenizer", mine], timeout=300)
    assert r.returncode == 0, r.stderr
    assert (other / "tokenizers" / "t5" / "tokenizer.json").read_bytes() == mine.read_bytes()
    assert (other / "tokenizers" / "qwen" / "tokenizer.json").is_file() and not (other / "diffusion_models").exists()
