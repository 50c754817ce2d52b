"""The CLI as a user drives it: the tiny model end to end, metadata, --from, errors, batch resume, the entry point."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from rdbt_cli.cli import app

TINY = ["--model", "tiny", "--size", "64x48", "--steps", "3", "--quiet"]


def run(*args, input=None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def assert_one_line_error(result, *needles):
    assert result.exit_code != 0, result.output
    out = result.output.strip()
    assert "Traceback" not in out
    assert len(out.splitlines()) == 1, out
    for n in needles:
        assert n in out, out


def test_help_lists_the_commands_without_importing_torch():
    code = (
        "import sys; from typer.testing import CliRunner; from rdbt_cli.cli import app; "
        "r = CliRunner().invoke(app, ['--help']); print(r.output); print('TORCH' if 'torch' in sys.modules else 'NO')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120).stdout
    for cmd in ("gen", "batch", "lora-stack", "inspect", "models", "presets", "download", "samplers"):
        assert cmd in out
    assert out.strip().endswith("NO")


def test_gen_tiny_writes_png_with_three_metadata_kinds_and_inspect_reads_it(tmp_path):
    out = tmp_path / "a.png"
    r = run("gen", "1girl, (silver hair:1.2), 夜空", "--seed", 7, "--cfg", 3, "-n", "blurry", "--out", out, *TINY)
    assert r.exit_code == 0, r.output
    assert Path(r.output.strip().splitlines()[-1]) == out
    img = Image.open(out)
    assert img.size == (64, 48)
    chunks = img.info
    assert {"parameters", "rdbt", "prompt", "workflow"} <= set(chunks)
    rec = json.loads(chunks["rdbt"])
    assert rec["seed"] == 7 and rec["steps"] == 3 and rec["cfg"] == 3 and rec["prompt"] == "1girl, (silver hair:1.2), 夜空"
    assert "Seed: 7" in chunks["parameters"] and "Negative prompt: blurry" in chunks["parameters"]
    graph = json.loads(chunks["prompt"])
    assert any(node["class_type"] == "KSampler" for node in graph.values())

    r = run("inspect", out, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["source"] == "rdbt" and info["seed"] == 7 and info["width"] == 64 and info["height"] == 48

    r = run("inspect", out)
    assert r.exit_code == 0 and "1girl" in r.output


def test_from_reproduces_the_image_bit_for_bit_and_flags_override(tmp_path):
    first = tmp_path / "first.png"
    assert run("gen", "a cat", "--seed", 11, "--out", first, *TINY).exit_code == 0
    again = tmp_path / "again.png"
    r = run("gen", "--from", first, "--out", again, "--quiet")
    assert r.exit_code == 0, r.output
    assert np.array_equal(pixels(first), pixels(again))
    other = tmp_path / "other.png"
    assert run("gen", "--from", first, "--seed", 12, "--out", other, "--quiet").exit_code == 0
    assert not np.array_equal(pixels(first), pixels(other))
    assert json.loads(Image.open(other).info["rdbt"])["seed"] == 12


def test_count_uses_consecutive_seeds_and_never_overwrites(tmp_path):
    r = run("gen", "a dog", "--seed", 100, "--count", 2, "--out", tmp_path, "--json", *TINY)
    assert r.exit_code == 0, r.output
    records = [json.loads(line) for line in r.output.strip().splitlines()]
    assert [rec["seed"] for rec in records] == [100, 101]
    paths = [Path(rec["path"]) for rec in records]
    assert len(set(paths)) == 2 and all(p.exists() for p in paths)
    before = paths[0].read_bytes()
    r = run("gen", "a dog", "--seed", 100, "--out", paths[0], *TINY)
    assert r.exit_code == 0
    assert paths[0].read_bytes() == before
    assert Path(r.output.strip()) != paths[0] and Path(r.output.strip()).exists()


def test_same_seed_same_image_and_cfg1_skips_negative(tmp_path):
    a, b, c = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    assert run("gen", "tree", "--seed", 5, "--cfg", 1, "-n", "x", "--out", a, *TINY).exit_code == 0
    assert run("gen", "tree", "--seed", 5, "--cfg", 1, "-n", "completely different", "--out", b, *TINY).exit_code == 0
    assert np.array_equal(pixels(a), pixels(b))  # at CFG 1 the negative prompt is never evaluated
    assert run("gen", "tree", "--seed", 5, "--cfg", 4, "-n", "x", "--out", c, *TINY).exit_code == 0
    assert not np.array_equal(pixels(a), pixels(c))


@pytest.mark.parametrize(
    "args,needles",
    [
        (["--sampler", "nope"], ["nope", "er_sde", "euler"]),
        (["--scheduler", "nope"], ["nope", "karras"]),
        (["--size", "100x64"], ["16"]),
        (["--width", "50"], ["16"]),
        (["--preset", "no-such-preset"], ["no-such-preset", "rdbt"]),
        (["--steps", "0"], ["steps"]),
    ],
)
def test_bad_generation_flags_give_one_line(tmp_path, args, needles):
    r = run("gen", "x", "--model", "tiny", "--out", tmp_path, *args)
    assert_one_line_error(r, *needles)


def test_missing_model_and_unwritable_output_and_missing_lora(tmp_path):
    r = run("gen", "x", "--model", tmp_path / "nope.safetensors", "--text-encoder", tmp_path / "t.safetensors",
            "--out", tmp_path)
    assert_one_line_error(r, "nope.safetensors")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    r = run("gen", "x", "--out", blocker / "sub", *TINY)
    assert_one_line_error(r, "sub")
    r = run("gen", "x", "--lora", "no_such_lora:0.5", "--out", tmp_path, *TINY)
    assert_one_line_error(r, "no_such_lora")


def test_bad_preset_file_names_file_and_line(tmp_path):
    preset = tmp_path / "mine.toml"
    preset.write_text('sampler = "er_sde"\nsteps = "many"\n')
    r = run("gen", "x", "--preset", preset, "--out", tmp_path, *TINY)
    assert_one_line_error(r, "mine.toml", ":2")


def test_truncated_checkpoint_is_one_line(tmp_path):
    from rdbt_cli.tiny import ensure_tiny_models

    paths = ensure_tiny_models()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(Path(paths.dit).read_bytes()[:5000])
    r = run("gen", "x", "--model", bad, "--text-encoder", paths.text_encoder, "--vae", paths.vae, "--out", tmp_path,
            "--qwen-tokenizer", paths.qwen_tokenizer, "--t5-tokenizer", paths.t5_tokenizer, "--quiet")
    assert_one_line_error(r, "cut.safetensors", "truncated")


def test_inspect_errors(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"definitely not a png")
    assert_one_line_error(run("inspect", junk), "junk.png")
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    assert_one_line_error(run("inspect", plain), "plain.png", "metadata")


def test_debug_shows_the_traceback(tmp_path):
    r = run("--debug", "gen", "x", "--sampler", "nope", "--model", "tiny", "--out", tmp_path)
    assert r.exit_code != 0 and r.exception is not None


def test_debug_after_the_command_and_help_with_defaults_and_readable_values(tmp_path):
    r = run("gen", "x", "--sampler", "nope", "--model", "tiny", "--out", tmp_path, "--debug")
    assert r.exit_code != 0 and r.exception is not None and "nope" in str(r.exception)
    out = CliRunner().invoke(app, ["gen", "--help"], env={"COLUMNS": "200"}).output
    rows = {line.split()[1]: line for line in out.splitlines() if line.startswith("│ --")}
    for flag, shown in (("--steps", "30"), ("--cfg", "4"), ("--sampler", "er_sde"), ("--scheduler", "simple"),
                        ("--size", "1024x1024"), ("--count", "1")):
        assert f"[default: {shown}]" in rows[flag], rows[flag]
    assert "NAME[:WEIGHT]" in rows["--lora"] and " NAME " in rows["--sampler"] and " N " in rows["--steps"]
    assert " WxH " in rows["--size"] and " NAME|PATH " in rows["--model"]
    assert "<list" not in out and "<bool>" not in "".join(v for k, v in rows.items() if k != "--help")
    assert "--compile" in rows and "--compile" in CliRunner().invoke(app, ["batch", "--help"]).output


def test_seed_minus_one_means_random(tmp_path):
    from rdbt_cli import LoadParams, plan
    from rdbt_cli.batch import parse_batch

    seeds = {plan("x", LoadParams(model="tiny"), seed=-1)[0][0].seed for _ in range(3)}
    assert len(seeds) == 3 and all(0 <= seed < 2**64 for seed in seeds)
    r = run("gen", "x", "--seed", "-1", "--out", tmp_path, "--json", *TINY)
    assert r.exit_code == 0 and json.loads(r.output)["seed"] >= 0, r.output
    (line,) = parse_batch("a prompt --seed -1\n")
    assert line.error is None and line.overrides.seed is None  # the line keeps the seed its content gives it


def test_shell_completion_of_names(tmp_path, spawn):
    from rdbt_cli import completion

    models = tmp_path / "models"
    (models / "loras" / "sub").mkdir(parents=True)
    for name in ("loras/style_a", "loras/sub/inky", "loras/other"):
        (models / f"{name}.safetensors").write_bytes(b"")
    assert completion.presets("kir") == ["kirazuri", "kirazuri-fast"]
    assert completion.choices(("euler", "euler_ancestral", "er_sde"))("eu") == ["euler", "euler_ancestral"]
    assert completion.models(None, "ti") == ["tiny"]

    def complete(*words):  # what bash asks the installed command for on Tab
        env = {**os.environ, "_RDBT_COMPLETE": "complete_bash", "COMP_WORDS": " ".join(["rdbt", *words]),
               "COMP_CWORD": str(len(words))}
        return spawn.run([sys.executable, "-m", "rdbt_cli"], env=env, timeout=120).stdout.split()

    assert complete("gen", "--sampler", "dpm") == ["dpmpp_2m", "dpmpp_2m_sde"]
    assert complete("batch", "--scheduler", "k") == ["karras"]
    assert complete("gen", "--preset", "rdbt") == ["rdbt", "rdbt-cfg"]
    assert complete("gen", "--models-dir", str(models), "--lora", "s") == ["style_a", "sub/inky"]


def test_compile_compiles_each_dit_block_of_gen(tmp_path, monkeypatch):
    import torch

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, **kw: compiled.append(module) or module)
    r = run("gen", "x", "--compile", "--out", tmp_path, *TINY)
    assert r.exit_code == 0, r.output
    assert len(compiled) == 2 and all(type(m).__name__ == "DiTBlock" for m in compiled)  # the tiny DiT has two blocks


def test_presets_and_samplers_and_models(tmp_path):
    r = run("presets")
    assert r.exit_code == 0 and "kirazuri-fast" in r.output and "turbo" in r.output
    r = run("presets", "turbo")
    assert r.exit_code == 0 and "lora" in r.output
    r = run("samplers")
    assert "sa_solver_pece" in r.output and "beta" in r.output
    r = run("models", "--models-dir", tmp_path / "missing")
    assert_one_line_error(r, "missing")


def test_lora_stack_round_trip(tmp_path):
    loras = tmp_path / "models" / "loras"
    loras.mkdir(parents=True)
    from safetensors.torch import save_file
    import torch

    save_file({"lora_unet_blocks_0_mlp_layer1.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_blocks_0_mlp_layer1.lora_up.weight": torch.zeros(4, 2)}, str(loras / "style_a.safetensors"))
    r = run("lora-stack", "--add", "style_a:0.6", "--models-dir", tmp_path / "models", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == [{"name": "style_a", "weight": 0.6}]
    r = run("lora-stack", "--set", "style_a:0.3", "--json")
    assert json.loads(r.output) == [{"name": "style_a", "weight": 0.3}]
    r = run("lora-stack")
    assert r.output.strip() == "style_a:0.3"
    r = run("lora-stack", "--remove", "style_a", "--json")
    assert json.loads(r.output) == []
    r = run("lora-stack", "--add", "nothing_like_it", "--models-dir", tmp_path / "models")
    assert_one_line_error(r, "nothing_like_it")


def _batch_pngs(folder):
    return sorted(p for p in Path(folder).glob("*.png"))


def test_batch_reports_bad_lines_and_resumes_without_redoing(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\nfirst prompt --seed 3\n\nsecond prompt --count 2\nthird --sampler nope\n")
    out = tmp_path / "out"
    r = run("batch", prompts, "--out", out, *TINY)
    assert r.exit_code == 1, r.output
    assert "line 5" in r.output and "nope" in r.output
    made = _batch_pngs(out)
    assert len(made) == 3
    stamps = {p: p.stat().st_mtime_ns for p in made}
    r = run("batch", prompts, "--out", out, *TINY)
    assert _batch_pngs(out) == made
    assert all(p.stat().st_mtime_ns == stamps[p] for p in made)
    assert "3 already done" in r.output


def test_installed_entry_point_runs_the_main_job(tmp_path, spawn):
    exe = shutil.which("rdbt")
    if exe is None:
        pytest.skip("the rdbt entry point is not on PATH (package not installed)")
    v = spawn.run([exe, "--version"])
    assert v.returncode == 0 and v.stdout.startswith("rdbt ")
    r = spawn.run([exe, "gen", "hello", "--out", str(tmp_path), *TINY])
    assert r.returncode == 0, r.stderr
    assert len(_batch_pngs(tmp_path)) == 1


def test_batch_interrupted_by_kill_resumes_with_nothing_lost_or_made_twice(tmp_path, spawn):
    prompts = tmp_path / "p.txt"
    prompts.write_text("one --count 20\ntwo --count 20\n")  # enough work that the kill lands midway
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "rdbt_cli", "batch", str(prompts), "--out", str(out), *TINY]
    proc = spawn.popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import time

    deadline = time.time() + 120
    while time.time() < deadline and len(_batch_pngs(out)) < 2 and proc.poll() is None:
        time.sleep(0.05)
    spawn.kill()
    partial = len(_batch_pngs(out))
    assert 2 <= partial < 40
    r = spawn.run(cmd)
    assert r.returncode == 0, r.stderr
    files = _batch_pngs(out)
    assert len(files) == 40
    jobs = [json.loads(Image.open(p).info["rdbt"])["batch"]["job"] for p in files]
    assert len(set(jobs)) == 40


def test_progress_goes_to_stderr_and_json_keeps_stdout_clean(tmp_path):
    args = ["gen", "x", "--model", "tiny", "--size", "64x48", "--steps", "2", "--count", "2", "--json"]
    r = run(*args, "--out", tmp_path)
    assert r.exit_code == 0, r.output
    assert [json.loads(line)["seed"] for line in r.stdout.splitlines()][1] == json.loads(r.stdout.splitlines()[0])["seed"] + 1
    assert "images" in r.stderr and "2/2" in r.stderr  # Rich's closing line off a terminal
    quiet = run(*args, "--quiet", "--out", tmp_path)
    assert quiet.exit_code == 0 and quiet.stderr == "" and len(quiet.stdout.splitlines()) == 2
    r = run("bench", "--model", "tiny", "--size", "32x32", "--steps", "2", "--json", "--quiet")
    assert json.loads(r.stdout)["steps"] == 2 and r.stderr == ""


def test_bench_runs_on_the_tiny_model():
    r = run("bench", "--model", "tiny", "--size", "64x64", "--steps", "2", "--cfg", "3", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["steps"] == 2 and out["dit_blocks"] == 2 and out["step_s"] > 0 and out["images_per_min"] > 0
    assert out["tflop_per_step"] > 0 and out["peak_host_mem_gb"] > 0


def test_the_tiny_model_keeps_its_quick_size_and_steps_under_a_preset(tmp_path):
    from rdbt_cli import LoadParams, plan

    def settings(preset=None, **flags):
        jobs, _, _ = plan("x", LoadParams(model="tiny"), preset=preset, **flags)
        g = jobs[0].settings
        return g.width, g.height, g.steps, g.cfg

    assert settings("rdbt") == (256, 256, 12, 1.0)  # rdbt's 1024x1024 at 20 steps is for the real model; its CFG holds
    assert settings("rdbt", width=64, height=32, steps=3) == (64, 32, 3, 1.0)  # given by the user: the user's
    own = tmp_path / "mine.toml"
    own.write_text('model = "tiny"\nsteps = 2\nsize = "32x32"\n')
    assert settings(str(own))[:3] == (32, 32, 2)  # a preset made for the tiny model keeps its own
    r = run("bench", "--model", "tiny", "--steps", "2", "--no-decode", "--json")
    assert r.exit_code == 0, r.output
    assert (json.loads(r.output)["width"], json.loads(r.output)["height"]) == (256, 256)


def test_dit_flop_count_matches_the_roofline_table():
    from rdbt_cli.bench import ANIMA_2B_DIT, dit_flops

    # landscape.md §4: 3.85 TFLOP at 512², 17.9 at 1024², 51.0 at 1536² per forward.
    for side, tflop in ((512, 3.85), (1024, 17.9), (1536, 51.0)):
        assert abs(dit_flops(ANIMA_2B_DIT, (side // 16) ** 2) / 1e12 - tflop) / tflop < 0.01


def test_low_vram_mode_tiles_the_decode_without_changing_the_picture(tmp_path):
    # 576 px wide = 72 latent cells: more than one 64-cell VAE tile, so the tiled decode really tiles.
    args = ["gen", "a wide landscape", "--model", "tiny", "--size", "576x64", "--steps", "2", "--seed", "3",
            "--dtype", "fp32", "--quiet", "--json"]
    plain = json.loads(run(*args, "--out", tmp_path / "plain.png").output)
    low = json.loads(run(*args, "--low-vram", "--out", tmp_path / "low.png").output)
    a, b = pixels(plain["path"]).astype(int), pixels(low["path"]).astype(int)
    assert a.shape == b.shape == (64, 576, 3)
    assert 0 < np.abs(a - b).mean() < 4  # tiles differ at the seams by a few levels at most, not a different image


def test_prompt_longer_than_512_t5_tokens_with_cfg(tmp_path):
    prompt = ", ".join(f"tag{i} detail{i}" for i in range(300))  # far past 512 T5 tokens: the context is not cut
    r = run("gen", prompt, "--cfg", "3", "-n", "blurry", "--seed", 1, "--out", tmp_path / "long.png", *TINY)
    assert r.exit_code == 0, r.output
    assert json.loads(Image.open(tmp_path / "long.png").info["rdbt"])["prompt"] == prompt


def test_download_defaults_to_rdbts_own_models_folder(monkeypatch, fake_hub):
    from rdbt_cli import discovery
    from rdbt_cli.config import user_dir

    r = run("download", "--only", "tokenizers")
    assert r.exit_code == 0, r.output
    got = [Path(line) for line in r.output.split()]
    assert got and all(p.exists() and user_dir() / "models" in p.parents for p in got)
    assert {p.parent.name for p in got} == {"qwen", "t5"}
    monkeypatch.setattr(discovery, "check_network", fake_hub.check_network)
    r = run("download", "--only", "turbo-lora")  # offline (the tests' network is off): one line, at once
    assert r.exit_code != 0 and r.output.startswith("error: cannot reach https://huggingface.co") and \
        len(r.output.strip().splitlines()) == 1, r.output


def test_models_lists_every_component_of_a_comfyui_folder():
    from conftest import shared_path

    folder = shared_path("golden", "models")
    r = run("models", "--models-dir", folder, "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    kinds = {row["file"]: row["kind"] for row in rows}
    assert kinds["diffusion_models/anima_tiny.safetensors"] == "dit"
    assert kinds["text_encoders/qwen_3_06b_tiny.safetensors"] == "te"
    assert kinds["vae/qwen_image_vae_tiny.safetensors"] == "vae"
    assert sum(kind == "lora" for kind in kinds.values()) == 3
    assert all(row["size"] > 0 for row in rows)


def test_prompt_from_stdin(tmp_path):
    r = run("gen", "-", "--seed", 2, "--out", tmp_path / "s.png", *TINY, input="a prompt from a pipe\n")
    assert r.exit_code == 0, r.output
    assert json.loads(Image.open(tmp_path / "s.png").info["rdbt"])["prompt"] == "a prompt from a pipe"


def test_batch_line_whose_preset_wants_another_model_fails_alone(tmp_path):
    from conftest import shared_path

    preset = tmp_path / "other.toml"
    preset.write_text('model = "some_other_model"\n')
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"fine line\nother model --preset {preset}\n")
    out = tmp_path / "out"
    r = run("batch", prompts, "--out", out, "--models-dir", shared_path("golden", "models"), "--size", "64x64",
            "--steps", "2", "--quiet")
    assert r.exit_code == 1, r.output
    assert "line 2" in r.output and "some_other_model" in r.output
    assert len(_batch_pngs(out)) == 1


def test_xformers_backend_without_the_package_is_a_clear_error(tmp_path):
    import importlib.util

    if importlib.util.find_spec("xformers") is not None:
        pytest.skip("xformers is installed here")
    r = run("gen", "x", "--attention", "xformers", "--out", tmp_path, *TINY)
    assert_one_line_error(r, "xformers", "sdpa")


def _golden_models(tmp_path):
    """A private copy of the golden models folder (so LoRA files can be moved around)."""
    from conftest import shared_path

    dest = tmp_path / "models"
    shutil.copytree(shared_path("golden", "models"), dest)
    return dest


GOLDEN_RUN = ["--size", "64x64", "--steps", "2", "--quiet", "--seed", "5", "--dtype", "fp32"]


def test_a_lora_named_two_ways_is_merged_once(tmp_path):
    models = _golden_models(tmp_path)
    assert run("lora-stack", "--add", "tiny_peft:0.5", "--models-dir", models).exit_code == 0
    r = run("gen", "x", "--lora", "tiny_peft_lora:0.4", "--models-dir", models, "--out", tmp_path / "a.png",
            "--json", *GOLDEN_RUN)
    assert r.exit_code == 0, r.output
    loras = json.loads(r.output)["loras"]
    assert [(entry["file"], entry["weight"]) for entry in loras] == [("tiny_peft_lora.safetensors", 0.4)]
    r = run("gen", "x", "--lora", "tiny_peft_lora:0", "--models-dir", models, "--out", tmp_path / "b.png",
            "--json", *GOLDEN_RUN)
    assert json.loads(r.output)["loras"] == []  # weight 0 switches the stack's entry off, whatever its spelling


def test_from_finds_a_lora_given_by_path_and_stack_paths_are_absolute(tmp_path, monkeypatch):
    models = _golden_models(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(str(models / "loras" / "tiny_kohya_lora.safetensors"), str(elsewhere / "style.safetensors"))
    monkeypatch.chdir(elsewhere)
    assert run("lora-stack", "--add", "style.safetensors:0.7", "--json").exit_code == 0
    stack = json.loads(run("lora-stack", "--json").output)
    assert stack == [{"name": str(elsewhere / "style.safetensors"), "weight": 0.7}]
    first = tmp_path / "first.png"
    r = run("gen", "x", "--models-dir", models, "--out", first, *GOLDEN_RUN)
    assert r.exit_code == 0, r.output
    monkeypatch.chdir(tmp_path)
    again = tmp_path / "again.png"
    r = run("gen", "--from", first, "--models-dir", models, "--out", again, "--quiet")
    assert r.exit_code == 0, r.output
    assert np.array_equal(pixels(first), pixels(again))


def test_from_rejects_a_recorded_value_rdbt_could_not_make(tmp_path):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", "a cat\nSteps: 4, Sampler: Euler, CFG scale: 4, Seed: 1, Size: 64x65")
    bad = tmp_path / "a1111.png"
    Image.new("RGB", (64, 65)).save(bad, pnginfo=info)
    r = run("gen", "--from", bad, "--model", "tiny", "--out", tmp_path, "--quiet")
    assert_one_line_error(r, "65", "16")


def test_batch_with_other_batch_wide_settings_is_a_new_batch(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\n")
    out = tmp_path / "out"
    assert run("batch", prompts, "--out", out, *TINY).exit_code == 0
    r = run("batch", prompts, "--out", out, "--model", "tiny", "--size", "32x32", "--steps", "2", "--quiet")
    assert r.exit_code == 0 and "1 image made," in r.output
    assert len(_batch_pngs(out)) == 2


def test_presets_json_and_a_preset_that_picks_the_tiny_model(tmp_path):
    r = run("presets", "--json")
    assert r.exit_code == 0 and {p["name"] for p in json.loads(r.output)} >= {"rdbt", "turbo"}
    r = run("presets", "turbo", "--json")
    assert json.loads(r.output)["loras"][0]["weight"] == 0.3
    preset = tmp_path / "mine.toml"
    preset.write_text('model = "tiny"\nsteps = 2\nsize = "32x32"\n')
    first = tmp_path / "p.png"
    r = run("gen", "x", "--preset", preset, "--seed", 1, "--out", first, "--quiet")
    assert r.exit_code == 0, r.output
    assert json.loads(Image.open(first).info["rdbt"])["model"]["name"] == "tiny"
    r = run("gen", "--from", first, "--out", tmp_path / "q.png", "--quiet")
    assert r.exit_code == 0 and np.array_equal(pixels(first), pixels(tmp_path / "q.png"))


def test_models_hash_fills_the_short_hash_column(tmp_path):
    import hashlib

    models = _golden_models(tmp_path)
    rows = json.loads(run("models", "--models-dir", models, "--hash", "--json").output)
    vae = next(row for row in rows if row["kind"] == "vae")
    assert vae["hash"] == hashlib.sha256(Path(vae["path"]).read_bytes()).hexdigest()[:10]


def test_no_prompt_and_interrupt_and_partial_inspect(tmp_path, monkeypatch):
    assert_one_line_error(run("gen", "--model", "tiny", "--out", tmp_path), "prompt")
    from rdbt_cli import pipeline

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "generate", interrupted)
    r = run("gen", "x", "--out", tmp_path, *TINY)
    assert r.exit_code == 130 and "interrupted" in r.output and "batch" not in r.output and "resume" not in r.output
    monkeypatch.undo()
    good = tmp_path / "good.png"
    assert run("gen", "x", "--seed", 1, "--out", good, *TINY).exit_code == 0
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"nope")
    r = run("inspect", good, junk)
    assert r.exit_code == 1 and "junk.png" in r.output and "seed:" in r.output


def test_small_things_a_new_user_meets(tmp_path):
    # a weight that is not a number is reported as the weight, not as a missing LoRA
    assert_one_line_error(run("gen", "x", "--lora", "style:abc", "--out", tmp_path, *TINY), "weight 'abc'", "style:0.7")
    assert_one_line_error(run("lora-stack", "--set", "style:abc"), "--set style:abc", "number")
    # a negative prompt at CFG 1 is never evaluated: one note says so, and nothing when it is used
    r = run("gen", "x", "-n", "blurry", "--cfg", 1, "--out", tmp_path, *TINY)
    assert r.exit_code == 0 and r.output.count("note: the negative prompt is not used at --cfg 1") == 1, r.output
    assert "note:" not in run("gen", "x", "-n", "blurry", "--cfg", 2, "--out", tmp_path, *TINY).output
    prompts = tmp_path / "p.txt"
    prompts.write_text("a --cfg 1 -n bad\nb\nc -n bad --cfg 1\n")
    r = run("batch", prompts, "--out", tmp_path / "b", *TINY)
    assert r.exit_code == 0 and "note: lines 1, 3: the negative prompt is not used" in r.output, r.output
    # a batch file with nothing to make says so
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    r = run("batch", empty, "--out", tmp_path / "e", *TINY)
    assert r.exit_code == 0 and "no prompts" in r.output and "empty.txt" in r.output and "images made" not in r.output


def test_bench_rejects_unknown_sampler_and_scheduler():
    assert_one_line_error(run("bench", "--model", "tiny", "--sampler", "nope"), "nope", "er_sde")
    assert_one_line_error(run("bench", "--model", "tiny", "--scheduler", "nope"), "nope", "karras")
