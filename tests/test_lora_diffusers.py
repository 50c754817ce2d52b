"""LoRAs saved by diffusers for Anima's text conditioner (the LLM adapter as diffusers names it), made with diffusers'
own model and saving code and PEFT, merged by rdbt and compared with what PEFT computes."""

import json

import pytest
import torch

from rdbt_cli.config import TINY_ADAPTER, TINY_DIT
from rdbt_cli.engine import AnimaDiT
from rdbt_cli.lora import apply_loras, parse_lora_file

pytest.importorskip("peft")
diffusers_anima = pytest.importorskip("diffusers.models.condition_embedders.condition_embedder_anima")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "mlp.0"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(rdbt tiny DiT, the diffusers conditioner holding its adapter with a fused PEFT LoRA, the saved file)."""
    from diffusers.loaders.lora_pipeline import AnimaLoraLoaderMixin
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(0)
    with torch.device("meta"):
        dit = AnimaDiT(TINY_DIT, TINY_ADAPTER)
    dit.to_empty(device="cpu")
    for p in dit.parameters():
        p.data.normal_(0, 0.05)
    a = TINY_ADAPTER
    tc = diffusers_anima.AnimaTextConditioner(
        source_dim=a.source_dim, target_dim=a.target_dim, model_dim=a.model_dim, num_layers=a.num_layers,
        num_attention_heads=a.num_heads, mlp_ratio=a.mlp_dim / a.model_dim, target_vocab_size=a.vocab_size,
    )
    tc.load_state_dict({k[len("llm_adapter."):]: v for k, v in dit.state_dict().items()
                        if k.startswith("llm_adapter.")}, strict=True)
    # lora_alpha != r and a per-module override, so a loader that ignores diffusers' metadata merges at the wrong scale
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False,
                        alpha_pattern={"cross_attn.o_proj": 2})
    tc.add_adapter(config, adapter_name="default")
    layers = get_peft_model_state_dict(tc, adapter_name="default")
    out = tmp_path_factory.mktemp("lora")
    AnimaLoraLoaderMixin._save_lora_weights(out, lora_layers={"text_conditioner": layers},
                                            lora_metadata={"text_conditioner": config.to_dict()},
                                            weight_name="tc_lora.safetensors")
    tc.fuse_lora(lora_scale=1.0)
    return dit, tc, out / "tc_lora.safetensors"


def test_file_has_diffusers_text_conditioner_names(saved):
    _, _, path = saved
    lf = parse_lora_file(path)
    assert all(b.startswith("text_conditioner.blocks.") for b in lf.modules)
    assert lf.formats == {"diffusers peft lora": 18}  # the alpha comes from the metadata, not from tensors
    assert "text_conditioner.blocks.1.cross_attn.o_proj" in lf.modules
    meta = json.loads(lf.metadata["lora_adapter_metadata"])
    assert meta["text_conditioner.lora_alpha"] == 8 and meta["text_conditioner.r"] == 4
    from rdbt_cli.discovery import classify

    assert classify(path).details["targets"] == "adapter"  # `rdbt models` says what it changes
    targets = lf.target_names({"dit": saved[0]})
    assert targets["text_conditioner.blocks.0.self_attn.q_proj"] == "dit:llm_adapter.blocks.0.self_attn.q_proj"
    assert None not in targets.values()


def test_merged_adapter_equals_peft(saved):
    dit, tc, path = saved
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    patch = apply_loras({"dit": dit}, [(parse_lora_file(path), 1.0)])
    fused = {k.replace(".base_layer", ""): v for k, v in tc.state_dict().items() if "lora_" not in k}
    changed = 0
    for name, ref in fused.items():
        ours = dit.state_dict()[f"llm_adapter.{name}"]
        assert torch.allclose(ours, ref, atol=1e-6, rtol=0), name
        changed += not torch.equal(before[f"llm_adapter.{name}"], ref)
    # 2 blocks x (4 self + 4 cross projections + mlp.0), all changed, nothing else in the DiT touched
    assert changed == len(patch.patched["dit"]) == 18
    assert all(torch.equal(before[k], v) for k, v in dit.state_dict().items() if not k.startswith("llm_adapter."))
    patch.undo()
    assert all(torch.equal(before[k], v) for k, v in dit.state_dict().items())


@pytest.mark.parametrize("config,scale", [
    ({"transformer.r": 4, "transformer.lora_alpha": 8}, 2.0),
    ({"transformer.lora_alpha": 8, "transformer.use_rslora": True}, 4.0),  # alpha / sqrt(r)
    ({"lora_alpha": 2, "alpha_pattern": {"attn1.to_q": 12}}, 3.0),  # save_lora_adapter's unprefixed config
    ({"transformer.lora_alpha": 4, "transformer.alpha_pattern": {"blocks.1.attn1.to_q": 1}}, 1.0),
])
def test_transformer_lora_alpha_from_metadata(tmp_path, config, scale):
    from safetensors.torch import save_file
    from torch import nn

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 8, generator=g), torch.randn(8, 4, generator=g)
    prefix = "transformer." if any(k.startswith("transformer.") for k in config) else ""
    path = tmp_path / "t.safetensors"
    save_file({f"{prefix}transformer_blocks.0.attn1.to_q.lora_A.weight": a,
               f"{prefix}transformer_blocks.0.attn1.to_q.lora_B.weight": b},
              str(path), metadata={"lora_adapter_metadata": json.dumps(config)})
    dit = nn.Module()
    dit.blocks = nn.ModuleList([nn.Module()])
    dit.blocks[0].self_attn = nn.Module()
    dit.blocks[0].self_attn.q_proj = nn.Linear(8, 8, bias=False).requires_grad_(False)
    w = dit.blocks[0].self_attn.q_proj.weight.clone()
    apply_loras({"dit": dit}, [(parse_lora_file(path), 1.0)])
    assert torch.allclose(dit.blocks[0].self_attn.q_proj.weight, w + scale * (b @ a), atol=1e-5)


@pytest.mark.parametrize("raw,needle", [("{not json", "not a JSON object"), ('{"lora_alpha": "8"}', "not a number")])
def test_damaged_adapter_metadata_is_one_clear_error(tmp_path, raw, needle):
    from safetensors.torch import save_file

    from rdbt_cli.errors import LoraError

    path = tmp_path / "bad.safetensors"
    save_file({"transformer_blocks.0.attn1.to_q.lora_A.weight": torch.ones(2, 8),
               "transformer_blocks.0.attn1.to_q.lora_B.weight": torch.ones(8, 2)},
              str(path), metadata={"lora_adapter_metadata": raw})
    with pytest.raises(LoraError, match=f"bad.safetensors: .*{needle}"):
        parse_lora_file(path)
