"""The Wan 2.1 / Qwen-Image VAE: parity with diffusers, ComfyUI's golden images, fast paths, tiling, loading, errors."""

import inspect
import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rdbt_cli.config import TINY_VAE, VAEParams
from rdbt_cli.engine import (
    WanVAE,
    infer_temporal_downsample,
    infer_vae_params,
    latent_to_vae,
    load_vae,
    to_uint8,
    vae_to_latent,
)
from rdbt_cli.errors import CheckpointError, CheckpointMismatch
from rdbt_cli.tiny import tiny_vae_state_dict, write_tiny_vae
from tests.conftest import shared_path

# anima.md §6.4 (the logic of diffusers' convert_anima_to_diffusers.py), written as one table.
_DIFFUSERS_RENAMES = [
    (r"^conv1\.", "quant_conv."),
    (r"^conv2\.", "post_quant_conv."),
    (r"^(encoder|decoder)\.conv1\.", r"\1.conv_in."),
    (r"^encoder\.downsamples\.", "encoder.down_blocks."),
    (r"\.middle\.0\.", ".mid_block.resnets.0."),
    (r"\.middle\.1\.", ".mid_block.attentions.0."),
    (r"\.middle\.2\.", ".mid_block.resnets.1."),
    (r"\.head\.0\.", ".norm_out."),
    (r"\.head\.2\.", ".conv_out."),
    (r"\.residual\.0\.", ".norm1."),
    (r"\.residual\.2\.", ".conv1."),
    (r"\.residual\.3\.", ".norm2."),
    (r"\.residual\.6\.", ".conv2."),
    (r"\.shortcut\.", ".conv_shortcut."),
]


def _decoder_index(m: re.Match) -> str:
    k = int(m[1])  # 4 entries per stage: 3 res blocks then the upsampler (at 3, 7, 11)
    return f"decoder.up_blocks.{k // 4}." + ("upsamplers.0." if k % 4 == 3 else f"resnets.{k % 4}.")


def to_diffusers(sd):
    out = {}
    for key, value in sd.items():
        key = re.sub(r"^decoder\.upsamples\.(\d+)\.", _decoder_index, key)
        for pattern, repl in _DIFFUSERS_RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


@pytest.fixture(scope="module")
def tiny_sd():
    return {k: v.float() for k, v in tiny_vae_state_dict(TINY_VAE, seed=3).items()}


