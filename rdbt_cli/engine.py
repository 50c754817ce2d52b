"""The single-file inference engine for Anima: LLM adapter + Cosmos-Predict2 DiT, Qwen3 text encoder, Wan 2.1 VAE.

Every nn.Module's attribute names equal the released checkpoints' keys (after the file's prefix is stripped), so
loading is a plain strict `load_state_dict`. Every size is inferred from tensor shapes, never hard-coded.
Reference behaviour: ComfyUI (comfy/ldm/cosmos/predict2.py, comfy/ldm/anima/model.py, comfy/text_encoders/llama.py,
comfy/ldm/wan/vae.py), as written up in spec/anima.md. forward() is tensor in, tensor out: no I/O, no printing.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rdbt_cli.config import ATTENTION_BACKENDS, AdapterParams, DiTParams, QwenParams, VAEParams
from rdbt_cli.discovery import (
    DIT_FILE,
    TE_FILE,
    VAE_FILE,
    FileFormat,
    check_model_file,
    is_gguf,
    is_ignored_key,
    read_safetensors_header,
    strip_prefix,
)
from rdbt_cli.errors import CheckpointError, CheckpointMismatch, ConfigError

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


# ---------------------------------------------------------------------------------------------------------------------
# Shared layers
# ---------------------------------------------------------------------------------------------------------------------


def half_dtype(device: torch.device | str) -> torch.dtype:
    """The 16-bit compute dtype for a device: bf16 on GPUs with bf16 tensor cores (Ampere on), fp16 before them
    (bf16 there is emulated and slow), bf16 on the CPU."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        return torch.float16
    return torch.bfloat16


class Linear(nn.Linear):
    """nn.Linear whose weight may be stored in another dtype (fp8, bf16) and is cast per call.

    fp8 weights stay fp8 in memory; `weight_scale` (set by the loader for ComfyUI "scaled fp8" files) multiplies the
    upcast weight. When the stored dtype equals the activation dtype this is exactly F.linear.
    """

    weight_scale: torch.Tensor | None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # A non-persistent buffer: follows .to(device), never appears in state_dict() (so strict loads ignore it).
        self.register_buffer("weight_scale", None, persistent=False)

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


_FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def read_checkpoint(
    path: str | os.PathLike, prefixes: tuple[str, ...] = (), cast: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a .safetensors file; strip the most common of `prefixes`; drop recomputed buffers.

    Returns (state dict, __metadata__). Tensors kept in their stored dtype stay memory-mapped (no copy). Floating
    tensors that must become `cast` are read one at a time and converted, so host memory peaks at the converted
    weights plus one tensor, not at both full copies (a bf16 file loaded as fp32: 2x the file, not 3x).
    """
    import struct

    from safetensors import safe_open

    path = Path(path)
    header, meta = read_safetensors_header(path)
    prefix = strip_prefix(header.keys(), prefixes) if prefixes else ""
    sd: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f, open(path, "rb") as raw:
            data_start = 8 + struct.unpack("<Q", raw.read(8))[0]
            scratch = torch.empty(0, dtype=torch.uint8)  # one reusable read buffer for the tensors being cast
            for key in f.keys():
                if not key.startswith(prefix) or is_ignored_key(key):
                    continue
                entry = header[key]
                stored = _FLOAT_DTYPES.get(entry["dtype"])
                side_tensor = key.endswith(_SCALE_SUFFIXES + _QUANT_EXTRA_SUFFIXES) or key.endswith("scaled_fp8")
                if cast is None or stored is None or stored == cast or side_tensor:
                    sd[key[len(prefix) :]] = f.get_tensor(key)
                    continue
                begin, end = entry["data_offsets"]
                if scratch.numel() < end - begin:
                    scratch = torch.empty(end - begin, dtype=torch.uint8)
                raw.seek(data_start + begin)
                view = scratch[: end - begin]
                if raw.readinto(memoryview(view.numpy())) != end - begin:
                    raise CheckpointError(f"{path}: file ended inside tensor {key!r}; download it again")
                sd[key[len(prefix) :]] = view.view(stored).reshape(entry["shape"]).to(cast)
    except Exception as exc:  # safetensors raises its own types for damaged files
        raise CheckpointError(f"{path}: could not read tensors ({exc}); download the file again") from None
    return sd, meta


def read_gguf(path: str | os.PathLike, cast: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """An Anima DiT stored as GGUF the way ComfyUI-GGUF writes it (tools/convert.py, arch `cosmos`; formats.md §1.6),
    keys stripped of their prefix.

    ggml lists a tensor's dimensions fastest first, so the torch shape is the reverse, unless the file records it as
    `comfy.gguf.orig_shape.<name>` (loader.py::get_orig_shape). Every tensor is dequantised here, once, on the CPU,
    by the gguf package (gguf.quants.dequantize), and kept as `cast` (fp32 when None): the model then runs like a
    .safetensors one and LoRAs merge as usual. Dequantising per layer at run time would keep a GPU's memory at the
    file's size instead; that is not done yet.
    """
    import gguf

    path = Path(path)
    check_model_file(path)  # the header's own checks name what is wrong (truncated, a text encoder, ...)
    try:
        reader = gguf.GGUFReader(path)
        tensors = list(reader.tensors)
    except Exception as exc:  # the reader raises ValueError, IndexError, struct/numpy errors on damaged files
        raise CheckpointError(f"{path}: not a readable GGUF file ({str(exc)[:120]}); download it again") from None
    prefix = DIT_FILE.locate({t.name for t in tensors}, path)

    def dequantise(t) -> torch.Tensor:
        try:
            field = reader.get_field(f"comfy.gguf.orig_shape.{t.name}")
            shape = ([int(field.parts[i][0]) for i in field.data] if field is not None
                     else [int(n) for n in reversed(t.shape)])
            qtype = gguf.GGMLQuantizationType(t.tensor_type)
            data = np.asarray(t.data)
            if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                array = np.array(data, copy=True)  # off the read-only memory map
            else:
                array = gguf.quants.dequantize(data, qtype)
            if array.size != math.prod(shape):
                raise ValueError(f"{array.size} values for shape {shape}")
            return torch.from_numpy(array).reshape(shape).to(cast or torch.float32)
        except Exception as exc:
            raise CheckpointError(f"{path}: GGUF tensor {t.name!r} cannot be read ({str(exc)[:120]}); the file is "
                                  "damaged, download it again") from None

    from concurrent.futures import ThreadPoolExecutor

    wanted = [t for t in tensors if t.name.startswith(prefix) and not is_ignored_key(t.name)]
    # numpy's dequantisation releases the GIL: threads scale it with the cores (2 threads: 1.9x), a few fp32 tensors
    # in flight at a time
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return {t.name[len(prefix):]: v for t, v in zip(wanted, pool.map(dequantise, wanted))}


def _read_as(fmt: FileFormat, path: Path, cast: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The state dict of a file that must be of `fmt`'s kind, keys stripped of the prefix its markers sit under."""
    header, _ = read_safetensors_header(path)
    return read_checkpoint(path, (fmt.locate(header, path),), cast)[0]


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
        try:
            layer = module.get_submodule(name)
        except AttributeError:
            raise CheckpointMismatch(f"{path}: fp8 scale for {name}, which is not a layer of a {what}") from None
        if isinstance(layer, Linear):
            layer.weight_scale = scale.to(device)
    return module


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension, eps 1e-6, weight used as is (no +1); the weight is cast to the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


class Embedding(nn.Embedding):
    """nn.Embedding whose rows are returned in `dtype` (the table may be stored in another precision)."""

    def reset_parameters(self) -> None:
        # Built on the meta device and then assigned from a file: nothing to initialise, and normal_ on a meta
        # tensor costs seconds on first use (it imports torch's symbolic-shape machinery).
        if self.weight.device.type != "meta":
            super().reset_parameters()

    def forward(self, ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        out = F.embedding(ids, self.weight)
        return out if dtype is None else out.to(dtype)


_attention_backend = "sdpa"


def set_attention_backend(name: str) -> None:
    """Choose the attention kernel: "sdpa" (PyTorch, default) or "xformers" (used for CUDA tensors only)."""
    global _attention_backend
    if name not in ATTENTION_BACKENDS:
        raise ConfigError(f"unknown attention backend {name!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
    if name == "xformers" and importlib.util.find_spec("xformers") is None:
        raise ConfigError("attention backend 'xformers' needs the xformers package; pip install xformers or use sdpa")
    _attention_backend = name


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked softmax attention, scale 1/sqrt(head_dim). q: [B, H, L, D], k/v: [B, H, S, D] -> [B, L, H*D]."""
    if _attention_backend == "xformers" and q.is_cuda:
        import xformers.ops  # optional dependency, imported only when chosen

        out = xformers.ops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.flatten(2)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


# ---------------------------------------------------------------------------------------------------------------------
# LLM adapter (anima/model.py LLMAdapter): T5-id queries cross-attending to Qwen3 hidden states
# ---------------------------------------------------------------------------------------------------------------------


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope_tables(n: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D rotate-half RoPE cos/sin (n, head_dim) in fp32: pair i <-> i + d/2 (Qwen3 and the LLM adapter)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    freqs = torch.arange(n, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]  # (N, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _adapter_rope(n: int, head_dim: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    # Computed in fp32, then rounded to the compute dtype as ComfyUI does.
    cos, sin = _rope_tables(n, head_dim, 10000.0, device)
    return cos.to(dtype), sin.to(dtype)


class _QKNormAttention(nn.Module):
    """q/k/v projections with per-head RMSNorm on q and k, shared by the LLM adapter and the DiT. The output
    projection is named as each checkpoint names it (`o_proj` in the adapter, `output_proj` in the DiT)."""

    out_name = ""

    def __init__(self, dim: int, context_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = Linear(dim, dim, bias=False)
        self.k_proj = Linear(context_dim, dim, bias=False)
        self.v_proj = Linear(context_dim, dim, bias=False)
        setattr(self, self.out_name, Linear(dim, dim, bias=False))
        self.q_norm = RMSNorm(dim // num_heads)
        self.k_norm = RMSNorm(dim // num_heads)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        return self.q_norm(self.q_proj(x).view(B, L, self.num_heads, -1))  # (B, L, H, D)

    def keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, S, _ = context.shape
        k = self.k_norm(self.k_proj(context).view(B, S, self.num_heads, -1))  # (B, S, H, D)
        return k, self.v_proj(context).view(B, S, self.num_heads, -1)


class AdapterAttention(_QKNormAttention):
    out_name = "o_proj"

    def forward(self, x, context, rope_q, rope_k):
        q, (k, v) = self.query(x), self.keys_values(context)
        (cq, sq), (ck, sk) = rope_q, rope_k
        q = q * cq[:, None] + _rotate_half(q) * sq[:, None]
        k = k * ck[:, None] + _rotate_half(k) * sk[:, None]
        return self.o_proj(attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)))


class AdapterBlock(nn.Module):
    def __init__(self, p: AdapterParams):
        super().__init__()
        self.norm_self_attn = RMSNorm(p.model_dim)
        self.self_attn = AdapterAttention(p.model_dim, p.model_dim, p.num_heads)
        self.norm_cross_attn = RMSNorm(p.model_dim)
        self.cross_attn = AdapterAttention(p.model_dim, p.source_dim, p.num_heads)
        self.norm_mlp = RMSNorm(p.model_dim)
        self.mlp = nn.Sequential(Linear(p.model_dim, p.mlp_dim), nn.GELU(), Linear(p.mlp_dim, p.model_dim))

    def forward(self, x, source, rope_x, rope_src):
        h = self.norm_self_attn(x)
        x = x + self.self_attn(h, h, rope_x, rope_x)
        x = x + self.cross_attn(self.norm_cross_attn(x), source, rope_x, rope_src)
        return x + self.mlp(self.norm_mlp(x))


class LLMAdapter(nn.Module):
    """Qwen3 hidden states [B, N, source_dim] + T5 ids [B, M] -> DiT context rows [B, M, target_dim]. No masks."""

    def __init__(self, p: AdapterParams):
        super().__init__()
        if p.model_dim % p.num_heads or (p.model_dim // p.num_heads) % 2:
            raise ConfigError(f"LLM adapter width {p.model_dim} does not split into {p.num_heads} even-sized heads")
        self.params = p
        self.embed = Embedding(p.vocab_size, p.target_dim)
        # ComfyUI: in_proj exists only when the embedding width differs from the model width.
        self.in_proj = Linear(p.target_dim, p.model_dim) if p.model_dim != p.target_dim else None
        self.blocks = nn.ModuleList(AdapterBlock(p) for _ in range(p.num_layers))
        self.out_proj = Linear(p.model_dim, p.target_dim)
        self.norm = RMSNorm(p.target_dim)

    def forward(self, source: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids, source.dtype)
        if self.in_proj is not None:
            x = self.in_proj(x)
        head_dim = self.params.model_dim // self.params.num_heads
        rope_x = _adapter_rope(x.shape[1], head_dim, x.dtype, x.device)
        rope_src = _adapter_rope(source.shape[1], head_dim, x.dtype, x.device)
        for block in self.blocks:
            x = block(x, source, rope_x, rope_src)
        return self.norm(self.out_proj(x))


# ---------------------------------------------------------------------------------------------------------------------
# DiT (cosmos/predict2.py MiniTrainDIT with anima/model.py's adapter): patchify, AdaLN-LoRA blocks, 3-D RoPE
# ---------------------------------------------------------------------------------------------------------------------

CONTEXT_ROWS = 512  # the adapter output is zero-padded to this many rows (never truncated)


def timestep_sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[B] -> [B, dim] fp32, cos half first (cosmos Timesteps, flip_sin_to_cos), max period 10000."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat((angles.cos(), angles.sin()), dim=-1)


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """(t, h, w) rotary widths: h = w = head_dim//6*2, t gets the rest (position_embedding.py)."""
    dim_h = head_dim // 6 * 2
    return head_dim - 2 * dim_h, dim_h, dim_h


def rope_3d(T: int, H: int, W: int, head_dim: int, extrapolation, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T*H*W, head_dim/2] fp32 for positions (t, i, j) in row-major order; angle order t | h | w."""
    dims = rope_split(head_dim)
    freqs = []
    for d, ratio in zip(dims, extrapolation):
        theta = 10000.0 * ratio ** (d / (d - 2))  # NTK-scaled base
        freqs.append(1.0 / (theta ** (torch.arange(0, d, 2, device=device, dtype=torch.float32)[: d // 2] / d)))
    ft, fh, fw = freqs
    pos = [torch.arange(n, device=device, dtype=torch.float32) for n in (T, H, W)]
    at = torch.outer(pos[0], ft)[:, None, None, :].expand(T, H, W, -1)
    ah = torch.outer(pos[1], fh)[None, :, None, :].expand(T, H, W, -1)
    aw = torch.outer(pos[2], fw)[None, None, :, :].expand(T, H, W, -1)
    angles = torch.cat((at, ah, aw), dim=-1).reshape(T * H * W, -1)
    return angles.cos(), angles.sin()


def apply_rope_split_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[p], x[p + D/2]) by angle p, in fp32; x: (B, L, H, D), cos/sin: (L, D/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    cos, sin = cos[:, None], sin[:, None]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


@dataclass(frozen=True)
class NAG:
    """Normalized Attention Guidance (Chen et al. 2025, arXiv:2505.21179) on a cross-attention output, as the
    ComfyUI-NAG-Extended fork (newsletternewsletter@43c54bc, anima/layers.py) applies it to Anima.

    z+ and z- are the image tokens' attention outputs (B, L, H*D) over the prompt and the negative. The guided output
    moves away from z- by `scale`, its per-token L1 norm (all heads together) is capped at `tau` times that of z+,
    and it is blended back with z+ by `alpha`.
    """

    scale: float
    tau: float
    alpha: float

    def __call__(self, z_pos: torch.Tensor, z_neg: torch.Tensor) -> torch.Tensor:
        g = z_pos * self.scale - z_neg * (self.scale - 1)
        ratio = (torch.linalg.vector_norm(g, 1, dim=-1, keepdim=True).clamp_min(1e-6)
                 / torch.linalg.vector_norm(z_pos, 1, dim=-1, keepdim=True).clamp_min(1e-6))  # (B, L, 1)
        g = g * (ratio.clamp(max=self.tau) / ratio)
        return torch.lerp(z_pos, g, self.alpha)


class DiTAttention(_QKNormAttention):
    out_name = "output_proj"

    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.keys_values(context)
        return k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, D), the layout attention() takes

    def forward(self, x, rope=None, kv=None, nag=None):
        """Self-attention (rope) or cross-attention over prepared `kv`. nag = (NAG, (k-, v-)) guides the last
        k-.shape[0] rows of the batch (the cond rows: CFG batches uncond first) with the negative's K/V."""
        B = x.shape[0]
        q = self.query(x)
        if kv is None:  # self-attention, with RoPE on q and k
            k, v = self.keys_values(x)
            q, k = apply_rope_split_half(q, *rope), apply_rope_split_half(k, *rope)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        else:
            k, v = kv
            if k.shape[0] != B:
                k, v = k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)
        q = q.transpose(1, 2)
        z = attention(q, k, v)  # (B, L, H*D)
        if nag is not None:
            guide, (k_neg, v_neg) = nag
            first = B - k_neg.shape[0]  # the same image query attends to the negative too
            guided = guide(z[first:], attention(q[first:], k_neg, v_neg))
            z = torch.cat((z[:first], guided)) if first else guided
        return self.output_proj(z)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.layer1 = Linear(dim, hidden, bias=False)
        self.layer2 = Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.layer2(F.gelu(self.layer1(x)))


def _adaln(dim: int, lora_dim: int, chunks: int) -> nn.Sequential:
    # Index 0 is the SiLU so the released keys come out as `.1.weight` / `.2.weight`.
    return nn.Sequential(nn.SiLU(), Linear(dim, lora_dim, bias=False), Linear(lora_dim, chunks * dim, bias=False))


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + scale) + shift).to(dtype)


