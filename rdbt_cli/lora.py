"""LoRA files: reading every format seen for Anima, mapping their keys onto real parameters, merging a weighted stack.

Keys are matched the way ComfyUI does it (comfy/lora.py::model_lora_keys_unet / _clip): every real parameter name is
flattened ('.' -> '_') and registered under each naming a trainer may use, so underscore names (kohya, LyCORIS) map
back to dotted ones without guessing where the underscores were (spec/formats.md §2.3). Works on any nn.Module by its
parameter names; the DiT (with the LLM adapter) and the Qwen3 text encoder are the targets "dit" and "te".

Merging follows ComfyUI's maths (comfy/lora.py::calculate_weight, comfy/weight_adapter/*.py; formats.md §2.4): in fp32
from the original tensor, written back once in the stored dtype; `Patch.undo()` puts the original tensors back.
"""

from __future__ import annotations

import json
import math
import os
import re
import zlib
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from rdbt_cli.config import LORA_REMAPS
from rdbt_cli.discovery import PICKLE_SUFFIXES, file_hashes, read_safetensors_header
from rdbt_cli.errors import CheckpointError, LoraError

# engine.py has the same tuple; lora sits below engine in the import layers, so it cannot take it from there.
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


# ---------------------------------------------------------------------------------------------------------------------
# Kinds
# ---------------------------------------------------------------------------------------------------------------------


def _f32(t: dict[str, torch.Tensor], role: str, device) -> torch.Tensor:
    return t[role].to(device, torch.float32)  # fp32: ComfyUI's intermediate dtype on CPU


def _scale(t: dict[str, torch.Tensor], rank: int | None) -> float:
    """alpha / rank; 1 without an alpha key or a rank (comfy/weight_adapter/*.py)."""
    alpha = t.get("alpha")
    return float(alpha.item()) / rank if alpha is not None and rank is not None else 1.0


class Kind:
    """One adapter type (formats.md §2.1, §2.4): the file-key suffixes it owns, the roles a module needs, and its ΔW.

    Registered in KINDS, which the parser and the merger both read; adding a type is one subclass there. Every kind is
    additive (W + s·scale·ΔW), so a stack of them is order-independent.
    """

    name: str
    suffixes: dict[str, str]  # file-key suffix -> role
    needs: tuple[str, ...] = ()

    def complete(self, roles) -> bool:
        return all(r in roles for r in self.needs)

    def shape(self, t: dict[str, torch.Tensor]) -> tuple[int, ...] | None:
        """ΔW's shape, compared with the parameter's `model_shape` before any merge; None if it changes no weight."""
        raise NotImplementedError

    def model_shape(self, shape: torch.Size) -> tuple[int, ...]:
        return (shape[0], math.prod(shape[1:]))

    def delta(self, t: dict[str, torch.Tensor], device, out: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
        """(ΔW in fp32, 2-D or the parameter's shape; scale) as ComfyUI computes them. A kind may write ΔW into `out`
        (fp32, contiguous, the parameter's numel, on `device`) to save an allocation."""
        raise NotImplementedError


class LoRA(Kind):
    name = "lora"
    suffixes = {
        ".lora_up.weight": "up", ".lora_down.weight": "down",
        ".lora_B.weight": "up", ".lora_A.weight": "down",
        ".lora_B": "up", ".lora_A": "down",
        ".lora_B.default.weight": "up", ".lora_A.default.weight": "down",
        ".lora.up.weight": "up", ".lora.down.weight": "down",
        "_lora.up.weight": "up", "_lora.down.weight": "down",
        ".lora_linear_layer.up.weight": "up", ".lora_linear_layer.down.weight": "down",
    }
    needs = ("up", "down")

    def shape(self, t):
        return (t["up"].shape[0], math.prod(t["down"].shape[1:]))

    def delta(self, t, device, out=None):
        down = _f32(t, "down", device)
        scale = _scale(t, down.shape[0])  # rank = rows of down (comfy/weight_adapter/lora.py)
        up, down = _f32(t, "up", device).flatten(1), down.flatten(1)
        if out is not None:
            return torch.mm(up, down, out=out.view(up.shape[0], down.shape[1])), scale
        return torch.mm(up, down), scale


class LoHa(Kind):
    name = "loha"
    suffixes = {f".hada_w{i}_{j}": f"hada_w{i}_{j}" for i in (1, 2) for j in "ab"}
    needs = tuple(suffixes.values())

    def shape(self, t):
        return (t["hada_w1_a"].shape[0], t["hada_w1_b"].shape[1])

    def delta(self, t, device, out=None):
        w1 = torch.mm(_f32(t, "hada_w1_a", device), _f32(t, "hada_w1_b", device))
        w2 = torch.mm(_f32(t, "hada_w2_a", device), _f32(t, "hada_w2_b", device))
        return w1 * w2, _scale(t, t["hada_w1_b"].shape[0])


class LoKr(Kind):
    """Each Kronecker factor is stored full (`lokr_wN`) or as a product (`lokr_wN_a` @ `lokr_wN_b`)."""

    name = "lokr"
    suffixes = {f".lokr_w{i}{p}": f"lokr_w{i}{p}" for i in (1, 2) for p in ("", "_a", "_b")}

    def complete(self, roles):
        return all(f"lokr_w{i}" in roles or (f"lokr_w{i}_a" in roles and f"lokr_w{i}_b" in roles) for i in (1, 2))

    def shape(self, t):
        (r1, *c1), (r2, *c2) = (t[f"lokr_w{i}"].shape if f"lokr_w{i}" in t else
                                (t[f"lokr_w{i}_a"].shape[0], t[f"lokr_w{i}_b"].shape[1]) for i in (1, 2))
        return (r1 * r2, math.prod(c1) * math.prod(c2))

    def delta(self, t, device, out=None):
        rank = None
        factors = []
        for i in (1, 2):  # with both factorised, w2's rank wins (lokr.py:297-313)
            if f"lokr_w{i}" in t:
                factors.append(_f32(t, f"lokr_w{i}", device))
            else:
                rank = t[f"lokr_w{i}_b"].shape[0]
                factors.append(torch.mm(_f32(t, f"lokr_w{i}_a", device), _f32(t, f"lokr_w{i}_b", device)))
        # α/r only when a factor is factorised; with both full, alpha is ignored even when stored (§2.4 pitfall)
        return torch.kron(factors[0].flatten(1), factors[1].flatten(1)), _scale(t, rank)


class Diff(Kind):
    """A stored full delta of the weight (`diff`, any shape) and/or of the bias (`diff_b`)."""

    name = "diff"
    suffixes = {".diff": "diff", ".diff_b": "diff_b"}

    def shape(self, t):
        return tuple(t["diff"].shape) if "diff" in t else None

    def model_shape(self, shape):
        return tuple(shape)

    def delta(self, t, device, out=None):
        return _f32(t, "diff", device), 1.0  # may be the stored tensor itself: never scale it in place


class DoRA:
    """Weight decomposition on top of any kind: W_c = (W + scale·ΔW)·m/‖·‖, then W + s·(W_c − W)
    (ComfyUI weight_adapter/base.py::weight_decompose). It sees the current weight, so it depends on stack order.

    `dora_scale` follows ComfyUI: one entry per output row → norms of the weight before this patch, else column norms
    of the updated weight. PEFT's `lora_magnitude_vector` (ignored by ComfyUI) follows PEFT: row norms of the updated
    weight, no epsilon.
    """

    suffixes = {
        ".dora_scale": "dora_scale",
        ".lora_magnitude_vector": "magnitude", ".lora_magnitude_vector.weight": "magnitude",
        ".lora_magnitude_vector.default": "magnitude", ".lora_magnitude_vector.default.weight": "magnitude",
    }

    def present(self, t: dict[str, torch.Tensor]) -> bool:
        return "dora_scale" in t or "magnitude" in t

    def apply(self, w: torch.Tensor, delta: torch.Tensor, scale: float, strength: float,
              t: dict[str, torch.Tensor]) -> torch.Tensor:
        out = w.shape[0]
        wc = w + scale * delta
        w2, wc2 = w.reshape(out, -1), wc.reshape(out, -1)
        if "magnitude" in t:
            mag = _f32(t, "magnitude", w.device).reshape(out, 1)
            wc2 = wc2 * (mag / wc2.norm(dim=1, keepdim=True))
        else:
            mag = _f32(t, "dora_scale", w.device)
            eps = torch.finfo(torch.float32).eps
            if mag.shape[0] == out:
                wc2 = wc2 * (mag.reshape(out, 1) / (w2.norm(dim=1, keepdim=True) + eps))
            else:
                wc2 = wc2 * (mag.reshape(1, -1) / (wc2.norm(dim=0, keepdim=True) + eps))
        wc = wc2.reshape(w.shape)
        return wc if strength == 1.0 else w + strength * (wc - w)


KINDS: tuple[Kind, ...] = (LoRA(), LoHa(), LoKr(), Diff())  # a module holding roles of several is the first listed
DORA = DoRA()

# Recognised so the error can name them; rdbt does not merge these (conv-only Tucker forms, OFT, GLoRA, ...).
_UNSUPPORTED = {
    ".lora_mid.weight": "Tucker LoRA (lora_mid)", ".hada_t1": "Tucker LoHa (hada_t1)",
    ".hada_t2": "Tucker LoHa (hada_t2)", ".lokr_t2": "Tucker LoKr (lokr_t2)",
    ".oft_blocks": "OFT/BOFT", ".rescale": "OFT/BOFT",
    ".a1.weight": "GLoRA", ".a2.weight": "GLoRA", ".b1.weight": "GLoRA", ".b2.weight": "GLoRA",
    ".w_norm": "norm diff (w_norm)", ".b_norm": "norm diff (b_norm)", ".set_weight": "set_weight",
    ".reshape_weight": "reshape_weight",
}
# File-key suffix -> role, for every adapter tensor ComfyUI recognises plus PEFT's DoRA magnitude (formats.md §2.1).
_ROLES = {s: r for unit in (*KINDS, DORA) for s, r in unit.suffixes.items()} | {".alpha": "alpha"}
# Longest first, so no suffix shadows a longer one that ends with it.
_SUFFIXES = sorted([*_ROLES, *_UNSUPPORTED], key=len, reverse=True)

# Anima name -> diffusers/ai-toolkit Cosmos name, one row per module, {} = block index
# (formats.md §2.6, anima.md §6.1).
DIFFUSERS_NAMES = {
    "blocks.{}.self_attn.q_proj": "transformer_blocks.{}.attn1.to_q",
    "blocks.{}.self_attn.k_proj": "transformer_blocks.{}.attn1.to_k",
    "blocks.{}.self_attn.v_proj": "transformer_blocks.{}.attn1.to_v",
    "blocks.{}.self_attn.output_proj": "transformer_blocks.{}.attn1.to_out.0",
    "blocks.{}.self_attn.q_norm": "transformer_blocks.{}.attn1.norm_q",
    "blocks.{}.self_attn.k_norm": "transformer_blocks.{}.attn1.norm_k",
    "blocks.{}.cross_attn.q_proj": "transformer_blocks.{}.attn2.to_q",
    "blocks.{}.cross_attn.k_proj": "transformer_blocks.{}.attn2.to_k",
    "blocks.{}.cross_attn.v_proj": "transformer_blocks.{}.attn2.to_v",
    "blocks.{}.cross_attn.output_proj": "transformer_blocks.{}.attn2.to_out.0",
    "blocks.{}.cross_attn.q_norm": "transformer_blocks.{}.attn2.norm_q",
    "blocks.{}.cross_attn.k_norm": "transformer_blocks.{}.attn2.norm_k",
    "blocks.{}.adaln_modulation_self_attn.1": "transformer_blocks.{}.norm1.linear_1",
    "blocks.{}.adaln_modulation_self_attn.2": "transformer_blocks.{}.norm1.linear_2",
    "blocks.{}.adaln_modulation_cross_attn.1": "transformer_blocks.{}.norm2.linear_1",
    "blocks.{}.adaln_modulation_cross_attn.2": "transformer_blocks.{}.norm2.linear_2",
    "blocks.{}.adaln_modulation_mlp.1": "transformer_blocks.{}.norm3.linear_1",
    "blocks.{}.adaln_modulation_mlp.2": "transformer_blocks.{}.norm3.linear_2",
    "blocks.{}.mlp.layer1": "transformer_blocks.{}.ff.net.0.proj",
    "blocks.{}.mlp.layer2": "transformer_blocks.{}.ff.net.2",
    "x_embedder.proj.1": "patch_embed.proj",
    "t_embedder.1.linear_1": "time_embed.t_embedder.linear_1",
    "t_embedder.1.linear_2": "time_embed.t_embedder.linear_2",
    "t_embedding_norm": "time_embed.norm",
    "final_layer.adaln_modulation.1": "norm_out.linear_1",
    "final_layer.adaln_modulation.2": "norm_out.linear_2",
    "final_layer.linear": "proj_out",
}


BASE_BLOCKS = 28  # the released Anima DiT; a LoRA trained on it names blocks 0-27
# Depth expansions whose inserted blocks are known: (base, expanded) -> the new blocks' indices, the others being the
# base blocks in order. Anima-2.9B grows 28 blocks to 40 LLaMA-Pro style (landscape.md §1; the same table as SD.Next's
# pipelines/anima/anima_lora.py BLOCK_EXPANSIONS; ComfyUI-EasyUseAnima remaps "to the 28 inherited block positions").
BLOCK_EXPANSIONS = {(28, 40): (2, 5, 8, 11, 14, 17, 21, 24, 27, 30, 33, 36)}
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def remap_blocks(mode: str, blocks: int, base: int = BASE_BLOCKS) -> dict[int, int]:
    """{block of the `base`-block model: its block in a `blocks`-block expansion}, for `--lora-remap`.

    expand: where each base block went in a known expansion (Anima-2.9B); spread: block i to
    round(i·(blocks−1)/(base−1)), the same relative depth, for expansions without a table; first: as named."""
    if mode == "first":
        return {i: i for i in range(base)}
    if mode == "spread":
        return {i: math.floor(i * (blocks - 1) / (base - 1) + 0.5) for i in range(base)}
    if mode == "expand":
        inserted = BLOCK_EXPANSIONS.get((base, blocks))
        if inserted is None:
            known = ", ".join(f"{b}->{e}" for b, e in BLOCK_EXPANSIONS)
            raise LoraError(f"--lora-remap expand knows the blocks kept by {known} only, not by {base}->{blocks}; use "
                            "--lora-remap spread (same relative depth) or first (blocks as named)")
        return dict(enumerate(n for n in range(blocks) if n not in inserted))
    raise LoraError(f"unknown --lora-remap {mode!r}; choose one of {', '.join(LORA_REMAPS)}")


def _flat(name: str) -> str:
    return name.replace(".", "_")


def _diffusers_name(module: str) -> str | None:
    parts = module.split(".")
    index = next((p for p in parts if p.isdigit()), None)
    for anima, diffusers in DIFFUSERS_NAMES.items():
        if "{}" in anima:
            if index is not None and anima.format(index) == module:
                return diffusers.format(index)
        elif anima == module:
            return diffusers
    return None


def _aliases(target: str, module: str) -> list[str]:
    """Every base name a LoRA file may use for the module `module` of `target` (formats.md §2.1, §2.2, §2.6)."""
    if target == "dit":
        names = [f"diffusion_model.{module}", f"lora_unet_{_flat(module)}", f"lycoris_{_flat(module)}", module,
                 f"base_model.model.{module}"]
        d = _diffusers_name(module)
        if d:
            names += [d, f"transformer.{d}", f"diffusion_model.{d}", f"lora_transformer_{_flat(d)}",
                      f"lycoris_{_flat(d)}"]
        if module.startswith("llm_adapter."):
            # diffusers splits the adapter out as `text_conditioner` (AnimaTextConditioner), its module names those of
            # the adapter without `llm_adapter.` (diffusers lora_conversion_utils::_convert_non_diffusers_anima_lora)
            names.append(f"text_conditioner.{module[len('llm_adapter.'):]}")
        return names
    if target == "te":
        # ComfyUI addresses the Qwen3 TE as qwen3_06b.transformer.model.<name without the HF "model." prefix>.
        inner = module[len("model."):] if module.startswith("model.") else module
        return [f"text_encoders.qwen3_06b.transformer.model.{inner}", f"text_encoders.transformer.model.{inner}",
                f"lora_te_{_flat(inner)}", f"lycoris_te_{_flat(inner)}"]
    return [f"{target}.{module}"]


def _name_index(names: dict[str, list[str]]) -> dict[str, tuple[str, str]]:
    """{LoRA base name: (target, module name)} from {target: real parameter names}."""
    index: dict[str, tuple[str, str]] = {}
    for target, params in names.items():
        for p in params:
            if not p.endswith(".weight"):
                continue
            module = p[: -len(".weight")]
            for alias in _aliases(target, module):
                index.setdefault(alias, (target, module))
    return index


def reference_names(dit_blocks: int = 28, adapter_blocks: int = 6, te_layers: int = 28) -> dict[str, list[str]]:
    """Parameter names of the released Anima DiT/adapter and Qwen3 TE (anima.md §1.3, §1.4), for lookups without a
    model."""
    dit = ["x_embedder.proj.1", "t_embedder.1.linear_1", "t_embedder.1.linear_2", "t_embedding_norm",
           "final_layer.linear", "final_layer.adaln_modulation.1", "final_layer.adaln_modulation.2",
           "llm_adapter.embed", "llm_adapter.out_proj", "llm_adapter.norm"]
    for n in range(dit_blocks):
        for attn in ("self_attn", "cross_attn"):
            dit += [f"blocks.{n}.{attn}.{p}" for p in ("q_proj", "k_proj", "v_proj", "output_proj", "q_norm", "k_norm")]
            dit += [f"blocks.{n}.adaln_modulation_{attn}.{i}" for i in (1, 2)]
        dit += [f"blocks.{n}.adaln_modulation_mlp.{i}" for i in (1, 2)] + [f"blocks.{n}.mlp.layer{i}" for i in (1, 2)]
    for n in range(adapter_blocks):
        b = f"llm_adapter.blocks.{n}"
        for attn in ("self_attn", "cross_attn"):
            dit += [f"{b}.{attn}.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")]
        dit += [f"{b}.norm_self_attn", f"{b}.norm_cross_attn", f"{b}.norm_mlp", f"{b}.mlp.0", f"{b}.mlp.2"]
    te = ["embed_tokens", "norm"]
    for n in range(te_layers):
        te += [f"layers.{n}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")]
        te += [f"layers.{n}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
        te += [f"layers.{n}.input_layernorm", f"layers.{n}.post_attention_layernorm"]
    return {"dit": [f"{m}.weight" for m in dit], "te": [f"{m}.weight" for m in te]}


# ---------------------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class LoraModule:
    """The tensors one file holds for one target module, by role (up, down, alpha, lokr_w1, diff, ...)."""

    base: str
    kind: Kind
    tensors: dict[str, torch.Tensor]
    peft_style: bool = False  # lora_A/lora_B rather than lora_down/lora_up
    keys: dict[str, str] = field(default_factory=dict)  # role -> the file's key, for messages

    @property
    def dora(self) -> bool:
        return DORA.present(self.tensors)

    @property
    def bias(self) -> torch.Tensor | None:
        """A bias delta: ComfyUI merges `diff_b` whatever the module's kind (comfy/lora.py::load_lora)."""
        return self.tensors.get("diff_b")

    @property
    def naming(self) -> str:
        """Which trainer's naming the base name uses (formats.md §2.2)."""
        b = self.base
        for prefix, name in (("lora_unet_", "kohya"), ("lora_te_", "kohya"), ("lycoris_", "lycoris"),
                             ("lora_transformer_", "diffusers"), ("transformer.", "diffusers"),
                             ("text_conditioner.", "diffusers"),
                             ("diffusion_model.", "comfyui"), ("text_encoders.", "comfyui"),
                             ("base_model.model.", "peft")):
            if b.startswith(prefix):
                return name
        return "bare"

    @property
    def format(self) -> str:
        """e.g. 'kohya lora', 'comfyui peft lora' (diffusion-pipe), 'comfyui peft lora+alpha' (kohya hybrid),
        'lycoris lokr', 'diffusers peft lora dora'."""
        kind = self.kind.name
        if self.peft_style:
            kind = "peft lora" + ("+alpha" if "alpha" in self.keys else "")  # a tensor; not diffusers' metadata
        return f"{self.naming} {kind}" + (" dora" if self.dora else "")


@dataclass
class LoraFile:
    path: Path
    modules: dict[str, LoraModule]  # by base name, in file order
    metadata: dict[str, str]
    unrecognised: list[str]  # keys whose suffix is no adapter tensor rdbt knows

    @property
    def n_modules(self) -> int:
        return len(self.modules)

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def formats(self) -> dict[str, int]:
        """{format: number of modules}, e.g. {'kohya lora': 20}."""
        out: dict[str, int] = {}
        for m in self.modules.values():
            out[m.format] = out.get(m.format, 0) + 1
        return out

    def target_names(self, targets: dict[str, nn.Module] | None = None) -> dict[str, str | None]:
        """{base name: 'dit:blocks.0.self_attn.q_proj' or None}, against `targets` or the released Anima names."""
        names = reference_names() if targets is None else _param_names(targets)
        index = _name_index(names)
        return {b: (f"{index[b][0]}:{index[b][1]}" if b in index else None) for b in self.modules}

    @cached_property
    def hashes(self) -> dict[str, str]:
        """{'autov2': ..., 'a1111_lora': ...}, cached by discovery.file_hashes."""
        try:
            return dict(file_hashes(self.path))
        except CheckpointError as exc:
            raise LoraError(str(exc)) from None


# safetensors dtypes a LoRA tensor may have; integers, bools and sub-byte floats are no adapter weights.
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


def _check_shapes(p: Path, header: dict, roles: dict[str, str]) -> None:
    """One module's tensors must agree with each other, from the header alone (no tensor is read): floating-point
    dtypes, no empty dimension, a scalar alpha, and the inner (rank) dimensions of every product equal."""
    shape = {}
    for role, key in roles.items():
        entry = header[key]
        if entry.get("dtype") not in _FLOAT_DTYPES:
            raise LoraError(f"{p}: tensor {key!r} has dtype {entry.get('dtype')}, not a float type; the file is "
                            "damaged or not a LoRA")
        shape[role] = [int(d) for d in entry.get("shape", [])]
        if 0 in shape[role]:
            raise LoraError(f"{p}: tensor {key!r} is empty (shape {shape[role]}); the file is damaged")
    if "alpha" in shape and math.prod(shape["alpha"]) != 1:
        raise LoraError(f"{p}: {roles['alpha']!r} has shape {shape['alpha']}, but alpha is one number; the file is "
                        "damaged")
    # (left factor, right factor) pairs whose inner dimensions must be equal
    pairs = [("up", "down"), ("hada_w1_a", "hada_w1_b"), ("hada_w2_a", "hada_w2_b"), ("lokr_w1_a", "lokr_w1_b"),
             ("lokr_w2_a", "lokr_w2_b")]
    for left, right in pairs:
        if left not in shape or right not in shape:
            continue
        a, b = shape[left], shape[right]
        if len(a) < 2 or len(b) < 2 or a[1] != b[0]:
            raise LoraError(f"{p}: {roles[left]!r} {a} and {roles[right]!r} {b} do not agree (the rank differs); "
                            "the file is damaged or was edited, download it again")
    if "hada_w1_a" in shape and (shape["hada_w1_a"][0], shape["hada_w1_b"][1]) != (
            shape["hada_w2_a"][0], shape["hada_w2_b"][1]):
        raise LoraError(f"{p}: the two LoHa products of {roles['hada_w1_a'].rsplit('.', 1)[0]!r} have different "
                        "shapes; the file is damaged")
    for role in ("lokr_w1", "lokr_w2", "diff"):
        if role in shape and len(shape[role]) < (2 if role != "diff" else 1):
            raise LoraError(f"{p}: tensor {roles[role]!r} has shape {shape[role]}, too few dimensions; the file is "
                            "damaged")


def _check_values(lf: LoraFile, mod: LoraModule) -> None:
    """NaN or inf in a file would turn the merged weights, and so the image, into NaN (a black picture): refuse it,
    naming the key. One pass over tensors the merge reads anyway."""
    for role, t in mod.tensors.items():
        if not torch.isfinite(t.float() if t.dtype in FP8_DTYPES else t).all():
            raise LoraError(f"{lf.path}: tensor {mod.keys.get(role, mod.base + ' ' + role)!r} holds NaN or infinite "
                            "values (a diverged training run or a damaged file); use another version of the LoRA")


def parse_lora_file(path: str | os.PathLike) -> LoraFile:
    """Read a .safetensors LoRA (never a pickle) and group its tensors by target module."""
    p = Path(path)
    if not p.exists():
        raise LoraError(f"{p}: LoRA file not found; check the path, or the name in `rdbt lora-stack --list`")
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise LoraError(
            f"{p}: pickle LoRAs ({p.suffix}) can run arbitrary code and are never loaded; use a .safetensors LoRA"
        )
    try:
        header, meta = read_safetensors_header(p)
    except CheckpointError as exc:
        raise LoraError(str(exc)) from None
    groups: dict[str, dict[str, str]] = {}  # {base name: {role: key}}
    unrecognised = []
    for key in header:
        suffix = next((s for s in _SUFFIXES if key.endswith(s) and len(key) > len(s)), None)
        if suffix is None:
            unrecognised.append(key)
        elif suffix in _UNSUPPORTED:
            raise LoraError(
                f"{p}: uses {_UNSUPPORTED[suffix]} (key {key!r}), which rdbt cannot merge; "
                "use a LoRA/LoHa/LoKr/DoRA/diff file"
            )
        else:
            groups.setdefault(key[: -len(suffix)], {})[_ROLES[suffix]] = key
    kinds = {}
    for base, roles in groups.items():
        kind = next((k for k in KINDS if any(r in roles for r in k.suffixes.values())), None)
        if kind is None or not kind.complete(roles):
            raise LoraError(
                f"{p}: module {base!r} has only {sorted(roles)} — an incomplete adapter; the file is damaged or "
                "not a LoRA"
            )
        kinds[base] = kind
        _check_shapes(p, header, roles)
    modules: dict[str, LoraModule] = {}
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            for base, roles in groups.items():
                tensors = {role: f.get_tensor(key) for role, key in roles.items()}
                peft = any(k.endswith(("lora_A.weight", "lora_A", "lora_A.default.weight")) for k in roles.values())
                modules[base] = LoraModule(base, kinds[base], tensors, peft_style=peft, keys=dict(roles))
    except Exception as exc:  # safetensors raises its own types for damaged files
        raise LoraError(f"{p}: could not read tensors ({exc}); download the LoRA again") from None
    if not modules and not unrecognised:
        raise LoraError(f"{p}: holds no tensors; it is not a LoRA")
    _peft_alphas(p, meta, modules)
    return LoraFile(p, modules, dict(meta), unrecognised)


def _pattern_value(patterns, name: str, default):
    """PEFT's per-module override (`alpha_pattern`): the first key that matches the end of the module's name
    (peft.utils.other.get_pattern_key)."""
    for key, value in (patterns.items() if isinstance(patterns, dict) else ()):
        try:
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        except re.error:
            continue
    return default


def _peft_alphas(p: Path, meta: dict, modules: dict[str, LoraModule]) -> None:
    """diffusers stores PEFT's lora_alpha not as `.alpha` tensors but in the metadata (`lora_adapter_metadata`: the
    LoraConfig as JSON, every key prefixed with its component, `transformer.` or `text_conditioner.`, when saved from
    a pipeline). PEFT scales ΔW by lora_alpha / r (/ √r with use_rslora); without it a LoRA saved with lora_alpha ≠ r
    would merge at the wrong strength. The scale becomes an alpha tensor, so merging has one rule for every file."""
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return
    try:
        config = json.loads(raw)
    except ValueError:
        config = None
    if not isinstance(config, dict):
        raise LoraError(f"{p}: its lora_adapter_metadata is not a JSON object; the file is damaged, download it again")
    for base, mod in modules.items():
        if not mod.peft_style or mod.kind.name != "lora" or "alpha" in mod.tensors:
            continue
        component = next((c for c in ("transformer", "text_conditioner") if base.startswith(c + ".")), None)

        def get(key, component=component):
            return config.get(f"{component}.{key}", config.get(key)) if component else config.get(key)

        alpha = get("lora_alpha")
        if alpha is None:
            continue
        alpha = _pattern_value(get("alpha_pattern"), base[len(component) + 1:] if component else base, alpha)
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
            raise LoraError(f"{p}: lora_alpha {alpha!r} in its metadata is not a number; the file is damaged")
        rank = mod.tensors["down"].shape[0]
        scale = alpha / math.sqrt(rank) if get("use_rslora") else alpha / rank
        mod.tensors["alpha"] = torch.tensor(scale * rank, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------------------
# Merging
# ---------------------------------------------------------------------------------------------------------------------


def _param_names(targets: dict[str, nn.Module]) -> dict[str, list[str]]:
    return {t: [n for n, _ in m.named_parameters()] for t, m in targets.items()}


@dataclass
class Patch:
    """What `apply_loras` changed, and how to put it back."""

    patched: dict[str, list[str]] = field(default_factory=dict)  # {target: parameter names changed}
    warnings: list[str] = field(default_factory=list)  # unmatched keys kept with allow_unmatched
    _saved: list[tuple[nn.Module, str, torch.Tensor, bool, object]] = field(default_factory=list, repr=False)

    @property
    def n_patched(self) -> int:
        return sum(len(v) for v in self.patched.values())

    def undo(self) -> None:
        """Put back the very tensors that were there before (bit for bit); a second call does nothing."""
        for module, attr, original, had_scale, old_scale in reversed(self._saved):
            getattr(module, attr).data = original
            if had_scale:
                module.weight_scale = old_scale
        self._saved.clear()
        self.patched = {}


def _summary(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" … (+{len(keys) - limit} more)" if len(keys) > limit else "")


def _strengths(weight) -> dict[str, float]:
    """A LoRA's weight: one number for every target, or (model, te) like ComfyUI's strength_model/strength_clip."""
    if isinstance(weight, (tuple, list)):
        model, te = weight
        return {"te": float(te), "*": float(model)}
    return {"*": float(weight)}


def apply_loras(
    targets: dict[str, nn.Module],
    loras: list[tuple[LoraFile, float | tuple[float, float]]],
    *,
    allow_unmatched: bool = False,
    remap: str = "refuse",
) -> Patch:
    """Merge Σ sᵢ·scaleᵢ·ΔWᵢ of the stack into `targets` ({"dit": dit, "te": te}); undo with `Patch.undo()`.

    A weight is one strength for every target, or (model, te) like ComfyUI's strength_model / strength_clip (the LLM
    adapter is part of the model). Every file is checked against the models before any weight changes: a file none of
    whose modules fit, or (unless `allow_unmatched`) one with modules that do not fit, raises LoraError.

    A LoRA whose DiT blocks all lie below 28 met with a deeper DiT (a 40/52-block expansion) was most likely made for
    the 28-block model, whose block numbers name other blocks there: refused unless `remap` (config.LORA_REMAPS) says
    how to move them (`remap_blocks`).
    """
    names = _param_names(targets)
    index = _name_index(names)
    params = {t: dict(m.named_parameters()) for t, m in targets.items()}
    depth = len({m.group(1) for n in names.get("dit", ()) if (m := _BLOCK.match(n))})
    patch = Patch()
    plan: dict[tuple[str, str], list[tuple[LoraFile, LoraModule, float]]] = {}  # in stack order
    for lf, weight in loras:
        strength = _strengths(weight)
        bad: list[str] = []
        fits = []
        moved = _moved_blocks(lf, index, depth, remap)
        for base, mod in lf.modules.items():
            hit = index.get(base)
            if hit is None:
                bad.append(base)
                continue
            target, module = hit
            if moved and target == "dit" and (m := _BLOCK.match(module)):
                module = f"blocks.{moved[int(m.group(1))]}.{module[m.end():]}"
            w = params[target][f"{module}.weight"]
            shape, want = mod.kind.shape(mod.tensors), mod.kind.model_shape(w.shape)
            if shape is not None and shape != want:
                bad.append(f"{base} (shape {list(shape)}, model {list(want)})")
                continue
            if mod.bias is not None:
                b = params[target].get(f"{module}.bias")
                if b is None or b.shape != mod.bias.shape:
                    bad.append(f"{base}.diff_b (the model's {module} has no bias of that shape)")
                    continue
            if mod.dora:
                out, cols = w.shape[0], math.prod(w.shape[1:])
                mag = mod.tensors.get("magnitude", mod.tensors.get("dora_scale"))
                if mag.numel() not in ((out,) if "magnitude" in mod.tensors else (out, cols)):
                    bad.append(f"{base} (DoRA magnitude of {mag.numel()} values, model {list(w.shape)})")
                    continue
            fits.append((target, module, mod, shape is not None))
        bad += lf.unrecognised
        total = lf.n_modules + len(lf.unrecognised)
        if not fits:
            raise LoraError(
                f"{lf.path}: 0 of {total} modules match this model ({_summary(bad, 3)}); it was made for another "
                "model or another size of Anima"
            )
        if bad and not allow_unmatched:
            raise LoraError(
                f"{lf.path}: {len(bad)} of {total} modules do not match this model: {_summary(bad)}; "
                "use a LoRA made for this model, or allow unmatched keys to apply the rest"
            )
        patch.warnings += [f"{lf.path.name}: not loaded: {k}" for k in bad]
        for target, module, mod, has_weight in fits:
            s = strength.get(target, strength["*"])
            if s == 0.0:
                continue  # W + 0·ΔW is W: skip the work (the file was still checked against the model)
            _check_values(lf, mod)
            if has_weight:
                plan.setdefault((target, f"{module}.weight"), []).append((lf, mod, s))
            if mod.bias is not None:
                plan.setdefault((target, f"{module}.bias"), []).append((lf, mod, s))
    scratch = _Scratch(max((params[t][p].numel() for t, p in plan), default=0))
    try:
        for (target, pname), items in plan.items():
            if not any(mod.dora for _, mod, _ in items):
                # Additive kinds commute; a fixed order makes the fp32 sum bit-identical whatever the stack order.
                items = sorted(items, key=lambda it: (str(it[0].path), it[2], it[1].base))
            _merge_one(targets[target], target, pname, items, patch, scratch)
    except BaseException:
        patch.undo()  # all or nothing: a refused merge (or Ctrl-C) leaves the model as it was
        raise
    return patch


def _moved_blocks(lf: LoraFile, index: dict, depth: int, remap: str) -> dict[int, int] | None:
    """The block remap for one file on a `depth`-block DiT: None when its blocks need no moving."""
    used = [int(m.group(1)) for base in lf.modules if (hit := index.get(base)) and hit[0] == "dit"
            and (m := _BLOCK.match(hit[1]))]
    if depth <= BASE_BLOCKS or not used or max(used) >= BASE_BLOCKS:
        return None
    if remap == "refuse":
        raise LoraError(
            f"{lf.path}: made for the {BASE_BLOCKS}-block Anima (its blocks stop at {max(used)}), but this model has "
            f"{depth} blocks, where those numbers name other blocks; choose --lora-remap expand (where Anima-2.9B "
            f"keeps the {BASE_BLOCKS} blocks), spread (block i to i*{depth - 1}/{BASE_BLOCKS - 1}) or first (as "
            "named, for a LoRA trained on this model)")
    return None if remap == "first" else remap_blocks(remap, depth)


def _term(mod: LoraModule, shape, device, is_bias: bool, out=None) -> tuple[torch.Tensor, float]:
    """(ΔW in fp32 shaped like the parameter, scale); ΔW is `out`, a fresh tensor, or a stored diff (never scale it
    in place)."""
    if is_bias:
        return mod.bias.to(device, torch.float32), 1.0
    delta, scale = mod.kind.delta(mod.tensors, device, out=None if mod.dora else out)
    return delta.reshape(shape), scale


class _Scratch:
    """Two reusable fp32 buffers per device: fresh 64 MB temporaries per weight cost more in page faults than in
    maths (a full-DiT merge on CPU went from 49 s to 11 s)."""

    def __init__(self, numel: int):
        self.numel, self.bufs = numel, {}

    def get(self, device: torch.device, shape) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self.bufs:
            self.bufs[device] = (torch.empty(self.numel, device=device), torch.empty(self.numel, device=device))
        n = math.prod(shape)
        return tuple(b[:n].view(shape) for b in self.bufs[device])


def _merge_one(root: nn.Module, target: str, pname: str, items, patch: Patch, scratch: _Scratch) -> None:
    module_name, attr = pname.rsplit(".", 1)
    module = root.get_submodule(module_name)
    param = getattr(module, attr)
    original = param.data
    is_bias = attr == "bias"
    fp8 = original.dtype in FP8_DTYPES
    scale_owner = attr == "weight" and fp8 and hasattr(module, "weight_scale")
    old_scale = module.weight_scale if scale_owner else None
    if fp8 or any(mod.dora for _, mod, _ in items):
        # Terms that see the current weight (DoRA) or a dequantised one: one working fp32 copy, patches in order.
        w = original.to(torch.float32, copy=True)
        if old_scale is not None:
            w = w * old_scale.to(w.device, torch.float32)
        for _, mod, s in items:
            delta, scale = _term(mod, w.shape, w.device, is_bias)
            if mod.dora:
                w = DORA.apply(w, delta, scale, s, mod.tensors)
            else:
                w += (s * scale) * delta
        new = w
    else:
        # Σ sᵢ·scaleᵢ·ΔWᵢ first, then + W. ComfyUI forms c = strength·(α/r) as one double and adds c·ΔW
        # (formats.md §2.4), so a single LoRA is bit-identical to ComfyUI's W + c·ΔW (addition commutes).
        acc, tmp = scratch.get(original.device, original.shape)
        for i, (_, mod, s) in enumerate(items):
            buf = acc if i == 0 else tmp
            delta, scale = _term(mod, original.shape, original.device, is_bias, out=buf)
            c = s * scale
            delta = delta.mul_(c) if delta.data_ptr() == buf.data_ptr() else c * delta
            if i == 0:
                if delta.data_ptr() != acc.data_ptr():
                    acc.copy_(delta)
            else:
                acc.add_(delta)
        tmp.copy_(original)  # the upcast W; fp32 + fp32 in place is much faster than a mixed-dtype add
        new = acc.add_(tmp)
    if fp8:
        _check_merged(new, items, target, pname, original.dtype)
        new, new_scale = _to_fp8(new, original.dtype, f"{target}.{pname}", rescale=scale_owner)
    else:
        new, new_scale = new.to(original.dtype, copy=True), None  # copy: never keep a scratch buffer
        _check_merged(new, items, target, pname, original.dtype)
    if original.device.type == "cpu" and original.is_pinned():
        new = new.pin_memory()  # a streamed block's weights stay pinned, so their uploads stay asynchronous
    patch._saved.append((module, attr, original, scale_owner, old_scale))
    param.data = new
    if scale_owner:
        module.weight_scale = new_scale
    patch.patched.setdefault(target, []).append(pname)


def _check_merged(new: torch.Tensor, items, target: str, pname: str, dtype: torch.dtype) -> None:
    """Finite tensors can still overflow the stored dtype (fp16 ends at 65504): refuse rather than make NaN images."""
    if not torch.isfinite(new).all():
        files = ", ".join(sorted({str(lf.path) for lf, _, _ in items}))
        raise LoraError(f"{files}: merged into {target}.{pname} the LoRA gives values beyond what {dtype} holds; "
                        "lower its weight, or use --dtype fp32")


def _to_fp8(
    w: torch.Tensor, dtype: torch.dtype, key: str, *, rescale: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Back to fp8 with a fresh per-tensor scale (when the layer has one) and stochastic rounding seeded by the key.

    Round-to-nearest would erase deltas below half an fp8 step (3 mantissa bits); stochastic rounding keeps them in
    expectation, as ComfyUI does (comfy/float.py::stochastic_rounding; formats.md §3).
    """
    fmax = torch.finfo(dtype).max
    scale = None
    if rescale:
        scale = (w.abs().amax().float() / fmax).clamp(min=1e-12)
        w = w / scale
    w = w.clamp(-fmax, fmax)
    near = w.to(dtype)
    v = near.float()
    bits = near.view(torch.uint8)
    # The other fp8 neighbour of w: one step further from zero when |w| > |v|, else one step towards zero.
    away = w.abs() > v.abs()
    mag = bits & 0x7F
    sign = torch.where(torch.signbit(w), 0x80, 0).to(torch.uint8)
    other_mag = torch.where(away, mag + 1, mag - 1).to(torch.uint8)
    other_mag = torch.where((mag == 0) & ~away, torch.zeros_like(mag), other_mag)
    other = (other_mag | sign).view(dtype)
    ov = other.float()
    gap = (ov - v).abs()
    p = torch.where(gap > 0, (w - v).abs() / torch.where(gap > 0, gap, torch.ones_like(gap)), torch.zeros_like(gap))
    gen = torch.Generator(device="cpu").manual_seed(zlib.crc32(key.encode()))
    u = torch.rand(w.shape, generator=gen).to(w.device)
    q = torch.where((u < p) & torch.isfinite(ov), other, near)
    return q, scale
