"""The single-file inference engine for Anima: LLM adapter + Cosmos-Predict2 DiT, Qwen3 text encoder, Wan 2.1 VAE.

Every nn.Module's attribute names equal the released checkpoints' keys (after the file's prefix is stripped), so
loading is a plain strict `load_state_dict`. Every size is inferred from tensor shapes, never hard-coded.
Reference behaviour: ComfyUI (comfy/ldm/cosmos/predict2.py, comfy/ldm/anima/model.py, comfy/text_encoders/llama.py,
comfy/ldm/wan/vae.py), as written up in spec/anima.md. forward() is tensor in, tensor out: no I/O, no printing.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rdbt_cli.discovery import is_ignored_key, read_safetensors_header, strip_prefix
from rdbt_cli.errors import CheckpointError, CheckpointMismatch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


# ---------------------------------------------------------------------------------------------------------------------
# Shared layers
# ---------------------------------------------------------------------------------------------------------------------


class Linear(nn.Linear):
    """nn.Linear whose weight may be stored in another dtype (fp8, bf16) and is cast per call.

    fp8 weights stay fp8 in memory; `weight_scale` (set by the loader for ComfyUI "scaled fp8" files) multiplies the
    upcast weight. When the stored dtype equals the activation dtype this is exactly F.linear.
    """

    weight_scale: torch.Tensor | None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.weight_scale = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if w.dtype != x.dtype:
            w = w.to(x.dtype)
            if self.weight_scale is not None:
                w = w * self.weight_scale.to(x.dtype)
        if b is not None and b.dtype != x.dtype:
            b = b.to(x.dtype)
        return F.linear(x, w, b)


# ---------------------------------------------------------------------------------------------------------------------
# Loading: safetensors only, memory-mapped, onto modules built on the meta device, strict
# ---------------------------------------------------------------------------------------------------------------------

# ComfyUI's "scaled fp8" formats keep a per-layer scale next to the weight (formats.md §1.5).
_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
_QUANT_EXTRA_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant", ".weight_scale_2")


def read_checkpoint(path: str | os.PathLike, prefixes: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a .safetensors file memory-mapped; strip the most common of `prefixes`; drop recomputed buffers.

    Returns (state dict, __metadata__). The tensors stay backed by the file until they are cast or moved.
    """
    from safetensors import safe_open

    path = Path(path)
    header, meta = read_safetensors_header(path)
    prefix = strip_prefix(header.keys(), prefixes) if prefixes else ""
    sd: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                if not key.startswith(prefix) or is_ignored_key(key):
                    continue
                sd[key[len(prefix) :]] = f.get_tensor(key)
    except Exception as exc:  # safetensors raises its own types for damaged files
        raise CheckpointError(f"{path}: could not read tensors ({exc}); download the file again") from None
    return sd, meta


def split_fp8_scales(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove ComfyUI scaled-fp8 side tensors from `sd`; return {module name: weight scale}."""
    sd.pop("scaled_fp8", None)
    scales = {}
    for key in list(sd):
        if key.endswith(_SCALE_SUFFIXES):
            scales[key.rsplit(".", 1)[0]] = sd.pop(key).float()
        elif key.endswith(_QUANT_EXTRA_SUFFIXES):
            sd.pop(key)
    return scales


def _summarise(keys, limit: int = 6) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" … (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_into(
    module: nn.Module,
    sd: dict[str, torch.Tensor],
    path: str | os.PathLike,
    what: str,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    keep_fp8: bool = True,
) -> nn.Module:
    """Assign `sd` to `module` (built on the meta device) after checking every key and shape.

    Floating tensors are cast to `dtype` (fp8 ones only when `keep_fp8` is false; they are then dequantised with their
    scale). One copy of the weights in memory: tensors that need no cast stay the file's memory map.
    """
    scales = split_fp8_scales(sd)
    expected = module.state_dict()
    missing = expected.keys() - sd.keys()
    unexpected = sd.keys() - expected.keys()
    wrong = [
        f"{k} {tuple(sd[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in expected.keys() & sd.keys()
        if sd[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys: {_summarise(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_summarise(unexpected)}")
        if wrong:
            parts.append(f"{len(wrong)} keys of the wrong shape: {_summarise(wrong, 3)}")
        raise CheckpointMismatch(f"{path}: not a {what} file this rdbt can load — " + "; ".join(parts))
    for k, v in sd.items():
        target = expected[k].dtype if not v.is_floating_point() else (dtype or v.dtype)
        if v.dtype in FP8_DTYPES and keep_fp8:
            target = v.dtype
        elif v.dtype in FP8_DTYPES:
            v = v.to(torch.float32) * scales.pop(k.rsplit(".", 1)[0], torch.tensor(1.0))
        sd[k] = v.to(device=device, dtype=target)
    module.load_state_dict(sd, strict=True, assign=True)
    for name, scale in scales.items():
        layer = module.get_submodule(name)
        if isinstance(layer, Linear):
            layer.weight_scale = scale.to(device)
    return module