class DiTBlock(nn.Module):
    def __init__(self, p: DiTParams):
        super().__init__()
        D = p.model_channels
        self.self_attn = DiTAttention(D, D, p.num_heads)
        self.cross_attn = DiTAttention(D, p.context_dim, p.num_heads)
        self.mlp = MLP(D, p.mlp_dim)
        self.adaln_modulation_self_attn = _adaln(D, p.adaln_lora_dim, 3)
        self.adaln_modulation_cross_attn = _adaln(D, p.adaln_lora_dim, 3)
        self.adaln_modulation_mlp = _adaln(D, p.adaln_lora_dim, 3)

    def forward(self, x, emb, adaln_lora, rope, kv, nag=None):
        # x: (B, L, D) residual stream; emb, adaln_lora: (B, 1, D), (B, 1, 3D) in the compute dtype
        # The gated update is formed in the residual stream's dtype (fp32 under fp16, as ComfyUI); a no-op otherwise.
        dt, r = emb.dtype, x.dtype
        shift, scale, gate = (self.adaln_modulation_self_attn(emb) + adaln_lora).chunk(3, dim=-1)
        x = x + gate.to(r) * self.self_attn(_modulate(x, shift, scale, dt), rope=rope).to(r)
        shift, scale, gate = (self.adaln_modulation_cross_attn(emb) + adaln_lora).chunk(3, dim=-1)
        x = x + gate.to(r) * self.cross_attn(_modulate(x, shift, scale, dt), kv=kv, nag=nag).to(r)
        shift, scale, gate = (self.adaln_modulation_mlp(emb) + adaln_lora).chunk(3, dim=-1)
        return x + gate.to(r) * self.mlp(_modulate(x, shift, scale, dt)).to(r)


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = Linear(dim, dim, bias=False)
        self.linear_2 = Linear(dim, 3 * dim, bias=False)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(e)))


class PatchEmbed(nn.Module):
    def __init__(self, in_features: int, dim: int):
        super().__init__()
        # Index 0 stands for ComfyUI's Rearrange (no weights), so the key is `x_embedder.proj.1.weight`.
        self.proj = nn.Sequential(nn.Identity(), Linear(in_features, dim, bias=False))


class FinalLayer(nn.Module):
    def __init__(self, p: DiTParams):
        super().__init__()
        D = p.model_channels
        self.adaln_modulation = _adaln(D, p.adaln_lora_dim, 2)
        self.linear = Linear(D, p.patch_spatial**2 * p.patch_temporal * p.out_channels, bias=False)


_RESIDENT_IN_STREAMING = re.compile(r"(?:^|\.)cross_attn\.(k_proj|v_proj|k_norm)\.")


def _tensor_slots(module: nn.Module):
    """(qualified name, (owner module, "parameter"|"buffer", attribute)) for every tensor of `module`."""
    for mod_name, mod in module.named_modules():
        for kind, table in (("parameter", mod._parameters), ("buffer", mod._buffers)):
            for attr, t in table.items():
                if t is not None:
                    yield (f"{mod_name}.{attr}" if mod_name else attr), (mod, kind, attr)


def _get_slot(slot) -> torch.Tensor:
    mod, kind, attr = slot
    return mod._parameters[attr].data if kind == "parameter" else mod._buffers[attr]


def _set_slot(slot, t: torch.Tensor) -> None:
    mod, kind, attr = slot
    if kind == "parameter":
        mod._parameters[attr].data = t  # same Parameter object: LoRA patches and named_parameters keep working
    else:
        mod._buffers[attr] = t


class _StreamIn:
    def __init__(self, slots, device):
        self.slots, self.device, self.at_rest = slots, device, []

    @torch.compiler.disable  # host-side bookkeeping: keep it out of compiled graphs
    def __call__(self, module, args):
        self.at_rest = [_get_slot(slot) for slot in self.slots]
        for slot, t in zip(self.slots, self.at_rest):
            # non_blocking is safe for host-to-device copies (pinned or not); copy=True also on the host, so the swap
            # is the same operation whatever the device (and testable on a CPU).
            _set_slot(slot, t.to(self.device, non_blocking=True, copy=True))


class _StreamOut:
    def __init__(self, stream_in: _StreamIn):
        self.stream_in = stream_in

    @torch.compiler.disable
    def __call__(self, module, args, output):
        # Back to the host tensors; the device copies are freed once the queued kernels no longer need them.
        for slot, t in zip(self.stream_in.slots, self.stream_in.at_rest):
            _set_slot(slot, t)
        return output


class AnimaDiT(nn.Module):
    """Anima's Cosmos-Predict2 DiT with its LLM adapter (`llm_adapter`); attribute names are the released keys.

    forward(x, timestep, context=None, kv=None, nag=None, nag_kv=None) -> v
        x [B, in_channels, T, h, w] (any float dtype; T = 1 for images), timestep [B] = sigma in [0, 1] (not x1000),
        context [B or 1, S, context_dim] = `encode_context` output, or instead kv = `prepare_context(context)`.
        nag (a NAG) with nag_kv = `prepare_context(negative)` guides every block's cross-attention of the last
        nag_kv batch rows; self-attention, MLP and AdaLN still run once per row.
        Returns the velocity, float32, shaped like x. Odd h/w are padded circularly to the patch size and the output
        cropped back (ComfyUI pad_to_patch_size).
    encode_context(qwen_hidden [B, N, source_dim], t5_ids [B, M] long, t5_weights [B, M]) -> [B, max(512, M), ctx]
        The adapter in the compute dtype, rows scaled by the T5 weights, zero rows appended up to 512 (never cut).
    prepare_context(context) -> the cross-attention K/V of every block; a sampler prepares it once per generation and
        passes it to each step, since the context and the weights stay the same for the whole run.
    Computation runs in `compute_dtype` (the weights' dtype; for fp8 weights the loader's choice) with fp32 for the
    timestep sinusoid and the RoPE rotation. fp16 keeps the residual stream in fp32.
    """

    def __init__(self, params: DiTParams, adapter: AdapterParams):
        super().__init__()
        D, heads = params.model_channels, params.num_heads
        if D % heads or (D // heads) % 2 or rope_split(D // heads)[1] <= 2:
            raise ConfigError(
                f"DiT width {D} with {heads} heads gives head_dim {D / heads:g}; it must be an even integer >= 12"
            )
        if params.patch_temporal != 1:
            raise ConfigError(f"DiT temporal patch {params.patch_temporal} is not supported (Anima uses 1)")
        self.params = params
        p = params.patch_spatial
        self.x_embedder = PatchEmbed((params.in_channels + 1) * p * p * params.patch_temporal, D)
        self.t_embedder = nn.Sequential(nn.Identity(), TimestepEmbedding(D))
        self.t_embedding_norm = RMSNorm(D)
        self.blocks = nn.ModuleList(DiTBlock(params) for _ in range(params.num_blocks))
        self.final_layer = FinalLayer(params)
        self.llm_adapter = LLMAdapter(adapter)
        self._compute_dtype: torch.dtype | None = None
        # RoPE tables by latent shape and device, built on first use (not buffers: the module is built on the meta
        # device); they depend on nothing the weights or dtype can change.
        self._rope_cache: dict = {}

    # -- dtype -------------------------------------------------------------------------------------------------------
    @property
    def compute_dtype(self) -> torch.dtype:
        if self._compute_dtype is not None:
            return self._compute_dtype
        w = self.x_embedder.proj[1].weight
        if w.dtype in FP8_DTYPES:
            return half_dtype(w.device) if w.is_cuda else torch.float32
        return w.dtype

    @compute_dtype.setter
    def compute_dtype(self, dtype: torch.dtype | None) -> None:
        self._compute_dtype = dtype

    # -- low VRAM: block weights streamed from host memory --------------------------------------------------------
    def stream_blocks(self, device: torch.device | str) -> None:
        """Keep each block's weights in host memory and bring them to `device` only while that block runs.

        Everything else stays on `device`: the embedders, the final layer, the adapter, and the cross-attention K/V
        projections, which prepare_context runs for every block at once, outside the blocks' forwards. The device
        then holds one block's weights at a time (~140 MB for Anima 2B in bf16) instead of all 28. Weight swaps
        (LoRA merges, undo) happen between forwards and are picked up, since each step copies whatever tensor the
        parameter holds at that moment. Copies go on the current stream, so kernels that use them are ordered after.
        """
        if getattr(self, "_streaming", False):
            raise RuntimeError("stream_blocks() was already called on this model")
        self._streaming = True
        device = torch.device(device)
        pin = device.type == "cuda" and torch.cuda.is_available()
        for name, slot in _tensor_slots(self):
            t = _get_slot(slot)
            streamed = name.startswith("blocks.") and not _RESIDENT_IN_STREAMING.search(name)
            if streamed:
                t = t.to("cpu")
                t = t.pin_memory() if pin else t
            else:
                t = t.to(device)
            _set_slot(slot, t)
        for block in self.blocks:
            slots = [slot for name, slot in _tensor_slots(block) if not _RESIDENT_IN_STREAMING.search(name)]
            stream_in = _StreamIn(slots, device)
            block.register_forward_pre_hook(stream_in)
            # always_call: a block that raises (out of memory, say) still gives its weights back to the host.
            block.register_forward_hook(_StreamOut(stream_in), always_call=True)

    # -- conditioning ------------------------------------------------------------------------------------------------
    def encode_context(self, qwen_hidden: torch.Tensor, t5_ids: torch.Tensor, t5_weights: torch.Tensor) -> torch.Tensor:
        dt = self.compute_dtype
        device = self.llm_adapter.out_proj.weight.device
        out = self.llm_adapter(qwen_hidden.to(device, dt), t5_ids.to(device, torch.long))
        out = out * t5_weights.to(device, dt)[..., None]
        if out.shape[1] < CONTEXT_ROWS:
            out = F.pad(out, (0, 0, 0, CONTEXT_ROWS - out.shape[1]))
        return out

    def prepare_context(self, context: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per block (k, v) [B, H, S, D] of the cross-attention, for forward(..., kv=...)."""
        context = context.to(self.x_embedder.proj[1].weight.device, self.compute_dtype)
        return [block.cross_attn.context_kv(context) for block in self.blocks]

    def _rope(self, T: int, H: int, W: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (T, H, W, str(device))
        if key not in self._rope_cache:
            p = self.params
            self._rope_cache[key] = rope_3d(T, H, W, p.head_dim, p.rope_extrapolation, device)
        return self._rope_cache[key]

    # -- forward -----------------------------------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor | None = None,
        kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        nag: NAG | None = None,
        nag_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        p = self.params
        dt = self.compute_dtype
        device = self.x_embedder.proj[1].weight.device
        B, C, T, H, W = x.shape
        ps = p.patch_spatial
        pad_h, pad_w = -H % ps, -W % ps
        x = x.to(device, dt)
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h, 0, 0), mode="circular")
        Hp, Wp = (H + pad_h) // ps, (W + pad_w) // ps
        x = torch.cat((x, torch.zeros_like(x[:, :1])), dim=1)  # all-zero padding-mask channel
        # patchify "b c t (h m) (w n) -> b (t h w) (c m n)"
        x = x.reshape(B, C + 1, T, Hp, ps, Wp, ps).permute(0, 2, 3, 5, 1, 4, 6).reshape(B, T * Hp * Wp, -1)
        x = self.x_embedder.proj[1](x)  # (B, L, D)

        e = timestep_sinusoid(timestep.to(device).reshape(-1).expand(B), p.model_channels).to(dt)[:, None]
        adaln_lora = self.t_embedder[1](e)  # (B, 1, 3D)
        emb = self.t_embedding_norm(e)  # AdaLN-LoRA: the blocks see the normalised sinusoid itself

        rope = self._rope(T, Hp, Wp, device)
        if kv is None:
            kv = self.prepare_context(context)
        if dt == torch.float16:
            x = x.float()  # fp16 range is too small for the residual stream
        guides = [None] * len(self.blocks) if nag is None else [(nag, neg) for neg in nag_kv]
        for block, block_kv, guide in zip(self.blocks, kv, guides):
            x = block(x, emb, adaln_lora, rope, block_kv, guide)

        D = p.model_channels
        shift, scale = (self.final_layer.adaln_modulation(emb) + adaln_lora[..., : 2 * D]).chunk(2, dim=-1)
        y = self.final_layer.linear(_modulate(x.to(dt), shift, scale, dt))  # (B, L, ps*ps*Cout)
        # unpatchify: output features are ordered (p1, p2, t, C)
        y = y.reshape(B, T, Hp, Wp, ps, ps, p.out_channels).permute(0, 6, 1, 2, 4, 3, 5)
        y = y.reshape(B, p.out_channels, T, Hp * ps, Wp * ps)
        return y[:, :, :, :H, :W].float()


# ---------------------------------------------------------------------------------------------------------------------
# DiT loading: sizes from shapes, meta-device build, strict load, fp8 kept per layer
# ---------------------------------------------------------------------------------------------------------------------

DIT_PREFIXES = DIT_FILE.prefixes  # where a DiT's keys sit, from discovery's table of file formats
# Kept out of fp8 even when the file stores them fp8: fp8 timestep/AdaLN weights corrupt every token (formats.md §1.5).
_HIGH_PRECISION = re.compile(r"^(t_embedder\.|t_embedding_norm\.)|adaln_modulation")

def _count_indexed(keys, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    if found and found != set(range(len(found))):
        missing = sorted(set(range(max(found) + 1)) - found)
        raise CheckpointMismatch(f"{prefix}N indices are not contiguous (missing {missing[:5]})")
    return len(found)


def infer_dit_params(
    sd: dict[str, torch.Tensor], path: str | os.PathLike = "state dict"
) -> tuple[DiTParams, AdapterParams]:
    """DiT and adapter sizes from tensor shapes alone (keys without the file prefix)."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            raise CheckpointMismatch(f"{path}: not a complete Anima file — missing {key}; download it again")
        return tuple(sd[key].shape)

    try:
        D, patch_in = shape("x_embedder.proj.1.weight")
        head_dim = shape("blocks.0.self_attn.q_norm.weight")[0]
        dit = DiTParams(
            model_channels=D,
            num_blocks=_count_indexed(sd, "blocks."),
            num_heads=D // head_dim,
            mlp_dim=shape("blocks.0.mlp.layer1.weight")[0],
            in_channels=patch_in // 4 - 1,
            out_channels=shape("final_layer.linear.weight")[0] // 4,
            context_dim=shape("blocks.0.cross_attn.k_proj.weight")[1],
            adaln_lora_dim=shape("blocks.0.adaln_modulation_self_attn.1.weight")[0],
        )
        vocab, target_dim = shape("llm_adapter.embed.weight")
        model_dim = shape("llm_adapter.blocks.0.self_attn.q_proj.weight")[1]
        adapter = AdapterParams(
            source_dim=shape("llm_adapter.blocks.0.cross_attn.k_proj.weight")[1],
            model_dim=model_dim,
            target_dim=target_dim,
            num_layers=_count_indexed(sd, "llm_adapter.blocks."),
            num_heads=model_dim // shape("llm_adapter.blocks.0.self_attn.q_norm.weight")[0],
            vocab_size=vocab,
            mlp_dim=shape("llm_adapter.blocks.0.mlp.0.weight")[0],
        )
    except CheckpointMismatch as exc:
        msg = str(exc)
        raise CheckpointMismatch(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
    except ValueError:
        raise CheckpointMismatch(f"{path}: an Anima key has an unexpected number of dimensions") from None
    if D % head_dim or patch_in % 4:
        raise CheckpointMismatch(f"{path}: width {D} is not a multiple of head_dim {head_dim}, or patch {patch_in}")
    return dit, adapter


def load_dit(
    path: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    keep_fp8: bool = True,
) -> AnimaDiT:
    """Load an Anima DiT + adapter file (prefix net./model.diffusion_model./diffusion_model. or bare), strict; a
    .safetensors file, or a GGUF one (`read_gguf`: dequantised at load).

    dtype: the compute dtype and the storage dtype of non-fp8 tensors (None: as stored; fp8 files then compute in
    bf16 on CUDA, fp32 on CPU). A float8 dtype stores the linear weights fp8 and computes in the default above.
    fp8 linear weights (plain, or ComfyUI scaled) stay fp8 and are upcast per call unless keep_fp8 is false;
    timestep-embedding and AdaLN weights are always dequantised at load.
    """
    cast = None if dtype in FP8_DTYPES else dtype
    sd = read_gguf(path, cast) if is_gguf(path) else _read_as(DIT_FILE, Path(path), cast=cast)
    dit_params, adapter_params = infer_dit_params(sd, path)
    with torch.device("meta"):
        model = AnimaDiT(dit_params, adapter_params)

    device = torch.device(device)
    store_fp8 = dtype in FP8_DTYPES
    has_fp8 = store_fp8 or any(v.dtype in FP8_DTYPES for v in sd.values())
    default = half_dtype(device) if device.type == "cuda" else torch.float32
    compute = default if (store_fp8 or (dtype is None and has_fp8)) else dtype
    linear_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Linear)}
    scales = split_fp8_scales(sd)
    for k, v in sd.items():
        layer = k.rsplit(".", 1)[0]
        fp8_linear = k in linear_weights and not _HIGH_PRECISION.search(k)
        if v.dtype in FP8_DTYPES and not (keep_fp8 and fp8_linear):
            v = v.to(torch.float32) * scales.pop(layer, torch.tensor(1.0))
            v = v.to(compute or torch.float32)
        elif v.dtype in FP8_DTYPES:
            pass
        elif store_fp8 and fp8_linear:
            v = v.to(dtype)
        elif v.is_floating_point() and compute is not None:
            v = v.to(compute)
        sd[k] = v
    for layer, scale in scales.items():  # load_into attaches the remaining scales to their fp8 layers
        sd[f"{layer}.weight_scale"] = scale
    load_into(model, sd, path, "Anima diffusion model", device=device, dtype=None, keep_fp8=True)
    model._compute_dtype = compute
    model.eval().requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------------------------------------
# Qwen3 text encoder (Qwen3-0.6B-Base; ComfyUI comfy/text_encoders/llama.py Llama2_ with Qwen3_06BConfig, spec/anima.md
# §3.4). Runs in fp32 whatever the storage dtype, as ComfyUI does; the output is the last layer after the final norm.
# ---------------------------------------------------------------------------------------------------------------------

QWEN_PREFIXES = TE_FILE.prefixes  # where a Qwen3 TE's keys sit, from discovery's table of file formats


class QwenAttention(nn.Module):
    def __init__(self, p: QwenParams):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = p.num_heads, p.num_kv_heads, p.head_dim
        self.q_proj = Linear(p.hidden_size, p.num_heads * p.head_dim, bias=False)
        self.k_proj = Linear(p.hidden_size, p.num_kv_heads * p.head_dim, bias=False)
        self.v_proj = Linear(p.hidden_size, p.num_kv_heads * p.head_dim, bias=False)
        self.o_proj = Linear(p.num_heads * p.head_dim, p.hidden_size, bias=False)
        self.q_norm = RMSNorm(p.head_dim, p.eps)
        self.k_norm = RMSNorm(p.head_dim, p.eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, N, d)
        k = self.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, kv, N, d)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        # q/k norms come before RoPE in Qwen3
        q = _apply_rope(self.q_norm(q), cos, sin)
        k = _apply_rope(self.k_norm(k), cos, sin)
        if self.num_kv_heads != self.num_heads:
            rep = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if bias is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=n > 1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class QwenMLP(nn.Module):
    def __init__(self, p: QwenParams):
        super().__init__()
        self.gate_proj = Linear(p.hidden_size, p.intermediate_size, bias=False)
        self.up_proj = Linear(p.hidden_size, p.intermediate_size, bias=False)
        self.down_proj = Linear(p.intermediate_size, p.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class QwenLayer(nn.Module):
    def __init__(self, p: QwenParams):
        super().__init__()
        self.self_attn = QwenAttention(p)
        self.mlp = QwenMLP(p)
        self.input_layernorm = RMSNorm(p.hidden_size, p.eps)
        self.post_attention_layernorm = RMSNorm(p.hidden_size, p.eps)

    def forward(self, x, cos, sin, bias):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, bias)
        return x + self.mlp(self.post_attention_layernorm(x))


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


