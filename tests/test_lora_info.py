"""A LoRA's training metadata (`ss_*`, `modelspec.*`) in `rdbt inspect FILE.safetensors` and `rdbt models --lora`,
the warning for a LoRA trained for another model family, and strangers' headers that must not break either."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file
from typer.testing import CliRunner

from rdbt_cli import lora_info
from rdbt_cli.cli import app

TAGS = {"10_ink": {"1girl": 40, "ink wash": 35, "solo": 12}, "5_extra": {"1girl": 5, "monochrome": 20, " ": 3}}
KOHYA = {
    "ss_output_name": "inkwash", "ss_base_model_version": "anima_preview",
    "ss_sd_model_name": "anima-preview.safetensors",
    "ss_network_module": "networks.lora_anima", "ss_network_dim": "16", "ss_network_alpha": "8.0",
    "ss_network_args": json.dumps({"conv_dim": "4", "algo": "lora"}), "ss_resolution": "(1024, 1024)",
    "ss_num_epochs": "10", "ss_steps": "2400", "ss_num_train_images": "240", "ss_learning_rate": "0.0001",
    "ss_optimizer": "bitsandbytes.optim.adamw.AdamW8bit", "ss_training_finished_at": "1767225600.5",
    "modelspec.trigger_phrase": "inkwash style", "ss_tag_frequency": json.dumps(TAGS),
}


def _lora(path, meta):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"lora_unet_blocks_0_mlp_layer1.lora_down.weight": np.zeros((2, 4), np.float32),
               "lora_unet_blocks_0_mlp_layer1.lora_up.weight": np.zeros((4, 2), np.float32)}, str(path), metadata=meta)
    return path


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_a_kohya_loras_training_is_shown(tmp_path):
    info = lora_info.describe(_lora(tmp_path / "ink.safetensors", KOHYA))
    t = info["training"]
    assert (t["title"], t["base model"], t["dim"], t["alpha"], t["trigger words"]) == (
        "inkwash", "anima_preview", "16", "8.0", "inkwash style")
    assert (t["resolution"], t["epochs"], t["steps"], t["network args"]) == ("(1024, 1024)", "10", "2400",
                                                                             "conv_dim=4, algo=lora")
    assert t["trained"] == "2026-01-01 00:00 UTC"
    # summed over datasets, most frequent first, blank tags dropped
    assert info["tags"] == [["1girl", 45], ["ink wash", 35], ["monochrome", 20], ["solo", 12]]
    assert info["kind"] == "lora" and info["warning"] is None
    text = lora_info.summary(info)
    assert "trigger words: inkwash style" in text and "top tags:      1girl (45), ink wash (35)" in text


@pytest.mark.parametrize("meta,family", [
    ({"ss_base_model_version": "sdxl_base_v1-0"}, "SDXL"),
    ({"modelspec.architecture": "flux-1-dev/lora"}, "Flux"),
    ({"ss_base_model_version": "sd_v1", "ss_sd_model_name": "anima.safetensors"}, "SD 1.5"),
    ({"ss_sd_model_name": "animagine-xl-3.1.safetensors"}, "SDXL (Animagine)"),
    ({"ss_sd_model_name": "ponyDiffusionV6XL.safetensors"}, "SDXL (Pony)"),
    ({"ss_base_model_version": "anima", "ss_sd_model_name": "sdxl_mix.safetensors"}, None),
    ({"ss_sd_model_name": "my_model.safetensors"}, None),
    ({}, None),
])
def test_another_family_is_warned_about(tmp_path, meta, family):
    info = lora_info.describe(_lora(tmp_path / "x.safetensors", meta))
    if family is None:
        assert info["warning"] is None
    else:
        assert f"trained for {family} " in info["warning"] and "not Anima" in info["warning"]


def test_strangers_metadata_is_bounded_and_cleaned(tmp_path):
    meta = {"ss_tag_frequency": "[" * 200_000, "ss_output_name": "evil\x1b[2J\x1b]0;pwn\x07name\u202e\nsecond line",
            "ss_network_args": "{not json", "modelspec.description": "x" * 100_000, "ss_network_dim": "None"}
    info = lora_info.describe(_lora(tmp_path / "x.safetensors", meta))
    assert info["tags"] == []  # JSON nested past Python's limit: no tags, no crash
    title = info["training"]["title"]
    assert "\x1b" not in title and "\x07" not in title and "\n" not in title and "\u202e" not in title
    assert "\\x1b[2J" in title
    assert len(info["training"]["description"]) == 200 and info["training"]["network args"] == "{not json"
    assert "dim" not in info["training"]  # "None" is no value
    for odd in ({"a": ["1girl"]}, ["1girl"], {"a": {"1girl": "many", "solo": True, "x": -1, "y": 2}}):
        assert lora_info.top_tags({"ss_tag_frequency": json.dumps(odd)}) in ([], [("y", 2)])


def test_inspect_and_models_show_it(tmp_path):
    models = tmp_path / "models"
    lora = _lora(models / "loras" / "style" / "ink.safetensors", KOHYA)
    _lora(models / "loras" / "old.safetensors", {"ss_base_model_version": "sdxl_base_v1-0"})
    r = run("inspect", lora)
    assert r.exit_code == 0 and "base model:" in r.output and "anima_preview" in r.output, r.output
    r = run("inspect", lora, "--json")
    assert json.loads(r.output)["training"]["dim"] == "16"
    r = run("models", "--lora", "style/ink", "--models-dir", models)
    assert r.exit_code == 0 and "inkwash style" in r.output, r.output
    r = run("models", "--lora", "old", "--models-dir", models, "--json")
    assert r.exit_code == 0 and "trained for SDXL" in json.loads(r.output)["warning"]
    r = run("models", "--lora", "nothing", "--models-dir", models)
    assert r.exit_code != 0 and "Traceback" not in r.output and "nothing" in r.output


def test_a_broken_header_is_one_line(tmp_path):
    bad = tmp_path / "bad.safetensors"
    header = json.dumps({"__metadata__": {"ss_network_dim": 16}}).encode()  # a number where text belongs
    bad.write_bytes(struct.pack("<Q", len(header)) + header)
    r = run("inspect", bad)
    out = r.output.strip()
    assert r.exit_code != 0 and len(out.splitlines()) == 1 and "Traceback" not in out and "bad.safetensors" in out


def test_gen_warns_about_a_lora_of_another_family_before_loading(tmp_path, shared_tiny):
    from rdbt_cli.config import LoadParams
    from rdbt_cli.jobs import plan

    sdxl = _lora(tmp_path / "old.safetensors", {"ss_base_model_version": "sdxl_base_v1-0"})
    ink = _lora(tmp_path / "ink.safetensors", KOHYA)
    jobs, _, _ = plan("x", LoadParams(model="tiny"), loras=[f"{sdxl}:0.5", f"{ink}:1"], count=2, seed=1)
    assert [[n for n in job.notes if "trained for" in n] for job in jobs] == [
        ["old.safetensors: its metadata says it was trained for SDXL (ss_base_model_version sdxl_base_v1-0), not "
         "Anima; its weights do not fit Anima's layers (rdbt refuses keys that match nothing), so look for an Anima "
         "version of it"]] * 2
