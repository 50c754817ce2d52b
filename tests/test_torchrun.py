"""`rdbt batch` under a real torchrun (CPU, gloo): every image made exactly once, kill-and-resume at another world
size, and a line that fails on one rank reported without stopping the others."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import alive, marked

TINY = ["--model", "tiny", "--size", "48x32", "--steps", "2", "--quiet"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "rdbt_cli", "batch", *map(str, args), *TINY]
    return cmd


def _jobs(out):
    return [json.loads(Image.open(p).info["rdbt"])["batch"]["job"] for p in sorted(Path(out).glob("*.png"))]


@pytest.fixture(autouse=True)
def _prebuilt_tiny():
    # Build the tiny model once before the ranks start, so the test measures the batch, not the first-run build.
    from rdbt_cli.tiny import ensure_tiny_models

    ensure_tiny_models()


def test_two_ranks_make_every_image_exactly_once(tmp_path, spawn):
    prompts = tmp_path / "p.txt"
    prompts.write_text("alpha --count 3\nbeta\ngamma --count 2\n")
    out = tmp_path / "out"
    r = spawn.run(_torchrun(2, prompts, "--out", out))
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = _jobs(out)
    assert len(jobs) == 6 and len(set(jobs)) == 6
    assert "6 images made" in r.stderr and "2 process(es)" in r.stderr
    assert r.stderr.count("images made") == 1  # one summary, from rank 0
    manifests = sorted(p.name for p in out.glob(".rdbt-batch-*.jsonl"))
    assert len(manifests) == 2  # one per rank: no two writers share a file


def test_killed_two_rank_batch_resumes_on_one_rank(tmp_path, spawn):
    prompts = tmp_path / "p.txt"
    prompts.write_text("one --count 20\ntwo --count 20\n")  # enough work that the kill lands midway
    out = tmp_path / "out"
    proc = spawn.popen(_torchrun(2, prompts, "--out", out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(out.glob("*.png"))) < 3 and proc.poll() is None:
        time.sleep(0.05)
    running = marked(spawn.token)
    # torchrun's workers run in sessions of their own: killing torchrun's process group alone would leave them behind.
    assert sum(os.getsid(pid) != proc.pid for pid in running if alive(pid)) >= 2, running
    spawn.kill()  # a crash of the whole job: torchrun and both workers
    assert not any(alive(pid) for pid in running)
    partial = len(list(out.glob("*.png")))
    assert 3 <= partial < 40
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    r = spawn.run([sys.executable, "-m", "rdbt_cli", "batch", str(prompts), "--out", str(out), *TINY], env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = _jobs(out)
    assert len(jobs) == 40 and len(set(jobs)) == 40


def test_a_line_failing_on_one_rank_is_reported_and_the_rest_finish(tmp_path, spawn):
    from safetensors.torch import save_file
    import torch

    loras = tmp_path / "models" / "loras"
    loras.mkdir(parents=True)
    # An SDXL LoRA: none of its keys fit Anima, so applying it fails on whichever rank owns that line.
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)},
              str(loras / "sdxl_style.safetensors"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("fine one\nbroken --lora sdxl_style:0.8\nfine two\nfine three\n")
    out = tmp_path / "out"
    env = {**os.environ, "RDBT_MODELS": str(tmp_path / "models")}
    r = spawn.run(_torchrun(2, prompts, "--out", out), env=env)
    assert r.returncode != 0
    assert "line 2" in r.stderr and "sdxl_style" in r.stderr
    assert "3 images made" in r.stderr and "1 failed" in r.stderr
    assert len(_jobs(out)) == 3
