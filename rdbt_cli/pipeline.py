"""The whole text-to-image data flow, and the only module that knows it.

Models.load reads the three networks and the tokenizers once; encode() turns a prompt into the DiT's cross-attention
context once per prompt; generate() samples and decodes one image per seed. Library code: never prints, reports
through callbacks, raises RdbtError subclasses.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rdbt_cli import engine, sampling, text
from rdbt_cli.config import DTYPES, ModelPaths
from rdbt_cli.errors import ConfigError

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available to this torch build; use --device cpu")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX on this CPU (Linux /proc/cpuinfo; elsewhere assume not)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def load_dit_for(path, device: torch.device, dtype_name: str, low_vram: bool = False):
    """The DiT as `rdbt gen` runs it: `--dtype fp8` stores its linear weights fp8; `--low-vram` on a GPU keeps the
    blocks in host memory and streams them in one at a time."""
    dt, keep_fp8 = resolve_dtype(dtype_name, device)
    stream = low_vram and device.type == "cuda"
    storage = torch.float8_e4m3fn if dtype_name == "fp8" else dt
    dit = engine.load_dit(path, device="cpu" if stream else device, dtype=storage, keep_fp8=keep_fp8)
    if stream:
        dit.stream_blocks(device)
    return dit


def vae_dtype(dt: torch.dtype) -> torch.dtype:
    # The Wan VAE overflows in fp16, so an fp16 run decodes in fp32.
    return torch.float32 if dt == torch.float16 else dt


def resolve_dtype(name: str, device: torch.device) -> tuple[torch.dtype, bool]:
    """(compute dtype of the DiT and VAE, whether fp8 weights stay fp8 in memory)."""
    if name == "auto":
        if device.type == "cuda":
            return engine.half_dtype(device), True
        # bf16 where the CPU multiplies bf16 natively (DiT steps and VAE decodes about 2x faster than fp32 on an
        # AVX512-BF16 EPYC, bench/README.md); elsewhere fp32, which emulated bf16 would only slow down.
        return (torch.bfloat16 if cpu_has_native_bf16() else torch.float32), False
    if name == "fp8":
        return (engine.half_dtype(device) if device.type == "cuda" else torch.float32), True
    if name not in TORCH_DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    return TORCH_DTYPES[name], False


@dataclass
class Models:
    """The loaded networks and tokenizers of one load, and the LoRA stack merged into them."""

    dit: torch.nn.Module
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    tokenizer: text.PromptTokenizer
    device: torch.device
    dtype: torch.dtype
    paths: ModelPaths
    low_vram: bool = False
    timings: dict = field(default_factory=dict)
    patch: object = None
    _contexts: dict = field(default_factory=dict)

    @classmethod
    def load(
        cls, paths: ModelPaths, *, device: str = "auto", dtype: str = "auto", low_vram: bool = False,
        attention: str = "sdpa",
    ) -> "Models":
        """low_vram: the text encoder stays on the CPU (it runs in fp32 there, as in ComfyUI, once per prompt), the
        DiT's blocks are streamed from host memory one at a time on a GPU, and the VAE always decodes in tiles."""
        dev = resolve_device(device)
        dt, _ = resolve_dtype(dtype, dev)
        engine.set_attention_backend(attention)
        t0 = time.perf_counter()
        tok = text.PromptTokenizer.from_files(paths.qwen_tokenizer, paths.t5_tokenizer)
        te = engine.load_text_encoder(paths.text_encoder, device="cpu" if low_vram else dev)
        dit = load_dit_for(paths.dit, dev, dtype, low_vram)
        vae = engine.load_vae(paths.vae, device=dev, dtype=vae_dtype(dt))
        eng = cls(dit=dit, text_encoder=te, vae=vae, tokenizer=tok, device=dev, dtype=dt, paths=paths,
                  low_vram=low_vram)
        eng.timings["load_s"] = time.perf_counter() - t0
        return eng

    @property
    def weights_fp8(self) -> bool:
        """Whether DiT weights are stored fp8 (recorded: a LoRA merged into fp8 weights is requantised)."""
        return any(p.dtype in engine.FP8_DTYPES for p in self.dit.parameters())

    def set_loras(self, loras: list[tuple[Path, float]], *, allow_unmatched: bool = False):
        """Undo the previous stack (exactly) and merge this one; no reload. Returns the Patch (or None)."""
        from rdbt_cli import lora

        if self.patch is not None:
            self.patch.undo()
            self.patch = None
        self._contexts.clear()  # a LoRA on the adapter or the text encoder changes every context
        if loras:
            files = [(lora.parse_lora_file(p), w) for p, w in loras]
            self.patch = lora.apply_loras(
                {"dit": self.dit, "te": self.text_encoder}, files, allow_unmatched=allow_unmatched
            )
        return self.patch

    @torch.inference_mode()
    def encode(self, prompt: str) -> torch.Tensor:
        """Prompt → padded cross-attention context [1, S, D]; cached, so each prompt is encoded once per process."""
        if prompt not in self._contexts:
            tp = self.tokenizer.tokenize(prompt)
            te_device = self.text_encoder.embed_tokens.weight.device
            ids = torch.tensor([tp.qwen_ids], device=te_device)
            # ComfyUI masks <|endoftext|> tokens that lead or trail the real text; a no-op for ordinary prompts.
            mask = torch.tensor([tp.qwen_mask], device=te_device) if tp.qwen_mask else None
            hidden = self.text_encoder(ids, mask).to(self.device)
            t5 = torch.tensor([tp.t5_ids], device=self.device)
            w = torch.tensor([tp.t5_weights], device=self.device, dtype=torch.float32)
            self._contexts[prompt] = self.dit.encode_context(hidden, t5, w)
        return self._contexts[prompt]


