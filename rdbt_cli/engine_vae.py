"""VAE section of the engine: the Wan 2.1 / Qwen-Image VAE for single images (spec/anima.md §1.5, §4).

Written to be pasted into engine.py as one section; until then it imports the loading core from there. Module
attribute names are the original Wan 2.1 keys (`decoder.upsamples.3.resample.1`, `residual.0.gamma`, ...), so the
released file loads with a plain strict load_state_dict. Reference behaviour: ComfyUI comfy/ldm/wan/vae.py + sd.py.

Images are one frame (T = 1). The causal 3-D convolutions then reduce to 2-D convolutions with the last temporal tap
(the two frames in front are causal zero padding), which is the default `path="2d"`; `path="3d"` evaluates the real
padded conv3d and exists to prove the two agree.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rdbt_cli.config import VAEParams
from rdbt_cli.discovery import read_safetensors_header, strip_prefix
from rdbt_cli.engine import load_into, read_checkpoint
from rdbt_cli.errors import CheckpointError, CheckpointMismatch

# ---------------------------------------------------------------------------------------------------------------------
# VAE: Wan 2.1 / Qwen-Image
# ---------------------------------------------------------------------------------------------------------------------

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
VAE_PREFIXES = ("first_stage_model.",)  # AIO checkpoints (formats.md §1.3)
_WAN21_MARKER = "decoder.middle.0.residual.0.gamma"
_WAN22_MARKER = "decoder.upsamples.0.upsamples.0.residual.2.weight"


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


class RMS_norm(nn.Module):
    """x / ‖x‖₂ over channels · √C · γ (F.normalize, eps 1e-12); γ is [C,1,1,1] (volumes) or [C,1,1] (images)."""

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
            RMS_norm(cin), nn.SiLU(), CausalConv3d(cin, cout, 3, padding=1),
            RMS_norm(cout), nn.SiLU(), nn.Identity(), CausalConv3d(cout, cout, 3, padding=1),
        )  # fmt: skip
        self.shortcut = CausalConv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x) + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H·W positions of each frame (scale 1/√C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMS_norm(dim, images=True)
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
        self.head = nn.Sequential(RMS_norm(c), nn.SiLU(), CausalConv3d(c, z_out, 3, padding=1))

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
        self.head = nn.Sequential(RMS_norm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1))

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
        return torch.cuda.mem_get_info(device)[0]
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


def _not_wan21_reason(keys) -> str | None:
    """Why a (prefix-stripped) key set is not a Wan 2.1 VAE, in words a user can act on; None if it is one."""
    keys = set(keys)
    if _WAN22_MARKER in keys:
        return "this is a Wan 2.2 VAE (z 48); Anima needs the Wan 2.1 / Qwen-Image VAE qwen_image_vae.safetensors"
    if _WAN21_MARKER in keys:
        return None
    if any(k.endswith("blocks.0.mlp.layer1.weight") for k in keys):
        return "this is a diffusion model (DiT), not a VAE; give it as --model and qwen_image_vae.safetensors as --vae"
    if any(".self_attn.q_norm.weight" in k or k.startswith("model.layers.") for k in keys):
        return "this is a text encoder, not a VAE; pass it with --text-encoder"
    if "decoder.mid_block.resnets.0.norm1.gamma" in keys:
        return "this is a diffusers-format Qwen-Image VAE; use the original ComfyUI file qwen_image_vae.safetensors"
    if any(k.startswith(("decoder.mid.", "decoder.up.", "decoder.mid_block.")) for k in keys):
        return "this is an SD/SDXL/Flux-style VAE; Anima needs the Wan 2.1 / Qwen-Image VAE qwen_image_vae.safetensors"
    return "not a Wan 2.1 / Qwen-Image VAE (no decoder.middle.0.residual.0.gamma); use qwen_image_vae.safetensors"


def load_vae(
    path: str | os.PathLike, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> WanVAE:
    """Load a Wan 2.1 / Qwen-Image VAE file (bare keys or an AIO file's `first_stage_model.`), strictly.

    dtype None keeps the file's dtype (bf16 for the release); the VAE computes in its weights' dtype.
    """
    path = Path(path)
    header, _ = read_safetensors_header(path)
    prefix = strip_prefix(header.keys(), VAE_PREFIXES)
    reason = _not_wan21_reason(k[len(prefix) :] for k in header if k.startswith(prefix))
    if reason:
        raise CheckpointError(f"{path}: {reason}")
    sd, _ = read_checkpoint(path, VAE_PREFIXES)
    params = infer_vae_params(sd, str(path))
    with torch.device("meta"):
        vae = WanVAE(params, infer_temporal_downsample(sd))
    load_into(vae, sd, path, "Wan 2.1 VAE", device=device, dtype=dtype)
    return vae.eval()
