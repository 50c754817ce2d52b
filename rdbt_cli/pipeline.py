"""The whole data flow (text-to-image, img2img, inpainting, hires fix), and the only module that knows it.

Models.load reads the three networks and the tokenizers once; encode() turns a prompt into the DiT's cross-attention
context once per prompt; generate() samples and decodes one image per seed. Each step is one ComfyUI node or two:
LoadImage -> ImageScale lanczos -> VAEEncode (SetLatentNoiseMask / VAEEncodeForInpaint) -> KSampler ->
(LatentUpscaleBy, or VAEDecode -> ImageScaleBy -> VAEEncode) -> KSampler -> VAEDecode. Library code: never prints,
reports through callbacks, raises RdbtError subclasses.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rdbt_cli import engine, images, sampling, settings, text
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


def report(callback, stage: str, **info) -> None:
    """Tell the progress display that a stage begins: {"stage": name, ...}. Sampler steps come as the samplers' own
    dicts ({"i": step, ...}) between a "sample" stage and the next one."""
    if callback is not None:
        callback({"stage": stage, **info})


def _loading(callback, part: str, path) -> None:
    try:
        size = os.path.getsize(path)
    except OSError:
        size = None
    report(callback, "load", part=part, file=Path(path).name, bytes=size)


def compile_blocks(dit) -> None:
    """torch.compile each DiT block in place (`--compile`): the first step pays for compiling, later steps run faster
    on a GPU. LoRA merges change the weights in place, which compiled blocks read as they are."""
    for i, block in enumerate(dit.blocks):
        dit.blocks[i] = torch.compile(block)


def emulated_bf16(dt: torch.dtype, device: torch.device) -> bool:
    """bf16 on a CPU that has no bf16 instructions: PyTorch emulates it, several times slower than fp32 for the DiT's
    matrix products and tens of times slower for the VAE's convolutions (bench/cpu_dtype.py)."""
    return dt == torch.bfloat16 and device.type == "cpu" and not cpu_has_native_bf16()


def vae_dtype(dt: torch.dtype, device: torch.device) -> torch.dtype:
    # The Wan VAE overflows in fp16, and emulated bf16 convolutions take minutes for one decode: both decode in fp32.
    return torch.float32 if dt == torch.float16 or emulated_bf16(dt, device) else dt


