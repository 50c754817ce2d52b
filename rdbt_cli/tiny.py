"""The embedded tiny model: deterministic random checkpoints in the released key layouts and rdbt's own tokenizers.

Used by `--model tiny` and the tests. Weights follow the golden README's recipe: linear and conv weights
N(0, 1/fan_in), norm weights 1 + 0.1·N (not exactly 1, so a swapped or missing norm shows), biases 0.05·N, embeddings
N(0, 1), stored bf16 like the released files. Nothing comes from the real vocabularies: the tokenizers are built from
a short corpus written below, their vocabularies fit config.TINY_QWEN / TINY_ADAPTER, and both fall back to bytes so
any Unicode prompt encodes. Every build is byte-for-byte the same.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from rdbt_cli.config import TINY_ADAPTER, TINY_DIT, TINY_QWEN, TINY_VAE, AdapterParams, DiTParams, QwenParams, VAEParams
from rdbt_cli.text import QWEN_PAD, QWEN_SPLIT_PATTERN, T5_EOS

# torch and the engine are imported by the functions that build weights: once the tiny model exists,
# ensure_tiny_models only names its files, so planning a tiny job (and `rdbt gen` through a server) stays torch-free.
if TYPE_CHECKING:
    import torch


def _random_weights(module: torch.nn.Module, seed: int, prefix: str = "", norm_base=lambda key: 1.0) -> dict:
    """Random tensors for every key of `module` (built on the meta device), under `prefix`, bf16."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, meta in module.state_dict().items():
        noise = torch.randn(meta.shape, generator=g, dtype=torch.float32)
        if key.endswith(".bias"):
            w = 0.05 * noise
        elif key.endswith(".gamma") or meta.ndim == 1:
            w = norm_base(key) + 0.1 * noise
        elif key.endswith(("embed.weight", "embed_tokens.weight")):
            w = noise
        else:
            w = noise / math.sqrt(math.prod(meta.shape[1:]))
        sd[prefix + key] = w.to(torch.bfloat16).contiguous()
    return sd


def _save(sd: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file(sd, str(path))
    return path


def tiny_dit_state_dict(
    dit: DiTParams = TINY_DIT, adapter: AdapterParams = TINY_ADAPTER, seed: int = 0, prefix: str = "net."
) -> dict[str, torch.Tensor]:
    """A random Anima DiT + LLM adapter with the released keys under `prefix` (`net.` as released)."""
    import torch

    from rdbt_cli.engine import AnimaDiT

    with torch.device("meta"):
        model = AnimaDiT(dit, adapter)
    # The DiT's cross-attention q/k norms near 2 make a random text signal strong enough to test (as in the goldens).
    return _random_weights(
        model, seed, prefix, lambda k: 2.0 if ".cross_attn." in k and not k.startswith("llm_adapter.") else 1.0
    )


def tiny_qwen_state_dict(params: QwenParams = TINY_QWEN, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random Qwen3 text encoder in the released layout (`model.` keys)."""
    import torch

    from rdbt_cli.engine import Qwen3Encoder

    with torch.device("meta"):
        model = Qwen3Encoder(params)
    return _random_weights(model, seed, "model.")


def tiny_vae_state_dict(params: VAEParams = TINY_VAE, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random Wan 2.1 VAE in the released layout (bare keys)."""
    import torch

    from rdbt_cli.engine import WanVAE

    with torch.device("meta"):
        model = WanVAE(params)
    return _random_weights(model, seed)


def write_tiny_dit(path: str | os.PathLike, **kw) -> Path:
    return _save(tiny_dit_state_dict(**kw), path)


def write_tiny_text_encoder(path: str | os.PathLike, params: QwenParams = TINY_QWEN, seed: int = 0) -> Path:
    return _save(tiny_qwen_state_dict(params, seed), path)


def write_tiny_vae(path: str | os.PathLike, params: VAEParams = TINY_VAE, seed: int = 0) -> Path:
    return _save(tiny_vae_state_dict(params, seed), path)


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------------------------

# Prompt-like words, tags and sentences: enough for a few hundred merges / pieces that make common prompts short.
_CORPUS = """
1girl 2girls 1boy solo multiple girls looking at viewer smile open mouth blush long hair short hair twintails
ponytail silver hair black hair blonde hair red eyes blue eyes green eyes school uniform serafuku dress shirt skirt
cherry blossoms outdoors indoors sky cloud night day sunset dusk city street village mountain river forest flower
masterpiece best quality high quality newest highres absurdres score_9 score_8_up score_7 rating:safe year 2024
worst quality low quality score_1 score_2 score_3 blurry jpeg artifacts sepia lowres bad anatomy watermark text
@artist @digital art anime illustration painting watercolor oil painting sketch lineart monochrome greyscale
a photo of a cat sitting on a wooden table next to a window, soft light, detailed background
a quiet mountain village at dusk, paper lanterns glowing along a stone path. soft watercolor style.
the girl is holding an umbrella in the rain while neon signs reflect on the wet street at night
portrait of a knight in shining armor standing in front of a castle, dramatic lighting, wide shot
close-up, upper body, full body, from above, from below, from side, dynamic angle, depth of field
hatsune miku (vocaloid), aqua hair, headphones, detached sleeves, necktie, thighhighs, microphone
embedding: lora: weight: 1.0 1.1 1.2 1.3 0.5 0.8 (masterpiece:1.2), ((smile)), [simple background]
and the of in on with at by for from to is are was were be been it this that these those an
"""


def _qwen_tokenizer():
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    specials = [QWEN_PAD, "<|im_start|>", "<|im_end|>"]
    # All 256 byte symbols are in the alphabet, so nothing is ever unknown; specials go last, as in Qwen's vocab.
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_QWEN.vocab_size - len(specials), min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
    )
    tok.train_from_iterator(_CORPUS.strip().splitlines(), trainer=trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


def _t5_pieces() -> list[tuple[str, float]]:
    # A hand-built Unigram vocabulary: T5's special ids (<pad> 0, </s> 1, <unk> 2), the 256 byte-fallback pieces,
    # single characters with and without the word marker, then the corpus words, scored by log frequency.
    words = Counter(w for line in _CORPUS.split("\n") for w in line.split())
    chars = sorted({c for c in _CORPUS if not c.isspace()} | set("abcdefghijklmnopqrstuvwxyz0123456789"))
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), (T5_EOS, 0.0), ("<unk>", 0.0)]
    pieces += [(f"<0x{b:02X}>", 0.0) for b in range(256)]
    pieces += [("▁", -3.0)] + [(c, -8.0) for c in chars] + [("▁" + c, -8.5) for c in chars]
    seen = {p for p, _ in pieces}
    total = sum(words.values())
    budget = TINY_ADAPTER.vocab_size - len(pieces)
    for w, n in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
        if budget <= 0:
            break
        piece = "▁" + w
        if piece not in seen and len(w) > 1:
            pieces.append((piece, round(math.log(n / total), 6)))
            seen.add(piece)
            budget -= 1
    return pieces


