# ---------------------------------------------------------------------------------------------------------------------
# Qwen3 text encoder (Qwen3-0.6B-Base; ComfyUI comfy/text_encoders/llama.py Llama2_ with Qwen3_06BConfig, spec/anima.md
# §3.4). Runs in fp32 whatever the storage dtype, as ComfyUI does; the output is the last layer after the final norm.
# ---------------------------------------------------------------------------------------------------------------------

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rdbt_cli.config import QwenParams
from rdbt_cli.discovery import read_safetensors_header
from rdbt_cli.engine import Linear, load_into, read_checkpoint
from rdbt_cli.errors import CheckpointError

# Where the Qwen3 tensors sit in the files users have (formats.md §1.3, §1.7): the released TE (`model.`), ComfyUI's
# clip state dict, an all-in-one checkpoint, the `text_encoders.` name space, and bare keys.
QWEN_PREFIXES = (
    "model.",
    "qwen3_06b.transformer.model.",
    "cond_stage_model.qwen3_06b.transformer.model.",
    "text_encoders.qwen3_06b.transformer.model.",
    "",
)
# ComfyUI's TE detection key (comfy/sd.py detect_te_model), relative to the prefix.
_QWEN_MARKER = "layers.0.self_attn.q_norm.weight"


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Qwen3 uses the weight as stored (no 1 + w), computed in x's dtype (fp32).
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.to(x.dtype)


class QwenRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rms_norm(x, self.weight, self.eps)


class QwenEmbedding(nn.Embedding):
    """Token table kept in the file dtype; rows are gathered first, then upcast to fp32 (ComfyUI out_dtype=float32)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).float()


class QwenAttention(nn.Module):
    def __init__(self, p: QwenParams):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = p.num_heads, p.num_kv_heads, p.head_dim
        self.q_proj = Linear(p.hidden_size, p.num_heads * p.head_dim, bias=False)
        self.k_proj = Linear(p.hidden_size, p.num_kv_heads * p.head_dim, bias=False)
        self.v_proj = Linear(p.hidden_size, p.num_kv_heads * p.head_dim, bias=False)
        self.o_proj = Linear(p.num_heads * p.head_dim, p.hidden_size, bias=False)
        self.q_norm = QwenRMSNorm(p.head_dim, p.eps)
        self.k_norm = QwenRMSNorm(p.head_dim, p.eps)

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
        self.input_layernorm = QwenRMSNorm(p.hidden_size, p.eps)
        self.post_attention_layernorm = QwenRMSNorm(p.hidden_size, p.eps)

    def forward(self, x, cos, sin, bias):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, bias)
        return x + self.mlp(self.post_attention_layernorm(x))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


def _rope_tables(n: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    # Built per call (cheap next to the layers): modules come from the meta device, so no buffers to fill.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    freqs = torch.arange(n, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]  # (N, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (N, d): rotate-half pairing i <-> i + d/2
    return emb.cos(), emb.sin()


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
        self.embed_tokens = QwenEmbedding(p.vocab_size, p.hidden_size)
        self.layers = nn.ModuleList(QwenLayer(p) for _ in range(p.num_layers))
        self.norm = QwenRMSNorm(p.hidden_size, p.eps)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`mask` (B, N) of 1 = attend, 0 = padding (TokenizedPrompt.qwen_mask); None or all ones = plain causal."""
        x = self.embed_tokens(ids)  # (B, N, H) fp32
        cos, sin = _rope_tables(ids.shape[1], self.params.head_dim, self.params.rope_theta, ids.device)
        bias = None
        if mask is not None and not bool(mask.bool().all()):
            bias = qwen_attention_bias(mask.to(ids.device))
        for layer in self.layers:
            x = layer(x, cos, sin, bias)
        return self.norm(x)


def _count_indices(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    found = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    if found != set(range(len(found))):
        raise CheckpointError(f"layer indices are not contiguous: {sorted(found)}")
    return len(found)


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
        vocab_size=int(vocab), hidden_size=int(hidden), num_layers=_count_indices(sd, r"layers\.(\d+)\."),
        num_heads=int(q_rows) // int(head_dim), num_kv_heads=int(k_rows) // int(head_dim), head_dim=int(head_dim),
        intermediate_size=int(inter),
    )


def qwen_prefix(keys) -> str | None:
    """The prefix under which a file holds a Qwen3 TE, or None when it holds none."""
    keys = set(keys)
    for pre in QWEN_PREFIXES:
        if pre + _QWEN_MARKER in keys and pre + "embed_tokens.weight" in keys:
            return pre
    return None


def load_text_encoder(
    path: str | os.PathLike, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> Qwen3Encoder:
    """Load a Qwen3 text encoder (released TE, ComfyUI clip/AIO layouts, bare keys). `dtype` is the storage dtype;
    None keeps the file's (bf16 for the release). Compute is always fp32."""
    path = Path(path)
    header, _ = read_safetensors_header(path)
    prefix = qwen_prefix(header.keys())
    if prefix is None:
        raise CheckpointError(
            f"{path}: not a Qwen3 text encoder (no {QWEN_PREFIXES[0]}{_QWEN_MARKER}); "
            "pass the qwen_3_06b_base.safetensors text encoder"
        )
    sd, _ = read_checkpoint(path, (prefix,)) if prefix else read_checkpoint(path)
    try:
        params = infer_qwen_params(sd)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    with torch.device("meta"):
        model = Qwen3Encoder(params)
    load_into(model, sd, path, "Qwen3 text-encoder", device=device, dtype=dtype)
    return model.eval().requires_grad_(False)