def dtype_warning(dt: torch.dtype, device: torch.device) -> str | None:
    """What to tell a user who asked for a dtype this device only emulates."""
    if not emulated_bf16(dt, device):
        return None
    return ("this CPU has no bf16 instructions (AVX512-BF16 or AMX), so --dtype bf16 is emulated: each DiT step takes "
            "several times as long as with fp32 (the VAE decodes in fp32); --dtype auto, fp32 here, is faster, bf16 "
            "only halves the DiT's memory")


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
        attention: str = "sdpa", compile: bool = False, callback=None,
    ) -> "Models":
        """low_vram: the text encoder stays on the CPU (it runs in fp32 there, as in ComfyUI, once per prompt), the
        DiT's blocks are streamed from host memory one at a time on a GPU, and the VAE always decodes in tiles.
        `callback` hears a "load" stage before each file."""
        dev = resolve_device(device)
        dt, _ = resolve_dtype(dtype, dev)
        engine.set_attention_backend(attention)
        t0 = time.perf_counter()
        _loading(callback, "tokenizers", paths.qwen_tokenizer)
        tok = text.PromptTokenizer.from_files(paths.qwen_tokenizer, paths.t5_tokenizer)
        _loading(callback, "text encoder", paths.text_encoder)
        te = engine.load_text_encoder(paths.text_encoder, device="cpu" if low_vram else dev)
        _loading(callback, "DiT", paths.dit)
        dit = load_dit_for(paths.dit, dev, dtype, low_vram)
        if compile:
            compile_blocks(dit)
        _loading(callback, "VAE", paths.vae)
        vae = engine.load_vae(paths.vae, device=dev, dtype=vae_dtype(dt, dev))
        eng = cls(dit=dit, text_encoder=te, vae=vae, tokenizer=tok, device=dev, dtype=dt, paths=paths,
                  low_vram=low_vram)
        eng.timings["load_s"] = time.perf_counter() - t0
        return eng

    @property
    def weights_fp8(self) -> bool:
        """Whether DiT weights are stored fp8 (recorded: a LoRA merged into fp8 weights is requantised)."""
        return any(p.dtype in engine.FP8_DTYPES for p in self.dit.parameters())

    def set_loras(self, loras: list[tuple[Path, float]], *, allow_unmatched: bool = False, remap: str = "refuse"):
        """Undo the previous stack (exactly) and merge this one; no reload. Returns the Patch (or None). `remap`:
        how 28-block LoRAs meet a deeper DiT (lora.apply_loras)."""
        from rdbt_cli import lora

        if self.patch is not None:
            self.patch.undo()
            self.patch = None
        self._contexts.clear()  # a LoRA on the adapter or the text encoder changes every context
        if loras:
            files = [(lora.parse_lora_file(p), w) for p, w in loras]
            self.patch = lora.apply_loras(
                {"dit": self.dit, "te": self.text_encoder}, files, allow_unmatched=allow_unmatched, remap=remap
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


def nag_guidance(eng: Models, gen) -> sampling.NAGGuidance | None:
    """KSamplerWithNAG's guidance for `gen`: the negative prompt's context (encoded like the prompt), off at a NAG
    scale of 1 or less, as the node switches itself off there."""
    if not gen.nag_scale or gen.nag_scale <= 1:
        return None
    return sampling.NAGGuidance(eng.encode(gen.negative), engine.NAG(gen.nag_scale, gen.nag_tau, gen.nag_alpha),
                                gen.nag_sigma_start, gen.nag_sigma_end)


@torch.inference_mode()
def generate(eng: Models, gen, *, seed: int, index: int = 0, callback=None) -> Result:
    """Make one image for `seed` with fully resolved `gen` (ComfyUI's KSampler + VAEDecode + SaveImage path)."""
    t0 = time.perf_counter()
    report(callback, "text")
    cond = eng.encode(gen.prompt)
    uncond = None if math.isclose(gen.cfg, 1.0) else eng.encode(gen.negative or "")
    nag = nag_guidance(eng, gen)
    _sync(eng.device)
    t_text = time.perf_counter()
    # The input latent (VAE space) and its noise mask at pixel resolution: an empty latent and none for txt2img.
    z, noise_mask = encode_input(eng, gen) if gen.init_image else (empty_latent(gen.width, gen.height), None)
    denoiser = sampling.CFGDenoiser(eng.dit, cond, uncond, gen.cfg, nag=nag)
    first_step = {}
    report(callback, "sample")

    def on_step(info):
        if "t" not in first_step:
            _sync(eng.device)
            first_step["t"] = time.perf_counter()
        if callback is not None:
            callback(info)

    z = ksample(denoiser, z, noise_mask, device=eng.device, seed=seed, sampler=gen.sampler, scheduler=gen.scheduler,
                steps=gen.steps, denoise=gen.denoise if gen.init_image else 1.0, shift=gen.shift, callback=on_step)
    _sync(eng.device)
    t_sample = time.perf_counter()
    hires_s = {}
    if gen.hires:
        report(callback, "upscale")
        z, noise_mask = upscale(eng, z, noise_mask, settings.hires_size(gen.width, gen.height, gen.hires),
                                gen.hires_upscaler)
        report(callback, "hires")
        z = ksample(denoiser, z, noise_mask, device=eng.device, seed=seed, sampler=gen.hires_sampler or gen.sampler,
                    scheduler=gen.hires_scheduler or gen.scheduler, steps=gen.hires_steps or gen.steps,
                    denoise=gen.hires_denoise, shift=gen.shift, callback=on_step)
        _sync(eng.device)
        hires_s["hires_s"] = time.perf_counter() - t_sample  # upscale and second pass
        t_sample = time.perf_counter()
    report(callback, "decode")
    img = eng.vae.decode(z, tiled=True if eng.low_vram else None)
    pixels = engine.to_uint8(img)[0]
    t_end = time.perf_counter()
    timings = {
        "text_s": t_text - t0,
        "first_step_s": first_step.get("t", t_sample) - t0,
        "sample_s": t_sample - t_text - hires_s.get("hires_s", 0.0),
        **hires_s,
        "decode_s": t_end - t_sample,
        "total_s": t_end - t0,
        "first_step_at": first_step.get("t", t_sample),  # perf_counter() when the first step finished
    }
    return Result(image=pixels, latent=z.cpu(), seed=seed, index=index, timings=timings)


# ---------------------------------------------------------------------------------------------------------------------
# The steps of generate(), one ComfyUI node (or two) each. Latents are VAE space [1, 16, 1, h, w] float32, as ComfyUI's
# LATENT; noise masks are pixel resolution [1, 1, H, W], 1 = repaint, as its LATENT's noise_mask.


def empty_latent(width: int, height: int) -> torch.Tensor:
    """EmptyLatentImage."""
    return torch.zeros(1, 16, 1, height // engine.VAE_SCALE, width // engine.VAE_SCALE)


def _pixels(eng: Models, array) -> torch.Tensor:
    # uint8 [H, W, 3] -> [1, 3, H, W] float32 in [0, 1] on the VAE's device (LoadImage: uint8 / 255)
    return (torch.from_numpy(array.copy()).float() / 255.0).permute(2, 0, 1).unsqueeze(0).to(eng.vae.device)


def encode_input(eng: Models, gen) -> tuple[torch.Tensor, torch.Tensor | None]:
    """LoadImage -> ImageScale lanczos (when its size is not the size) -> VAEEncode, and with a mask LoadImageMask ->
    SetLatentNoiseMask (blend) or VAEEncodeForInpaint (fill)."""
    array = images.read_image(gen.init_image)
    if array.shape[:2] != (gen.height, gen.width):
        array = images.lanczos(array, gen.width, gen.height)
    pixels = _pixels(eng, array)
    if not gen.mask:
        return eng.vae.encode(pixels), None
    mask = torch.from_numpy(images.read_mask(gen.mask))[None, None]
    if gen.inpaint == "blend":
        return eng.vae.encode(pixels), mask  # SetLatentNoiseMask keeps the mask as loaded
    # VAEEncodeForInpaint: the mask bilinear to the pixels, grown by a max filter over grow x grow pixels (an even
    # size looks one pixel further up-left than down-right, as ComfyUI's conv2d padding does), and the pixels under
    # the un-grown mask set to grey before encoding.
    mask = torch.nn.functional.interpolate(mask, size=pixels.shape[-2:], mode="bilinear")
    grown = mask
    if gen.grow_mask:
        g = gen.grow_mask
        grown = torch.nn.functional.conv2d(mask.round(), torch.ones(1, 1, g, g), padding=math.ceil((g - 1) / 2))
        grown = grown.clamp(0, 1)[..., : mask.shape[-2], : mask.shape[-1]]
    keep = (1.0 - mask.round()).to(pixels.device)
    return eng.vae.encode((pixels - 0.5) * keep + 0.5), grown.round()


def ksample(denoiser, z: torch.Tensor, noise_mask, *, device: torch.device, seed: int, sampler: str, scheduler: str,
            steps: int, denoise: float, shift: float, callback=None) -> torch.Tensor:
    """KSampler on the VAE-space latent z: ComfyUI's sigmas for `denoise`, its noise on the (normalised) latent and,
    with a noise mask, the input restored outside the mask at every step. Returns the VAE-space result."""
    sigmas = sampling.get_sigmas(scheduler, steps, shift=shift, denoise=denoise).to(device)
    if len(sigmas) == 0:
        return z
    # An empty latent stays zeros; any other is normalised into model space (ComfyUI CFGGuider.inner_sample).
    latent = engine.vae_to_latent(z) if torch.count_nonzero(z) else z.float()
    latent = latent.to(device)
    # Noise from a CPU generator: the same seed gives the same starting point on any device, as in ComfyUI.
    noise = sampling.initial_noise(seed, latent.shape).to(device)
    model = denoiser
    if noise_mask is not None:
        model = sampling.MaskedDenoiser(denoiser, sampling.latent_mask(noise_mask, latent.shape).to(device), noise,
                                        latent)
    x = sampling.noise_scaling(sigmas[0], noise, latent)
    x = sampling.sample(sampler, model, x, sigmas, seed=seed, callback=callback, shift=shift)
    return engine.latent_to_vae(x.float())


def upscale(eng: Models, z: torch.Tensor, noise_mask, size: tuple[int, int], upscaler: str):
    """The hires upscale to size (W, H): LatentUpscaleBy nearest-exact on the latent, whose noise mask (if any) goes
    along as in ComfyUI; or VAEDecode -> ImageScaleBy lanczos (8-bit, Pillow) -> VAEEncode, which has none."""
    w, h = size
    if upscaler == "latent":
        up = torch.nn.functional.interpolate(z[:, :, 0], size=(h // engine.VAE_SCALE, w // engine.VAE_SCALE),
                                             mode="nearest-exact")
        return up.unsqueeze(2), noise_mask
    decoded = eng.vae.decode(z, tiled=True if eng.low_vram else None)
    array = images.lanczos(engine.to_uint8(decoded)[0], w, h)
    return eng.vae.encode(_pixels(eng, array)), None