def _t5_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.Unigram(_t5_pieces(), unk_id=2, byte_fallback=True))
    # As T5's: normalise, strip the right end, collapse runs of spaces; Metaspace marks word starts.
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Strip(left=False, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.post_processor = processors.TemplateProcessing(single=f"$A {T5_EOS}", special_tokens=[(T5_EOS, 1)])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.add_special_tokens(["<pad>", T5_EOS, "<unk>"])
    return tok


def build_tiny_tokenizers(dest_dir: str | Path) -> tuple[Path, Path]:
    """Write <dest>/qwen/tokenizer.json and <dest>/t5/tokenizer.json (rdbt's layout); return their paths."""
    dest = Path(dest_dir)
    out = []
    for kind, tok in (("qwen", _qwen_tokenizer()), ("t5", _t5_tokenizer())):
        path = dest / kind / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(tok.to_str(pretty=True), encoding="utf-8")
        out.append(path)
    return out[0], out[1]


# Bump when any tiny generator changes, so cached copies from an older rdbt are rebuilt rather than reused.
TINY_VERSION = 2


def ensure_tiny_models(root: str | os.PathLike | None = None):
    """The embedded tiny model (DiT, text encoder, VAE, tokenizers) under user_dir()/tiny-vN, built once.

    Built in a temporary folder and renamed into place, so concurrent first runs (torchrun ranks) never see a half
    written model. Returns config.ModelPaths.
    """
    import shutil
    import tempfile
    from pathlib import Path

    from rdbt_cli.config import user_dir
    from rdbt_cli.config import ModelPaths

    root = Path(root) if root is not None else user_dir() / f"tiny-v{TINY_VERSION}"
    paths = ModelPaths(
        dit=root / "diffusion_models" / "anima_tiny.safetensors",
        text_encoder=root / "text_encoders" / "qwen3_tiny.safetensors",
        vae=root / "vae" / "wan21_vae_tiny.safetensors",
        qwen_tokenizer=root / "tokenizers" / "qwen" / "tokenizer.json",
        t5_tokenizer=root / "tokenizers" / "t5" / "tokenizer.json",
    )
    if all(Path(p).exists() for p in vars(paths).values()):
        return paths
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=root.parent))
    try:
        write_tiny_dit(tmp / "diffusion_models" / paths.dit.name)
        write_tiny_text_encoder(tmp / "text_encoders" / paths.text_encoder.name)
        write_tiny_vae(tmp / "vae" / paths.vae.name)
        build_tiny_tokenizers(tmp / "tokenizers")
        try:
            os.rename(tmp, root)
        except OSError:
            if not all(Path(p).exists() for p in vars(paths).values()):  # not another process winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths
