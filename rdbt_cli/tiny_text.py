"""The tiny text side of the embedded test model: rdbt's own small tokenizers and a random Qwen3 text encoder.

Nothing here comes from the real vocabularies. The tokenizers are built from a short corpus written below, so their
vocabularies fit config.TINY_QWEN / TINY_ADAPTER, and both fall back to bytes, so any Unicode prompt encodes. Every
build is byte-for-byte the same.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from rdbt_cli.config import TINY_ADAPTER, TINY_QWEN, QwenParams
from rdbt_cli.text import QWEN_PAD, QWEN_SPLIT_PATTERN, T5_EOS

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


def tiny_qwen_state_dict(params: QwenParams = TINY_QWEN, seed: int = 0) -> dict:
    """A random Qwen3 TE in the released layout (`model.` keys, bf16): linears N(0, 1/fan_in), norms 1 + 0.1·N."""
    import torch

    g = torch.Generator().manual_seed(seed)
    p = params

    def linear(out_f, in_f):
        return torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)

    def norm(n):
        return 1.0 + 0.1 * torch.randn(n, generator=g)

    sd = {"model.embed_tokens.weight": torch.randn(p.vocab_size, p.hidden_size, generator=g)}
    q, kv = p.num_heads * p.head_dim, p.num_kv_heads * p.head_dim
    for i in range(p.num_layers):
        pre = f"model.layers.{i}."
        sd[pre + "self_attn.q_proj.weight"] = linear(q, p.hidden_size)
        sd[pre + "self_attn.k_proj.weight"] = linear(kv, p.hidden_size)
        sd[pre + "self_attn.v_proj.weight"] = linear(kv, p.hidden_size)
        sd[pre + "self_attn.o_proj.weight"] = linear(p.hidden_size, q)
        sd[pre + "self_attn.q_norm.weight"] = norm(p.head_dim)
        sd[pre + "self_attn.k_norm.weight"] = norm(p.head_dim)
        sd[pre + "mlp.gate_proj.weight"] = linear(p.intermediate_size, p.hidden_size)
        sd[pre + "mlp.up_proj.weight"] = linear(p.intermediate_size, p.hidden_size)
        sd[pre + "mlp.down_proj.weight"] = linear(p.hidden_size, p.intermediate_size)
        sd[pre + "input_layernorm.weight"] = norm(p.hidden_size)
        sd[pre + "post_attention_layernorm.weight"] = norm(p.hidden_size)
    sd["model.norm.weight"] = norm(p.hidden_size)
    return {k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}


def write_tiny_text_encoder(path: str | Path, params: QwenParams = TINY_QWEN, seed: int = 0) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tiny_qwen_state_dict(params, seed), str(path))
    return path
