"""LoRAs made for the 28-block Anima on depth-expanded models (Anima-2.9B, 40 blocks): refused by default with the
option named, moved by `--lora-remap expand|spread|first`, recorded in the recipe so `--from` repeats it."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from rdbt_cli.cli import app
from rdbt_cli.config import TINY_DIT
from rdbt_cli.errors import LoraError
from rdbt_cli.lora import BLOCK_EXPANSIONS, apply_loras, parse_lora_file, remap_blocks
from rdbt_cli.tiny import ensure_tiny_models, write_tiny_dit


def test_remap_tables():
    expand = remap_blocks("expand", 40)
    inserted = set(BLOCK_EXPANSIONS[(28, 40)])
    assert sorted(expand) == list(range(28)) and sorted(expand.values()) == sorted(set(range(40)) - inserted)
    assert list(expand.values()) == sorted(expand.values())  # the kept blocks keep their order
    assert (expand[0], expand[1], expand[2], expand[27]) == (0, 1, 3, 39)
    spread = remap_blocks("spread", 52)
    assert (spread[0], spread[1], spread[14], spread[27]) == (0, 2, 26, 51) and len(set(spread.values())) == 28
    assert remap_blocks("first", 40) == {i: i for i in range(28)}
    with pytest.raises(LoraError, match="28->40.*28->52.*spread"):
        remap_blocks("expand", 52)


def _dit(blocks: int) -> nn.Module:
    root = nn.Module()
    root.blocks = nn.ModuleList()
    for _ in range(blocks):
        b = nn.Module()
        b.self_attn = nn.Module()
        b.self_attn.q_proj = nn.Linear(8, 8, bias=False)
        root.blocks.append(b)
    root.llm_adapter = nn.Module()
    root.llm_adapter.out_proj = nn.Linear(8, 8, bias=False)
    return root.requires_grad_(False)


def _lora(path, blocks, adapter=True):
    g = torch.Generator().manual_seed(3)
    t = {}
    for i in blocks:
        t[f"diffusion_model.blocks.{i}.self_attn.q_proj.lora_A.weight"] = torch.randn(2, 8, generator=g)
        t[f"diffusion_model.blocks.{i}.self_attn.q_proj.lora_B.weight"] = torch.randn(8, 2, generator=g)
    if adapter:  # the adapter's own numbering never moves
        t["diffusion_model.llm_adapter.out_proj.lora_A.weight"] = torch.randn(2, 8, generator=g)
        t["diffusion_model.llm_adapter.out_proj.lora_B.weight"] = torch.randn(8, 2, generator=g)
    save_file(t, str(path))
    return parse_lora_file(path)


def _moved(dit, before):
    """{block: ΔW} of the blocks the merge changed."""
    return {i: dit.blocks[i].self_attn.q_proj.weight - before[i] for i in range(len(dit.blocks))
            if not torch.equal(dit.blocks[i].self_attn.q_proj.weight, before[i])}


@pytest.mark.parametrize("mode", ["expand", "spread", "first"])
def test_28_block_lora_on_40_blocks(tmp_path, mode):
    lf = _lora(tmp_path / "base.safetensors", range(0, 28, 3))
    dit = _dit(40)
    with pytest.raises(LoraError, match=r"base.safetensors: made for the 28-block Anima.*40 blocks.*--lora-remap"):
        apply_loras({"dit": dit}, [(lf, 1.0)])
    assert not any(p.sum() == 0 for p in dit.parameters()) and dit.blocks[0].self_attn.q_proj.weight.ne(0).any()
    before = [b.self_attn.q_proj.weight.clone() for b in dit.blocks]
    adapter = dit.llm_adapter.out_proj.weight.clone()
    patch = apply_loras({"dit": dit}, [(lf, 1.0)], remap=mode)
    table = remap_blocks(mode, 40)
    moved = _moved(dit, before)
    assert sorted(moved) == sorted(table[i] for i in range(0, 28, 3))
    for i in range(0, 28, 3):
        m = lf.modules[f"diffusion_model.blocks.{i}.self_attn.q_proj"].tensors
        assert torch.allclose(moved[table[i]], m["up"] @ m["down"], atol=1e-6)
    assert not torch.equal(dit.llm_adapter.out_proj.weight, adapter)
    patch.undo()
    assert not _moved(dit, before)


def test_no_remap_where_none_is_needed(tmp_path):
    # a 28-block model, and a LoRA that reaches past block 27 (made for the 40-block model): merged as named
    lf = _lora(tmp_path / "a.safetensors", [0, 5, 27])
    dit = _dit(28)
    before = [b.self_attn.q_proj.weight.clone() for b in dit.blocks]
    apply_loras({"dit": dit}, [(lf, 1.0)], remap="spread")
    assert sorted(_moved(dit, before)) == [0, 5, 27]
    deep = _lora(tmp_path / "b.safetensors", [3, 30])
    dit = _dit(40)
    before = [b.self_attn.q_proj.weight.clone() for b in dit.blocks]
    apply_loras({"dit": dit}, [(deep, 1.0)])
    assert sorted(_moved(dit, before)) == [3, 30]
    adapter_only = _lora(tmp_path / "c.safetensors", [])
    apply_loras({"dit": _dit(40)}, [(adapter_only, 1.0)])


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_gen_refuses_then_remaps_and_from_repeats_it(tmp_path):
    paths = ensure_tiny_models()
    # 40 blocks, narrower than the tiny model so that making and running it stays cheap
    dit = replace(TINY_DIT, num_blocks=40, model_channels=64, num_heads=1, mlp_dim=128, adaln_lora_dim=32)
    model = write_tiny_dit(tmp_path / "anima40.safetensors", dit=dit)
    lora = tmp_path / "style.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({f"lora_unet_blocks_{i}_mlp_layer1.{r}.weight": 0.5 * torch.randn(s, generator=g)
               for i in range(28) for r, s in (("lora_down", (4, 64)), ("lora_up", (128, 4)))}, str(lora))
    common = ("--text-encoder", paths.text_encoder, "--vae", paths.vae, "--qwen-tokenizer", paths.qwen_tokenizer,
              "--t5-tokenizer", paths.t5_tokenizer, "--device", "cpu", "--no-stack", "--quiet")
    args = ("gen", "1girl", "--model", model, "--lora", lora, "--size", "64x64", "--steps", 1, "--cfg", 1, "--seed", 3,
            *common)
    r = run(*args, "--out", tmp_path / "x.png")
    assert r.exit_code != 0 and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    assert "style.safetensors" in r.output and "--lora-remap" in r.output and "40 blocks" in r.output
    first = tmp_path / "a.png"
    assert run(*args, "--lora-remap", "expand", "--out", first).exit_code == 0
    assert json.loads(Image.open(first).text["rdbt"])["lora_remap"] == "expand"
    again = tmp_path / "b.png"
    r = run("gen", "--from", first, *common, "--out", again)
    assert r.exit_code == 0, r.output
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    other = tmp_path / "c.png"
    assert run(*args, "--lora-remap", "spread", "--out", other).exit_code == 0
    assert not np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(other)))
