"""Hostile files and a hostile environment (issue 14), through the real CLI in a subprocess: every case ends in one
readable line naming the file, a non-zero exit, no traceback, and no partial or lost file."""

import json
import os
import re
import struct
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

TINY = ["--model", "tiny", "--size", "32x32", "--steps", "1", "--quiet", "--dtype", "fp32"]
RDBT = [sys.executable, "-m", "rdbt_cli"]


@pytest.fixture(scope="module", autouse=True)
def _prebuilt_tiny(tmp_path_factory):
    # The subprocesses share the test's RDBT_HOME; build the tiny model once, not in every process.
    from rdbt_cli.tiny import ensure_tiny_models

    ensure_tiny_models()


def rdbt(spawn, *args, input=None, timeout=180, env=None):
    env = {**os.environ, "COLUMNS": "400", **(env or {})}  # rich tables unabridged
    args = [os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in args]  # bytes: an argument that is not UTF-8
    proc = spawn.popen([*RDBT, *args], stdin=-1, stdout=-1, stderr=-1, env=env)
    out, err = proc.communicate(input=input, timeout=timeout)
    return proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


def one_line_error(result, *needles):
    rc, out, err = result
    assert rc != 0, err
    text = err.strip()
    assert "Traceback" not in text, text
    assert len(text.splitlines()) == 1, text
    for n in needles:
        assert n in text, text
    return text


# ---------------------------------------------------------------------------------------------------------------------
# 2. LoRA contents: refused before merging, naming the file and the key; never a black image with exit 0

Q = "lora_unet_blocks_0_self_attn_q_proj"  # the tiny DiT's q_proj is (128, 128)


def _lora(**over):
    t = {f"{Q}.lora_down.weight": torch.randn(4, 128) * 0.01, f"{Q}.lora_up.weight": torch.randn(128, 4) * 0.01,
         f"{Q}.alpha": torch.tensor(4.0)}
    t.update(over)
    return {k: v for k, v in t.items() if v is not None}


def _nan_up():
    up = torch.randn(128, 4)
    up[3, 1] = float("nan")
    return _lora(**{f"{Q}.lora_up.weight": up})


LORA_CASES = {
    "nan": (_nan_up, f"{Q}.lora_up.weight", "NaN"),
    "inf": (lambda: _lora(**{f"{Q}.lora_down.weight": torch.full((4, 128), float("-inf"))}),
            f"{Q}.lora_down.weight", "infinite"),
    "fp16 inf": (lambda: _lora(**{f"{Q}.lora_up.weight": torch.full((128, 4), float("inf")).half()}),
                 f"{Q}.lora_up.weight", "NaN"),
    "rank disagrees": (lambda: _lora(**{f"{Q}.lora_up.weight": torch.randn(128, 3)}), f"{Q}.lora_down.weight",
                       "rank"),
    "1-d up": (lambda: _lora(**{f"{Q}.lora_up.weight": torch.randn(128)}), f"{Q}.lora_up.weight", "rank"),
    "wrong for the layer": (lambda: _lora(**{f"{Q}.lora_down.weight": torch.randn(4, 96)}), Q, "model [128, 128]"),
    "integer dtype": (lambda: _lora(**{f"{Q}.lora_up.weight": torch.ones(128, 4, dtype=torch.int32)}),
                      f"{Q}.lora_up.weight", "I32"),
    "bool dtype": (lambda: _lora(**{f"{Q}.alpha": torch.tensor(True)}), f"{Q}.alpha", "BOOL"),
    "alpha not a number": (lambda: _lora(**{f"{Q}.alpha": torch.ones(4)}), f"{Q}.alpha", "one number"),
    "empty rank": (lambda: _lora(**{f"{Q}.lora_up.weight": torch.randn(128, 0),
                                    f"{Q}.lora_down.weight": torch.randn(0, 128)}), "empty", "damaged"),
    "overflow": (lambda: _lora(**{f"{Q}.lora_up.weight": torch.full((128, 4), 1e30),
                                  f"{Q}.lora_down.weight": torch.full((4, 128), 1e30)}),
                 "q_proj", "lower its weight"),
    "lokr factors": (lambda: {f"{Q}.lokr_w1": torch.randn(8, 8), f"{Q}.lokr_w2_a": torch.randn(16, 2),
                              f"{Q}.lokr_w2_b": torch.randn(3, 16)}, f"{Q}.lokr_w2_a", "rank"),
    "lokr kron shape": (lambda: {f"{Q}.lokr_w1": torch.randn(8, 8), f"{Q}.lokr_w2": torch.randn(16, 15)},
                        Q, "model [128, 128]"),
    "loha products": (lambda: {f"{Q}.hada_w1_a": torch.randn(128, 2), f"{Q}.hada_w1_b": torch.randn(2, 128),
                               f"{Q}.hada_w2_a": torch.randn(64, 2), f"{Q}.hada_w2_b": torch.randn(2, 128)},
                      Q, "LoHa"),
    "dora magnitude": (lambda: _lora(**{f"{Q}.dora_scale": torch.ones(1, 7)}), Q, "DoRA"),
}