@pytest.fixture(scope="module")
def vae(tiny_sd):
    model = WanVAE(infer_vae_params(tiny_sd))
    model.load_state_dict(tiny_sd, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def oracle(tiny_sd):
    from diffusers import AutoencoderKLQwenImage

    ref = AutoencoderKLQwenImage(base_dim=TINY_VAE.base_dim, z_dim=TINY_VAE.z_dim)
    ref.load_state_dict(to_diffusers(tiny_sd), strict=True)
    return ref.eval()


def _latent(h=8, w=6, seed=0, b=1):
    return 2.0 * torch.randn(b, 16, 1, h, w, generator=torch.Generator().manual_seed(seed))


def _image(h=64, w=48, seed=0):
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


# --- parity with diffusers.AutoencoderKLQwenImage ------------------------------------------------------------------


def test_decode_matches_diffusers(vae, oracle):
    z = _latent(8, 6)  # non-square, so a swapped H/W shows
    ours = vae.decode(z)
    with torch.no_grad():
        ref = (oracle.decode(z).sample[:, :, 0] + 1.0) / 2.0  # diffusers clamps to [-1, 1] first: same image
    assert ours.shape == (1, 3, 64, 48) and ours.dtype == torch.float32
    assert (ours - ref).abs().max().item() <= 1e-4


def test_encode_matches_diffusers(vae, oracle):
    img = _image(64, 48)
    ours = vae.encode(img)
    with torch.no_grad():
        ref = oracle.encode((img * 2 - 1).unsqueeze(2)).latent_dist.mode()
    assert ours.shape == (1, 16, 1, 8, 6)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_latent_constants_match_diffusers_defaults():
    from diffusers import AutoencoderKLQwenImage

    params = inspect.signature(AutoencoderKLQwenImage.__init__).parameters
    zeros = torch.zeros(2, 16, 1, 3, 3)
    ones = torch.ones(2, 16, 1, 3, 3)
    mean = latent_to_vae(zeros)[0, :, 0, 0, 0]
    std = latent_to_vae(ones)[0, :, 0, 0, 0] - mean
    assert torch.allclose(mean, torch.tensor(params["latents_mean"].default), atol=1e-6)
    assert torch.allclose(std, torch.tensor(params["latents_std"].default), atol=1e-6)
    x = torch.randn(2, 16, 1, 3, 3)
    assert torch.allclose(vae_to_latent(latent_to_vae(x)), x, atol=1e-5)
    assert latent_to_vae(x.bfloat16()).dtype == torch.float32


# --- fast path, tiling, round trip ------------------------------------------------------------------------------------


def test_2d_fast_path_equals_3d(vae):
    z = _latent(8, 6, seed=1, b=2)
    assert (vae.decode(z, path="2d") - vae.decode(z, path="3d")).abs().max().item() <= 1e-5
    img = _image(48, 64, seed=1)
    assert (vae.encode(img, path="2d") - vae.encode(img, path="3d")).abs().max().item() <= 1e-5


def test_batch_items_are_independent(vae):
    z = _latent(6, 6, seed=2, b=2)
    both = vae.decode(z)
    assert (both[1:] - vae.decode(z[1:])).abs().max().item() <= 1e-5


def test_tiled_blending_is_exact_for_a_local_decoder(vae, monkeypatch):
    # A pixel-local stand-in decoder isolates the tiling: placement and weights must reproduce it with no seams.
    def local(z, path):
        return torch.tanh(z[:, :3, 0]).repeat_interleave(8, -1).repeat_interleave(8, -2)

    monkeypatch.setattr(vae, "_decode_raw", local)
    z = _latent(13, 17, seed=3)
    untiled = vae.decode(z, tiled=False)
    for tile, overlap in [(8, 2), (6, 3), (5, 0)]:
        assert (vae.decode_tiled(z, tile=tile, overlap=overlap) - untiled).abs().max().item() <= 1e-6


def test_tiled_decode_close_to_untiled(vae):
    z = _latent(12, 12, seed=4)
    untiled = vae.decode(z, tiled=False)
    tiled = vae.decode(z, tiled=True, tile=8, overlap=4)
    diff = (tiled - untiled).abs()
    # Not exact: the mid-block attention is global and the decoder's receptive field (~17 latent cells) is wider
    # than a tile, so each tile sees less context. Measured on this random tiny VAE: mean 0.026, max 0.22 on an image
    # whose std is 0.145; random weights make the attention far less local than a trained VAE's. A misplaced or
    # unblended tile gives a mean of order the image std (~0.15), so these bounds still catch tiling bugs.
    assert diff.mean().item() < 0.05
    assert diff.max().item() < 0.4
    # a tile covering the whole latent is the untiled decode
    assert (vae.decode_tiled(z, tile=12, overlap=4) - untiled).abs().max().item() <= 1e-6


def test_decode_picks_tiling_from_memory(vae, monkeypatch):
    import rdbt_cli.engine as ev

    calls = []
    real = WanVAE.decode_tiled
    monkeypatch.setattr(WanVAE, "decode_tiled", lambda self, z, **kw: calls.append(kw) or real(self, z, **kw))
    z = _latent(6, 6, seed=5)
    vae.decode(z)
    assert calls == []  # plenty of memory for a 48x48 image
    monkeypatch.setattr(ev, "_available_bytes", lambda device: vae.estimate_decode_bytes(z) // 2)
    vae.decode(z, tile=4, overlap=1)
    assert len(calls) == 1 and calls[0]["tile"] == 4
    vae.decode(z, tiled=False)  # forced off despite the estimate
    assert len(calls) == 1


def test_round_trip_shapes_and_crop(vae):
    img = _image(70, 45, seed=6)  # not multiples of 8: centre-cropped to 64x40
    z = vae.encode(img)
    assert z.shape == (1, 16, 1, 8, 5) and z.dtype == torch.float32 and torch.isfinite(z).all()
    assert torch.equal(z, vae.encode(img[:, :, 3:67, 2:42]))
    out = vae.decode(z)
    assert out.shape == (1, 3, 64, 40) and torch.isfinite(out).all()
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.equal(z, vae.encode(_image(70, 45, seed=7)))


def test_bf16_weights_compute_in_bf16_and_return_fp32(tiny_sd):
    model = WanVAE(TINY_VAE).to(torch.bfloat16)
    model.load_state_dict(tiny_sd)
    assert model.dtype == torch.bfloat16
    z = _latent(3, 3)
    out = model.decode(z)
    assert out.dtype == torch.float32
    ref = WanVAE(TINY_VAE)
    ref.load_state_dict(tiny_sd)
    assert (out - ref.decode(z)).abs().mean().item() < 0.05


def test_to_uint8_truncates_in_float32():
    x = torch.tensor([0.0, 0.5, 0.999, 1.0, 1.5, -0.2]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    out = to_uint8(x)
    assert out.shape == (1, 1, 6, 3) and out.dtype == np.uint8
    assert out[0, 0, :, 0].tolist() == [0, 127, 254, 255, 255, 0]
    # truncation, not rounding: about half of random values would round up
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    got = to_uint8(x)
    prod = np.float32(255.0) * x.permute(0, 2, 3, 1).numpy()
    assert np.array_equal(got, np.floor(prod).astype(np.uint8))
    assert (got != np.round(prod)).mean() > 0.3


# --- the golden ComfyUI outputs ---------------------------------------------------------------------------------------


def _golden_cases():
    cases = json.loads(shared_path("golden", "cases.json").read_text())["cases"]
    return [c["id"] for c in cases]


@pytest.fixture(scope="module")
def golden_vae():
    return load_vae(shared_path("golden", "models", "vae", "qwen_image_vae_tiny.safetensors"), dtype=torch.float32)


def test_golden_decodes(golden_vae):
    from PIL import Image

    ids = _golden_cases()
    assert ids
    for case in ids:
        z = torch.from_numpy(np.load(shared_path("golden", "latents", f"{case}.npy")))
        ref = np.load(shared_path("golden", "images_float", f"{case}.npy"))
        png = np.asarray(Image.open(shared_path("golden", "images", f"{case}.png")).convert("RGB"))
        img = golden_vae.decode(z)
        assert np.abs(img[0].permute(1, 2, 0).numpy() - ref).max() <= 1e-3, case
        assert np.abs(to_uint8(img)[0].astype(int) - png).max() <= 1, case
        # ComfyUI's own float image quantises to its PNG exactly
        assert np.array_equal(to_uint8(torch.from_numpy(ref).permute(2, 0, 1)[None])[0], png), case


def test_golden_file_loads_strictly_with_time_conv(golden_vae):
    from safetensors.torch import load_file

    path = shared_path("golden", "models", "vae", "qwen_image_vae_tiny.safetensors")
    file_sd = load_file(str(path))
    ours = golden_vae.state_dict()
    assert ours.keys() == file_sd.keys()
    key = "decoder.upsamples.3.time_conv.weight"
    assert torch.equal(ours[key], file_sd[key].float())
    assert golden_vae.params == infer_vae_params(file_sd)


# --- loading, config inference, bad files -----------------------------------------------------------------------------


def test_tiny_vae_round_trips_strictly(tmp_path):
    path = write_tiny_vae(tmp_path / "vae.safetensors")
    sd = tiny_vae_state_dict()
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    model = load_vae(path)
    assert model.dtype == torch.bfloat16
    assert model.state_dict().keys() == sd.keys()
    assert all(torch.equal(model.state_dict()[k], sd[k]) for k in sd)
    assert any(".time_conv." in k for k in sd)
    gammas = torch.cat([v.float().flatten() for k, v in sd.items() if k.endswith("gamma")])
    assert 0.05 < gammas.std().item() < 0.15  # 1 + 0.1·N, so a missing norm weight shows


@pytest.mark.parametrize(
    "params",
    [
        VAEParams(base_dim=8),
        VAEParams(base_dim=8, z_dim=4, dim_mult=(1, 2, 2), num_res_blocks=1),
        VAEParams(base_dim=4, dim_mult=(1, 3), num_res_blocks=3),
    ],
)
def test_config_inference(params, tmp_path):
    sd = tiny_vae_state_dict(params, seed=1)
    assert infer_vae_params(sd) == params
    n = len(params.dim_mult) - 1
    assert infer_temporal_downsample(sd) == tuple(i > 0 for i in range(n))
    model = load_vae(write_tiny_vae(tmp_path / "v.safetensors", params), dtype=torch.float32)
    assert model.params == params
    out = model.decode(torch.randn(1, params.z_dim, 1, 2, 3))
    scale = 2**n
    assert out.shape == (1, 3, 2 * scale, 3 * scale)


def test_aio_prefix_is_accepted(tmp_path):
    sd = {f"first_stage_model.{k}": v for k, v in tiny_vae_state_dict().items()}
    sd.update({f"model.diffusion_model.blocks.{i}.mlp.layer1.weight": torch.zeros(2, 2) for i in range(300)})
    save_file(sd, str(tmp_path / "aio.safetensors"))
    model = load_vae(tmp_path / "aio.safetensors")
    assert model.params == TINY_VAE


def _write(tmp_path, name, sd):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def test_missing_and_truncated_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_vae(tmp_path / "nope.safetensors")
    good = write_tiny_vae(tmp_path / "good.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated") as err:
        load_vae(cut)
    assert str(cut) in str(err.value)


@pytest.mark.parametrize(
    "keys, says",
    [
        ([f"net.blocks.{i}.mlp.layer1.weight" for i in range(8)] + ["net.llm_adapter.embed.weight"], "DiT"),
        (["decoder.middle.0.residual.0.gamma", "decoder.upsamples.0.upsamples.0.residual.2.weight"], "Wan 2.2"),
        (["decoder.mid.block_1.norm1.weight", "encoder.conv_in.weight", "decoder.up.0.block.0.conv1.weight"], "SDXL"),
        (["decoder.mid_block.resnets.0.norm1.gamma", "decoder.conv_in.weight"], "diffusers"),
        ([f"model.layers.{i}.self_attn.q_norm.weight" for i in range(8)], "text encoder"),
    ],
)
def test_other_models_are_refused(tmp_path, keys, says):
    path = _write(tmp_path, "other.safetensors", {k: torch.zeros(2) for k in keys})
    with pytest.raises(CheckpointError, match=says) as err:
        load_vae(path)
    assert str(path) in str(err.value)


def test_damaged_wan21_file_is_a_mismatch(tmp_path):
    sd = tiny_vae_state_dict()
    del sd["decoder.upsamples.7.time_conv.weight"]
    sd["decoder.head.2.bias"] = torch.zeros(4, dtype=torch.bfloat16)
    path = _write(tmp_path, "broken.safetensors", sd)
    with pytest.raises(CheckpointMismatch) as err:
        load_vae(path)
    msg = str(err.value)
    assert str(path) in msg and "decoder.upsamples.7.time_conv.weight" in msg and "decoder.head.2.bias" in msg