def qwen_attention_bias(mask: torch.Tensor) -> torch.Tensor:
    """Additive fp32 bias (B, 1, N, N) from a key mask (B, N) of 1/0, as ComfyUI's llama.py builds it.

    Masked keys get finfo.min/4 (finite, so a row with every key masked still averages instead of giving NaN) and the
    causal part is the same finite value added on top.
    """
    b, n = mask.shape
    neg = torch.finfo(torch.float32).min / 4
    bias = (1.0 - mask.to(torch.float32))[:, None, None, :].expand(b, 1, n, n)
    bias = bias.masked_fill(bias.bool(), neg)
    if n > 1:
        bias = bias + torch.full((n, n), neg, device=mask.device).triu(1)
    return bias


class Qwen3Encoder(nn.Module):
    """Qwen3 decoder stack used as an encoder: ids (B, N) -> last hidden state after `norm` (B, N, hidden), fp32."""

    def __init__(self, params: QwenParams):
        super().__init__()
        p = params
        if p.head_dim % 2:
            raise ValueError(f"Qwen3 head_dim must be even for RoPE, got {p.head_dim}")
        if p.num_heads % p.num_kv_heads:
            raise ValueError(f"Qwen3 heads ({p.num_heads}) must be a multiple of kv heads ({p.num_kv_heads})")
        self.params = p
        self.embed_tokens = Embedding(p.vocab_size, p.hidden_size)
        self.layers = nn.ModuleList(QwenLayer(p) for _ in range(p.num_layers))
        self.norm = RMSNorm(p.hidden_size, p.eps)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`mask` (B, N) of 1 = attend, 0 = padding (TokenizedPrompt.qwen_mask); None or all ones = plain causal."""
        x = self.embed_tokens(ids, torch.float32)  # (B, N, H): rows gathered, then upcast (ComfyUI out_dtype)
        cos, sin = _rope_tables(ids.shape[1], self.params.head_dim, self.params.rope_theta, ids.device)
        bias = None
        if mask is not None and not bool(mask.bool().all()):
            bias = qwen_attention_bias(mask.to(ids.device))
        for layer in self.layers:
            x = layer(x, cos, sin, bias)
        return self.norm(x)


def infer_qwen_params(sd: dict) -> QwenParams:
    """Sizes from tensor shapes (prefix already stripped). `sd` may hold tensors or anything with a `.shape`."""
    try:
        vocab, hidden = sd["embed_tokens.weight"].shape
        head_dim = sd["layers.0.self_attn.q_norm.weight"].shape[0]
        q_rows = sd["layers.0.self_attn.q_proj.weight"].shape[0]
        k_rows = sd["layers.0.self_attn.k_proj.weight"].shape[0]
        inter = sd["layers.0.mlp.gate_proj.weight"].shape[0]
    except KeyError as exc:
        raise CheckpointError(f"not a Qwen3 text encoder (no {exc.args[0]})") from None
    return QwenParams(
        vocab_size=int(vocab), hidden_size=int(hidden), num_layers=_count_indexed(sd, "layers."),
        num_heads=int(q_rows) // int(head_dim), num_kv_heads=int(k_rows) // int(head_dim), head_dim=int(head_dim),
        intermediate_size=int(inter),
    )


def load_text_encoder(
    path: str | os.PathLike, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> Qwen3Encoder:
    """Load a Qwen3 text encoder (released TE, ComfyUI clip/AIO layouts, bare keys). `dtype` is the storage dtype;
    None keeps the file's (bf16 for the release). Compute is always fp32."""
    path = Path(path)
    sd = _read_as(TE_FILE, path)
    try:
        params = infer_qwen_params(sd)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    try:
        with torch.device("meta"):
            model = Qwen3Encoder(params)
    except ValueError as exc:
        raise CheckpointMismatch(f"{path}: impossible Qwen3 sizes ({exc})") from None
    load_into(model, sd, path, "Qwen3 text-encoder", device=device, dtype=dtype)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------------------