# A real process for one case of each way a LoRA is refused (its header, its values, its merge); the rest through
# the same command in-process, which keeps the suite's time (each process starts torch anew).
IN_PROCESS = set(LORA_CASES) - {"rank disagrees", "nan", "overflow"}


def rdbt_in_process(*args):
    from typer.testing import CliRunner

    from rdbt_cli.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    return r.exit_code, r.stdout, r.stderr


@pytest.mark.parametrize("case", LORA_CASES)
def test_hostile_lora_contents_are_refused_naming_file_and_key(tmp_path, spawn, case):
    make, key, word = LORA_CASES[case]
    path = tmp_path / "bad style.safetensors"
    save_file(make(), str(path))
    out = tmp_path / "out"
    args = ("gen", "x", "--lora", f"{path}:1", "--out", out, *TINY)
    result = rdbt_in_process(*args) if case in IN_PROCESS else rdbt(spawn, *args)
    text = one_line_error(result, str(path), key, word)
    assert not out.exists() or not list(out.iterdir()), text  # no image, no temp file


def test_a_sound_lora_of_the_same_shape_still_works(tmp_path, spawn):
    path = tmp_path / "good.safetensors"
    save_file(_lora(), str(path))
    rc, out, err = rdbt(spawn, "gen", "x", "--lora", f"{path}:0.5", "--out", tmp_path / "a.png", *TINY)
    assert rc == 0, err
    assert (tmp_path / "a.png").exists()


# ---------------------------------------------------------------------------------------------------------------------
# 8. `lora-stack --add` stores only what later gens can load


ADD_CASES = {
    "missing": (None, "not found"),
    "pickle": (b"\x80\x04K\x01.", "never loaded"),
    "truncated": ("truncated", "truncated"),
    "garbage": (b"hello, this is not a model at all", "not a safetensors file"),
    "a model": ("model", "is a diffusion model"),
    "no adapter": ("plain", "not a LoRA"),
}


@pytest.mark.parametrize("case", ADD_CASES)
def test_lora_stack_add_refuses_what_gen_could_not_load(tmp_path, spawn, case):
    content, word = ADD_CASES[case]
    suffix = ".ckpt" if case == "pickle" else ".safetensors"
    path = tmp_path / f"thing{suffix}"
    if content == "truncated":
        save_file(_lora(), str(path))
        path.write_bytes(path.read_bytes()[:-100])
    elif content == "model":
        from rdbt_cli.tiny import write_tiny_dit

        write_tiny_dit(path)
    elif content == "plain":
        save_file({"some.tensor": torch.zeros(3)}, str(path))
    elif content is not None:
        path.write_bytes(content)
    one_line_error(rdbt(spawn, "lora-stack", "--add", f"{path}:0.5"), "thing", word)
    rc, out, err = rdbt(spawn, "lora-stack", "--json")
    assert rc == 0 and json.loads(out) == [], err  # nothing stored: later gens are not broken
    good = tmp_path / "good.safetensors"
    save_file(_lora(), str(good))
    rc, out, err = rdbt(spawn, "lora-stack", "--add", f"{good}:0.5", "--json")
    assert rc == 0 and [e["name"] for e in json.loads(out)] == [str(good)], err