@dataclass
class Result:
    image: "object"  # uint8 numpy [H, W, 3]
    latent: torch.Tensor  # the sampler's output in VAE space, float32 [1, 16, 1, h, w] (ComfyUI's LATENT)
    seed: int
    index: int
    timings: dict


def _sync(device: torch.device) -> None:
    # Timings on a GPU must wait for the queued work; one sync per phase, none inside the step loop after step 1.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate(eng: Models, gen, *, seed: int, index: int = 0, callback=None) -> Result:
    """Make one image for `seed` with fully resolved `gen` (ComfyUI's KSampler + VAEDecode + SaveImage path)."""
    t0 = time.perf_counter()
    cond = eng.encode(gen.prompt)
    uncond = None if math.isclose(gen.cfg, 1.0) else eng.encode(gen.negative or "")
    _sync(eng.device)
    t_text = time.perf_counter()
    sigmas = sampling.get_sigmas(gen.scheduler, gen.steps, shift=gen.shift).to(eng.device)
    shape = (1, 16, 1, gen.height // 8, gen.width // 8)
    # Noise from a CPU generator: the same seed gives the same starting point on any device, as in ComfyUI.
    x = sampling.prepare_latent(seed, torch.zeros(shape), sigmas).to(eng.device)
    denoiser = sampling.CFGDenoiser(eng.dit, cond, uncond, gen.cfg)
    first_step = {}

    def on_step(info):
        if "t" not in first_step:
            _sync(eng.device)
            first_step["t"] = time.perf_counter()
        if callback is not None:
            callback(info)

    x = sampling.sample(gen.sampler, denoiser, x, sigmas, seed=seed, callback=on_step, shift=gen.shift)
    _sync(eng.device)
    t_sample = time.perf_counter()
    z = engine.latent_to_vae(x.float())
    img = eng.vae.decode(z, tiled=True if eng.low_vram else None)
    pixels = engine.to_uint8(img)[0]
    t_end = time.perf_counter()
    timings = {
        "text_s": t_text - t0,
        "first_step_s": first_step.get("t", t_sample) - t0,
        "sample_s": t_sample - t_text,
        "decode_s": t_end - t_sample,
        "total_s": t_end - t0,
        "first_step_at": first_step.get("t", t_sample),  # perf_counter() when the first step finished
    }
    return Result(image=pixels, latent=z.cpu(), seed=seed, index=index, timings=timings)