# VAE: Wan 2.1 / Qwen-Image
# ---------------------------------------------------------------------------------------------------------------------
# Module attribute names are the original Wan 2.1 keys (`decoder.upsamples.3.resample.1`, `residual.0.gamma`, ...), so
# the released file loads with a plain strict load_state_dict. Reference behaviour: ComfyUI comfy/ldm/wan/vae.py + sd.py.
#
# Images are one frame (T = 1). The causal 3-D convolutions then reduce to 2-D convolutions with the last temporal tap
# (the two frames in front are causal zero padding), which is the default `path="2d"`; `path="3d"` evaluates the real
# padded conv3d and exists to prove the two agree.

# comfy/latent_formats.py Wan21 (= diffusers AutoencoderKLQwenImage latents_mean / latents_std).
WAN21_LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

VAE_SCALE = 8  # pixels per latent cell


def _latent_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, -1) + (1,) * (x.ndim - 2)  # [1, 16, 1, 1, 1] for 5-D latents
    mean = torch.tensor(WAN21_LATENT_MEAN, dtype=torch.float32, device=x.device).view(shape)
    std = torch.tensor(WAN21_LATENT_STD, dtype=torch.float32, device=x.device).view(shape)
    return mean, std


def latent_to_vae(latent: torch.Tensor) -> torch.Tensor:
    """Model space -> VAE space (ComfyUI Wan21.process_out): z·std + mean, float32."""
    mean, std = _latent_stats(latent)
    return latent.float() * std + mean


def vae_to_latent(latent: torch.Tensor) -> torch.Tensor:
    """VAE space -> model space (ComfyUI Wan21.process_in): (z − mean)/std, float32."""
    mean, std = _latent_stats(latent)
    return (latent.float() - mean) / std


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [0, 1] -> uint8 [B, H, W, 3] exactly as ComfyUI's SaveImage: float32 255·x, clip, truncate."""
    arr = images.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    # float32 product on purpose: float64 can move a value across an integer and flip the truncation (anima.md §4.3)
    return np.clip(np.float32(255.0) * arr, 0, 255).astype(np.uint8)


class CausalConv3d(nn.Conv3d):
    """Conv3d padded causally in time: 2·pt zero frames in front, none behind, so frame t sees only frames <= t."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__(cin, cout, kernel, stride=stride, padding=0)
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        self.causal_pad = (pw, pw, ph, ph, 2 * pt, 0)
        self.pad2d = (ph, pw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            # One frame [B, C, H, W]: the padded frames are zeros, so only the last temporal tap meets data.
            return F.conv2d(x, self.weight[:, :, -1], self.bias, self.stride[1:], self.pad2d)
        return F.conv3d(F.pad(x, self.causal_pad), self.weight, self.bias, self.stride)


class ChannelRMSNorm(nn.Module):
    """Wan's RMS_norm: x / ‖x‖₂ over channels · √C · γ (F.normalize, eps 1e-12); γ is [C,1,1,1] or [C,1,1]."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gamma = self.gamma.view((-1,) + (1,) * (x.ndim - 2))
        return F.normalize(x, dim=1) * self.scale * gamma