# ---------------------------------------------------------------------------------------------------------------------
# 7. Junk in a models folder is one unreadable row with its reason; the other files still list and load


def _raw_safetensors(path, header, data=b""):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


JUNK = {
    "no_dtype": ({"w": {"shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "dtype, shape or offsets"),
    "bad_dtype": ({"w": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "dtype, shape or offsets"),
    "meta_not_table": ({"__metadata__": [1, 2], "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
                       b"\0" * 8, "__metadata__"),
    "meta_not_strings": ({"__metadata__": {"a": {"b": 1}}, "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
                         b"\0" * 8, "__metadata__"),
    "absurd_shape": ({"w": {"dtype": "F32", "shape": [10**12, 10**12], "data_offsets": [0, 8]}}, b"\0" * 8,
                     "does not fit"),
    "negative_shape": ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8,
                       "dtype, shape or offsets"),
    "shape_words": ({"w": {"dtype": "F32", "shape": "big", "data_offsets": [0, 8]}}, b"\0" * 8,
                    "dtype, shape or offsets"),
    "overlap": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "overlap"),
    "entry_not_table": ({"w": 5}, b"", "dtype, shape or offsets"),
    "deep_json": (b"[" * 100000 + b"]" * 100000, b"", "unreadable header"),
    "not_utf8": (b'{"\xff\xfe": 1}', b"", "unreadable header"),
    "header_list": (b"[1, 2, 3]", b"", "not a table"),
    "truncated": ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 4, "truncated"),
}


@pytest.fixture
def junk_models(tmp_path):
    import shutil

    from rdbt_cli.tiny import ensure_tiny_models

    dit = Path(ensure_tiny_models().dit)
    models = tmp_path / "models"
    shutil.copytree(dit.parent.parent, models)
    for name, (header, data, _) in JUNK.items():
        _raw_safetensors(models / "diffusion_models" / f"junk_{name}.safetensors", header, data)
    (models / "loras").mkdir()
    _raw_safetensors(models / "loras" / "junk_lora.safetensors", JUNK["overlap"][0], JUNK["overlap"][1])
    (models / "diffusion_models" / "junk_empty.safetensors").write_bytes(b"")
    (models / "diffusion_models" / "junk_link.safetensors").symlink_to(tmp_path / "gone.safetensors")
    return models


def test_models_lists_junk_as_broken_with_the_reason(junk_models, spawn):
    rc, out, err = rdbt(spawn, "models", "--models-dir", junk_models, "--json")
    assert rc == 0, err
    assert "Traceback" not in err
    rows = {Path(r["file"]).stem: r for r in json.loads(out)}
    for name, (_, _, reason) in JUNK.items():
        row = rows[f"junk_{name}"]
        assert row["kind"] == "broken" and reason in json.dumps(row), row
    assert rows["junk_empty"]["kind"] == rows["junk_link"]["kind"] == rows["junk_lora"]["kind"] == "broken"
    assert {rows[n]["kind"] for n in ("anima_tiny", "qwen3_tiny", "wan21_vae_tiny")} == {"dit", "te", "vae"}
    rc, out, err = rdbt(spawn, "models", "--models-dir", junk_models)  # the table, too
    assert rc == 0 and "junk_overlap" in out and "overlap" in out, err


def test_junk_beside_the_model_does_not_stop_gen(junk_models, tmp_path, spawn):
    rc, out, err = rdbt(spawn, "gen", "x", "--models-dir", junk_models, "--size", "32x32", "--steps", "1", "--quiet",
                        "--out", tmp_path / "a.png")
    assert rc == 0, err
    assert (tmp_path / "a.png").exists()
    # naming a junk file is a one-line error that names it
    one_line_error(rdbt(spawn, "gen", "x", "--models-dir", junk_models, "--model", "junk_overlap", "--size", "32x32",
                        "--steps", "1", "--quiet", "--out", tmp_path / "b.png"), "junk_overlap", "overlap")
    one_line_error(rdbt(spawn, "gen", "x", "--model", "tiny", "--lora", junk_models / "loras" / "junk_lora.safetensors",
                        "--size", "32x32", "--steps", "1", "--quiet", "--out", tmp_path / "c.png"), "junk_lora")
    assert not (tmp_path / "b.png").exists() and not (tmp_path / "c.png").exists()


# ---------------------------------------------------------------------------------------------------------------------
# 3. Text that is not UTF-8: one rule (strict UTF-8, a BOM allowed), the first bad byte named, before any model loads

NO_MODEL = ["--model", "/nowhere/model.safetensors"]  # the encoding error must come before the model is looked for


def test_prompt_arguments_that_are_not_utf8(tmp_path, spawn):
    one_line_error(rdbt(spawn, "gen", b"caf\xe9 au lait", "--out", tmp_path, *NO_MODEL), "prompt", "0xE9",
                   "character 4", "UTF-8")
    one_line_error(rdbt(spawn, "gen", "fine", "--cfg", "4", "-n", b"\x80bad", "--out", tmp_path, *NO_MODEL),
                   "negative", "0x80", "character 1")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("data, where", [
    (b"caf\xe9\n", "line 1, column 4"),
    ("\ufeffgood line\n".encode() + b"second \xff line\n", "line 2, column 8"),
    ("1girl".encode("utf-16"), "line 1, column 1"),
])
def test_stdin_that_is_not_utf8(tmp_path, spawn, data, where):
    one_line_error(rdbt(spawn, "gen", "-", "--out", tmp_path, *NO_MODEL, input=data), "stdin", where, "UTF-8")
    one_line_error(rdbt(spawn, "batch", "-", "--out", tmp_path, *NO_MODEL, input=data), "stdin", where)
    assert not list(tmp_path.iterdir())


def test_batch_file_that_is_not_utf8(tmp_path, spawn):
    prompts = tmp_path / "p.txt"
    prompts.write_bytes("un café\n".encode() + "deux crème --seed 3\n".encode("latin-1"))
    out = tmp_path / "out"
    one_line_error(rdbt(spawn, "batch", prompts, "--out", out, *NO_MODEL), str(prompts), "line 2, column 8",
                   "0xE8", "iconv")
    assert not out.exists()
    prompts.write_bytes("\ufeffun café\n".encode())  # UTF-8 with a BOM is fine
    rc, out_text, err = rdbt(spawn, "batch", prompts, "--out", out, *TINY)
    assert rc == 0, err


# ---------------------------------------------------------------------------------------------------------------------
# 9. Very long prompts: refused past a documented limit, before anything loads, instead of minutes of silence


def test_a_prompt_past_the_limit_is_refused_before_loading(tmp_path, spawn):
    from rdbt_cli.settings import MAX_PROMPT_CHARS

    long = "1girl, " * (MAX_PROMPT_CHARS // 7 + 1)
    one_line_error(rdbt(spawn, "gen", long, "--out", tmp_path, *NO_MODEL), "prompt", f"{MAX_PROMPT_CHARS:,}",
                   "shorten")
    one_line_error(rdbt(spawn, "gen", "-", "--out", tmp_path, *NO_MODEL, input=long.encode()), "prompt", "shorten")
    one_line_error(rdbt(spawn, "gen", "x", "--cfg", "4", "-n", long, "--out", tmp_path, *NO_MODEL), "negative")
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"short one\n{long}\n")
    rc, out, err = rdbt(spawn, "batch", prompts, "--out", tmp_path / "out", *TINY)
    assert rc == 1 and "line 2" in err and "shorten" in err, err
    assert len(list((tmp_path / "out").glob("*.png"))) == 1  # the good line is made


# ---------------------------------------------------------------------------------------------------------------------
# 1. Hostile metadata: inspect shows what it can and lists what it skipped; --from refuses before loading anything


@pytest.fixture(scope="module")
def made_png(tmp_path_factory):
    from typer.testing import CliRunner

    from rdbt_cli.cli import app

    out = tmp_path_factory.mktemp("made") / "a.png"
    r = CliRunner().invoke(app, ["gen", "a cat", "--seed", "3", "--out", str(out), *TINY])
    assert r.exit_code == 0, r.output
    return out


def _with_chunks(src, dest, **chunks):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, text in chunks.items():
        info.add_itxt(key, text) if any(ord(c) > 255 for c in text) else info.add_text(key, text)
    Image.open(src).save(dest, pnginfo=info)
    return dest


HOSTILE_FIELDS = {
    "steps": (10**9, "at most"),
    "steps ": ("twenty", "whole number"),
    "width": (1_000_000, "pixels"),
    "cfg": (float("nan"), "number"),
    "cfg ": (float("inf"), "number"),
    "seed": (-5, "seed"),
    "sampler": ({"a": 1}, "sampler"),
    "prompt": ("a \ud800 cat", "surrogate"),
    "negative": (["a", "list"], "string"),
    "loras": ("style", "list"),
    "loras ": ([{"name": "x", "weight": "heavy"}], "weight"),
    "model": (42, "model"),
}


@pytest.mark.parametrize("field", HOSTILE_FIELDS)
def test_hostile_rdbt_recipe_field(made_png, tmp_path, spawn, field):
    from PIL import Image

    value, word = HOSTILE_FIELDS[field]
    recipe = json.loads(Image.open(made_png).info["rdbt"])
    recipe[field.strip()] = value
    png = _with_chunks(made_png, tmp_path / "hostile.png", rdbt=json.dumps(recipe))
    rc, out, err = rdbt(spawn, "inspect", png)
    assert rc == 0 and "Traceback" not in err, err
    assert re.search(rf"skipped:\s+{field.strip()} \(", out) and out.count("skipped:") == 1, out
    rc, out, err = rdbt(spawn, "inspect", png, "--json")
    assert rc == 0 and any(s.startswith(field.strip()) for s in json.loads(out)["skipped"]), out
    out_dir = tmp_path / "out"
    one_line_error(rdbt(spawn, "gen", "--from", png, "--out", out_dir, "--model", "tiny"), str(png), word)
    assert not out_dir.exists()


def test_deeply_nested_and_garbled_chunks(made_png, tmp_path, spawn):
    deep = "[" * 200_000 + "]" * 200_000
    from PIL import Image

    recipe = json.loads(Image.open(made_png).info["rdbt"])
    recipe["batch"] = json.loads("[" * 500 + "]" * 500)  # deep, but below the parser's limit: shown or skipped
    cases = {
        "deep_rdbt.png": {"rdbt": deep},
        "deep_inner.png": {"rdbt": json.dumps(recipe)},
        "deep_comfy.png": {"prompt": deep, "workflow": deep},
        "deep_hashes.png": {"parameters": f"a cat\nSteps: 4, Sampler: Euler, CFG scale: 4, Seed: 1, Hashes: {deep}"},
        "wrong_comfy.png": {"prompt": json.dumps({"3": {"class_type": "KSampler", "inputs": {"seed": "abc",
                                                                                            "steps": [1]}}})},
        "absurd_a1111.png": {"parameters": "a cat\nSteps: 1000000000, Sampler: Euler, CFG scale: nan, Seed: 1, "
                                           "Size: 1000000x1000000"},
    }
    for name, chunks in cases.items():
        png = _with_chunks(made_png, tmp_path / name, **chunks)
        rc, out, err = rdbt(spawn, "inspect", png)
        assert "Traceback" not in err and len(err.strip().splitlines()) <= 1, (name, err)
        if rc == 0:
            rc, out, err = rdbt(spawn, "inspect", png, "--json")
            assert rc == 0, (name, err)
            json.loads(out)
    for name in ("wrong_comfy.png", "absurd_a1111.png"):
        one_line_error(rdbt(spawn, "gen", "--from", tmp_path / name, "--out", tmp_path / "o", "--model", "tiny"),
                       name)
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------------------------------
# 5. Shared state under concurrency


def test_parallel_lora_stack_edits_lose_no_update(tmp_path, spawn):
    import subprocess
    import time

    files = []
    for i in range(8):
        files.append(tmp_path / f"style{i}.safetensors")
        save_file(_lora(), str(files[-1]))
    procs = [spawn.popen([*RDBT, "lora-stack", "--add", f"{f}:0.{i + 1}"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE) for i, f in enumerate(files)]
    deadline = time.monotonic() + 120
    for proc in procs:
        proc.wait(max(1.0, deadline - time.monotonic()))
        assert proc.returncode == 0, proc.stderr.read()
    rc, out, err = rdbt(spawn, "lora-stack", "--json")
    assert rc == 0, err
    assert sorted(e["name"] for e in json.loads(out)) == sorted(map(str, files))
    stack_dir = Path(os.environ["RDBT_HOME"])
    assert not [p for p in stack_dir.iterdir() if p.name.endswith(".tmp")]


def test_a_second_batch_into_the_same_folder_waits_its_turn(tmp_path, spawn):
    import subprocess
    import time

    from PIL import Image

    prompts = tmp_path / "p.txt"
    prompts.write_text("one --count 300\n")
    out = tmp_path / "out"
    first = spawn.popen([*RDBT, "batch", prompts, "--out", out, *TINY], stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(out.glob("*.png")) and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.05)
    assert first.poll() is None, "the first batch ended before the second could start"
    one_line_error(rdbt(spawn, "batch", prompts, "--out", out, *TINY), str(out), "already", "resume")
    spawn.kill()
    jobs = [json.loads(Image.open(p).info["rdbt"])["batch"]["job"] for p in out.glob("*.png")]
    assert jobs and len(jobs) == len(set(jobs))  # no image made twice


def test_a_hash_cache_with_wrong_typed_entries_is_rewritten(tmp_path, spawn):
    from rdbt_cli.tiny import ensure_tiny_models

    models = Path(ensure_tiny_models().dit).parent
    cache = Path(os.environ["RDBT_HOME"]) / "hashes.json"
    entries = {str(p.resolve()): bad for p, bad in zip(sorted(models.iterdir()), ["x", {"sha256": 5, "size": "big"}])}
    cache.write_text(json.dumps({"version": 1, "files": {**entries, "junk": [1, 2]}}))
    rc, out, err = rdbt(spawn, "models", "--models-dir", models, "--hash", "--json")
    assert rc == 0 and "Traceback" not in err, err
    assert all(len(row["hash"] or "") == 10 for row in json.loads(out)), out
    files = json.loads(cache.read_text())["files"]
    assert all(isinstance(files[k], dict) and isinstance(files[k]["sha256"], str) for k in entries)
    cache.write_text('{"version": 1, "files": ' + "[" * 100_000)  # torn and deep: a miss, not a crash
    rc, out, err = rdbt(spawn, "models", "--models-dir", models, "--hash", "--json")
    assert rc == 0, err


# ---------------------------------------------------------------------------------------------------------------------
# 6. Disk full: the message names the file and says to free space; what was made stays recorded; a resume completes

# rdbt with every fsync after the first FAIL_AFTER failing as a full disk does (fsync is where a full disk shows up
# on many file systems; every file rdbt must not lose is fsync'd).
DISK_FULL = """
import errno, os, sys
real, calls = os.fsync, [0]
def fsync(fd):
    calls[0] += 1
    if calls[0] > int(os.environ["FAIL_AFTER"]):
        raise OSError(errno.ENOSPC, "No space left on device")
    return real(fd)
os.fsync = fsync
sys.argv[0] = "rdbt"
from rdbt_cli.cli import app
app()
"""


def _png_jobs(out):
    from PIL import Image

    return [json.loads(Image.open(p).info["rdbt"])["batch"]["job"] for p in sorted(out.glob("*.png"))]


@pytest.mark.parametrize("fail_after", [0, 3])
def test_disk_full_during_a_batch_then_resume(tmp_path, spawn, fail_after):
    prompts = tmp_path / "p.txt"
    prompts.write_text("one --count 4\n")
    out = tmp_path / "out"
    proc = spawn.popen([sys.executable, "-c", DISK_FULL, "batch", prompts, "--out", out, *TINY], stdout=-1, stderr=-1,
                       env={**os.environ, "FAIL_AFTER": str(fail_after), "COLUMNS": "400"})
    _, err = proc.communicate(timeout=180)
    err = err.decode()
    assert proc.returncode != 0 and "Traceback" not in err, err
    assert "the disk is full" in err and "free some space" in err, err
    assert str(out) in err, err
    assert not list(out.glob(".*.tmp")) and not list(out.glob("*.tmp"))
    made = _png_jobs(out)
    assert len(made) == len(set(made)) <= 2
    rc, _, err = rdbt(spawn, "batch", prompts, "--out", out, *TINY)
    assert rc == 0, err
    jobs = _png_jobs(out)
    assert len(jobs) == 4 and len(set(jobs)) == 4  # the resume made only what was missing


def test_disk_full_for_gen(tmp_path, spawn):
    env = {**os.environ, "FAIL_AFTER": "0"}
    proc = spawn.popen([sys.executable, "-c", DISK_FULL, "gen", "x", "--out", tmp_path / "o", *TINY], stdout=-1,
                       stderr=-1, env=env)
    _, err = proc.communicate(timeout=180)
    one_line_error((proc.returncode, "", err.decode()), str(tmp_path / "o"), "disk is full", "free some space")
    assert not list((tmp_path / "o").iterdir())


# ---------------------------------------------------------------------------------------------------------------------
# 4. SIGTERM and SIGHUP behave like Ctrl-C; stale temp files of killed processes are removed by the next run


def _wait_for_pngs(out, n, proc, timeout=120):
    import time

    deadline = time.monotonic() + timeout
    while len(list(out.glob("*.png"))) < n and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "finished before the signal"


@pytest.mark.parametrize("signame, command", [("SIGTERM", "gen"), ("SIGHUP", "batch")])
def test_termination_signals_unwind_like_ctrl_c(tmp_path, spawn, signame, command):
    import signal

    out = tmp_path / "out"
    prompts = tmp_path / "p.txt"
    prompts.write_text("one --count 12\n")
    args = ["gen", "x", "--count", "300"] if command == "gen" else ["batch", prompts]
    proc = spawn.popen([*RDBT, *args, "--out", out, *TINY], stdout=-1, stderr=-1)
    _wait_for_pngs(out, 2, proc)
    proc.send_signal(getattr(signal, signame))
    _, err = proc.communicate(timeout=60)
    err = err.decode()
    assert proc.returncode == 128 + getattr(signal, signame), err
    assert "Traceback" not in err and "interrupted" in err.strip().splitlines()[-1], err
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    if command == "batch":
        recorded = [json.loads(line)["file"] for m in out.glob(".rdbt-batch-*.jsonl") for line in m.open()]
        assert recorded and all((out / f).exists() for f in recorded)  # the manifest names only finished images
        rc, _, err = rdbt(spawn, "batch", prompts, "--out", out, *TINY)
        assert rc == 0, err
        jobs = _png_jobs(out)
        assert len(jobs) == 12 and len(set(jobs)) == 12


def test_stale_temps_of_dead_processes_are_removed_by_the_next_run(tmp_path, spawn):
    import signal
    import subprocess

    from rdbt_cli.metadata import _host

    out = tmp_path / "out"
    proc = spawn.popen([*RDBT, "gen", "x", "--count", "300", "--out", out, *TINY], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    _wait_for_pngs(out, 1, proc)
    dead = spawn.popen([sys.executable, "-c", "pass"])
    dead.wait(30)
    stale = out / f".x-0001.{_host()}-{dead.pid}-0123456789ab.tmp"
    mine = out / f".x-0002.{_host()}-{os.getpid()}-0123456789ab.tmp"  # a live writer's
    other = out / f".x-0003.otherhost-{dead.pid}-0123456789ab.tmp"  # another machine's, on a shared folder
    for p in (stale, mine, other):
        p.write_bytes(b"half a png")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    left = [p for p in out.iterdir() if p.name.endswith(".tmp") and p not in (mine, other, stale)]
    rc, _, err = rdbt(spawn, "gen", "y", "--out", out, *TINY)
    assert rc == 0, err
    assert not stale.exists() and mine.exists() and other.exists()
    assert not any(p.exists() for p in left)  # whatever the killed run left is gone too
