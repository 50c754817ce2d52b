"""The library entry point: plan jobs, run them on loaded models, get images with their recipes and timings."""

from dataclasses import replace

import numpy as np
import pytest

from rdbt_cli import LoadParams, plan, run
from rdbt_cli.errors import ConfigError
from rdbt_cli.metadata import recipe_settings
from rdbt_cli.runner import Runner
from rdbt_cli.settings import SETTINGS


def test_plan_and_run_make_count_images_with_recipes_and_timings():
    jobs, load, paths = plan("1girl", LoadParams(model="tiny", device="cpu", dtype="fp32"), steps=2, count=2,
                             seed=40, width=32, height=32)
    assert [(j.seed, j.index) for j in jobs] == [(40, 0), (41, 1)]
    made = list(run(jobs, load, paths))
    assert [m.recipe["seed"] for m in made] == [40, 41] and made[0].recipe["steps"] == 2
    assert made[0].image.shape == (32, 32, 3) and made[0].image.dtype == np.uint8
    assert "load_s" in made[0].timings and "load_s" not in made[1].timings and made[1].timings["sample_s"] > 0
    assert not np.array_equal(made[0].image, made[1].image)
    # Settings that only plan images (count, combinatorial) are not recorded: every other one reads back exactly.
    unrecorded = {s.name: None for s in SETTINGS if s.recipe is None}
    assert "count" in unrecorded and "steps" not in unrecorded
    for m in made:
        back, recorded = recipe_settings(m.recipe)
        assert replace(back, **unrecorded) == replace(m.job.settings, **unrecorded) and recorded["model"] == "tiny"


def test_plan_checks_keyword_settings_as_flags():
    with pytest.raises(ConfigError, match="--steps"):
        plan("x", LoadParams(model="tiny"), steps=0)
    with pytest.raises(ConfigError, match="prompt"):
        plan(None, LoadParams(model="tiny"))


def test_runner_switches_lora_stacks_by_exact_undo(tmp_path):
    import torch
    from safetensors.torch import save_file

    from rdbt_cli import engine

    load = LoadParams(model="tiny", device="cpu", dtype="fp32")
    base, load, paths = plan("a cat", load, steps=2, seed=3, width=32, height=32)
    dit = engine.load_dit(paths.dit, device="cpu", dtype=torch.float32)
    w = dit.state_dict()["blocks.0.mlp.layer1.weight"]
    lora = tmp_path / "style.safetensors"
    save_file({"diffusion_model.blocks.0.mlp.layer1.lora_down.weight": torch.randn(4, w.shape[1]),
               "diffusion_model.blocks.0.mlp.layer1.lora_up.weight": torch.randn(w.shape[0], 4)}, str(lora))
    styled, _, _ = plan("a cat", load, steps=2, seed=3, width=32, height=32, loras=[f"{lora}:0.8"])
    assert styled[0].loras == [(lora, 0.8)] and base[0].loras == []
    runner = Runner(load, paths)
    first = runner.run(base[0]).image
    with_lora = runner.run(styled[0])
    assert not np.array_equal(first, with_lora.image)
    assert with_lora.recipe["loras"][0]["weight"] == 0.8
    assert np.array_equal(runner.run(base[0]).image, first)  # undone exactly, no reload


def test_every_long_stage_is_reported_before_it_runs():
    events = []
    jobs, load, paths = plan("1girl", LoadParams(model="tiny", device="cpu", dtype="fp32"), steps=3, count=2,
                             seed=1, width=32, height=32, hires=1.5, hires_steps=2)
    made = list(run(jobs, load, paths, callback=events.append))
    stages = [e.get("stage", "step") for e in events]
    loads = [e["part"] for e in events if e.get("stage") == "load"]
    assert loads == ["tokenizers", "text encoder", "DiT", "VAE"]  # each file, once, before the first image
    assert all(e["file"] and e["bytes"] > 0 for e in events if e.get("stage") == "load")
    one_image = ["text", "sample", *["step"] * 3, "upscale", "hires", *["step"] * 2, "decode"]
    assert stages == ["load"] * 4 + one_image * 2
    assert len(made) == 2 and jobs[0].steps == 5  # the bar's total: both passes' steps


def test_the_progress_line_says_what_happens_now():
    from rdbt_cli.console import Progress, describe

    assert describe({"stage": "load", "part": "DiT", "file": "anima.safetensors", "bytes": 4_200_000_000}) == \
        "loading DiT anima.safetensors (3.9 GiB)"
    assert describe({"stage": "hash", "files": ["a.safetensors"]}).startswith("hashing a.safetensors")
    with Progress(2, quiet=True) as bar:
        bar.event({"stage": "load", "part": "VAE", "file": "vae.safetensors", "bytes": 2**20})
        assert bar.progress.tasks[-1].description == "loading VAE vae.safetensors (1 MiB)"
        assert bar.progress.tasks[-1].total is None  # a spinner: loading has no steps to count
        bar.start_image("seed 7", 5)
        for info in ({"stage": "text"}, {"stage": "sample"}, {"i": 0}, {"i": 1}, {"i": 2}, {"stage": "upscale"},
                     {"stage": "hires"}, {"i": 0}):
            bar.event(info)
        task = bar.progress.tasks[-1]
        assert task.description == "seed 7 · hires pass" and (task.completed, task.total) == (4, 5)
        bar.event({"stage": "decode"})
        assert bar.progress.tasks[-1].description == "seed 7 · decoding (VAE)"


def test_bench_reports_its_stages_and_steps():
    from rdbt_cli import bench

    events = []
    bench.run(model="tiny", width=32, height=32, steps=2, device="cpu", callback=events.append)
    assert [e.get("stage", "step") for e in events] == ["load", "sample", "step", "step", "decode", "gemm"]


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_bf16_instructions_warns_once_and_decodes_in_fp32(monkeypatch, native):
    import torch

    from rdbt_cli import pipeline

    monkeypatch.setattr(pipeline, "cpu_has_native_bf16", lambda: native)
    warnings = []
    jobs, load, paths = plan("x", LoadParams(model="tiny", device="cpu", dtype="bf16"), steps=1, width=32, height=32,
                             count=2)
    runner = Runner(load, paths, on_warning=warnings.append)
    made = [runner.run(job) for job in jobs]
    assert next(runner.models.dit.parameters()).dtype == torch.bfloat16  # the DiT computes as asked
    vae = next(runner.models.vae.parameters()).dtype
    if native:
        assert vae == torch.bfloat16 and warnings == []
    else:  # emulated bf16 convolutions take minutes per decode; fp32 takes seconds
        assert vae == torch.float32 and len(warnings) == 1 and "--dtype auto" in warnings[0]
    assert all(m.recipe["dtype"] == "bfloat16" for m in made)