def _frames(x: torch.Tensor) -> tuple[torch.Tensor, tuple | None]:
    """[B, C, T, H, W] -> [B·T, C, H, W] (and what is needed to undo it); 4-D input passes through."""
    if x.ndim == 4:
        return x, None
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w), (b, t)


def _unframes(x: torch.Tensor, bt: tuple | None) -> torch.Tensor:
    if bt is None:
        return x
    b, t = bt
    return x.reshape(b, t, *x.shape[1:]).transpose(1, 2)


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        # Indices mirror the checkpoint: 0 norm, 1 SiLU, 2 conv, 3 norm, 4 SiLU, 5 dropout (inference: no-op), 6 conv.
        self.residual = nn.Sequential(
            ChannelRMSNorm(cin), nn.SiLU(), CausalConv3d(cin, cout, 3, padding=1),
            ChannelRMSNorm(cout), nn.SiLU(), nn.Identity(), CausalConv3d(cout, cout, 3, padding=1),
        )  # fmt: skip
        self.shortcut = CausalConv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x) + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H·W positions of each frame (scale 1/√C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = ChannelRMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, bt = _frames(x)
        n, c, hh, ww = h.shape
        qkv = self.to_qkv(self.norm(h)).reshape(n, 1, c * 3, hh * ww).transpose(-1, -2)  # (N, 1, HW, 3C)
        q, k, v = qkv.contiguous().chunk(3, dim=-1)
        h = F.scaled_dot_product_attention(q, k, v)  # (N, 1, HW, C)
        h = self.proj(h.squeeze(1).transpose(1, 2).reshape(n, c, hh, ww))
        return _unframes(h, bt) + x


class Resample(nn.Module):
    """×2 nearest up + conv to C/2, or zero-pad right/bottom + stride-2 conv; per frame.

    The `time_conv` of the 3-D modes acts only from the second temporal chunk on, so a single frame never uses it; it
    exists so the released weights load strictly.
    """

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):
            up = nn.Upsample(scale_factor=2.0, mode="nearest-exact")  # = pixel repeat for ×2
            self.resample = nn.Sequential(up, nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 5 and x.shape[2] != 1:
            raise ValueError(f"the VAE decodes single frames only, got {x.shape[2]} frames")
        h, bt = _frames(x)
        return _unframes(self.resample(h), bt)


class Encoder3d(nn.Module):
    def __init__(self, dim: int, z_out: int, dim_mult: tuple[int, ...], num_res: int, temporal: tuple[bool, ...]):
        super().__init__()
        dims = [dim * m for m in (1, *dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res):
                blocks.append(ResidualBlock(cin, cout))
                cin = cout
            if i != len(dim_mult) - 1:
                blocks.append(Resample(cout, "downsample3d" if temporal[i] else "downsample2d"))
        self.downsamples = nn.Sequential(*blocks)
        c = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(c, c), AttentionBlock(c), ResidualBlock(c, c))
        self.head = nn.Sequential(ChannelRMSNorm(c), nn.SiLU(), CausalConv3d(c, z_out, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.middle(self.downsamples(self.conv1(x))))


class Decoder3d(nn.Module):
    def __init__(self, dim: int, z_dim: int, dim_mult: tuple[int, ...], num_res: int, temporal_up: tuple[bool, ...]):
        super().__init__()
        dims = [dim * dim_mult[-1]] + [dim * m for m in reversed(dim_mult)]
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        c = dims[0]
        self.middle = nn.Sequential(ResidualBlock(c, c), AttentionBlock(c), ResidualBlock(c, c))
        blocks: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                cin //= 2  # the previous stage's upsample halved the channels
            for _ in range(num_res + 1):
                blocks.append(ResidualBlock(cin, cout))
                cin = cout
            if i != len(dim_mult) - 1:
                blocks.append(Resample(cout, "upsample3d" if temporal_up[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*blocks)
        self.head = nn.Sequential(ChannelRMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.upsamples(self.middle(self.conv1(x))))


def _tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Evenly spaced tile starts covering [0, n), neighbours overlapping by at least `overlap`."""
    if n <= tile:
        return [0]
    count = -(-(n - overlap) // (tile - overlap))  # ceil
    return [round(i * (n - tile) / (count - 1)) for i in range(count)]


def _ramp(n_px: int, start: bool, end: bool, ramp_px: int) -> torch.Tensor:
    """Blend weights along one axis of a tile: linear 0→1 over `ramp_px` at edges shared with a neighbour."""
    w = torch.ones(n_px)
    r = min(ramp_px, n_px)
    if r > 0:
        up = (torch.arange(r, dtype=torch.float32) + 0.5) / r
        if start:
            w[:r] = torch.minimum(w[:r], up)
        if end:
            w[-r:] = torch.minimum(w[-r:], up.flip(0))
    return w


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        # Memory PyTorch's caching allocator holds but does not use is free for the decode too.
        return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: assume it fits


class WanVAE(nn.Module):
    """Wan 2.1 VAE (= Qwen-Image VAE): encoder, conv1 (32→32), conv2 (16→16), decoder. Latents in VAE space."""

    # Peak decoder activation memory ≈ this many full-resolution tensors of base_dim channels (bench/vae_bench.py,
    # base dim 96 at 1024x1024 on CPU, fp32: 6.04).
    DECODE_PEAK_FACTOR = 6

    def __init__(self, params: VAEParams, temporal_downsample: tuple[bool, ...] | None = None):
        super().__init__()
        if params.base_dim <= 0 or params.z_dim <= 0 or not params.dim_mult or params.num_res_blocks <= 0:
            raise CheckpointMismatch(f"impossible VAE sizes {params}")
        n = len(params.dim_mult) - 1
        # Wan's default: no temporal downsampling in the first stage, then every stage ([False, True, True]).
        temporal = tuple(temporal_downsample) if temporal_downsample is not None else tuple(i > 0 for i in range(n))
        if len(temporal) != n:
            raise CheckpointMismatch(f"temporal_downsample {temporal} needs {n} entries for dim_mult {params.dim_mult}")
        self.params = params
        self.temporal_downsample = temporal
        self.encoder = Encoder3d(params.base_dim, params.z_dim * 2, params.dim_mult, params.num_res_blocks, temporal)
        self.conv1 = CausalConv3d(params.z_dim * 2, params.z_dim * 2, 1)
        self.conv2 = CausalConv3d(params.z_dim, params.z_dim, 1)
        self.decoder = Decoder3d(params.base_dim, params.z_dim, params.dim_mult, params.num_res_blocks, temporal[::-1])

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    def _check_latent(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim == 4:
            z = z.unsqueeze(2)
        if z.ndim != 5 or z.shape[1] != self.params.z_dim or z.shape[2] != 1:
            raise ValueError(f"expected a latent [B, {self.params.z_dim}, 1, h, w], got {tuple(z.shape)}")
        return z

    def _decode_raw(self, z: torch.Tensor, path: str) -> torch.Tensor:
        """[B, 16, 1, h, w] -> decoder output [B, 3, 8h, 8w] in ≈[−1, 1], float32."""
        x = z.to(device=self.device, dtype=self.dtype)
        if path == "2d":
            x = x[:, :, 0]
        elif path != "3d":
            raise ValueError(f"path must be '2d' or '3d', not {path!r}")
        y = self.decoder(self.conv2(x))
        return (y[:, :, 0] if y.ndim == 5 else y).float()

    def estimate_decode_bytes(self, z: torch.Tensor) -> int:
        b, _, _, h, w = self._check_latent(z).shape
        itemsize = torch.finfo(self.dtype).bits // 8
        return self.DECODE_PEAK_FACTOR * b * self.params.base_dim * h * w * VAE_SCALE**2 * itemsize

    @torch.no_grad()
    def decode(
        self, z: torch.Tensor, *, path: str = "2d", tiled: bool | None = None, tile: int = 64, overlap: int = 16
    ) -> torch.Tensor:
        """Latent [B, 16, 1, h, w] (VAE space) -> image [B, 3, 8h, 8w] float32 in [0, 1].

        tiled=None tiles only when the estimated activation memory exceeds 80 % of what the device has free.
        """
        z = self._check_latent(z)
        if tiled is None:
            tiled = self.estimate_decode_bytes(z) > 0.8 * _available_bytes(self.device)
        if tiled:
            return self.decode_tiled(z, tile=tile, overlap=overlap, path=path)
        # ComfyUI: output to fp32 first, then (x + 1)/2 clamped.
        return ((self._decode_raw(z, path) + 1.0) / 2.0).clamp(0.0, 1.0)

    @torch.no_grad()
    def decode_tiled(self, z: torch.Tensor, *, tile: int = 64, overlap: int = 16, path: str = "2d") -> torch.Tensor:
        """decode() over overlapping latent tiles (tile, overlap in latent cells), blended with linear ramps.

        The mid-block attention is global, so tiles see less context than the whole image: close to, not equal to,
        the untiled decode.
        """
        z = self._check_latent(z)
        if not 0 <= overlap < tile:
            raise ValueError(f"need 0 <= overlap < tile, got tile {tile}, overlap {overlap}")
        b, _, _, h, w = z.shape
        out = torch.zeros(b, 3, h * VAE_SCALE, w * VAE_SCALE)
        weight = torch.zeros(1, 1, h * VAE_SCALE, w * VAE_SCALE)
        ramp_px = overlap * VAE_SCALE
        for y0 in _tile_starts(h, tile, overlap):
            y1 = min(y0 + tile, h)
            wy = _ramp((y1 - y0) * VAE_SCALE, y0 > 0, y1 < h, ramp_px)
            for x0 in _tile_starts(w, tile, overlap):
                x1 = min(x0 + tile, w)
                wx = _ramp((x1 - x0) * VAE_SCALE, x0 > 0, x1 < w, ramp_px)
                mask = wy[:, None] * wx[None, :]
                part = self._decode_raw(z[..., y0:y1, x0:x1], path).cpu()
                ys, xs = slice(y0 * VAE_SCALE, y1 * VAE_SCALE), slice(x0 * VAE_SCALE, x1 * VAE_SCALE)
                out[:, :, ys, xs] += part * mask
                weight[:, :, ys, xs] += mask
        return ((out / weight + 1.0) / 2.0).clamp(0.0, 1.0).to(self.device)

    @torch.no_grad()
    def encode(self, image: torch.Tensor, *, path: str = "2d") -> torch.Tensor:
        """Image [B, 3, H, W] in [0, 1] -> latent [B, 16, 1, H/8, W/8] float32 (VAE space, the posterior mean).

        Sizes that are not multiples of 8 are centre-cropped, as ComfyUI's VAEEncode does; each image is encoded on
        its own (ComfyUI would treat a batch as video frames).
        """
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"expected an image [B, 3, H, W], got {tuple(image.shape)}")
        H, W = image.shape[-2:]
        h8, w8 = H // VAE_SCALE * VAE_SCALE, W // VAE_SCALE * VAE_SCALE
        if h8 == 0 or w8 == 0:
            raise ValueError(f"image {H}x{W} is smaller than one latent cell ({VAE_SCALE} px)")
        top, left = (H % VAE_SCALE) // 2, (W % VAE_SCALE) // 2
        image = image[:, :, top : top + h8, left : left + w8]
        x = (image.float() * 2.0 - 1.0).to(device=self.device, dtype=self.dtype)
        if path == "3d":
            x = x.unsqueeze(2)
        elif path != "2d":
            raise ValueError(f"path must be '2d' or '3d', not {path!r}")
        moments = self.conv1(self.encoder(x))
        mean = moments[:, : self.params.z_dim]
        return (mean if mean.ndim == 5 else mean.unsqueeze(2)).float()


def _stage_of(sd: dict, prefix: str) -> dict[int, str]:
    """{index: "res" | "resample"} for the entries of encoder.downsamples / decoder.upsamples."""
    kinds: dict[int, str] = {}
    for k in sd:
        m = re.match(re.escape(prefix) + r"(\d+)\.(residual|resample)\.", k)
        if m:
            kinds[int(m[1])] = "res" if m[2] == "residual" else "resample"
    return kinds


def infer_vae_params(sd: dict[str, torch.Tensor], where: str = "VAE state dict") -> VAEParams:
    """Sizes from shapes: base dim (encoder.conv1), z_dim (conv2), res blocks per stage and dim_mult (encoder)."""
    need = ("encoder.conv1.weight", "conv2.weight", "encoder.downsamples.0.residual.2.weight")
    missing = [k for k in need if k not in sd]
    if missing:
        raise CheckpointMismatch(f"{where}: not a Wan 2.1 VAE (missing {', '.join(missing)})")
    base_dim = sd["encoder.conv1.weight"].shape[0]
    z_dim = sd["conv2.weight"].shape[0]
    kinds = _stage_of(sd, "encoder.downsamples.")
    if sorted(kinds) != list(range(len(kinds))):
        raise CheckpointMismatch(f"{where}: encoder.downsamples indices are not contiguous: {sorted(kinds)}")
    resamples = [i for i in sorted(kinds) if kinds[i] == "resample"]
    num_res = resamples[0] if resamples else len(kinds)
    n_stages = len(resamples) + 1
    dim_mult = []
    for s in range(n_stages):
        out_ch = sd[f"encoder.downsamples.{s * (num_res + 1)}.residual.2.weight"].shape[0]
        if out_ch % base_dim:
            raise CheckpointMismatch(f"{where}: stage {s} width {out_ch} is not a multiple of base dim {base_dim}")
        dim_mult.append(out_ch // base_dim)
    return VAEParams(base_dim=base_dim, z_dim=z_dim, dim_mult=tuple(dim_mult), num_res_blocks=num_res)


def infer_temporal_downsample(sd: dict[str, torch.Tensor]) -> tuple[bool, ...]:
    """Which encoder downsamples are 3-D (carry a time_conv): (False, True, True) in the release."""
    kinds = _stage_of(sd, "encoder.downsamples.")
    return tuple(f"encoder.downsamples.{i}.time_conv.weight" in sd for i in sorted(kinds) if kinds[i] == "resample")


def load_vae(
    path: str | os.PathLike, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> WanVAE:
    """Load a Wan 2.1 / Qwen-Image VAE file (bare keys or an AIO file's `first_stage_model.`), strictly.

    dtype None keeps the file's dtype (bf16 for the release); the VAE computes in its weights' dtype.
    """
    path = Path(path)
    sd = _read_as(VAE_FILE, path, cast=dtype)
    params = infer_vae_params(sd, str(path))
    with torch.device("meta"):
        vae = WanVAE(params, infer_temporal_downsample(sd))
    load_into(vae, sd, path, "Wan 2.1 VAE", device=device, dtype=dtype)
    return vae.eval()
